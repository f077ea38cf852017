"""Time from a fault's onset to the online detector's finding, and its false alarms on healthy runs,
replayed over the attribution evaluation's cached cases (``benchmarks/attribution_eval.py --cache``).

At every 10 s of data time the detector evaluates what ``stacklens serve`` would have known then (spans
arrive when requests end); a finding counts when it is confirmed (two evaluations in a row agree).

    python -m benchmarks.online_eval --cache /work/evalcache --code-hash HASH [--faults ...] [--seeds 1-10]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.attribution_eval import _culprit_ok, code_hash
from collector.simfleet import FAULT_KINDS
from correlator.analysis.online import WINDOW, OnlineDetector
from correlator.store.duckdb_store import Store

_STEP_NS = 10 * 10**9


def replay(db: Path, meta: dict[str, Any], before_s: int = 120, after_s: int = 300, window: str = WINDOW
           ) -> dict[str, Any]:
    kind = meta["fault"]
    onset = meta["onset_ns"] or meta["start_ns"] + 600 * 10**9
    healthy = kind == "drift"
    t0 = meta["start_ns"] + 300 * 10**9 if healthy else onset - before_s * 10**9
    t1 = meta["start_ns"] + 1500 * 10**9 if healthy else onset + after_s * 10**9
    cause = FAULT_KINDS[kind]
    det = OnlineDetector(window=window)
    store = Store(db, read_only=True)
    first: dict[str, Any] | None = None
    first_right: float | None = None
    # where the delay goes: since when the last minute had shown the regression (the latency of requests
    # ended by then, of the fleet or of a replica on the fault's node) in every evaluation up to the first
    # right confirmed finding, and the first evaluation whose top finding was the right one
    streak_from: int | None = None
    shown: float | None = None
    named: float | None = None
    early = 0
    wall = time.perf_counter()
    with store.reader() as cur:
        t = t0
        while t <= t1:
            confirmed = det.step(cur, t, store=False)
            doc = det.last
            reg = doc["regression"] if doc is not None else None
            # a regression of the fleet, or of a replica on the fault's node (not a peer's noise in a minute)
            detected = reg is not None and bool(reg["detected"]) and (
                reg["scope"] == "fleet" or (reg["replica"] or {}).get("node") == meta.get("node"))
            streak_from = (streak_from if streak_from is not None else t) if detected else None
            if doc is not None and not healthy and t >= onset and doc["regression"]["detected"]:
                f0 = (doc.get("findings") or [None])[0]
                c0 = f0["culprit"] if f0 else {}
                if named is None and f0 and (f0["cause"], f0.get("subcause") or "") == cause \
                        and _culprit_ok(kind, meta, c0.get("gpu"), c0.get("node")):
                    named = (t - onset) / 1e9
            for inc in confirmed:
                assert inc.confirmed_ns is not None
                delay = (inc.confirmed_ns - onset) / 1e9
                c, sub, node, gpu = inc.key
                right = (c, sub or "") == cause and _culprit_ok(kind, meta, gpu, node)
                if delay < 0 or healthy:
                    early += 1
                if first is None:
                    first = {"delay_s": delay, "cause": f"{c}/{sub}", "right": right}
                if right and first_right is None and delay >= 0:
                    first_right = delay
                    shown = max(0, (streak_from or t) - onset) / 1e9
            t += _STEP_NS
    store.close()
    return {"fault": kind, "seed": meta["seed"], "first": first, "first_right_s": first_right,
            "regression_shown_s": shown, "right_cause_named_s": named,
            "false_alarms": early, "evaluations": det.evaluations,
            "ms_per_evaluation": round(1000 * (time.perf_counter() - wall) / max(1, det.evaluations), 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", required=True)
    ap.add_argument("--code-hash")
    ap.add_argument("--faults", default=",".join(FAULT_KINDS))
    ap.add_argument("--seeds", default="1-10", help="a range, e.g. 1-10")
    ap.add_argument("--window", default=WINDOW, help="the detector's incident window")
    ap.add_argument("--json")
    a = ap.parse_args()
    lo, _, hi = a.seeds.partition("-")
    seeds = range(int(lo), int(hi or lo) + 1)
    cache = Path(a.cache) / (a.code_hash or code_hash())
    print(f"# online detection replay on {platform.node()} ({platform.machine()}, {os.cpu_count()} cpus, "
          f"Python {platform.python_version()}), {cache}", flush=True)
    rows = []
    for kind in a.faults.split(","):
        for seed in seeds:
            db = cache / f"{kind}-{seed}.duckdb"
            truth = db.with_suffix(".truth.json")
            if not db.exists() or not truth.exists():
                continue
            r = replay(db, json.loads(truth.read_text()), window=a.window)
            rows.append(r)
            print(json.dumps(r), flush=True)
    faults = [r for r in rows if r["fault"] != "drift"]
    healthy = [r for r in rows if r["fault"] == "drift"]
    delays = sorted(r["first_right_s"] for r in faults if r["first_right_s"] is not None)
    per_fault = {}
    for kind in dict.fromkeys(r["fault"] for r in faults):
        d = [r["first_right_s"] for r in faults if r["fault"] == kind and r["first_right_s"] is not None]
        n = sum(1 for r in faults if r["fault"] == kind)
        shown = [r["regression_shown_s"] for r in faults if r["fault"] == kind and r["regression_shown_s"] is not None]
        named = [r["right_cause_named_s"] for r in faults
                 if r["fault"] == kind and r["right_cause_named_s"] is not None]
        per_fault[kind] = {"found": f"{len(d)}/{n}", "median_s": statistics.median(d) if d else None,
                           "max_s": max(d) if d else None,
                           "regression_shown_median_s": statistics.median(shown) if shown else None,
                           "right_cause_named_median_s": statistics.median(named) if named else None}
    summary = {
        "fault_cases": len(faults),
        "found_within_300s": round(len(delays) / max(1, len(faults)), 3),
        "within_60s": round(sum(1 for d in delays if d <= 60) / max(1, len(faults)), 3),
        "median_s": statistics.median(delays) if delays else None,
        "first_finding_right": round(sum(1 for r in faults if r["first"] and r["first"]["right"])
                                     / max(1, len(faults)), 3),
        "false_alarms_before_onset": sum(r["false_alarms"] for r in faults),
        "healthy_cases": len(healthy),
        "healthy_false_alarms": sum(r["false_alarms"] for r in healthy),
        "healthy_evaluations": sum(r["evaluations"] for r in healthy),
        "per_fault": per_fault,
    }
    print(json.dumps(summary))
    if a.json:
        Path(a.json).write_text(json.dumps({"summary": summary, "cases": rows}, indent=1))


if __name__ == "__main__":
    main()
