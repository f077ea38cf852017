"""Figure: CPU time of one sample cycle and the access layer's overhead per NVML call.

Runs against whatever ``libnvidia-ml.so.1`` the dynamic loader finds: the project's C stand-in in CI
(``--standin`` builds it and re-executes with LD_LIBRARY_PATH set) or a real driver on a GPU machine.
For each NVML call the agent makes it times (a) pynvml's own wrapper called directly and (b) the same
call through :class:`NvmlAccess`, side by side in one run, and reports the difference as the access
layer's overhead. Then it times whole sample cycles of :class:`NvmlGpuSource` (CPU time, not wall).

    python -m benchmarks.nvml_call_overhead --standin --gpus 8
    python -m benchmarks.nvml_call_overhead            # on a machine with a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"python": platform.python_version(), "cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release()}


def _time_cpu(fn: Callable[[], Any], repeat: int) -> float:
    """Median CPU seconds per call over ``repeat`` calls, in 5 batches."""
    per_batch = max(1, repeat // 5)
    samples = []
    for _ in range(5):
        t0 = time.process_time()
        for _ in range(per_batch):
            fn()
        samples.append((time.process_time() - t0) / per_batch)
    return statistics.median(samples)


def run(cycles: int, repeat: int) -> dict[str, Any]:
    import pynvml

    from collector.nvml.access import NvmlAccess
    from collector.nvml.source import NvmlGpuSource

    # the PCIe counter poller runs on its own thread; process_time would charge it to the cycles. At a
    # 100 ms interval the medium tier is read on every tenth sample: timed below both ways.
    source = NvmlGpuSource(xid_events=False, pcie_counter_poll=False, interval_s=0.1)
    status = source.open()
    if status != "ok":
        return {"status": status}
    access = source.access
    devices = source._devices
    dev = devices[0]
    h = dev.handle
    raw = NvmlAccess()  # a second gateway, so the timed calls do not share caches with the source
    raw.init()
    calls: dict[str, tuple[Callable[[], Any], Callable[[], Any]]] = {
        "nvmlDeviceGetTemperature": (lambda: pynvml.nvmlDeviceGetTemperature(h, 0),
                                     lambda: raw.call("nvmlDeviceGetTemperature", 0, h, 0)),
        "nvmlDeviceGetClockInfo": (lambda: pynvml.nvmlDeviceGetClockInfo(h, 1),
                                   lambda: raw.call("nvmlDeviceGetClockInfo", 0, h, 1, key="sm")),
        "nvmlDeviceGetCurrentClocksEventReasons": (
            lambda: pynvml.nvmlDeviceGetCurrentClocksEventReasons(h),
            lambda: raw.call("nvmlDeviceGetCurrentClocksEventReasons", 0, h)),
        "nvmlDeviceGetMemoryInfo": (lambda: pynvml.nvmlDeviceGetMemoryInfo(h),
                                    lambda: raw.call("nvmlDeviceGetMemoryInfo", 0, h)),
        "nvmlDeviceGetUtilizationRates": (lambda: pynvml.nvmlDeviceGetUtilizationRates(h),
                                          lambda: raw.call("nvmlDeviceGetUtilizationRates", 0, h)),
        f"nvmlDeviceGetFieldValues (fast tier, {len(dev.fast_request)} fields)": (
            lambda: pynvml.nvmlDeviceGetFieldValues(h, list(dev.fast_request)),
            lambda: raw.field_values(0, h, dev.fast_request)),
    }
    per_call = {}
    for name, (direct, via) in calls.items():
        d = _time_cpu(direct, repeat)
        v = _time_cpu(via, repeat)
        per_call[name] = {"pynvml_us": d * 1e6, "access_layer_us": v * 1e6, "overhead_us": (v - d) * 1e6,
                          "ratio": v / d if d else None}
    # whole cycles: fast tier (9 of 10 cycles at 100 ms), with the medium tier (every cycle at 1 s, every
    # tenth at 100 ms), and with slow signals and processes (every 10 s)
    source.sample(time.time_ns(), True, True)
    every = source._medium_every
    source._medium_every = 1 << 60  # never: fast tier only
    for _ in range(3):
        source.sample(time.time_ns(), False, False)
    fast = _time_cpu(lambda: source.sample(time.time_ns(), False, False), cycles)
    source._medium_every = 1  # every sample: fast and medium tiers
    medium = _time_cpu(lambda: source.sample(time.time_ns(), False, False), max(5, cycles // 2))
    source._medium_every = 1 << 60
    full = _time_cpu(lambda: source.sample(time.time_ns(), True, True), max(5, cycles // 10))
    wall0 = time.perf_counter()
    for _ in range(20):
        source.sample(time.time_ns(), False, False)
    wall = (time.perf_counter() - wall0) / 20
    source._medium_every = every
    from collector.nvml.pcie import PcieCounterPoller

    poller = PcieCounterPoller(access, [(d.ident.index, d.handle) for d in devices], 1.0)
    poll_cpu = _time_cpu(poller.poll_once, max(20, cycles // 5))
    unsupported = sorted(str(k) for k in access._unsupported)
    result = {
        "status": status,
        "gpus": len(devices),
        "gpu_model": dev.ident.name,
        "driver": source.driver_version,
        "nvml_links": list(dev.links),
        "fields_fast_tier": len(dev.fast_request),
        "fields_medium_tier": len(dev.medium_request),
        "fields_slow_tier": len(dev.slow_request),
        "per_call": per_call,
        "cycle_fast_cpu_ms": fast * 1e3,
        "cycle_with_medium_cpu_ms": medium * 1e3,
        "cycle_with_slow_and_processes_cpu_ms": full * 1e3,
        "cycle_fast_wall_ms": wall * 1e3,
        "pcie_counter_poll_cpu_ms_all_gpus": poll_cpu * 1e3,
        "unsupported": unsupported,
        "machine": machine(),
    }
    source.close()
    raw.shutdown()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--standin", action="store_true", help="build the C stand-in and run against it")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs of the stand-in")
    parser.add_argument("--cycles", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=2000)
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    if args.standin and "NVML_STANDIN_SCRIPT" not in os.environ:
        from tests.nvml_standin.script import build_standin, standin_env

        tmp = Path(tempfile.mkdtemp(prefix="stacklens-bench-"))
        lib = build_standin(tmp / "lib")
        script = standard_script(args.gpus).write(tmp / "script.txt")
        env = standin_env(lib, script)
        return subprocess.call([sys.executable, "-m", "benchmarks.nvml_call_overhead", *sys.argv[1:]], env=env,
                               cwd=REPO)
    result = run(args.cycles, args.repeat)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    if result.get("status") != "ok":
        return 1
    print(f"\n{result['gpus']} x {result['gpu_model']} (driver {result['driver']}) on {result['machine']['cpu']}")
    print(f"{'call':58} {'pynvml us':>10} {'via layer':>10} {'overhead':>9} {'ratio':>6}")
    for name, r in result["per_call"].items():
        print(f"{name:58} {r['pynvml_us']:10.2f} {r['access_layer_us']:10.2f} {r['overhead_us']:9.2f} "
              f"{(r['ratio'] or 0):6.2f}")
    print(f"sample cycle, all GPUs, fast tier: {result['cycle_fast_cpu_ms']:.3f} ms CPU "
          f"({result['cycle_fast_wall_ms']:.3f} ms wall); with the medium tier: "
          f"{result['cycle_with_medium_cpu_ms']:.3f} ms CPU; with slow signals and processes: "
          f"{result['cycle_with_slow_and_processes_cpu_ms']:.3f} ms CPU; one PCIe counter poll of all GPUs: "
          f"{result['pcie_counter_poll_cpu_ms_all_gpus']:.3f} ms CPU")
    return 0


def standard_script(gpus: int) -> Any:
    """A stand-in node shaped like an 8x H100 SXM box: every field the agent asks for is supported."""
    from tests.nvml_standin.script import StandinScript

    s = StandinScript().driver("580.82.07").gpus(gpus)
    getters: dict[str, list[object]] = {
        "name": ["NVIDIA H100 80GB HBM3"], "temp.gpu": [55, 56, 57], "clock.sm": [1980, 1755], "clock.mem": [2619],
        "clock_max.sm": [1980], "reasons": [0, 4], "mem.total": [85520809984], "mem.used": [76000000000],
        "mem.free": [9520809984], "util.gpu": [97], "util.mem": [61], "pcie.gen": [5], "pcie.width": [16],
        "pcie.max_gen": [5], "pcie.max_width": [16], "power_mw": [612000], "power_limit_mw": [700000],
        "procs.compute": ["4120:76000000000"], "procs.graphics": ["-"],
    }
    for key, values in getters.items():
        s.set(None, key, *values)
    s.set(None, "field.91", 18)
    for fid in (186, 190, 83, 82, 94, 38, 45, 52, 59, 3, 4, 5, 6, 29, 30, 31, 142, 143, 144, 145,
                74, 75, 76, 77, 78, 79, 269, 270, 271):
        s.set(None, f"field.{fid}", *[1000 * (k + 1) for k in range(4)])
    for fid in (197, 198):  # the PCIe byte counters: 32-bit, as an H100 answers them (NVML value type 1)
        s.set(None, f"field.{fid}", *[f"u32:{1000 * (k + 1)}" for k in range(4)])
    for link in range(18):
        s.set(None, f"field.138.{link}", *[4096 * (k + 1) for k in range(4)])
        s.set(None, f"field.139.{link}", *[8192 * (k + 1) for k in range(4)])
        s.set(None, f"nvlink.state.{link}", 1)
    return s


if __name__ == "__main__":
    raise SystemExit(main())
