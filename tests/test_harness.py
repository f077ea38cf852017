"""Self-tests of the telemetry harnesses in tests/harness: real servers, real clients."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Literal

import grpc
import pytest
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
    OTLPMetricExporter as GrpcMetricExporter,
)
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
    OTLPSpanExporter as GrpcSpanExporter,
)
from opentelemetry.exporter.otlp.proto.http import Compression as HttpCompression
from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
    OTLPMetricExporter as HttpMetricExporter,
)
from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
    OTLPSpanExporter as HttpSpanExporter,
)
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    InMemoryMetricReader,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from tests.harness import fixtures
from tests.harness.otlp_sink import MetricPoint, OtlpSink, SpanRecord
from tests.harness.prometheus_server import ScrapeTarget, free_tcp_port

Transport = Literal["grpc", "http"]
RESOURCE = {"service.name": "stacklens-harness-test", "host.name": "gpu-node-7"}
_PROXY_VARS = (
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "grpc_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
)


@pytest.fixture(autouse=True)
def _loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make sure no client routes 127.0.0.1 traffic through a proxy from the environment."""
    for var in _PROXY_VARS:
        monkeypatch.delenv(var, raising=False)


# ----------------------------------------------------------------------------------------------
# (a) real Prometheus scraping a real prometheus_client exposition
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def exposition() -> Iterator[tuple[int, Gauge]]:
    registry = CollectorRegistry()
    gauge = Gauge(
        "stacklens_harness_gpu_temperature_celsius",
        "GPU temperature (harness self-test)",
        ["gpu", "node"],
        registry=registry,
    )
    gauge.labels(gpu="0", node="gpu-node-7").set(61.5)
    port = free_tcp_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        yield port, gauge
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_prometheus_scrapes_real_exposition(
    prometheus_factory: fixtures.PrometheusFactory, exposition: tuple[int, Gauge]
) -> None:
    port, gauge = exposition
    dead_port = free_tcp_port()  # nothing listens here
    prom = prometheus_factory(
        [
            ScrapeTarget(f"127.0.0.1:{port}", job="harness"),
            ScrapeTarget(f"127.0.0.1:{dead_port}", job="dead", labels={"role": "missing"}),
        ],
        scrape_interval=0.5,
    )
    assert prom.url.startswith("http://127.0.0.1:")
    result = prom.wait_for('stacklens_harness_gpu_temperature_celsius{job="harness"}', timeout_s=15)
    assert len(result) == 1
    labels = result[0]["metric"]
    assert labels == {
        "__name__": "stacklens_harness_gpu_temperature_celsius",
        "gpu": "0",
        "node": "gpu-node-7",
        "job": "harness",
        "instance": f"127.0.0.1:{port}",
    }
    assert float(result[0]["value"][1]) == 61.5

    # A changed value shows up on a later scrape.
    gauge.labels(gpu="0", node="gpu-node-7").set(70.25)
    result = prom.wait_for(
        'stacklens_harness_gpu_temperature_celsius{gpu="0"}',
        predicate=lambda r: bool(r) and float(r[0]["value"][1]) == 70.25,
    )
    assert float(result[0]["value"][1]) == 70.25

    series = prom.series('{__name__="stacklens_harness_gpu_temperature_celsius"}')
    assert [s["gpu"] for s in series] == ["0"]
    end = time.time()
    ranged = prom.query_range("stacklens_harness_gpu_temperature_celsius", end - 30, end, 0.5)
    assert ranged
    assert ranged[0]["values"]

    # Target health is reported, and shows up in wait_for's timeout message.
    prom.wait_for('up{job="dead"} == 0')
    health = {t["labels"]["job"]: t["health"] for t in prom.targets()}
    assert health == {"harness": "up", "dead": "down"}
    with pytest.raises(AssertionError, match=r"job=dead .*health=down") as info:
        prom.wait_for("stacklens_no_such_metric", timeout_s=0.3)
    assert "job=harness" in str(info.value)

    # Reload with a new target set.
    prom.set_targets([ScrapeTarget(f"127.0.0.1:{port}", job="renamed")])
    prom.wait_for('stacklens_harness_gpu_temperature_celsius{job="renamed"}')


def test_require_prometheus_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STACKLENS_PROMETHEUS_BIN", "/nonexistent/prometheus")
    monkeypatch.delenv(fixtures.REQUIRE_PROMETHEUS_ENV, raising=False)
    assert not fixtures.prometheus_available()
    with pytest.raises(pytest.skip.Exception):
        fixtures.require_prometheus()
    monkeypatch.setenv(fixtures.REQUIRE_PROMETHEUS_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="STACKLENS_REQUIRE_PROMETHEUS"):
        fixtures.require_prometheus()


