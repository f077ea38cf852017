"""The correlator's /metrics: TTFT and TPOT histograms by model, node and replica GPUs computed from the
stored requests (bucket counts checked exactly against the values sent), the findings gauges, the
ingest counters; and a real Prometheus scraping it."""

from __future__ import annotations

import http.client
import json
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from prometheus_client.parser import text_string_to_metric_families

from collector.engine_spans import FinishedRequest, VllmSpanEmitter, engine_resource
from collector.export.otlp_encode import OtlpMetricsEncoder, ResourceInfo
from collector.records import NodeSnapshot, Placement
from collector.simulated import SimulatedGpuSource
from correlator.server.metrics import TPOT_BUCKETS, TTFT_BUCKETS, IngestCounters, render_metrics
from tests.harness.fixtures import PrometheusFactory
from tests.harness.prometheus_server import ScrapeTarget

T0 = 1_790_000_000_000_000_000
NODE = "node-1"


Req = FinishedRequest


@dataclass(frozen=True)
class Engine:
    pid: int
    model: str
    gpu_label: str  # what /metrics must say in its gpu label
    explicit_gpus: tuple[int, ...] = ()  # sent as gpu.uuids instead of matched through placement
    placed_gpus: tuple[int, ...] = ()  # the agent's placement says this pid holds these GPUs


# pid 100: TP-2 replica found through placement; 200: one GPU through placement; 300: explicit gpu.uuids;
# 400: nothing known about it, so every GPU of the node (inferred)
ENGINES = (Engine(100, "llama-3-70b", "0,1", placed_gpus=(0, 1)), Engine(200, "mistral-7b", "2", placed_gpus=(2,)),
           Engine(300, "mistral-7b", "3", explicit_gpus=(3,)), Engine(400, "llama-3-70b", "0,1,2,3"))


def _near_bound(value: float, bounds: tuple[float, ...]) -> bool:
    return any(abs(value - b) < 1e-6 for b in bounds)


def make_requests(engine: Engine, n: int, t0: int, rng: random.Random) -> list[Req]:
    """Latencies spread over every bucket (lognormal), none within 1 µs of a bucket bound."""
    out: list[Req] = []
    while len(out) < n:
        queue = rng.choice((0.0, rng.lognormvariate(-3.0, 1.5)))
        prefill = rng.lognormvariate(-2.5, 1.0)
        tokens = rng.choice((1, 2, 17, 128, 300))
        decode = (tokens - 1) * rng.lognormvariate(-3.5, 0.8)
        r = Req(f"{engine.pid}-{len(out)}", t0 + len(out) * 10**8, t0 + len(out) * 10**8 + 10**9, queue, prefill,
                decode, 100, tokens)
        if _near_bound(r.ttft_s, TTFT_BUCKETS) or (r.tpot_s is not None and _near_bound(r.tpot_s, TPOT_BUCKETS)):
            continue
        out.append(r)
    return out


def post(url: str, path: str, body: bytes, ctype: str = "application/x-protobuf") -> int:
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=10)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": ctype})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def get(url: str) -> tuple[int, str]:
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=20)
    try:
        conn.request("GET", u.path + (f"?{u.query}" if u.query else ""))
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def feed_fleet(otlp_http: str, t0: int, per_engine: int = 120, seed: int = 11,
               seconds: int = 20) -> list[tuple[Engine, Req]]:
    """One node with 4 simulated GPUs (samples and placement over OTLP, as the agent sends them) and the
    four engines of :data:`ENGINES` sending vLLM spans through the OpenTelemetry SDK."""
    src = SimulatedGpuSource(4, seed=3)
    enc = OtlpMetricsEncoder(ResourceInfo(NODE))
    uuids: dict[int, str] = {}
    bodies = []
    for i in range(seconds):
        t = t0 + i * 10**9
        gpus = src.sample(t, slow=i == 0, processes=False)
        uuids = {g.gpu.index: g.gpu.uuid for g in gpus}
        placements = tuple(Placement(uuids[idx], idx, e.pid, t, used_memory_bytes=10 << 30)
                           for e in ENGINES for idx in e.placed_gpus)
        bodies.append(enc.encode(NodeSnapshot(NODE, t, gpus, placements=placements)))
    assert post(otlp_http, "/v1/metrics", b"".join(bodies)) == 200
    rng = random.Random(seed)
    sent: list[tuple[Engine, Req]] = []
    for e in ENGINES:
        resource = engine_resource("vllm", NODE, e.pid, model=e.model,
                                   gpu_uuids=[uuids[i] for i in e.explicit_gpus] or None)
        emitter = VllmSpanEmitter(resource, OTLPSpanExporter(endpoint=f"{otlp_http}/v1/traces"))
        for r in make_requests(e, per_engine, t0, rng):
            emitter.emit(r)
            sent.append((e, r))
        assert emitter.flush()
        emitter.shutdown()
    return sent


