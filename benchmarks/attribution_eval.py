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


def score_case(db: Path, meta: dict[str, Any]) -> dict[str, Any]:
    kind = meta["fault"]
    store = Store(db, read_only=True)
    t0 = time.perf_counter()
    with store.reader() as cur:
        doc = RootCause(cur).why(WhyQuery())
    elapsed = time.perf_counter() - t0
    store.close()
    cause, sub = FAULT_KINDS[kind]
    found = [(f["cause"], f.get("subcause") or "") for f in doc["findings"]]
    top = doc["findings"][0] if doc["findings"] else None
    top_gpu = top["culprit"]["gpu"] if top else None
    if kind == "cpu_contention":  # a host cause: the culprit is the node
        culprit_ok = top is not None and top["culprit"]["node"] == meta["node"]
    elif kind in _REPLICA_CAUSES:
        culprit_ok = top_gpu in meta["replica_gpus"]
    else:
        culprit_ok = top_gpu == meta["gpu"]
    onset_delay = None
    if kind != "drift" and doc["query"].get("onset_detected") and meta["onset_ns"]:
        onset_delay = round((parse_time_ns(doc["query"]["window"][0], 0) - meta["onset_ns"]) / 1e9, 1)
    return {
        "fault": kind, "seed": meta["seed"], "truth": f"{cause}/{sub}", "detected": doc["regression"]["detected"],
        "metric": doc["regression"]["metric"], "ratio": doc["regression"]["ratio"],
        "found": [f"{c}/{s}" for c, s in found[:3]],
        "top1": bool(found[:1] == [(cause, sub)]) if kind != "drift" else not doc["findings"],
        "top3": (cause, sub) in found[:3] if kind != "drift" else not doc["findings"],
        "culprit_ok": culprit_ok if kind != "drift" else None,
        "onset_error_s": onset_delay, "why_s": round(elapsed, 3),
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
    ap.add_argument("--code-hash", help="reuse the cached cases of this code hash (the data, not the analysis, changed)")
    a = ap.parse_args()
    print(f"# attribution eval on {platform.node()} ({platform.machine()}, {os.cpu_count()} cpus, "
          f"Python {platform.python_version()})", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(a.cache) / (a.code_hash or code_hash()) if a.cache else Path(tmp)
        cache.mkdir(parents=True, exist_ok=True)
        todo = [(k, s, str(cache)) for k in a.faults.split(",") for s in range(a.first_seed, a.first_seed + a.seeds)]
        t0 = time.perf_counter()
        if a.jobs > 1:
            with multiprocessing.get_context("spawn").Pool(a.jobs) as pool:
                cases = pool.map(_ensure, todo, chunksize=1)
        else:
            cases = [_ensure(t) for t in todo]
        print(f"# {len(cases)} cases ready in {time.perf_counter() - t0:.0f} s ({cache})", flush=True)
        rows = []
        for db, meta in cases:
            r = score_case(db, meta)
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
    return {
        "cases": len(rows),
        "cause_top1": frac([r["top1"] for r in faults]),
        "cause_top3": frac([r["top3"] for r in faults]),
        "culprit_top1": frac([bool(r["culprit_ok"]) for r in faults]),
        "false_attribution_healthy": frac([not r["top1"] for r in healthy]),
        "onset_error_s_median": delays[len(delays) // 2] if delays else None,
        "onset_error_s_max": max(delays, key=abs) if delays else None,
        "per_fault": per_fault,
    }


if __name__ == "__main__":
    main()
