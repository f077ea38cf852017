"""Attribution accuracy over the simulated fleet's fault catalog, end to end through the OTLP decoders:
each case's GPU metrics are encoded by the agent's encoder and its spans by the OpenTelemetry SDK's OTLP
encoder, decoded by the correlator, stored in DuckDB, and ``why`` answers (the JSON of DESIGN.md).

    python -m benchmarks.attribution_eval --seeds 10 [--faults pcie_saturation,thermal_throttle] [--json out.json]

Scores: cause top-1 and top-3, culprit GPU top-1, false attribution on healthy (drift-only) windows.
"""

from __future__ import annotations

import argparse
import json
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


def run_case(kind: str, seed: int, workdir: Path) -> dict[str, Any]:
    fleet = Fleet(fault_scenario(kind, seed=seed, node=seed % 2, gpu=(seed * 3) % 4))
    store = Store(workdir / f"{kind}-{seed}.duckdb")
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
    t0 = time.perf_counter()
    with store.reader() as cur:
        doc = RootCause(cur).why(WhyQuery())
    elapsed = time.perf_counter() - t0
    store.close()
    truth = fleet.ground_truth
    cause, sub = FAULT_KINDS[kind]
    gpu = truth[0].gpu_uuid if truth else None
    found = [(f["cause"], f.get("subcause") or "") for f in doc["findings"]]
    top_gpu = doc["findings"][0]["culprit"]["gpu"] if doc["findings"] else None
    return {
        "fault": kind, "seed": seed, "truth": f"{cause}/{sub}", "detected": doc["regression"]["detected"],
        "ratio": doc["regression"]["ratio"], "found": [f"{c}/{s}" for c, s in found[:3]],
        "top1": bool(found[:1] == [(cause, sub)]) if kind != "drift" else not doc["findings"],
        "top3": (cause, sub) in found[:3] if kind != "drift" else not doc["findings"],
        "culprit_ok": (gpu is None or top_gpu == gpu) if kind != "drift" else None,
        "why_s": round(elapsed, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--faults", default=",".join(FAULT_KINDS))
    ap.add_argument("--json")
    a = ap.parse_args()
    print(f"# attribution eval on {platform.node()} ({platform.machine()}, {platform.python_version()})")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for kind in a.faults.split(","):
            for seed in range(1, a.seeds + 1):
                r = run_case(kind, seed, Path(d))
                rows.append(r)
                print(json.dumps(r), flush=True)
    faults = [r for r in rows if r["fault"] != "drift"]
    healthy = [r for r in rows if r["fault"] == "drift"]
    summary = {
        "cases": len(rows),
        "cause_top1": round(sum(r["top1"] for r in faults) / max(1, len(faults)), 3),
        "cause_top3": round(sum(r["top3"] for r in faults) / max(1, len(faults)), 3),
        "culprit_top1": round(sum(bool(r["culprit_ok"]) for r in faults) / max(1, len(faults)), 3),
        "false_attribution_healthy": round(sum(not r["top1"] for r in healthy) / max(1, len(healthy)), 3),
    }
    print(json.dumps(summary))
    if a.json:
        Path(a.json).write_text(json.dumps({"summary": summary, "cases": rows}, indent=1))


if __name__ == "__main__":
    main()
