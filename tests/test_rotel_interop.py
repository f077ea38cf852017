"""Interop through a real collector: rotel (PyPI ``rotel``, a Rust OpenTelemetry collector) sits between the
real OpenTelemetry SDK / the agent's own encoder and the correlator, receiving OTLP on gRPC and HTTP and
exporting it over gRPC or HTTP (gzip, batched). Everything arrives in DuckDB with its values: vLLM-shaped
spans, DCGM-named gauges, a GenAI latency histogram and the agent's GPU samples."""

from __future__ import annotations

import contextlib
import http.client
import importlib.util
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcMetricExporter
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource

from collector.engine_spans import VllmSpanEmitter, engine_resource
from collector.export.otlp_encode import OtlpMetricsEncoder, ResourceInfo
from collector.records import NodeSnapshot
from collector.simulated import SimulatedGpuSource
from tests.harness.prometheus_server import free_tcp_port

T0 = 1_790_000_000_000_000_000


def rotel_binary() -> str:
    """The rotel-agent executable that the ``rotel`` wheel ships; skip (with the reason) where it cannot."""
    spec = importlib.util.find_spec("rotel")
    if spec is None or spec.origin is None:
        pytest.skip("rotel is not installed: `pip install 'rotel>=0.0.1a15,<0.1'` (pyproject's dev extras); it "
                    "ships prebuilt wheels for Linux and macOS on x86_64 and arm64 only")
    path = Path(spec.origin).parent / "rotel-agent"
    if not path.exists() or not os.access(path, os.X_OK):
        pytest.skip(f"the rotel wheel installed here has no runnable agent binary at {path} (platform without one)")
    return str(path)


def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"rotel-agent exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise AssertionError(f"rotel-agent did not listen on {port}:\n{log.read_text()[-3000:]}")


class Rotel:
    def __init__(self, binary: str, tmp: Path, export_to: str, protocol: str) -> None:
        self.grpc_port, self.http_port = free_tcp_port(), free_tcp_port()
        self.log = tmp / "rotel.log"
        cmd = [binary, "start", "--otlp-grpc-endpoint", f"127.0.0.1:{self.grpc_port}",
               "--otlp-http-endpoint", f"127.0.0.1:{self.http_port}", "--exporter", "otlp",
               "--otlp-exporter-endpoint", export_to, "--otlp-exporter-protocol", protocol,
               "--otlp-exporter-compression", "gzip", "--batch-timeout", "100ms",
               "--pid-file", str(tmp / "rotel.pid"), "--log-file", str(tmp / "rotel-agent.log")]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, "NO_COLOR": "1"})
        try:
            _wait_port(self.grpc_port, self.proc, self.log)
            _wait_port(self.http_port, self.proc, self.log)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture(params=["grpc", "http"])
def rotel_in_front(request: pytest.FixtureRequest, correlator: Any, tmp_path: Path) -> Iterator[Rotel]:
    """rotel receiving on its own ports and exporting to the correlator over ``request.param``."""
    binary = rotel_binary()
    protocol = str(request.param)
    target = ("http://" + correlator.addresses["otlp_grpc"]) if protocol == "grpc" else \
        correlator.addresses["otlp_http"]
    r = Rotel(binary, tmp_path, target, protocol)
    try:
        yield r
    finally:
        r.close()


class Req:
    def __init__(self, i: int) -> None:
        self.request_id = f"cmpl-{i}"
        self.arrival_ns = T0 + i * 10**8
        self.queue_s, self.prefill_s, self.decode_s = 0.01 * (i % 7), 0.05 + 0.001 * i, 0.8 + 0.01 * i
        self.ttft_s = self.queue_s + self.prefill_s
        self.e2e_s = self.ttft_s + self.decode_s
        self.end_ns = self.arrival_ns + round(self.e2e_s * 1e9)
        self.prompt_tokens, self.output_tokens, self.finish_reason = 100 + i, 1 + i % 40, "length"


def _rows(c: Any, sql: str) -> list[tuple[Any, ...]]:
    c.store.flush()  # acknowledged exports are committed within about a second (the spool); now, for the test
    with c.store.reader() as cur:
        return list(cur.execute(sql).fetchall())


