"""The OTLP decoders under hypothesis: random bytes, truncated and corrupted protobuf, mutated JSON, messages
of the right structure with the wrong types, gzip bombs. Whatever arrives, ``decode``/``decode_message``
either return rows the store can take (every value fits its column, nothing NULL where the schema forbids
it: a bad row would fail the group commit it shares with other clients' batches) or raise PayloadError
with a 4xx status. Valid messages round-trip their values. Deterministic (derandomized) and fast."""

from __future__ import annotations

import base64
import copy
import gzip
import json
import math
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue, KeyValueList
from opentelemetry.proto.metrics.v1.metrics_pb2 import Metric, NumberDataPoint
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from collector.engine_spans import vllm_v1_attributes
from collector.export.otlp_encode import OtlpMetricsEncoder, ResourceInfo
from collector.records import NodeSnapshot
from collector.signals import ENGINE_SIGNALS, SIGNALS
from collector.simulated import SimulatedGpuSource
from correlator.ingest.batch import IngestBatch
from correlator.ingest.payload import (
    INLINE_DECODE_BYTES,
    Limits,
    PayloadError,
    Signal,
    decode,
    decode_inline,
    decode_message,
    inflate,
)
from correlator.store.duckdb_store import Store, _arrow
from tests.otlp_wire import assert_same_batch

