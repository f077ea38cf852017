"""Attribution accuracy over the simulated fleet's fault catalog, end to end through the OTLP decoders:
each case's GPU metrics are encoded by the agent's encoder and its spans by the OpenTelemetry SDK's OTLP
encoder, decoded by the correlator, stored in DuckDB, and ``why`` answers (the JSON of DESIGN.md).

    python -m benchmarks.attribution_eval --seeds 10 [--faults pcie_saturation,thermal_throttle] [--json out.json]
        [--cache DIR] [--jobs N]

With ``--cache DIR`` each case's database is kept (keyed by the fault, the seed and a hash of the code that
generates and stores it), so a change to the analysis re-scores the same data in seconds.

Scores: cause top-1 and top-3, culprit GPU top-1, false attribution on healthy (drift-only) windows.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import platform
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from benchmarks.baselines import findings_from_ranks, rank, series_frame
from collector.engine_spans import VllmSpanEmitter, engine_resource
from collector.export.otlp_encode import OtlpMetricsEncoder, ResourceInfo
from collector.simfleet import FAULT_KINDS, EngineGauges, Fleet, fault_scenario
from correlator.analysis.timeparse import parse_time_ns
from correlator.analysis.why import RootCause, WhyQuery
from correlator.demo import engine_metrics_request
from correlator.ingest.payload import decode
from correlator.store.duckdb_store import Store


class _Collect(SpanExporter):
    def __init__(self) -> None:
        self.payloads: list[bytes] = []

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.payloads.append(encode_spans(spans).SerializeToString())
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


_GENERATING_CODE = ("collector/simfleet.py", "collector/engine_spans.py", "collector/export/otlp_encode.py",
                    "correlator/demo.py", "correlator/ingest", "correlator/store")


_ROOT = Path(__file__).resolve().parent.parent


def code_hash(root: Path = _ROOT) -> str:
    """Hash of the code that generates and stores a case: a cached database is reused only while it holds."""
    h = hashlib.sha256()
    for rel in _GENERATING_CODE:
        p = root / rel
        for f in sorted(p.rglob("*.py")) if p.is_dir() else [p]:
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


def case_fleet(kind: str, seed: int) -> Fleet:
    return Fleet(fault_scenario(kind, seed=seed, node=seed % 2, gpu=(seed * 3) % 4))


def generate_case(kind: str, seed: int, db: Path) -> dict[str, Any]:
    """Runs the fleet and stores its telemetry through the OTLP decoders; returns the ground truth."""
    fleet = case_fleet(kind, seed)
    tmp = db.with_suffix(".partial")
    tmp.unlink(missing_ok=True)
    store = Store(tmp)
    enc = {n: OtlpMetricsEncoder(ResourceInfo(n)) for n in fleet.nodes}
    sink = _Collect()
    emitters = {r.pid: VllmSpanEmitter(engine_resource("vllm", fleet.nodes[r.node], r.pid, model=fleet.s.model),
                                       sink) for r in fleet.replicas}
    metrics: list[bytes] = []
    gauges: list[EngineGauges] = []
    for k, tick in enumerate(fleet.run()):
        metrics += [enc[s.node].encode(s) for s in tick.snapshots]
        gauges += tick.engines
        for r in tick.finished:
            emitters[r.pid].emit(r)
        if (k + 1) % 60 == 0:
            store.submit(decode("metrics", b"".join(metrics), "application/x-protobuf"))
            store.submit(decode("metrics", engine_metrics_request(gauges, fleet.s.start_ns), "application/x-protobuf"))
            metrics, gauges = [], []
    if metrics:
        store.submit(decode("metrics", b"".join(metrics), "application/x-protobuf"))
    for e in emitters.values():
        e.flush()
    for p in sink.payloads:
        store.submit(decode("traces", p, "application/x-protobuf"))
    if gauges:
        store.submit(decode("metrics", engine_metrics_request(gauges, fleet.s.start_ns), "application/x-protobuf"))
    store.flush()
    store.close()
    tmp.rename(db)
    truth = fleet.ground_truth
    replica_gpus: list[str] = []
    if truth and truth[0].gpu_uuid:
        rep = next(r for r in fleet.replicas if any(g.ident.uuid == truth[0].gpu_uuid for g in r.gpus))
        replica_gpus = [g.ident.uuid for g in rep.gpus]
    meta = {"fault": kind, "seed": seed, "node": truth[0].node if truth else None,
            "gpu": truth[0].gpu_uuid if truth else None, "replica_gpus": replica_gpus,
            "onset_ns": truth[0].onset_ns if truth else None, "start_ns": fleet.s.start_ns}
    db.with_suffix(".truth.json").write_text(json.dumps(meta))
    return meta


# causes of a whole replica (its engine, its queue): any GPU of the replica is the right culprit
_REPLICA_CAUSES = {"kv_pressure", "arrival_burst", "batching_misconfig"}


def _culprit_ok(kind: str, meta: dict[str, Any], gpu: str | None, node: str | None) -> bool:
    if kind == "cpu_contention":  # a host cause: the culprit is the node
        return node is not None and node == str(meta["node"])
    if kind in _REPLICA_CAUSES:
        return bool(gpu in meta["replica_gpus"])
    return gpu is not None and gpu == meta["gpu"]


def score_baselines(cur: Any, meta: dict[str, Any], end_ns: int) -> dict[str, Any]:
    """BARO and N-Sigma on the same case's time series, given the true onset (drift: minute 10)."""
    kind = meta["fault"]
    cause = FAULT_KINDS[kind]
    frame, about = series_frame(cur, meta["start_ns"], end_ns)
    onset_ns = meta["onset_ns"] or meta["start_ns"] + 600 * 10**9
    replica_gpus: dict[tuple[str, int], list[str]] = {}
    for node, pid, uuid in cur.execute("SELECT DISTINCT n.name, p.pid, g.uuid FROM placements p JOIN gpus g "
                                       "USING (gpu_id) JOIN nodes n ON n.node_id = g.node_id").fetchall():
        replica_gpus.setdefault((node, pid), []).append(uuid)
    out: dict[str, Any] = {}
    for method in ("baro", "nsigma"):
        found = findings_from_ranks(rank(method, frame, (onset_ns - meta["start_ns"]) / 1e9), about, replica_gpus)
        causes = [(c, s) for c, s, _, _ in found]
        out[method] = {
            "found": [f"{c}/{s}" for c, s in causes[:3]],
            # a metric ranking always names a cause: on a healthy window that is a false attribution
            "top1": bool(causes[:1] == [cause]) if kind != "drift" else False,
            "top3": cause in causes[:3] if kind != "drift" else False,
            "culprit_ok": _culprit_ok(kind, meta, found[0][2], found[0][3]) if kind != "drift" and found else None,
        }
    return out