# ----------------------------------------------------------------------------------------------
# (b) real OpenTelemetry SDK -> OTLP exporters -> OtlpSink
# ----------------------------------------------------------------------------------------------


def _metric_exporter(
    sink: OtlpSink, transport: Transport, *, gzip: bool = False, timeout_s: float = 5.0
) -> MetricExporter:
    if transport == "grpc":
        return GrpcMetricExporter(
            endpoint=sink.grpc_endpoint,
            insecure=True,
            timeout=timeout_s,
            compression=grpc.Compression.Gzip if gzip else None,
        )
    return HttpMetricExporter(
        endpoint=sink.http_endpoint + "/v1/metrics",
        timeout=timeout_s,
        compression=HttpCompression.Gzip if gzip else HttpCompression.NoCompression,
    )


def _one(points: list[MetricPoint], name: str) -> MetricPoint:
    matching = [p for p in points if p.name == name]
    assert matching, f"no point named {name}: {points}"
    return matching[-1]


@pytest.mark.parametrize(
    ("transport", "gzip"), [("grpc", False), ("grpc", True), ("http", False), ("http", True)]
)
def test_sdk_metrics_arrive(otlp_sink: OtlpSink, transport: Transport, gzip: bool) -> None:
    exporter = _metric_exporter(otlp_sink, transport, gzip=gzip)
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=3_600_000)
    provider = MeterProvider(resource=Resource.create(RESOURCE), metric_readers=[reader])
    meter = provider.get_meter("stacklens.harness", "1.2.3")
    counter = meter.create_counter("harness.requests", unit="{request}")
    counter.add(3, {"gpu": "0"})
    counter.add(4, {"gpu": "0"})
    gauge = meter.create_gauge("harness.gpu.temperature", unit="Cel")
    gauge.set(61.5, {"gpu": "1", "ecc": True, "slot": 2})
    histogram = meter.create_histogram("harness.latency", unit="s")
    for value in (0.25, 0.5, 1.25):
        histogram.record(value)
    try:
        assert provider.force_flush(10_000)
    finally:
        provider.shutdown()

    points = otlp_sink.wait_for_points(
        lambda pts: (
            {"harness.requests", "harness.gpu.temperature", "harness.latency"} <= {p.name for p in pts}
        ),
        timeout_s=5,
    )
    requests = _one(points, "harness.requests")
    assert requests.kind == "sum"
    assert requests.is_monotonic
    assert requests.temporality == "cumulative"
    assert requests.value == 7.0
    assert requests.value_type == "int"
    assert requests.unit == "{request}"
    assert requests.attributes == {"gpu": "0"}
    assert requests.scope_name == "stacklens.harness"
    assert requests.scope_version == "1.2.3"
    assert requests.time_unix_nano >= requests.start_time_unix_nano > 0

    temperature = _one(points, "harness.gpu.temperature")
    assert temperature.kind == "gauge"
    assert not temperature.is_monotonic
    assert temperature.value == 61.5
    assert temperature.value_type == "double"
    assert temperature.attributes == {"gpu": "1", "ecc": True, "slot": 2}

    latency = _one(points, "harness.latency")
    assert latency.kind == "histogram"
    assert latency.count == 3
    assert latency.value == 2.0

    for point in points:
        assert point.resource_attributes["service.name"] == "stacklens-harness-test"
        assert point.resource_attributes["host.name"] == "gpu-node-7"

    exports = otlp_sink.exports()
    assert exports
    assert {e.transport for e in exports} == {transport}
    assert {e.signal for e in exports} == {"metrics"}
    if transport == "http":
        assert exports[0].metadata["content-type"] == "application/x-protobuf"
        assert exports[0].metadata.get("content-encoding", "identity") == ("gzip" if gzip else "identity")
    else:
        assert "user-agent" in exports[0].metadata


# ----------------------------------------------------------------------------------------------
# (c) failure injection and unreachable endpoint
# ----------------------------------------------------------------------------------------------


