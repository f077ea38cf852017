"""Every query of the generated dashboards and of the Prometheus rules, run against a live stack: a real
Prometheus (Debian's) with deploy/prometheus/rules loaded, scraping a simulated agent (in process, with
an XID, a power-capped GPU and a lost one), a correlator with requests arriving, and two vLLM-shaped
engines (one with the current metric names, one with the names before vLLM renamed them). Each PromQL
expression must return at least one series with a number, with the variables set to All and set to one
concrete node, GPU and model; each Infinity query must get JSON from the correlator's API with the fields
its columns read."""

from __future__ import annotations

import json
import math
import random
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

from collector.agent import Agent
from collector.engine_spans import VllmSpanEmitter, engine_resource
from collector.export.prometheus import PrometheusExposition, serve_metrics
from collector.host import HostSource
from collector.placement.resolver import PlacementResolver
from collector.simulated import SimulatedGpuSource
from dashboards import generate
from dashboards.queries import PromQuery, infinity_queries, interpolate, prometheus_queries
from tests.harness.exposition import StaticExposition
from tests.harness.fixtures import require_prometheus
from tests.harness.prometheus_server import PrometheusServer, ScrapeTarget, free_tcp_port
from tests.test_correlator_metrics import ENGINES, NODE, Req, feed_fleet, get

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
RULE_FILES = sorted((REPO / "deploy" / "prometheus" / "rules").glob("*.yml"))
DOCS = {p.stem: json.loads(p.read_text()) for p in sorted(generate.GENERATED.glob("*.json"))}
CLUSTER = "test"
ALL = {"datasource": "stacklens-prometheus", "cluster": ".*", "node": ".*", "gpu": ".*", "model": ".*"}
ONE = {"datasource": "stacklens-prometheus", "cluster": CLUSTER, "node": NODE, "gpu": "0", "model": "llama-3-70b"}


class RulesPrometheus(PrometheusServer):
    """The harness' Prometheus with rule files loaded (absolute paths, so the temp config finds them)."""

    def __init__(self, targets: Sequence[ScrapeTarget], rule_files: Sequence[Path], **kwargs: Any) -> None:
        self._rule_files = [str(p) for p in rule_files]
        super().__init__(targets, **kwargs)

    def _build_config(self) -> dict[str, Any]:
        return {**super()._build_config(), "rule_files": self._rule_files}

    def rules(self) -> list[dict[str, Any]]:
        status, raw = self._raw_request("GET", "/api/v1/rules")
        assert status == 200, raw
        return [r for g in json.loads(raw)["data"]["groups"] for r in g["rules"]]


# --- a vLLM-shaped /metrics ----------------------------------------------------------------------------
_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class _EngineMetrics:
    """vLLM's server metrics for one model, under the current names or the ones before the renames;
    counters and histograms grow at every scrape."""

    def __init__(self, model: str, renamed: bool) -> None:
        self.model = model
        self.renamed = renamed
        self.scrapes = 0
        self.lock = threading.Lock()

    def text(self) -> str:
        with self.lock:
            self.scrapes += 1
            n = self.scrapes
        lab = f'engine="0",model_name="{self.model}"'
        kv, preempt, prompt, gen, itl = (
            ("vllm:kv_cache_usage_perc", "vllm:num_preemptions_total", "vllm:prompt_tokens_total",
             "vllm:generation_tokens_total", "vllm:inter_token_latency_seconds") if not self.renamed else
            ("vllm:gpu_cache_usage_perc", "vllm:num_preemptions", "vllm:prompt_tokens", "vllm:generation_tokens",
             "vllm:time_per_output_token_seconds"))
        out = [f"# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{{{lab}}} {8 + n % 3}",
               f"# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{{{lab}}} {n % 5}",
               f"# TYPE {kv} gauge\n{kv}{{{lab}}} {0.5 + 0.01 * (n % 40)}",
               f"# TYPE {preempt} counter\n{preempt}{{{lab}}} {n // 2}",
               f"# TYPE {prompt} counter\n{prompt}{{{lab}}} {1000 * n}",
               f"# TYPE {gen} counter\n{gen}{{{lab}}} {300 * n}"]
        for name, scale in (("vllm:time_to_first_token_seconds", 1.0), (itl, 0.1),
                            ("vllm:request_queue_time_seconds", 0.5), ("vllm:e2e_request_latency_seconds", 10.0)):
            lines = [f"# TYPE {name} histogram"]
            for i, b in enumerate(_BUCKETS):
                lines.append(f'{name}_bucket{{{lab},le="{b * scale!r}"}} {n * (i + 1)}')
            lines += [f'{name}_bucket{{{lab},le="+Inf"}} {n * 10}', f"{name}_sum{{{lab}}} {n * scale * 3}",
                      f"{name}_count{{{lab}}} {n * 10}"]
            out.append("\n".join(lines))
        return "\n".join(out) + "\n"


def _serve_engine(metrics: _EngineMetrics) -> StaticExposition:
    return StaticExposition(lambda _: metrics.text())