def score_case(db: Path, meta: dict[str, Any], baselines: bool = False) -> dict[str, Any]:
    kind = meta["fault"]
    store = Store(db, read_only=True)
    t0 = time.perf_counter()
    with store.reader() as cur:
        doc = RootCause(cur).why(WhyQuery())
        elapsed = time.perf_counter() - t0
        end_ns = cur.execute("SELECT max(end_ns) FROM requests").fetchall()[0][0]
        base = score_baselines(cur, meta, end_ns) if baselines else None
    store.close()
    cause, sub = FAULT_KINDS[kind]
    found = [(f["cause"], f.get("subcause") or "") for f in doc["findings"]]
    top = doc["findings"][0] if doc["findings"] else None
    culprit_ok = top is not None and _culprit_ok(kind, meta, top["culprit"]["gpu"], top["culprit"]["node"])
    onset_delay = None  # when the top finding says its cause began, against the injection
    if kind != "drift" and top is not None and doc["query"].get("onset_detected") and meta["onset_ns"]:
        onset_delay = round((parse_time_ns(top["window"][0], 0) - meta["onset_ns"]) / 1e9, 1)
    return {
        "fault": kind, "seed": meta["seed"], "truth": f"{cause}/{sub}", "detected": doc["regression"]["detected"],
        "metric": doc["regression"]["metric"], "ratio": doc["regression"]["ratio"],
        "found": [f"{c}/{s}" for c, s in found[:3]],
        # healthy: right unless a cause is named (a flagged regression nothing explains is "none")
        "top1": bool(found[:1] == [(cause, sub)]) if kind != "drift" else all(c == "none" for c, _ in found),
        "top3": (cause, sub) in found[:3] if kind != "drift" else all(c == "none" for c, _ in found),
        "culprit_ok": culprit_ok if kind != "drift" else None,
        "onset_error_s": onset_delay, "why_s": round(elapsed, 3),
        **({"baselines": base} if base else {}),
    }