def _sample_metrics() -> MetricsData:
    reader = InMemoryMetricReader()
    provider = MeterProvider(resource=Resource.create(RESOURCE), metric_readers=[reader])
    provider.get_meter("stacklens.harness").create_counter("harness.retries").add(1, {"gpu": "0"})
    data = reader.get_metrics_data()
    provider.shutdown()
    assert data is not None
    return data


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_fail_next_then_success(otlp_sink: OtlpSink, transport: Transport) -> None:
    data = _sample_metrics()
    exporter = _metric_exporter(otlp_sink, transport)
    try:
        # A non-retryable failure makes the export itself fail...
        otlp_sink.fail_next(1, grpc_code=grpc.StatusCode.PERMISSION_DENIED, http_status=400)
        assert exporter.export(data) == MetricExportResult.FAILURE
        assert otlp_sink.rejected_count == 1
        assert otlp_sink.metrics_requests() == []
        assert otlp_sink.pending_failures == 0
        # ...and the next one goes through.
        assert exporter.export(data) == MetricExportResult.SUCCESS
        assert len(otlp_sink.metrics_requests()) == 1

        # Retryable failures (UNAVAILABLE / 503) are retried by the exporter, honouring the
        # sink's short RetryInfo / Retry-After hint, and the export ends up succeeding.
        otlp_sink.fail_next(2, retry_after_s=0.05)
        started = time.monotonic()
        assert exporter.export(data) == MetricExportResult.SUCCESS
        assert time.monotonic() - started < 2.0
        assert otlp_sink.rejected_count == 3
        assert len(otlp_sink.metrics_requests()) == 2
        accepted = [e.accepted for e in otlp_sink.exports()]
        assert accepted == [False, True, False, False, True]
    finally:
        exporter.shutdown()
    assert _one(otlp_sink.metric_points(), "harness.retries").value == 1.0


def _refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return False
    except ConnectionRefusedError:
        return True


def test_stop_makes_endpoint_unreachable_and_start_rebinds(otlp_sink: OtlpSink) -> None:
    grpc_endpoint, http_endpoint = otlp_sink.grpc_endpoint, otlp_sink.http_endpoint
    data = _sample_metrics()
    http_exporter = _metric_exporter(otlp_sink, "http", timeout_s=1.0)
    grpc_exporter = _metric_exporter(otlp_sink, "grpc", timeout_s=10.0)
    try:
        assert http_exporter.export(data) == MetricExportResult.SUCCESS  # keep-alive connection open
        otlp_sink.stop()
        assert not otlp_sink.running
        assert _refused(otlp_sink.grpc_port)
        assert _refused(otlp_sink.http_port)
        assert http_exporter.export(data) == MetricExportResult.FAILURE
        assert len(otlp_sink.exports()) == 1

        otlp_sink.start()
        assert otlp_sink.running
        assert (otlp_sink.grpc_endpoint, otlp_sink.http_endpoint) == (grpc_endpoint, http_endpoint)
        assert http_exporter.export(data) == MetricExportResult.SUCCESS
        assert grpc_exporter.export(data) == MetricExportResult.SUCCESS
        assert [e.transport for e in otlp_sink.exports()] == ["http", "http", "grpc"]
    finally:
        http_exporter.shutdown()
        grpc_exporter.shutdown()


# ----------------------------------------------------------------------------------------------
# (d) traces through the SDK's OTLP span exporters
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_sdk_spans_arrive(otlp_sink: OtlpSink, transport: Transport) -> None:
    exporter: SpanExporter
    if transport == "grpc":
        exporter = GrpcSpanExporter(endpoint=otlp_sink.grpc_endpoint, insecure=True, timeout=5)
    else:
        exporter = HttpSpanExporter(endpoint=otlp_sink.http_endpoint + "/v1/traces", timeout=5)
    provider = TracerProvider(resource=Resource.create(RESOURCE))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("stacklens.harness.tracer")
    with tracer.start_as_current_span("request", kind=SpanKind.SERVER) as parent:
        parent.set_attribute("llm.model", "tiny")
        with tracer.start_as_current_span("gpu.kernel", attributes={"gpu": 3}) as child:
            child.add_event("throttled", {"reason": "thermal"})
            child.set_status(StatusCode.ERROR, "slow")
    provider.shutdown()

    spans = otlp_sink.wait_for_spans(lambda s: len(s) >= 2, timeout_s=5)
    by_name: dict[str, SpanRecord] = {s.name: s for s in spans}
    request, kernel = by_name["request"], by_name["gpu.kernel"]
    assert request.kind == "server"
    assert request.parent_span_id == ""
    assert request.attributes == {"llm.model": "tiny"}
    assert kernel.kind == "internal"
    assert kernel.parent_span_id == request.span_id
    assert kernel.trace_id == request.trace_id
    assert len(kernel.trace_id) == 32
    assert kernel.attributes == {"gpu": 3}
    assert kernel.status_code == "error"
    assert kernel.status_message == "slow"
    assert [(e.name, e.attributes) for e in kernel.events] == [("throttled", {"reason": "thermal"})]
    assert kernel.scope_name == "stacklens.harness.tracer"
    assert kernel.end_time_unix_nano >= kernel.start_time_unix_nano
    for span in spans:
        assert span.resource_attributes["service.name"] == "stacklens-harness-test"
    assert {e.transport for e in otlp_sink.exports()} == {transport}
    assert otlp_sink.metric_points() == []
