"""Probe a real GPU's NVML fields: the cost of each field read alone, the raw PCIe byte counters at a
fine cadence under PCIe load (width and wrap), and the raw values at the renumbered ids 251-253 and
269-271. Writes JSON to the path given."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time

import pynvml

from collector.nvml.fields import field_plan


def main(out_path: str) -> None:
    pynvml.nvmlInit()
    driver = pynvml.nvmlSystemGetDriverVersion()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    result: dict[str, object] = {"driver": driver}
    ids = sorted({s.field_id for s in field_plan(driver)} | {251, 252, 253, 254, 255, 256, 269, 270, 271, 91, 185})
    costs = {}
    for fid in ids:
        pynvml.nvmlDeviceGetFieldValues(h, [fid])
        t0 = time.process_time()
        w0 = time.perf_counter()
        for _ in range(20):
            v = pynvml.nvmlDeviceGetFieldValues(h, [fid])[0]
        costs[fid] = {"cpu_us": (time.process_time() - t0) / 20 * 1e6, "wall_us": (time.perf_counter() - w0) / 20 * 1e6,
                      "latency_usec": v.latencyUsec, "ret": v.nvmlReturn, "type": v.valueType,
                      "value": (v.value.ullVal if v.valueType == 3
                                else v.value.dVal if v.valueType == 0 else v.value.uiVal)}
    result["field_costs"] = costs
    # PCIe byte counters under load, every 5 ms
    load = subprocess.Popen([sys.executable, "devtools/gpu_workload.py", "--phase-s", "3"], stdout=subprocess.DEVNULL)
    trace = []
    t_end = time.time() + 14
    while time.time() < t_end:
        vals = pynvml.nvmlDeviceGetFieldValues(h, [197, 198])
        trace.append([time.time(), vals[0].timestamp, vals[0].value.ullVal, vals[1].value.ullVal, vals[0].valueType])
        time.sleep(0.005)
    load.wait()
    thr = []
    for _ in range(3):
        t0 = time.perf_counter()
        tx = pynvml.nvmlDeviceGetPcieThroughput(h, 0)
        thr.append({"kb_per_s": tx, "wall_ms": (time.perf_counter() - t0) * 1e3})
    result["pcie_throughput_call"] = thr
    result["pcie_trace"] = trace
    decreases = [(a, b) for a, b in itertools.pairwise(trace) if b[2] < a[2]]
    result["pcie_tx_decreases"] = decreases[:20]
    result["pcie_tx_max"] = max(t[2] for t in trace)
    with open(out_path, "w") as f:
        json.dump(result, f)
    print(json.dumps({k: v for k, v in result.items() if k not in ("pcie_trace",)}, indent=1)[:12000])


if __name__ == "__main__":
    main(sys.argv[1])