def _ensure(args: tuple[str, int, str]) -> tuple[Path, dict[str, Any]]:
    kind, seed, cache = args
    db = Path(cache) / f"{kind}-{seed}.duckdb"
    truth = db.with_suffix(".truth.json")
    if db.exists() and truth.exists():
        return db, json.loads(truth.read_text())
    return db, generate_case(kind, seed, db)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=1)
    ap.add_argument("--faults", default=",".join(FAULT_KINDS))
    ap.add_argument("--json")
    ap.add_argument("--cache", help="keep each case's database here and reuse it while the code that made it holds")
    ap.add_argument("--jobs", type=int, default=1, help="cases generated in parallel")
    ap.add_argument("--baselines", action="store_true", help="also score BARO and N-Sigma (fse-baro) on each case")
    ap.add_argument("--code-hash", help="reuse the cases cached under this hash (the analysis changed, not the data)")
    a = ap.parse_args()
    print(f"# attribution eval on {platform.node()} ({platform.machine()}, {os.cpu_count()} cpus, "
          f"Python {platform.python_version()})", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(a.cache) / (a.code_hash or code_hash()) if a.cache else Path(tmp)
        cache.mkdir(parents=True, exist_ok=True)
        todo = [(k, s, str(cache)) for s in range(a.first_seed, a.first_seed + a.seeds) for k in a.faults.split(",")]
        t0 = time.perf_counter()
        if a.jobs > 1:
            with multiprocessing.get_context("spawn").Pool(a.jobs) as pool:
                cases = pool.map(_ensure, todo, chunksize=1)
        else:
            cases = [_ensure(t) for t in todo]
        print(f"# {len(cases)} cases ready in {time.perf_counter() - t0:.0f} s ({cache})", flush=True)
        rows = []
        for db, meta in cases:
            r = score_case(db, meta, a.baselines)
            rows.append(r)
            print(json.dumps(r), flush=True)
    summary = summarize(rows)
    print(json.dumps(summary))
    if a.json:
        Path(a.json).write_text(json.dumps({"summary": summary, "cases": rows}, indent=1))


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    faults = [r for r in rows if r["fault"] != "drift"]
    healthy = [r for r in rows if r["fault"] == "drift"]
    delays = sorted(r["onset_error_s"] for r in faults if r["onset_error_s"] is not None)

    def frac(xs: list[bool]) -> float:
        return round(sum(xs) / max(1, len(xs)), 3)

    per_fault = {}
    for kind in dict.fromkeys(r["fault"] for r in rows):
        rs = [r for r in rows if r["fault"] == kind]
        per_fault[kind] = {"cases": len(rs), "detected": frac([r["detected"] for r in rs]),
                           "top1": frac([r["top1"] for r in rs]), "top3": frac([r["top3"] for r in rs]),
                           "culprit": frac([bool(r["culprit_ok"]) for r in rs]) if kind != "drift" else None}
    methods = {}
    for m in ("baro", "nsigma"):
        rs = [r["baselines"][m] for r in faults if "baselines" in r]
        hs = [r["baselines"][m] for r in healthy if "baselines" in r]
        if rs:
            methods[m] = {"cause_top1": frac([x["top1"] for x in rs]), "cause_top3": frac([x["top3"] for x in rs]),
                          "culprit_top1": frac([bool(x["culprit_ok"]) for x in rs]),
                          "false_attribution_healthy": 1.0 if hs else None,
                          "per_fault_top1": {k: frac([r["baselines"][m]["top1"] for r in faults
                                                      if r["fault"] == k and "baselines" in r])
                                             for k in dict.fromkeys(r["fault"] for r in faults)}}
    return {
        "baselines": methods,
        "cases": len(rows),
        "cause_top1": frac([r["top1"] for r in faults]),
        "cause_top3": frac([r["top3"] for r in faults]),
        "culprit_top1": frac([bool(r["culprit_ok"]) for r in faults]),
        "false_attribution_healthy": frac([not r["top1"] for r in healthy]),
        "regression_flagged_healthy": frac([r["detected"] for r in healthy]),
        "onset_error_s_median": delays[len(delays) // 2] if delays else None,
        "onset_error_s_max": max(delays, key=abs) if delays else None,
        "per_fault": per_fault,
    }


if __name__ == "__main__":
    main()
