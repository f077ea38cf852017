"""The correlator's receivers with real clients: the OpenTelemetry SDK's OTLP exporters (gRPC and HTTP)
send spans shaped exactly like vLLM's and metrics named like the agent's and like forwarded DCGM series;
everything arrives in DuckDB with the right values. Bad payloads are refused and nothing of them stays."""

from __future__ import annotations

import gzip
import http.client
import json
import zlib
from typing import Any
from urllib.parse import urlsplit

import pytest
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcMetricExporter
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter
from opentelemetry.metrics import Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource

from collector.engine_spans import FinishedRequest, VllmSpanEmitter, engine_resource
from collector.export.otlp_encode import OtlpMetricsEncoder, ResourceInfo
from collector.records import NodeSnapshot, Placement
from collector.simulated import SimulatedGpuSource

T0 = 1_790_000_000_000_000_000


Req = FinishedRequest


def _reqs(n: int, offset: int = 0) -> list[Req]:
    return [Req(f"cmpl-{offset + i}", T0 + i * 10**8, T0 + i * 10**8 + 2 * 10**9, 0.01 * i, 0.05, 1.2, 100 + i,
                 1 + i % 50) for i in range(n)]


def _rows(c: Any, sql: str) -> list[tuple[Any, ...]]:
    c.store.flush()  # acknowledged exports are committed within about a second (the spool); now, for the test
    with c.store.reader() as cur:
        return list(cur.execute(sql).fetchall())


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_sdk_exporter_spans_shaped_like_vllm_arrive_with_their_values(correlator: Any, transport: str) -> None:
    if transport == "grpc":
        exporter: Any = GrpcSpanExporter(endpoint=correlator.addresses["otlp_grpc"], insecure=True)
    else:
        exporter = HttpSpanExporter(endpoint=correlator.addresses["otlp_http"] + "/v1/traces")
    emitter = VllmSpanEmitter(engine_resource("vllm", "node-1", 4242, model="llama-2-70b",
                                              gpu_uuids=["GPU-a", "GPU-b"]), exporter)
    reqs = _reqs(300)
    for r in reqs:
        emitter.emit(r, max_tokens=512)
    assert emitter.flush()
    emitter.shutdown()
    rows = _rows(correlator, "SELECT request_id, start_ns, end_ns, ttft_s, tpot_s, e2e_s, queue_s, prefill_s, "
                             "decode_s, prompt_tokens, output_tokens, model, pid, gpu_uuids, finish_reason, engine, "
                             "n.name FROM requests JOIN nodes n USING (node_id) ORDER BY start_ns")
    assert len(rows) == 300
    for r, row in zip(reqs, rows, strict=True):
        assert row[0] == r.request_id and row[1] == r.arrival_ns and row[2] == r.end_ns
        assert row[3] == pytest.approx(r.ttft_s) and row[5] == pytest.approx(r.e2e_s)
        assert row[6:9] == pytest.approx((r.queue_s, r.prefill_s, r.decode_s))
        # TPOT = decode / (output tokens - 1); none for a single output token
        assert row[4] == (None if r.output_tokens < 2 else pytest.approx(r.decode_s / (r.output_tokens - 1)))
        assert row[9:] == (r.prompt_tokens, r.output_tokens, "llama-2-70b", 4242, "GPU-a,GPU-b", "stop", "vllm",
                           "node-1")


def test_agent_metrics_over_http_keep_nvml_times_values_and_missing(correlator: Any) -> None:
    src = SimulatedGpuSource(2, seed=3)
    enc = OtlpMetricsEncoder(ResourceInfo("node-7"))
    bodies = []
    for i in range(3):
        t = T0 + i * 10**9
        gpus = src.sample(t, slow=True, processes=True)
        pl = tuple(Placement(g.gpu.uuid, g.gpu.index, 5000 + g.gpu.index, t, container_id="c0ffee") for g in gpus)
        bodies.append(enc.encode(NodeSnapshot("node-7", t, gpus, placements=pl)))
        expected_power = {g.gpu.uuid: next(r.value for r in g.readings if r.signal == "power_w") for g in gpus}
    body = b"".join(bodies)
    status, _ = _post(correlator, "/v1/metrics", gzip.compress(body), "application/x-protobuf", "gzip")
    assert status == 200
    power = dict(_rows(correlator, "SELECT g.uuid, value FROM gpu_samples JOIN gpus g USING (gpu_id) "
                                   "JOIN signals s USING (signal_id) WHERE s.name = 'power_w' "
                                   f"AND time_ns = {T0 + 2 * 10**9}"))
    assert power == pytest.approx(expected_power)
    info = _rows(correlator, "SELECT uuid, gpu_index, model, n.name FROM gpus JOIN nodes n USING (node_id) "
                             "ORDER BY gpu_index")
    assert [(i[1], i[2], i[3]) for i in info] == [(0, "NVIDIA H100 80GB HBM3", "node-7"),
                                                  (1, "NVIDIA H100 80GB HBM3", "node-7")]
    assert _rows(correlator, "SELECT count(*), min(pid), max(pid), min(container_id) FROM placements") == [
        (6, 5000, 5001, "c0ffee")]


