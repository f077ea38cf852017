"""``stacklens demo``: a simulated 2-node x 4-GPU fleet with one fault, through the real pipeline (OTLP
over HTTP into the correlator's receivers, DuckDB, the attribution engine), to a verdict.

The GPUs go out through the agent's own OTLP encoder and HTTP transport; each engine's requests as
vLLM ``llm_request`` spans through the OpenTelemetry SDK's OTLP exporter; the engines' gauges as the
``vllm:*`` metrics an OpenTelemetry Collector forwards. Simulated time runs ~100x faster than wall time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import (
    AggregationTemporality,
    Metric,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
)
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from collector.engine_spans import VllmSpanEmitter, engine_resource
from collector.export.otlp_encode import OtlpMetricsEncoder, ResourceInfo
from collector.export.otlp_transport import HttpTransport, OtlpConfig
from collector.simfleet import FAULT_KINDS, EngineGauges, Fleet, Scenario, fault_scenario, load_scenario

_GAUGES = (("vllm:num_requests_running", "running"), ("vllm:num_requests_waiting", "waiting"),
           ("vllm:kv_cache_usage_perc", "kv_usage_ratio"))
_COUNTERS = (("vllm:num_preemptions_total", "preemptions_total"), ("vllm:prompt_tokens_total", "prompt_tokens_total"),
             ("vllm:generation_tokens_total", "generation_tokens_total"))


def _kv(key: str, value: str | int) -> KeyValue:
    v = AnyValue(string_value=value) if isinstance(value, str) else AnyValue(int_value=value)
    return KeyValue(key=key, value=v)


def engine_metrics_request(gauges: list[EngineGauges], start_ns: int) -> bytes:
    """vLLM's server metrics as an OpenTelemetry Collector forwards them after scraping /metrics."""
    by_engine: dict[tuple[str, int], list[EngineGauges]] = {}
    for g in gauges:
        by_engine.setdefault((g.node, g.pid), []).append(g)
    req = ExportMetricsServiceRequest()
    for (node, pid), gs in by_engine.items():
        rm = ResourceMetrics(resource=Resource(attributes=[_kv("service.name", "vllm"), _kv("host.name", node),
                                                           _kv("process.pid", pid)]))
        sm = ScopeMetrics()
        for name, field in _GAUGES + _COUNTERS:
            m = Metric(name=name)
            points = [NumberDataPoint(time_unix_nano=g.time_ns, as_double=float(getattr(g, field)),
                                      attributes=[_kv("model_name", g.model)]) for g in gs]
            if (name, field) in _COUNTERS:
                m.sum.is_monotonic = True
                m.sum.aggregation_temporality = AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
                for p in points:
                    p.start_time_unix_nano = start_ns
                m.sum.data_points.extend(points)
            else:
                m.gauge.data_points.extend(points)
            sm.metrics.append(m)
        rm.scope_metrics.append(sm)
        req.resource_metrics.append(rm)
    return req.SerializeToString()


class FleetSender:
    """Sends a simulated fleet's telemetry to an OTLP/HTTP endpoint through the real client paths."""

    def __init__(self, fleet: Fleet, otlp_http: str, batch_ticks: int = 30,
                 headers: tuple[tuple[str, str], ...] = ()) -> None:
        self.fleet = fleet
        self.batch_ticks = batch_ticks
        cfg = OtlpConfig(endpoint=f"{otlp_http}/v1/metrics", headers=headers)
        self.metrics = HttpTransport(cfg)
        self.encoders = {n: OtlpMetricsEncoder(ResourceInfo(n)) for n in fleet.nodes}
        self.emitters = {
            r.pid: VllmSpanEmitter(engine_resource("vllm", fleet.nodes[r.node], r.pid, model=fleet.s.model,
                                                   extra={"service.instance.id": r.name}),
                                   OTLPSpanExporter(endpoint=f"{otlp_http}/v1/traces", headers=dict(headers)))
            for r in fleet.replicas}
        self.spans = 0
        self.points_payloads = 0

    def run(self, on_tick: object = None) -> None:
        pending: list[bytes] = []
        gauges: list[EngineGauges] = []
        for k, tick in enumerate(self.fleet.run()):
            for snap in tick.snapshots:
                pending.append(self.encoders[snap.node].encode(snap))
            gauges += tick.engines
            for r in tick.finished:
                self.emitters[r.pid].emit(r)
                self.spans += 1
            if (k + 1) % self.batch_ticks == 0:
                self._flush(pending, gauges)
                pending, gauges = [], []
                for e in self.emitters.values():
                    e.flush()
            if callable(on_tick):
                on_tick(k)
        self._flush(pending, gauges)
        for e in self.emitters.values():
            e.flush()
            e.shutdown()
        self.metrics.close()

    def _flush(self, pending: list[bytes], gauges: list[EngineGauges]) -> None:
        if pending:
            self.metrics.send(b"".join(pending))
            self.points_payloads += 1
        if gauges:
            self.metrics.send(engine_metrics_request(gauges, self.fleet.s.start_ns))