def _wait_rows(c: Any, sql: str, want: int, log: Path, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    n = 0
    while time.monotonic() < deadline:
        n = _rows(c, sql)[0][0]
        if n >= want:
            return
        time.sleep(0.1)
    raise AssertionError(f"{sql}: {n} of {want} after {timeout_s}s; rotel log:\n{log.read_text()[-3000:]}")


def test_spans_and_metrics_through_rotel_arrive_with_their_values(rotel_in_front: Rotel, correlator: Any) -> None:
    rotel = rotel_in_front
    # vLLM-shaped spans from the SDK: half over gRPC, half over HTTP into rotel
    reqs = [Req(i) for i in range(240)]
    for half, exporter in ((reqs[:120], GrpcSpanExporter(endpoint=f"127.0.0.1:{rotel.grpc_port}", insecure=True)),
                           (reqs[120:], HttpSpanExporter(endpoint=f"http://127.0.0.1:{rotel.http_port}/v1/traces"))):
        emitter = VllmSpanEmitter(engine_resource("vllm", "node-3", 777, model="llama-3-8b", gpu_uuids=["GPU-x"]),
                                  exporter)
        for r in half:
            emitter.emit(r, max_tokens=256)
        assert emitter.flush()
        emitter.shutdown()

    # DCGM-named gauges and a GenAI latency histogram from the SDK's metrics exporter
    reader = PeriodicExportingMetricReader(
        GrpcMetricExporter(endpoint=f"127.0.0.1:{rotel.grpc_port}", insecure=True), export_interval_millis=60_000)
    provider = MeterProvider(resource=Resource.create({"service.name": "vllm", "host.name": "node-3",
                                                       "gen_ai.request.model": "llama-3-8b"}),
                             metric_readers=[reader])
    meter = provider.get_meter("interop")
    labels = {"gpu": "1", "UUID": "GPU-rotel-1", "Hostname": "node-3", "modelName": "NVIDIA H100 80GB HBM3"}

    def observe(v: float) -> Callable[[CallbackOptions], Iterable[Observation]]:
        return lambda _options: [Observation(v, labels)]

    for name, v in {"DCGM_FI_DEV_POWER_USAGE": 401.5, "DCGM_FI_DEV_SM_CLOCK": 1980.0}.items():
        meter.create_observable_gauge(name, callbacks=[observe(v)])
    ttft = meter.create_histogram("gen_ai.server.time_to_first_token", unit="s")
    for x in (0.1, 0.2, 0.3, 0.4):
        ttft.record(x)
    provider.force_flush()
    provider.shutdown()

    # the agent's own OTLP/HTTP protobuf payload (NVML timestamps) into rotel's HTTP receiver
    src = SimulatedGpuSource(2, seed=11)
    gpus = src.sample(T0, slow=True, processes=False)
    body = OtlpMetricsEncoder(ResourceInfo("node-4")).encode(NodeSnapshot("node-4", T0, gpus))
    power = {g.gpu.uuid: next(r for r in g.readings if r.signal == "power_w") for g in gpus}
    conn = http.client.HTTPConnection("127.0.0.1", rotel.http_port, timeout=10)
    conn.request("POST", "/v1/metrics", body, {"Content-Type": "application/x-protobuf"})
    resp = conn.getresponse()
    resp.read()
    conn.close()
    assert resp.status == 200

    _wait_rows(correlator, "SELECT count(*) FROM requests", len(reqs), rotel.log)
    _wait_rows(correlator, "SELECT count(*) FROM gpu_samples JOIN gpus g USING (gpu_id) WHERE g.uuid = 'GPU-rotel-1'",
               2, rotel.log)
    _wait_rows(correlator, "SELECT count(*) FROM engine_samples", 2, rotel.log)
    _wait_rows(correlator, "SELECT count(DISTINCT gpu_id) FROM gpu_samples JOIN gpus g USING (gpu_id) "
                           "JOIN nodes n USING (node_id) WHERE n.name = 'node-4'", 2, rotel.log)

    rows = _rows(correlator, "SELECT request_id, start_ns, end_ns, ttft_s, tpot_s, e2e_s, queue_s, prefill_s, "
                             "decode_s, prompt_tokens, output_tokens, model, pid, gpu_uuids, finish_reason, n.name "
                             "FROM requests JOIN nodes n USING (node_id) ORDER BY start_ns")
    assert len(rows) == len(reqs)  # none lost, none twice
    for r, row in zip(reqs, rows, strict=True):
        assert row[:3] == (r.request_id, r.arrival_ns, r.end_ns)
        assert row[3:9] == pytest.approx((r.ttft_s, r.decode_s / (r.output_tokens - 1) if r.output_tokens > 1
                                          else None, r.e2e_s, r.queue_s, r.prefill_s, r.decode_s))
        assert row[9:] == (r.prompt_tokens, r.output_tokens, "llama-3-8b", 777, "GPU-x", "length", "node-3")

    got = dict(_rows(correlator, "SELECT s.name, value FROM gpu_samples JOIN signals s USING (signal_id) "
                                 "JOIN gpus g USING (gpu_id) WHERE g.uuid = 'GPU-rotel-1'"))
    assert got == pytest.approx({"power_w": 401.5, "sm_clock_hz": 1980e6})
    assert _rows(correlator, "SELECT gpu_index, model, n.name FROM gpus JOIN nodes n USING (node_id) "
                             "WHERE uuid = 'GPU-rotel-1'") == [(1, "NVIDIA H100 80GB HBM3", "node-3")]
    eng = dict(_rows(correlator, "SELECT s.name, value FROM engine_samples JOIN signals s USING (signal_id)"))
    assert eng == pytest.approx({"engine_ttft_seconds_sum": 1.0, "engine_ttft_seconds_count": 4.0})
    agent = dict(_rows(correlator, "SELECT g.uuid, value FROM gpu_samples JOIN gpus g USING (gpu_id) "
                                   "JOIN signals s USING (signal_id) WHERE s.name = 'power_w' AND g.uuid <> "
                                   "'GPU-rotel-1'"))
    assert agent == pytest.approx({u: r.value for u, r in power.items()})
    times = _rows(correlator, "SELECT DISTINCT time_ns FROM gpu_samples JOIN gpus g USING (gpu_id) "
                              "JOIN signals s USING (signal_id) WHERE s.name = 'power_w' AND g.uuid <> 'GPU-rotel-1'")
    assert sorted(t for (t,) in times) == sorted({r.time_ns for r in power.values()})  # NVML's, kept by rotel