def test_missing_value_is_stored_as_null_never_zero(correlator: Any) -> None:
    src = SimulatedGpuSource(1, seed=3)
    gpus = src.sample(T0, slow=False, processes=False)
    from collector.records import GpuSample, Reading
    g = gpus[0]
    g2 = GpuSample(g.gpu, g.time_ns, (*g.readings, Reading("memory_temp_c", None, T0 + 5)))
    body = OtlpMetricsEncoder(ResourceInfo("n")).encode(NodeSnapshot("n", T0, (g2,)))
    assert _post(correlator, "/v1/metrics", body, "application/x-protobuf")[0] == 200
    assert _rows(correlator, "SELECT value FROM gpu_samples JOIN signals USING (signal_id) "
                             f"WHERE name = 'memory_temp_c' AND time_ns = {T0 + 5}") == [(None,)]


def test_dcgm_series_forwarded_by_an_otel_collector_are_normalised(correlator: Any) -> None:
    """What the OTel Collector's Prometheus receiver sends after scraping dcgm-exporter: DCGM metric names
    as they are, exporter labels as point attributes, units of DCGM (MHz, MiB, mJ, percent)."""
    labels = {"gpu": "3", "UUID": "GPU-dcgm-3", "Hostname": "node-9", "modelName": "NVIDIA H100 80GB HBM3",
              "pod": "vllm-0", "namespace": "serving", "container": "vllm"}
    values = {"DCGM_FI_DEV_SM_CLOCK": 1755.0, "DCGM_FI_DEV_FB_USED": 1024.0, "DCGM_FI_DEV_POWER_USAGE": 512.5,
              "DCGM_FI_DEV_GPU_UTIL": 87.0, "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION": 5000.0,
              "DCGM_FI_PROF_PCIE_RX_BYTES": 2.5e9,
              "vllm_gpu_cache_usage_perc": 0.93}  # the SDK refuses ":" in names; receivers may write "_"
    reader = PeriodicExportingMetricReader(
        GrpcMetricExporter(endpoint=correlator.addresses["otlp_grpc"], insecure=True), export_interval_millis=60_000)
    provider = MeterProvider(resource=Resource.create({"service.name": "dcgm-exporter"}), metric_readers=[reader])
    meter = provider.get_meter("otelcol/prometheusreceiver")
    def observe(v: float) -> Any:
        return lambda _options: [Observation(v, labels)]

    for name, v in values.items():
        meter.create_observable_gauge(name, callbacks=[observe(v)])
    provider.force_flush()
    provider.shutdown()
    got = dict(_rows(correlator, "SELECT s.name, value FROM gpu_samples JOIN signals s USING (signal_id) "
                                 "JOIN gpus g USING (gpu_id) WHERE g.uuid = 'GPU-dcgm-3'"))
    assert got == pytest.approx({"sm_clock_hz": 1755e6, "fb_used_bytes": 1024 * 2**20, "power_w": 512.5,
                                 "gpu_util_ratio": 0.87, "energy_j": 5.0, "pcie_rx_bytes_per_s": 2.5e9})
    assert _rows(correlator, "SELECT n.name, g.gpu_index FROM gpus g JOIN nodes n USING (node_id)") == [("node-9", 3)]
    assert _rows(correlator, "SELECT DISTINCT pod, namespace FROM placements") == [("vllm-0", "serving")]
    # (flush and shutdown each collect the observable gauges once)
    assert _rows(correlator, "SELECT DISTINCT s.name, value FROM engine_samples JOIN signals s USING (signal_id)") == [
        ("engine_kv_cache_usage_ratio", pytest.approx(0.93))]


def test_http_metrics_exporter_of_the_sdk_is_accepted(correlator: Any) -> None:
    reader = PeriodicExportingMetricReader(
        HttpMetricExporter(endpoint=correlator.addresses["otlp_http"] + "/v1/metrics"), export_interval_millis=60_000)
    provider = MeterProvider(resource=Resource.create({"host.name": "node-3"}), metric_readers=[reader])
    provider.get_meter("x").create_observable_gauge(
        "stacklens.gpu_temp_c", callbacks=[lambda _o: [Observation(71.0, {"gpu.uuid": "GPU-h"})]])
    provider.force_flush()
    provider.shutdown()
    assert _rows(correlator, "SELECT DISTINCT value FROM gpu_samples") == [(71.0,)]