def store_finding(cur: Any, cause: str, sub: str, node: str, gpu_uuid: str | None, start_ns: int) -> None:
    cur.execute("INSERT INTO findings VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [start_ns + 60 * 10**9, "ttft_p99", cause, sub, node, gpu_uuid, start_ns, start_ns + 60 * 10**9,
                 0.9, 0.8, json.dumps({"cause": cause, "subcause": sub})])


def expected_histograms(sent: list[tuple[Engine, Req]]) -> dict[tuple[str, str, str, str], dict[str, float]]:
    """{(metric, model, node, gpu): {le: cumulative count, "sum": s, "count": n}}."""
    out: dict[tuple[str, str, str, str], dict[str, float]] = {}
    for metric, bounds in (("ttft", TTFT_BUCKETS), ("tpot", TPOT_BUCKETS)):
        for e, r in sent:
            value = r.ttft_s if metric == "ttft" else r.tpot_s
            h = out.setdefault((metric, e.model, NODE, e.gpu_label),
                               {**{repr(b): 0.0 for b in bounds}, "+Inf": 0.0, "sum": 0.0, "count": 0.0})
            if value is None:
                continue
            for b in bounds:
                h[repr(b)] += value <= b
            h["+Inf"] += 1
            h["count"] += 1
            h["sum"] += value
    return out


def parse_histograms(text: str) -> dict[tuple[str, str, str, str], dict[str, float]]:
    out: dict[tuple[str, str, str, str], dict[str, float]] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name not in ("stacklens_request_ttft_seconds", "stacklens_request_tpot_seconds"):
            continue
        assert fam.type == "histogram"
        metric = fam.name.split("_")[2]
        for s in fam.samples:
            key = (metric, s.labels["model"], s.labels["node"], s.labels["gpu"])
            h = out.setdefault(key, {})
            if s.name.endswith("_bucket"):
                h[s.labels["le"]] = s.value
            else:
                h[s.name.rsplit("_", 1)[1]] = s.value
    return out


@pytest.fixture
def api_correlator(tmp_path: Path) -> Iterator[Any]:
    from correlator.server.api import api_routes
    from correlator.server.serve import Correlator, ServeConfig

    c = Correlator(ServeConfig(db=str(tmp_path / "m.duckdb"), otlp_grpc=None, otlp_http="127.0.0.1:0",
                               api="127.0.0.1:0"), api_routes)
    c.start()
    try:
        yield c
    finally:
        c.stop()


def test_empty_database_renders_valid_exposition(api_correlator: Any) -> None:
    status, text = get(api_correlator.addresses["api"] + "/metrics")
    assert status == 200
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {"stacklens_request_ttft_seconds", "stacklens_request_tpot_seconds", "stacklens_findings",
            "stacklens_ingest_rows", "stacklens_store_transactions"} <= names


def test_bucket_counts_are_exact_by_model_node_and_replica_gpus(api_correlator: Any) -> None:
    sent = feed_fleet(api_correlator.addresses["otlp_http"], T0)
    api_correlator.store.flush()  # committed within about a second (the spool): now
    status, text = get(api_correlator.addresses["api"] + "/metrics")
    assert status == 200
    got = parse_histograms(text)
    want = expected_histograms(sent)
    assert set(got) == set(want)
    for key, h in want.items():
        g = dict(got[key])
        assert g.pop("sum") == pytest.approx(h.pop("sum"), rel=1e-9), key
        assert g == h, key
    # buckets are cumulative and end at the count; single-token requests have no TPOT
    for h in got.values():
        counts = [v for k, v in h.items() if k not in ("sum", "count")]
        assert counts == sorted(counts) and counts[-1] == h["count"]
    n_tpot = sum(1 for _, r in sent if r.tpot_s is not None)
    assert sum(h["count"] for k, h in got.items() if k[0] == "tpot") == n_tpot < len(sent)
    assert sum(h["count"] for k, h in got.items() if k[0] == "ttft") == len(sent)
    # counters grow with more requests (monotone since the database began)
    feed_fleet(api_correlator.addresses["otlp_http"], T0 + 60 * 10**9, per_engine=10, seed=12, seconds=1)
    api_correlator.store.flush()  # committed within about a second (the spool): now
    again = parse_histograms(get(api_correlator.addresses["api"] + "/metrics")[1])
    for key, h in got.items():
        assert all(again[key][k] >= v for k, v in h.items()), key