# --- requests arriving at the correlator -----------------------------------------------------------------
class Traffic:
    """Each engine of ENGINES sends a few vLLM spans every half second, a third of them slow (TTFT 0.8 s,
    TPOT 0.3 s), so the latency histograms move and the SLO ratios burn."""

    def __init__(self, otlp_http: str) -> None:
        self.emitters = [(e, VllmSpanEmitter(engine_resource("vllm", NODE, e.pid, model=e.model),
                                             OTLPSpanExporter(endpoint=f"{otlp_http}/v1/traces")))
                         for e in ENGINES]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.rng = random.Random(5)
        self.sent = 0

    def _run(self) -> None:
        while not self.stop.is_set():
            now = time.time_ns()
            for e, emitter in self.emitters:
                for k in range(3):
                    slow = k == 0
                    tokens = 64
                    r = Req(f"live-{e.pid}-{self.sent}", now - 3 * 10**9, now, 0.02,
                            0.78 if slow else 0.08 + 0.1 * self.rng.random(),
                            (tokens - 1) * (0.3 if slow else 0.02 + 0.02 * self.rng.random()), 200, tokens)
                    emitter.emit(r)
                    self.sent += 1
                emitter.flush()
            self.stop.wait(0.5)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        for _, emitter in self.emitters:
            emitter.shutdown()


@dataclass
class Stack:
    prom: RulesPrometheus
    api: str


def _finding(uuid: str, start_ns: int) -> dict[str, Any]:
    iso = datetime.fromtimestamp(start_ns / 1e9, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"rank": 1, "cause": "interconnect", "subcause": "pcie", "score": 0.9, "explained_share": 0.8,
            "culprit": {"node": NODE, "gpu": uuid, "pod": None, "pid": 200, "mapping": "placement"},
            "window": [iso, iso],
            "evidence": [{"signal": "pcie_rx_bytes_per_s", "unit": "B/s", "baseline": 2.1e9, "incident": 2.4e10,
                          "robust_z": 17.2}]}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    require_prometheus()
    from correlator.server.api import api_routes
    from correlator.server.serve import Correlator, ServeConfig

    closers: list[Any] = []
    try:
        db = tmp_path_factory.mktemp("live") / "c.duckdb"
        correlator = Correlator(ServeConfig(db=str(db), otlp_grpc=None, otlp_http="127.0.0.1:0", api="127.0.0.1:0"),
                                api_routes)
        correlator.start()
        closers.append(correlator.stop)
        otlp, api = correlator.addresses["otlp_http"], correlator.addresses["api"]
        t0 = time.time_ns() - 120 * 10**9
        feed_fleet(otlp, t0, per_engine=60)
        assert correlator.store is not None
        correlator.store.flush()  # committed within about a second (the spool): now
        with correlator.store.reader() as cur:
            uuid = cur.execute("SELECT uuid FROM gpus WHERE gpu_index = 2").fetchall()[0][0]
            body = _finding(uuid, t0)
            cur.execute("INSERT INTO findings VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        [time.time_ns(), "ttft_p99", "interconnect", "pcie", NODE, uuid, t0, t0 + 60 * 10**9, 0.9,
                         0.8, json.dumps(body)])
        traffic = Traffic(otlp)
        traffic.thread.start()
        closers.append(traffic.close)

        # the agent, in process, so that the test can raise an XID, cap a GPU's power and lose one
        backend = SimulatedGpuSource(4, seed=3)
        exposition = PrometheusExposition(NODE)
        agent = Agent(NODE, backend, [], HostSource(), PlacementResolver(), interval_s=0.5, slow_interval_s=2.0)
        agent.sinks.append(_Sink(exposition))
        agent.open()
        backend.set_power_limit(1, 150.0)
        backend.lose(3)
        agent.cycle()
        backend.raise_xid(0, 79, time.time_ns())
        agent_server = serve_metrics("127.0.0.1", 0, exposition)
        closers.append(agent_server.shutdown)
        stop = threading.Event()
        agent_thread = threading.Thread(target=agent.run, args=(stop,), daemon=True)
        agent_thread.start()

        def stop_agent() -> None:
            stop.set()
            agent_thread.join(10)
            agent.close()

        closers.append(stop_agent)

        engines = [_serve_engine(_EngineMetrics("llama-3-70b", renamed=False)),
                   _serve_engine(_EngineMetrics("mistral-7b", renamed=True))]
        closers += [e.close for e in engines]

        labels = {"cluster": CLUSTER}
        targets = [
            ScrapeTarget(f"127.0.0.1:{agent_server.server_address[1]}", job="stacklens-agent", labels=labels),
            ScrapeTarget(f"127.0.0.1:{free_tcp_port()}", job="stacklens-agent", labels=labels),  # a dead agent
            ScrapeTarget(api.removeprefix("http://"), job="stacklens-correlator", labels=labels),
            *(ScrapeTarget(e.address, job="vllm", labels={**labels, "Hostname": NODE})
              for e in engines)]
        prom = RulesPrometheus(targets, RULE_FILES, scrape_interval=1.0, evaluation_interval=1.0,
                               binary=require_prometheus())
        prom.start()
        closers.append(prom.close)
        assert len(prom.rules()) == 24
        # warm: every job scraped twice (rates need two samples) and the rules evaluated on them
        prom.wait_for("count(count_over_time(up[1m]) >= 3) >= 5", timeout_s=30)
        prom.wait_for("stacklens:request_ttft_slo_errors:ratio_rate5m", timeout_s=15)
        yield Stack(prom, api)
    finally:
        for close in reversed(closers):
            close()