class LocalGpus:
    """This machine's real GPUs through the agent's own NVML path (``stacklens demo --nvml``), sampled at most
    once a wall-clock second while the simulated fleet streams, and sent over the same OTLP transport."""

    def __init__(self, send: Callable[[bytes], object], clock: Callable[[], float] = time.monotonic) -> None:
        import socket

        from collector.agent import Agent
        from collector.host import HostSource
        from collector.nvml.source import NvmlGpuSource
        from collector.placement.resolver import PlacementResolver

        self.node = socket.gethostname()
        self.agent = Agent(self.node, NvmlGpuSource(pcie_counter_poll=False), [], HostSource(), PlacementResolver(),
                           slow_interval_s=1.0)
        self.encoder = OtlpMetricsEncoder(ResourceInfo(self.node))
        self.send = send
        self.clock = clock
        self.status = "closed"
        self.samples = 0
        self._last = -1e9

    def open(self) -> str:
        self.status = self.agent.open()
        return self.status

    def maybe_sample(self) -> None:
        if self.status != "ok" or self.clock() - self._last < 1.0:
            return
        self._last = self.clock()
        self.send(self.encoder.encode(self.agent.cycle()))
        self.samples += 1

    def close(self) -> None:
        self.agent.close()


def run_demo(fault: str, db: str, seed: int, scenario_path: str | None, console: Console, out: Console,
             nvml: bool = False) -> int:
    from correlator.analysis.why import RootCause, WhyQuery, store_findings
    from correlator.cli import print_why
    from correlator.server.serve import Correlator, ServeConfig

    if scenario_path:
        try:
            scenario: Scenario = load_scenario(scenario_path)
        except ValueError as e:
            console.print(f"stacklens demo: {e}", markup=False)
            return 2
    elif fault not in FAULT_KINDS:
        console.print(f"stacklens demo: unknown fault {fault!r}; choose one of: {', '.join(FAULT_KINDS)}",
                      markup=False)
        return 2
    else:
        scenario = fault_scenario(fault, seed=seed)
    for p in (Path(db), Path(f"{db}.wal")):
        p.unlink(missing_ok=True)
    t0 = time.perf_counter()
    # no online detection: simulated time runs ~100x faster than the detector's clock; the verdict comes at the end
    correlator = Correlator(ServeConfig(db=db, otlp_grpc=None, otlp_http="127.0.0.1:0", api=None,
                                        detect_interval_s=0))
    addresses = correlator.start()
    fleet = Fleet(scenario)
    truth = fleet.ground_truth
    console.print(f"stacklens demo: {scenario.nodes} nodes x {scenario.gpus_per_node} {scenario.gpu_type} GPUs "
                  f"serving {scenario.model} (TP {scenario.tp}), {scenario.duration_s / 60:.0f} simulated minutes; "
                  + (f"injecting {scenario.faults[0].kind} on {truth[0].node} GPU {scenario.faults[0].gpu} at "
                     f"minute {scenario.faults[0].onset_s / 60:.0f}" if scenario.faults else "no fault (benign drift)"),
                  markup=False)
    sender = FleetSender(fleet, addresses["otlp_http"])
    local = None
    if nvml:
        local = LocalGpus(sender.metrics.send)
        status = local.open()
        if status == "ok":
            console.print(f"adding this machine's real GPUs as node {local.node}, through the agent's NVML path",
                          markup=False)
        else:
            console.print(f"real NVML not used ({status}): the simulated fleet alone", markup=False)
    steps = int(scenario.duration_s)
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} s"),
                      TimeElapsedColumn(), console=console, transient=True) as progress:
            task = progress.add_task("simulating and sending over OTLP", total=steps)

            def tick(k: int) -> None:
                progress.update(task, completed=k + 1)
                if local is not None:
                    local.maybe_sample()

            sender.run(tick)
        if local is not None:
            local.close()
            if local.samples:
                console.print(f"sent {local.samples} samples of {local.node}'s real GPUs", markup=False)
        rows = correlator.store.stats.rows if correlator.store else 0
        console.print(f"sent {sender.spans} request spans and {steps} s of GPU, host and engine telemetry "
                      f"in {time.perf_counter() - t0:.1f} s; the correlator stored {rows} rows", markup=False)
        assert correlator.store is not None
        with correlator.store.reader() as cur:
            doc = RootCause(cur).why(WhyQuery())
            store_findings(cur, doc)
    finally:
        correlator.stop()
    print_why(doc, out)
    if truth:
        g = truth[0]
        top = doc["findings"][0] if doc["findings"] else None
        ok = bool(top and top["cause"] == g.cause and top["subcause"] == g.subcause and
                  (g.gpu_uuid is None or top["culprit"]["gpu"] == g.gpu_uuid))
        console.print(f"ground truth: {g.cause}/{g.subcause} on {g.node}"
                      + (f" GPU {g.gpu_uuid}" if g.gpu_uuid else "") + (" — matched" if ok else " — NOT matched"),
                      markup=False)
    console.print(f"done in {time.perf_counter() - t0:.1f} s. The database is {db}; try:\n"
                  f"  stacklens why --db {db} -o json\n  stacklens top --db {db}\n  stacklens slo --db {db}\n"
                  f"  stacklens requests --db {db} --limit 10\n  stacklens why --db {db} --plot why.png\n"
                  f"  stacklens demo --fault thermal_throttle   (faults: {', '.join(FAULT_KINDS)})", markup=False)
    return 0