def test_findings_and_ingest_counters(api_correlator: Any) -> None:
    feed_fleet(api_correlator.addresses["otlp_http"], T0, per_engine=5)
    api_correlator.store.flush()  # committed within about a second (the spool): now
    store = api_correlator.store
    with store.reader() as cur:
        uuid = cur.execute("SELECT uuid FROM gpus WHERE gpu_index = 2").fetchall()[0][0]
        store_finding(cur, "interconnect", "pcie", NODE, uuid, T0)
        store_finding(cur, "interconnect", "pcie", NODE, uuid, T0 + 120 * 10**9)
        store_finding(cur, "scheduling", "queueing", NODE, None, T0)
    fams = {f.name: f for f in text_string_to_metric_families(get(api_correlator.addresses["api"] + "/metrics")[1])}
    findings = {(s.labels["cause"], s.labels["sub_cause"], s.labels["gpu"]): s.value
                for s in fams["stacklens_findings"].samples}
    assert findings == {("interconnect", "pcie", "2"): 2, ("scheduling", "queueing", ""): 1}
    onset = {s.labels["cause"]: s.value for s in fams["stacklens_finding_onset_seconds"].samples}
    assert onset["interconnect"] == pytest.approx((T0 + 120 * 10**9) / 1e9)
    rows = {s.name: s.value for s in fams["stacklens_ingest_rows"].samples}
    assert rows["stacklens_ingest_rows_total"] == store.stats.rows > 0
    spooled = {s.name: s.value for s in fams["stacklens_store_spooled_exports"].samples}
    assert spooled["stacklens_store_spooled_exports_total"] == store.stats.spooled_exports > 0  # HTTP exports
    assert {s.name: s.value for s in fams["stacklens_store_rejected_exports"].samples} == {
        "stacklens_store_rejected_exports_total": 0}
    codes = {s.labels["code"]: s.value for s in fams["stacklens_ingest_requests"].samples}
    assert codes["200"] >= 5


def test_render_is_cheap_enough_for_a_15s_scrape(api_correlator: Any) -> None:
    feed_fleet(api_correlator.addresses["otlp_http"], T0, per_engine=250)
    api_correlator.store.flush()  # committed within about a second (the spool): now
    with api_correlator.store.reader() as cur:
        render_metrics(cur, IngestCounters())
        t = time.perf_counter()
        text = render_metrics(cur, IngestCounters())
        elapsed = time.perf_counter() - t
    assert "stacklens_request_ttft_seconds_bucket" in text
    assert elapsed < 0.5, f"rendering /metrics took {elapsed:.3f}s"


def test_prometheus_scrapes_the_histograms(api_correlator: Any, prometheus_factory: PrometheusFactory) -> None:
    sent = feed_fleet(api_correlator.addresses["otlp_http"], T0, per_engine=50)
    api_correlator.store.flush()  # committed within about a second (the spool): now
    address = api_correlator.addresses["api"].removeprefix("http://")
    prom = prometheus_factory([ScrapeTarget(address, job="stacklens-correlator")])
    total = prom.wait_for("sum(stacklens_request_ttft_seconds_count)", timeout_s=30)
    assert float(total[0]["value"][1]) == len(sent)
    by_gpu = prom.query('sum by (gpu) (stacklens_request_ttft_seconds_count{gpu=~"(.*,)?2(,.*)?"})')
    assert {s["metric"]["gpu"] for s in by_gpu} == {"2", "0,1,2,3"}
    p50 = prom.query("histogram_quantile(0.5, sum by (le, model) (stacklens_request_ttft_seconds_bucket))")
    assert {s["metric"]["model"] for s in p50} == {"llama-3-70b", "mistral-7b"}
    for s in p50:
        ttfts = sorted(r.ttft_s for e, r in sent if e.model == s["metric"]["model"])
        median = ttfts[len(ttfts) // 2]
        # the estimate lies within the bucket that holds the true median
        lo = max([0.0, *(b for b in TTFT_BUCKETS if b < median)])
        hi = min([math.inf, *(b for b in TTFT_BUCKETS if b >= median)])
        assert lo <= float(s["value"][1]) <= hi