class _Sink:
    def __init__(self, exposition: PrometheusExposition) -> None:
        self.exposition = exposition

    def handle(self, snapshot: Any) -> None:
        self.exposition.update(snapshot)


def _has_number(result: list[dict[str, Any]], label: str | None) -> bool:
    return any(not math.isnan(float(s["value"][1])) and (label is None or label in s["metric"]) for s in result)


def _check(prom: RulesPrometheus, queries: Sequence[PromQuery], deadline: float) -> list[str]:
    """Each query until it returns a series with a number (polled up to the deadline); the failures."""
    failures = []
    for q in queries:
        result: list[dict[str, Any]] = []
        while True:
            result = prom.query(q.expr)
            if _has_number(result, q.label) or time.monotonic() > deadline:
                break
            time.sleep(0.25)
        if not _has_number(result, q.label):
            failures.append(f"{q.where}: {q.expr!r} -> {json.dumps(result)[:300]}")
    return failures


@pytest.mark.parametrize("name", sorted(DOCS))
@pytest.mark.parametrize("values", [ALL, ONE], ids=["all", "one-gpu"])
def test_every_dashboard_expression_returns_series(stack: Stack, name: str, values: dict[str, str]) -> None:
    queries = [PromQuery(q.where, interpolate(q.expr, values), q.label) for q in prometheus_queries(DOCS[name])]
    assert len(queries) >= 8
    failures = _check(stack.prom, queries, time.monotonic() + 20)
    assert not failures, "expressions without series:\n" + "\n".join(failures)


def test_every_rule_expression_returns_series(stack: Stack) -> None:
    """Recording rules and alert conditions alike: the traffic burns both SLOs, GPU 0 raised an XID, GPU 1
    is power-capped, GPU 3 is lost and one agent target is down."""
    rules = stack.prom.rules()
    names = {r["name"] for r in rules}
    assert {"StacklensTTFTBudgetBurnFast", "StacklensTPOTBudgetBurnSlow", "stacklens:gpu_throttled:active"} <= names
    queries = [PromQuery(f"{r['type']} {r['name']}", r["query"]) for r in rules
               if r["type"] == "recording" or not r["query"].startswith("avg_over_time")]
    failures = _check(stack.prom, queries, time.monotonic() + 20)
    # the throttle alert averages a recorded series over 10 m: it has series once that series exists
    throttled = [r["query"] for r in rules if r["name"] == "StacklensGpuThrottled"]
    failures += _check(stack.prom, [PromQuery("alerting StacklensGpuThrottled", q) for q in throttled],
                       time.monotonic() + 10)
    assert not failures, "rule expressions without series:\n" + "\n".join(failures)
    for r in rules:
        assert r["health"] == "ok", r


def _select(doc: Any, path: str) -> Any:
    """Infinity's column and root selectors as the tests need them: dotted paths and list[n] indices."""
    for part in filter(None, path.replace("[", ".").replace("]", "").split(".")):
        doc = doc[int(part)] if isinstance(doc, list) else doc[part]
    return doc


def test_infinity_queries_get_their_fields_from_the_correlator_api(stack: Stack) -> None:
    until = datetime.now(UTC)
    frm = until.timestamp() - 3600
    times = {"__from": datetime.fromtimestamp(frm, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
             "__to": until.isoformat(timespec="milliseconds").replace("+00:00", "Z")}
    status, stored = get(f"{stack.api}/api/v1/findings")
    assert status == 200 and json.loads(stored), stored
    checked = 0
    for where, t in infinity_queries(DOCS["incident"]):
        params = {p["key"]: interpolate(p["value"], times) for p in t["url_options"]["params"]}
        status, text = get(f"{stack.api}{t['url']}" + (f"?{urlencode(params)}" if params else ""))
        assert status == 200, f"{where}: {t['url']} {params} -> {status} {text[:300]}"
        doc = json.loads(text)
        if isinstance(doc, dict) and "findings" in doc and not doc["findings"]:
            # no regression in this window: check the columns on the stored findings (the same shape)
            doc = {**doc, "findings": json.loads(stored)}
        rows = _select(doc, t["root_selector"])
        rows = rows if isinstance(rows, list) else [rows]
        assert rows, f"{where}: no rows at {t['root_selector']!r}"
        for c in t["columns"]:
            top = c["selector"].split(".")[0]
            assert top in rows[0], f"{where}: column {c['selector']!r} not in {sorted(rows[0])}"
        checked += 1
    assert checked == 4