FUZZ = settings(derandomize=True, deadline=None, database=None, max_examples=1000,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
T0 = 1_790_000_000_000_000_000
PB, JS = "application/x-protobuf", "application/json"

# columns the schema declares NOT NULL (gpu_samples' gpu_uuid may be None: the store names the GPU by index)
_NOT_NULL = {"gpu_samples": ("time_ns", "node", "signal"), "host_samples": ("time_ns", "node", "signal"),
             "engine_samples": ("time_ns", "node", "signal"), "placements": ("time_ns", "node", "gpu_uuid"),
             "gpu_info": ("node", "gpu_uuid"), "requests": ("start_ns", "end_ns", "node")}


def storable(batch: IngestBatch) -> None:
    """Every table converts to the store's Arrow column types, with no NULL where the schema forbids one."""
    for name, rows in batch.tables().items():
        _arrow(rows)
        for col in _NOT_NULL[name]:
            assert None not in rows.data[col], (name, col)


def accepted_or_4xx(call: Callable[[], IngestBatch]) -> IngestBatch | None:
    status = 0
    try:
        batch = call()
    except PayloadError as e:
        status = e.status
    if status:
        assert 400 <= status < 500, status
        return None
    assert isinstance(batch, IngestBatch)
    storable(batch)
    return batch


# -- a corpus of valid messages: what the OTel SDK and the agent send --------------------------------
_EXPORTER = InMemorySpanExporter()
_PROVIDER = TracerProvider(resource=Resource.create({"service.name": "vllm", "host.name": "node-1",
                                                     "process.pid": 4242, "gen_ai.request.model": "llama"}))
_PROVIDER.add_span_processor(SimpleSpanProcessor(_EXPORTER))
_TRACER = _PROVIDER.get_tracer("vllm.llm_engine")


class Req:
    def __init__(self, i: int, start_ns: int, queue_s: float, prefill_s: float, decode_s: float, prompt: int,
                 output: int) -> None:
        self.request_id, self.arrival_ns = f"cmpl-{i}", start_ns
        self.queue_s, self.prefill_s, self.decode_s = queue_s, prefill_s, decode_s
        self.ttft_s = queue_s + prefill_s
        self.e2e_s = self.ttft_s + decode_s
        self.end_ns = start_ns + int(self.e2e_s * 1e9)
        self.prompt_tokens, self.output_tokens, self.finish_reason = prompt, output, "stop"


def sdk_spans(reqs: list[Req]) -> ExportTraceServiceRequest:
    _EXPORTER.clear()
    for r in reqs:
        span = _TRACER.start_span("llm_request", kind=SpanKind.SERVER, start_time=r.arrival_ns,
                                  attributes=vllm_v1_attributes(r, max_tokens=512))
        span.end(end_time=r.end_ns)
    msg: ExportTraceServiceRequest = encode_spans(_EXPORTER.get_finished_spans())
    return msg


def agent_metrics() -> bytes:
    src = SimulatedGpuSource(1, seed=5)
    snap = NodeSnapshot("node-7", T0, src.sample(T0, slow=False, processes=True))
    return OtlpMetricsEncoder(ResourceInfo("node-7")).encode(snap)


DCGM_LABELS = {"gpu": "0", "UUID": "GPU-0", "Hostname": "node-9", "modelName": "NVIDIA H100", "pod": "p",
               "namespace": "ns", "pci_bus_id": "00000000:17:00.0"}


def kv(key: str, value: Any) -> KeyValue:
    if isinstance(value, AnyValue):
        return KeyValue(key=key, value=value)
    if isinstance(value, bool):
        return KeyValue(key=key, value=AnyValue(bool_value=value))
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    if isinstance(value, float):
        return KeyValue(key=key, value=AnyValue(double_value=value))
    return KeyValue(key=key, value=AnyValue(string_value=str(value)))


def dcgm_metrics(values: dict[str, float], labels: dict[str, str] = DCGM_LABELS,
                 time_ns: int = T0) -> ExportMetricsServiceRequest:
    msg = ExportMetricsServiceRequest()
    rm = msg.resource_metrics.add()
    rm.resource.attributes.append(kv("service.name", "dcgm-exporter"))
    sm = rm.scope_metrics.add()
    for name, v in values.items():
        m = sm.metrics.add(name=name)
        m.gauge.data_points.add(time_unix_nano=time_ns, as_double=v, attributes=[kv(k, x) for k, x in labels.items()])
    return msg


CORPUS: list[tuple[Signal, bytes]] = [
    ("traces", sdk_spans([Req(i, T0 + i * 10**8, 0.01 * i, 0.05, 1.2, 100 + i, 1 + i) for i in range(3)])
     .SerializeToString()),
    ("metrics", agent_metrics()),
    ("metrics", dcgm_metrics({"DCGM_FI_DEV_POWER_USAGE": 300.0, "DCGM_FI_DEV_SM_CLOCK": 1500.0,
                              "vllm:num_requests_running": 3.0}).SerializeToString()),
]


def otlp_json(signal: Signal, body: bytes) -> dict[str, Any]:
    """OTLP/JSON as exporters write it: ids in hex (protobuf's own JSON mapping writes base64)."""
    msg: Any = ExportTraceServiceRequest() if signal == "traces" else ExportMetricsServiceRequest()
    msg.ParseFromString(body)
    doc: dict[str, Any] = json_format.MessageToDict(msg)

    def hexify(node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k in ("traceId", "spanId", "parentSpanId") and isinstance(v, str):
                    node[k] = base64.b64decode(v).hex()
                else:
                    hexify(v)
        elif isinstance(node, list):
            for x in node:
                hexify(x)

    hexify(doc)
    return doc


JSON_CORPUS = [(signal, otlp_json(signal, body)) for signal, body in CORPUS]


# -- 1. random bytes ---------------------------------------------------------------------------------
@FUZZ
@given(body=st.binary(max_size=400), signal=st.sampled_from(["traces", "metrics"]),
       ctype=st.sampled_from([PB, JS, "application/protobuf; charset=x", "text/plain"]),
       encoding=st.sampled_from(["", "identity", "gzip", "deflate", "br"]), wrap=st.booleans())
def test_random_bytes_are_refused_with_4xx_or_decoded(body: bytes, signal: Signal, ctype: str, encoding: str,
                                                      wrap: bool) -> None:
    if wrap and encoding == "gzip":
        body = gzip.compress(body)
    elif wrap and encoding == "deflate":
        body = zlib.compress(body)
    accepted_or_4xx(lambda: decode(signal, body, ctype, encoding))


# -- 2. truncated and corrupted protobuf ---------------------------------------------------------------
@FUZZ
@given(data=st.data(), which=st.integers(0, len(CORPUS) - 1), gz=st.booleans())
def test_truncated_or_corrupted_protobuf(data: st.DataObject, which: int, gz: bool) -> None:
    signal, body = CORPUS[which]
    b = bytearray(body[:data.draw(st.integers(0, len(body)), label="cut")])
    for _ in range(data.draw(st.integers(0, 4), label="edits")):
        if b:
            b[data.draw(st.integers(0, len(b) - 1))] = data.draw(st.integers(0, 255))
    raw = bytes(b)
    batch = accepted_or_4xx(lambda: decode(signal, gzip.compress(raw) if gz else raw, PB, "gzip" if gz else ""))
    if batch is not None and raw == body:
        assert batch.row_count() > 0


# -- 3. mutated JSON ----------------------------------------------------------------------------------
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats()
    | st.sampled_from(["", "NaN", "Infinity", "-1", "18446744073709551616", "0x10", "llm_request", "ZZ", "00ff"])
    | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(
        st.sampled_from(["key", "value", "stringValue", "intValue", "doubleValue", "arrayValue", "kvlistValue",
                         "values", "asDouble", "asInt", "timeUnixNano", "attributes", "gauge", "sum",
                         "dataPoints", "spans", "traceId"]) | st.text(max_size=6), children, max_size=3),
    max_leaves=6)


def _paths(node: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield path
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*path, i))