# -- bad input -------------------------------------------------------------------------------------
def _post(c: Any, path: str, body: bytes, ctype: str, encoding: str = "",
          headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    u = urlsplit(c.addresses["otlp_http"])
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    h = {"Content-Type": ctype, **({"Content-Encoding": encoding} if encoding else {}), **(headers or {})}
    conn.request("POST", path, body=body, headers=h)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, data


def _valid_spans_json() -> bytes:
    return json.dumps({"resourceSpans": [{"resource": {"attributes": [
        {"key": "host.name", "value": {"stringValue": "node-j"}}]},
        "scopeSpans": [{"spans": [{
            "traceId": "5b8efff798038103d269b633813fc60c", "spanId": "eee19b7ec3c1b174", "name": "llm_request",
            "startTimeUnixNano": str(T0), "endTimeUnixNano": str(T0 + 3 * 10**9), "kind": 2,
            "attributes": [
                {"key": "gen_ai.latency.time_to_first_token", "value": {"doubleValue": 0.25}},
                {"key": "gen_ai.latency.time_in_queue", "value": {"doubleValue": 0.05}},
                {"key": "gen_ai.latency.e2e", "value": {"doubleValue": 3.0}},
                {"key": "gen_ai.usage.completion_tokens", "value": {"intValue": "11"}},
                {"key": "gen_ai.response.model", "value": {"stringValue": "m0"}}]}]}]}]}).encode()


def test_otlp_json_with_hex_ids_is_accepted_and_v0_decode_is_derived(correlator: Any) -> None:
    assert _post(correlator, "/v1/traces", _valid_spans_json(), "application/json")[0] == 200
    rows = _rows(correlator, "SELECT trace_id, span_id, model, prefill_s, decode_s, tpot_s FROM requests")
    assert rows == [("5b8efff798038103d269b633813fc60c", "eee19b7ec3c1b174", "m0", pytest.approx(0.2),
                     pytest.approx(2.75), pytest.approx(0.275))]


BOMB = gzip.compress(b"\0" * (80 << 20))


@pytest.mark.parametrize(("body", "ctype", "encoding", "status"), [
    (b"\xff\xff\xff\xff", "application/x-protobuf", "", 400),            # not protobuf
    (_valid_spans_json()[:-9], "application/json", "", 400),             # truncated JSON
    (b'{"resourceSpans": 5}', "application/json", "", 400),              # wrong shape
    (b"{}", "text/plain", "", 415),                                      # wrong content type
    (b"\x1f\x8b\x08\x00garbage", "application/x-protobuf", "gzip", 400),  # broken gzip
    (gzip.compress(b"x" * 1000)[:-10], "application/x-protobuf", "gzip", 400),  # truncated gzip
    (BOMB, "application/x-protobuf", "gzip", 413),                       # gzip bomb
    (b"x", "application/x-protobuf", "br", 415),                         # unsupported encoding
])
def test_bad_payloads_are_refused_nothing_is_stored_and_serving_goes_on(
        correlator: Any, body: bytes, ctype: str, encoding: str, status: int) -> None:
    got, msg = _post(correlator, "/v1/traces", body, ctype, encoding)
    assert got == status, msg
    assert msg  # a message says why
    assert _rows(correlator, "SELECT count(*) FROM requests") == [(0,)]
    assert _post(correlator, "/v1/traces", _valid_spans_json(), "application/json")[0] == 200
    assert _rows(correlator, "SELECT count(*) FROM requests") == [(1,)]


def test_oversized_body_is_413_before_it_is_read(correlator: Any) -> None:
    status, msg = _post(correlator, "/v1/metrics", b"\0" * (17 << 20), "application/x-protobuf")
    assert status == 413 and b"limit" in msg


def test_grpc_malformed_message_is_invalid_argument(correlator: Any) -> None:
    import grpc
    channel = grpc.insecure_channel(correlator.addresses["otlp_grpc"])
    call = channel.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export")
    with pytest.raises(grpc.RpcError) as e:
        call(b"\xff\xff\xff\xff", timeout=5)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    channel.close()


def _spans_message(n: int) -> bytes:
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind

    from collector.engine_spans import vllm_v1_attributes

    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=engine_resource("vllm", "node-1", 4242, model="m0"))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("vllm.llm_engine")
    for r in _reqs(n):
        span = tracer.start_span("llm_request", kind=SpanKind.SERVER, start_time=r.arrival_ns,
                                 attributes=vllm_v1_attributes(r, max_tokens=1024))
        span.end(end_time=r.end_ns)
    body: bytes = encode_spans(exporter.get_finished_spans()).SerializeToString()
    provider.shutdown()
    return body


