"""Summarise a real-GPU check: per workload phase, the median of the agent's key signals."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

KEYS = ["power_w", "gpu_temp_c", "sm_clock_hz", "gpu_util_ratio", "memory_busy_ratio", "pcie_rx_bytes_per_s",
        "pcie_tx_bytes_per_s", "energy_j", "clock_event_reasons", "power_cap_throttle_s", "fb_used_bytes"]


def main(out: Path) -> None:
    phases = [json.loads(x) for x in (out / "workload.jsonl").read_text().splitlines() if x.startswith("{")]
    samples = [json.loads(x) for x in (out / "agent.jsonl").read_text().splitlines() if x.startswith("{")]
    print(f"{len(samples)} agent samples, {len(phases)} workload phases")
    for ph in phases:
        rows = [s for s in samples if ph["start_s"] * 1e9 <= s["time_ns"] <= ph["end_s"] * 1e9 and s["gpus"]]
        print(f"\n== {ph['phase']}: {len(rows)} samples; workload {ph['tflops']:.0f} TFLOP/s, "
              f"PCIe {ph['pcie_gb_per_s_each_way']:.1f} GB/s each way")
        for k in KEYS:
            vals = [s["gpus"][0]["signals"].get(k) for s in rows]
            known = [v for v in vals if v is not None]
            if known:
                med = statistics.median(known)
                print(f"  {k:28} median {med:14.4g}  min {min(known):12.4g}  max {max(known):12.4g}  "
                      f"missing {len(vals) - len(known)}")
        reasons = {r for s in rows for r in (s["gpus"][0].get("clock_event_reasons_decoded") or [])}
        print(f"  clock event reasons seen: {sorted(reasons)}")
        procs = {p["pid"] for s in rows for p in s["gpus"][0]["processes"]}
        print(f"  processes on the GPU: {sorted(procs)}")
    otlp = out / "otlp_summary.json"
    if otlp.exists():
        s = json.loads(otlp.read_text())
        print(f"\nOTLP receiver: {s['requests']} requests, {s['bytes']} bytes, {len(s['metrics'])} metrics; "
              f"resource {s['resource']}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