@st.composite
def mutated_json(draw: st.DrawFn) -> tuple[Signal, bytes]:
    signal, original = draw(st.sampled_from(JSON_CORPUS))
    doc = copy.deepcopy(original)
    for _ in range(draw(st.integers(1, 4))):
        paths = [p for p in _paths(doc) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        op = draw(st.sampled_from(["replace", "replace", "delete", "duplicate"]))
        if op == "replace":
            parent[path[-1]] = draw(JSON_VALUES)
        elif op == "delete":
            del parent[path[-1]]
        elif isinstance(parent, list):
            parent.append(copy.deepcopy(parent[path[-1]]))
    return signal, json.dumps(doc).encode()


@settings(FUZZ, max_examples=300)
@given(case=mutated_json())
def test_mutated_json_is_refused_with_4xx_or_decoded(case: tuple[Signal, bytes]) -> None:
    signal, body = case
    accepted_or_4xx(lambda: decode(signal, body, JS))


def test_pathological_json_is_a_400() -> None:
    for body in (b"[" * 100_000 + b"]" * 100_000, b'{"resourceSpans":' + b"[" * 900 + b"]" * 900 + b"}",
                 b'{"resourceSpans":[{"scopeSpans":[{"spans":[{"startTimeUnixNano":' + b"1" * 5000 + b"}]}]}]}",
                 b"\xff\xfe{}", b'"a string"', b"null"):
        with pytest.raises(PayloadError) as e:
            decode("traces", body, JS)
        assert e.value.status == 400


# -- 4. the right structure with the wrong types ---------------------------------------------------------
SPAN_KEYS = ["gen_ai.latency.time_to_first_token", "gen_ai.latency.e2e", "gen_ai.latency.time_in_queue",
             "gen_ai.latency.time_in_model_prefill", "gen_ai.latency.time_in_model_decode",
             "gen_ai.latency.time_in_model_inference", "gen_ai.usage.prompt_tokens", "gen_ai.usage.completion_tokens",
             "gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens", "gen_ai.request.id", "gen_ai.response.id",
             "gen_ai.response.finish_reasons", "gen_ai.request.model", "gen_ai.response.model", "gen_ai.system",
             "gen_ai.provider.name", "process.pid", "container.id", "k8s.pod.uid", "k8s.pod.name",
             "k8s.namespace.name", "gpu.uuids", "host.name", "k8s.node.name", "service.name", "model"]
POINT_KEYS = ["gpu.uuid", "gpu.index", "gpu", "UUID", "uuid", "hw.id", "hw.type", "Hostname", "hostname", "pod",
              "namespace", "container", "modelName", "pci_bus_id", "device", "link", "reason", "xid", "model_name",
              "process.pid", "pid", "container.id", "container_id", "cgroup", "k8s.pod.name", "gpu.model",
              "gpu.pci_bus_id", "gpu.device", "hw.gpu.task", "direction", "k8s.node.name", "host.name"]
METRIC_NAMES = sorted({*(s.otlp_name for s in SIGNALS.values()), *(f"stacklens_{n}" for n in SIGNALS),
                       *(src.name for s in SIGNALS.values() for src in (s.dcgm, *s.dcgm_aliases, s.otel) if src),
                       *(src for s in ENGINE_SIGNALS.values() for src in s.sources),
                       "vllm:time_to_first_token_seconds", "gen_ai.server.time_to_first_token",
                       "vllm:e2e_request_latency_seconds", "stacklens.gpu_info", "dcgm_fi_dev_power_usage"})
U64 = st.integers(0, 2**64 - 1)
TIMES = st.sampled_from([0, 1, T0, 2**63 - 1, 2**63, 2**64 - 1]) | U64


def _any(kind: str, v: Any) -> AnyValue:
    return AnyValue(**{kind: v})


SCALARS = (st.text(max_size=10).map(lambda v: _any("string_value", v))
           | st.sampled_from(["12", "-3", "1e999", "nan", "GPU-1", "", "4294967296"]).map(
               lambda v: _any("string_value", v))
           | st.integers(-(2**63), 2**63 - 1).map(lambda v: _any("int_value", v))
           | st.sampled_from([0, 1, -1, 2**31, 2**63 - 1, -(2**63)]).map(lambda v: _any("int_value", v))
           | st.floats().map(lambda v: _any("double_value", v))
           | st.booleans().map(lambda v: _any("bool_value", v))
           | st.binary(max_size=6).map(lambda v: _any("bytes_value", v))
           | st.just(AnyValue()))
ANY_VALUES = st.recursive(
    SCALARS,
    lambda c: st.lists(c, max_size=3).map(lambda vs: AnyValue(array_value=ArrayValue(values=vs)))
    | st.lists(st.tuples(st.sampled_from(POINT_KEYS), c), max_size=3).map(
        lambda kvs: AnyValue(kvlist_value=KeyValueList(values=[KeyValue(key=k, value=v) for k, v in kvs]))),
    max_leaves=2)


def attrs(keys: list[str]) -> st.SearchStrategy[list[KeyValue]]:
    return st.lists(st.tuples(st.sampled_from(keys) | st.text(max_size=5), ANY_VALUES), max_size=4).map(
        lambda pairs: [KeyValue(key=k, value=v) for k, v in pairs])


@st.composite
def trace_messages(draw: st.DrawFn) -> ExportTraceServiceRequest:
    msg = ExportTraceServiceRequest()
    for _ in range(draw(st.integers(0, 1)) + 1):
        rs = msg.resource_spans.add()
        rs.resource.attributes.extend(draw(attrs(SPAN_KEYS)))
        ss = rs.scope_spans.add()
        for _ in range(draw(st.integers(0, 2))):
            ss.spans.add(name=draw(st.sampled_from(["llm_request", "chat llama", "db"]) | st.text(max_size=5)),
                         trace_id=draw(st.binary(max_size=20)), span_id=draw(st.binary(max_size=10)),
                         start_time_unix_nano=draw(TIMES), end_time_unix_nano=draw(TIMES),
                         attributes=draw(attrs(SPAN_KEYS)))
    return msg


@st.composite
def number_points(draw: st.DrawFn) -> list[NumberDataPoint]:
    out = []
    for _ in range(draw(st.integers(0, 2))):
        p = NumberDataPoint(time_unix_nano=draw(TIMES), flags=draw(st.sampled_from([0, 1, 2, 2**32 - 1])),
                            attributes=draw(attrs(POINT_KEYS)))
        which = draw(st.sampled_from(["double", "int", "none"]))
        if which == "double":
            p.as_double = draw(st.floats())
        elif which == "int":
            p.as_int = draw(st.integers(-(2**63), 2**63 - 1))
        out.append(p)
    return out


@st.composite
def metric_messages(draw: st.DrawFn) -> ExportMetricsServiceRequest:
    msg = ExportMetricsServiceRequest()
    for _ in range(draw(st.integers(0, 1)) + 1):
        rm = msg.resource_metrics.add()
        rm.resource.attributes.extend(draw(attrs([*SPAN_KEYS, *POINT_KEYS])))
        sm = rm.scope_metrics.add()
        for _ in range(draw(st.integers(0, 3))):
            m: Metric = sm.metrics.add(name=draw(st.sampled_from(METRIC_NAMES) | st.text(max_size=8)))
            kind = draw(st.sampled_from(["gauge", "sum", "histogram", "summary", "exponential_histogram", "none"]))
            if kind in ("gauge", "sum"):
                getattr(m, kind).data_points.extend(draw(number_points()))
                if kind == "sum":
                    m.sum.is_monotonic = draw(st.booleans())
            elif kind in ("histogram", "summary", "exponential_histogram"):
                for _ in range(draw(st.integers(0, 2))):
                    p = getattr(m, kind).data_points.add(time_unix_nano=draw(TIMES), count=draw(U64),
                                                         attributes=draw(attrs(POINT_KEYS)))
                    p.sum = draw(st.floats())
    return msg


@settings(FUZZ, max_examples=200)
@given(msg=trace_messages())
def test_span_messages_with_wrong_types(msg: ExportTraceServiceRequest) -> None:
    direct = accepted_or_4xx(lambda: decode_message("traces", msg))
    wire = accepted_or_4xx(lambda: decode("traces", msg.SerializeToString(), PB))
    assert (direct is None) == (wire is None)
    if direct is not None and wire is not None:
        assert direct.row_count() == wire.row_count()
        for r in direct.requests.data["ttft_s"] + direct.requests.data["tpot_s"]:
            assert r is None or (isinstance(r, float) and math.isfinite(r) and r >= 0)


@settings(FUZZ, max_examples=200)
@given(msg=metric_messages())
def test_metric_messages_with_wrong_types(msg: ExportMetricsServiceRequest) -> None:
    direct = accepted_or_4xx(lambda: decode_message("metrics", msg))
    wire = accepted_or_4xx(lambda: decode("metrics", msg.SerializeToString(), PB))
    assert (direct is None) == (wire is None)
    if direct is not None and wire is not None:
        assert direct.row_count() == wire.row_count()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    s = Store(Path(tmp_path_factory.mktemp("fuzz")) / "f.duckdb", linger_s=0.0)
    yield s
    s.close()


@settings(FUZZ, max_examples=50)
@given(traces=trace_messages(), metrics=metric_messages())
def test_whatever_decodes_is_committed_by_the_store(store: Store, traces: ExportTraceServiceRequest,
                                                    metrics: ExportMetricsServiceRequest) -> None:
    batch = IngestBatch()
    batch.extend(decode_message("traces", traces))
    batch.extend(decode_message("metrics", metrics))
    store.write(batch)  # raises StoreError if one row broke the transaction


# -- 4b. which bodies are decoded where they arrive ------------------------------------------------------
def test_plain_protobuf_bodies_a_compiled_decoder_takes_are_decoded_inline_and_only_those() -> None:
    """The HTTP receiver decodes a plain protobuf body of at most INLINE_DECODE_BYTES on its event loop when a
    compiled decoder takes it (the same rows as decode); everything else goes to decode on a worker thread,
    which answers errors as before."""
    from correlator.ingest import fast_metrics, fast_spans

    for signal, body in CORPUS:
        got = decode_inline(signal, body, PB)
        fast = fast_spans.available() if signal == "traces" else fast_metrics.available()
        assert (got is not None) == (fast and (fast_spans.decode(body) if signal == "traces"
                                               else fast_metrics.decode(body)) is not None)
        if got is not None:
            assert_same_batch(got, decode(signal, body, PB))
        assert (decode_inline(signal, body, "application/protobuf; charset=x") is None) == (got is None)
        assert decode_inline(signal, gzip.compress(body), PB, "gzip") is None
        assert decode_inline(signal, body, JS) is None
    assert decode_inline("traces", b"\xff\xff\xff\xff", PB) is None  # declined: decode gives the 400
    body = next(body for signal, body in CORPUS if signal == "traces")
    big = body + b"\x0a\x00" * ((INLINE_DECODE_BYTES - len(body)) // 2 + 1)  # and empty ResourceSpans after it
    assert fast_spans.decode(big) is not None and decode_inline("traces", big, PB) is None  # over the size
    # and over the receiver's own limits: decode answers 413
    assert decode_inline("traces", body, PB, "", Limits(max_body_bytes=len(body) - 1)) is None
    assert decode_inline("traces", body, PB, "", Limits(max_decoded_bytes=len(body) - 1)) is None
    assert decode_inline("traces", body, PB, "", Limits(max_decoded_bytes=len(body))) is not None


# -- 5. compression bombs -----------------------------------------------------------------------------
@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_compression_bomb_is_413_within_the_limit(encoding: str) -> None:
    zeros = b"\0" * (9 << 20)
    bomb = gzip.compress(zeros, 9) if encoding == "gzip" else zlib.compress(zeros, 9)
    assert len(bomb) < 64 << 10
    limits = Limits(max_body_bytes=1 << 20, max_decoded_bytes=8 << 20)
    with pytest.raises(PayloadError) as e:
        decode("metrics", bomb, PB, encoding, limits)
    assert e.value.status == 413
    # a bomb inside a bomb: the outer layer inflates to compressed bytes, which are not a message
    double = gzip.compress(gzip.compress(zeros, 9), 9)
    with pytest.raises(PayloadError) as e:
        decode("metrics", double, PB, "gzip", limits)
    assert e.value.status == 400


@settings(FUZZ, max_examples=300)
@given(n=st.integers(0, 20_000), limit=st.integers(1, 10_000), members=st.integers(1, 3),
       encoding=st.sampled_from(["gzip", "deflate"]), fill=st.sampled_from([b"\0", b"\x0a", b"ab"]))
def test_inflate_stops_at_the_limit(n: int, limit: int, members: int, encoding: str, fill: bytes) -> None:
    raw = (fill * n)[:n]
    body = b"".join(gzip.compress(raw) for _ in range(members)) if encoding == "gzip" else zlib.compress(raw)
    total = n * members if encoding == "gzip" else n
    status, out = 0, b""
    try:
        out = inflate(body, encoding, limit)
    except PayloadError as e:
        status = e.status
    if status:
        assert status == 413 and total > limit
    else:
        assert total <= limit and out == raw * (members if encoding == "gzip" else 1)


@pytest.mark.parametrize(("tail", "status"), [
    (b"", 0),  # one member: handed back as zlib made it
    (b"\0" * 16, 0),  # zero padding after it
    (gzip.compress(b"more"), 0),  # a second member
    (gzip.compress(b"more")[:-6], 400),  # a second member cut short
    (b"\x1f\x8bgarbage", 400),  # not a member
])
def test_inflate_after_a_whole_first_member(tail: bytes, status: int) -> None:
    body = gzip.compress(b"first" * 100) + tail
    if status:
        with pytest.raises(PayloadError) as e:
            inflate(body, "gzip", 10_000)
        assert e.value.status == status
        return
    more = b"more" if tail.startswith(b"\x1f\x8b\x08") else b""
    assert inflate(body, "gzip", 10_000) == b"first" * 100 + more


def test_inflate_takes_the_standard_librarys_zlib_without_zlib_ng(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    from correlator.ingest import payload

    real_import = builtins.__import__

    def without_zlib_ng(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("zlib_ng"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    assert payload._inflater()[0] is not zlib.decompressobj  # zlib-ng, a dependency, where installed
    monkeypatch.setattr(builtins, "__import__", without_zlib_ng)
    decompressobj, errors = payload._inflater()
    assert decompressobj is zlib.decompressobj and errors == (zlib.error,)
    monkeypatch.setattr(payload, "_decompressobj", decompressobj)
    monkeypatch.setattr(payload, "_INFLATE_ERRORS", errors)
    assert inflate(gzip.compress(b"x" * 1000), "gzip", 10_000) == b"x" * 1000
    with pytest.raises(PayloadError) as e:
        inflate(b"\x1f\x8b\x08\x00garbage", "gzip", 10_000)
    assert e.value.status == 400


# -- 6. valid messages round-trip -----------------------------------------------------------------------
LAT = st.floats(0.0, 100.0, allow_nan=False)
REQS = st.lists(st.tuples(LAT, LAT, LAT, st.integers(0, 10**6), st.integers(1, 10**5),
                          st.integers(0, 10**15)), min_size=1, max_size=6)


@settings(FUZZ, max_examples=150)
@given(spec=REQS, as_json=st.booleans(), gz=st.booleans())
def test_vllm_spans_round_trip(spec: list[tuple[float, float, float, int, int, int]], as_json: bool,
                               gz: bool) -> None:
    reqs = [Req(i, T0 + off, q, p, d, prompt, out) for i, (q, p, d, prompt, out, off) in enumerate(spec)]
    body = sdk_spans(reqs).SerializeToString()
    if as_json:
        body = json.dumps(otlp_json("traces", body)).encode()
    batch = decode("traces", gzip.compress(body) if gz else body, JS if as_json else PB, "gzip" if gz else "")
    rows = batch.requests.data
    assert len(batch.requests) == len(reqs)
    for i, r in enumerate(reqs):
        assert rows["request_id"][i] == r.request_id and rows["start_ns"][i] == r.arrival_ns
        assert rows["end_ns"][i] == r.end_ns and rows["node"][i] == "node-1" and rows["pid"][i] == 4242
        assert rows["queue_s"][i] == r.queue_s and rows["prefill_s"][i] == r.prefill_s
        assert rows["decode_s"][i] == r.decode_s and rows["ttft_s"][i] == r.ttft_s and rows["e2e_s"][i] == r.e2e_s
        assert rows["prompt_tokens"][i] == r.prompt_tokens and rows["output_tokens"][i] == r.output_tokens
        want_tpot = r.decode_s / (r.output_tokens - 1) if r.output_tokens >= 2 else None
        assert rows["tpot_s"][i] == want_tpot and rows["model"][i] == "llama"
        assert len(str(rows["trace_id"][i])) == 32 and len(str(rows["span_id"][i])) == 16
    storable(batch)


DCGM_FACTORS = {"DCGM_FI_DEV_POWER_USAGE": ("power_w", 1.0), "DCGM_FI_DEV_SM_CLOCK": ("sm_clock_hz", 1e6),
                "DCGM_FI_DEV_FB_USED": ("fb_used_bytes", 2.0**20), "DCGM_FI_DEV_GPU_UTIL": ("gpu_util_ratio", 0.01),
                "DCGM_FI_PROF_PCIE_TX_BYTES": ("pcie_tx_bytes_per_s", 1.0)}


@settings(FUZZ, max_examples=150)
@given(values=st.fixed_dictionaries({k: st.floats(-1e12, 1e12) for k in DCGM_FACTORS}),
       gpu=st.integers(0, 15), time_ns=st.integers(1, 2**63 - 1), as_json=st.booleans())
def test_dcgm_metrics_round_trip(values: dict[str, float], gpu: int, time_ns: int, as_json: bool) -> None:
    labels = {**DCGM_LABELS, "gpu": str(gpu), "UUID": f"GPU-{gpu}"}
    body = dcgm_metrics(values, labels, time_ns).SerializeToString()
    if as_json:
        body = json.dumps(otlp_json("metrics", body)).encode()
    batch = decode("metrics", body, JS if as_json else PB)
    g = batch.gpu_samples.data
    got = {s: (v, t, u, i, n) for s, v, t, u, i, n in zip(g["signal"], g["value"], g["time_ns"], g["gpu_uuid"],
                                                          g["gpu_index"], g["node"], strict=True)}
    assert set(got) == {s for s, _ in DCGM_FACTORS.values()}
    for name, (signal, factor) in DCGM_FACTORS.items():
        assert got[signal] == (pytest.approx(values[name] * factor, rel=1e-12), time_ns, f"GPU-{gpu}", gpu, "node-9")
    assert batch.gpu_info.data["model"] == ["NVIDIA H100"] and batch.gpu_info.data["pci_bus_id"] == [
        "00000000:17:00.0"]
    storable(batch)