@pytest.mark.parametrize("compression", ["gzip", "deflate", "none"])
def test_grpc_compressed_messages_are_inflated_by_the_receiver(correlator: Any, compression: str) -> None:
    """grpcio hands compressed messages over as they came (its inflate cost ~1.45x the CPU); the receiver tells
    gzip and deflate from a message by their first bytes and inflates them itself."""
    import grpc
    which = {"gzip": grpc.Compression.Gzip, "deflate": grpc.Compression.Deflate,
             "none": grpc.Compression.NoCompression}[compression]
    with grpc.insecure_channel(correlator.addresses["otlp_grpc"], compression=which) as channel:
        call = channel.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export")
        call(_spans_message(50), timeout=10)
    assert _rows(correlator, "SELECT count(*), sum(output_tokens) FROM requests") == [
        (50, sum(r.output_tokens for r in _reqs(50)))]


def test_grpc_compression_bomb_is_refused_within_the_decoded_limit(correlator: Any) -> None:
    import grpc
    bomb = b"\x0a" + b"\0" * (80 << 20)  # a message that inflates past max_decoded_bytes (64 MiB)
    with grpc.insecure_channel(correlator.addresses["otlp_grpc"], compression=grpc.Compression.Gzip) as channel:
        call = channel.unary_unary("/opentelemetry.proto.collector.metrics.v1.MetricsService/Export")
        with pytest.raises(grpc.RpcError) as e:
            call(bomb, timeout=30)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit" in (e.value.details() or "")
    assert _rows(correlator, "SELECT count(*) FROM gpu_samples") == [(0,)]


def test_a_message_that_starts_like_a_zlib_header_is_not_taken_for_one() -> None:
    from correlator.ingest.payload import DEFAULT_LIMITS
    from correlator.server.otlp_grpc import _decode, _encoding

    body = _spans_message(3)
    assert _encoding(body) == "" and _encoding(gzip.compress(body)) == "gzip"
    assert _encoding(zlib.compress(body)) == "deflate"
    # field 15, varint 0x9c (0x789c: what zlib writes first), an unknown field a decoder skips, then the spans
    odd = b"\x78\x9c\x01" + body
    assert _encoding(odd) == "deflate"
    batch, message = _decode("traces", odd, "deflate", DEFAULT_LIMITS)
    assert message == odd and len(batch.tables()["requests"]) == 3


def test_non_loopback_bind_requires_a_token_and_the_token_is_checked(tmp_path: Any) -> None:
    from correlator.server.serve import Correlator, ServeConfig, ServeConfigError
    with pytest.raises(ServeConfigError, match="token"):
        Correlator(ServeConfig(db=str(tmp_path / "x.duckdb"), otlp_http="0.0.0.0:0", otlp_grpc=None, api=None))
    c = Correlator(ServeConfig(db=str(tmp_path / "y.duckdb"), otlp_http="127.0.0.1:0", otlp_grpc=None, api=None,
                               token="s3cret"))
    c.start()
    try:
        assert _post(c, "/v1/traces", _valid_spans_json(), "application/json")[0] == 401
        assert _post(c, "/v1/traces", _valid_spans_json(), "application/json",
                     headers={"Authorization": "Bearer s3cret"})[0] == 200
    finally:
        c.stop()


def test_db_threads_sets_duckdbs_workers_and_ingest_still_stores(tmp_path: Any) -> None:
    """``serve --db-threads 1``: the store's DuckDB runs one worker thread (its default is one per core) and spans
    sent over HTTP are stored and read back as before; a count under one is refused."""
    from correlator.server.serve import Correlator, ServeConfig
    from correlator.store.duckdb_store import Store, StoreError

    with pytest.raises(StoreError, match="at least 1"):
        Store(tmp_path / "z.duckdb", threads=0)
    c = Correlator(ServeConfig(db=str(tmp_path / "t.duckdb"), otlp_http="127.0.0.1:0", otlp_grpc=None, api=None,
                               db_threads=1, detect_interval_s=0))
    c.start()
    try:
        assert c.store is not None
        assert _post(c, "/v1/traces", _valid_spans_json(), "application/json")[0] == 200
        c.store.flush()
        with c.store.reader() as cur:  # the writer thread owns the store's connection: a reader takes a cursor
            assert cur.execute("SELECT current_setting('threads')").fetchall() == [(1,)]
            assert cur.execute("SELECT count(*) FROM requests").fetchall()[0][0] >= 1
    finally:
        c.stop()