def run_simulate(scenario: Scenario, otlp_http: str, speed: float, headers: tuple[tuple[str, str], ...],
                 console: Console, clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep) -> int:
    """Stream a simulated fleet to any OTLP/HTTP endpoint (a ``stacklens serve``, an OpenTelemetry
    Collector), its simulated time anchored at now and paced to the wall clock ``speed`` times faster,
    for dashboards and online detection to watch (the compose stack's demo profile)."""
    start_s = clock()
    fleet = Fleet(replace(scenario, start_ns=int(start_s * 1e9)))
    batch = max(1, round(5 * speed))  # about one export every 5 s of wall time
    sender = FleetSender(fleet, otlp_http.rstrip("/"), batch_ticks=batch, headers=headers)
    faults = ", ".join(f"{f.kind} on {fleet.nodes[f.node]} GPU {f.gpu} after {f.onset_s / 60:g} min"
                       for f in scenario.faults) or "no fault (benign drift)"
    console.print(f"stacklens simulate: {scenario.nodes} nodes x {scenario.gpus_per_node} {scenario.gpu_type} "
                  f"to {otlp_http} at {speed:g}x for {scenario.duration_s / 60:g} simulated minutes; {faults}",
                  markup=False)

    def pace(k: int) -> None:
        ahead = start_s + (k + 1) / speed - clock()
        if ahead > 0:
            sleep(ahead)
        if (k + 1) % 60 == 0:
            console.print(f"  {(k + 1) // 60} simulated min: {sender.spans} spans sent", markup=False)

    try:
        sender.run(pace)
    except KeyboardInterrupt:
        return 130
    console.print(f"done: {sender.spans} spans", markup=False)
    return 0
