"""The compiled span decoder (correlator/ingest/fast_spans.py + _fastspans.c) against the reference,
``decode_spans`` over the upb-parsed message: for every body either the fast path declines it (and the
reference path decides: rows or the same PayloadError), or it gives exactly the reference's rows, every
column, value types and float bits included. Messages from the OpenTelemetry SDK (vLLM V1 spans), vLLM V0
and GenAI shapes, resources with k8s placement, the decoder fuzz tests' wrong-typed messages, hand-made
wire data (unknown fields, reordered and repeated fields, bad UTF-8, groups, long varints, deep nesting)
and truncated or corrupted bodies. Hypothesis, derandomized; a few seconds."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue, KeyValueList
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from correlator.ingest import fast_spans
from correlator.ingest.batch import IngestBatch
from correlator.ingest.payload import PayloadError, decode, parse_message
from tests import otlp_wire
from tests.otlp_wire import assert_same_batch, dbl_any, f64, kv_bytes, ld, str_any, tag, varint
from tests.test_decoder_fuzz import CORPUS, JSON_CORPUS, REQS, T0, Req, sdk_spans, trace_messages

if not fast_spans.available():
    if os.environ.get("STACKLENS_REQUIRE_FASTSPANS") == "1":
        raise RuntimeError(f"the compiled span decoder is not built (library: {fast_spans.library_path()})")
    pytest.skip("the compiled span decoder is not built or STACKLENS_PURE_PYTHON=1", allow_module_level=True)

FAST = settings(derandomize=True, deadline=None, database=None, max_examples=200,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PB = "application/x-protobuf"


def reference(raw: bytes) -> IngestBatch | PayloadError:
    return otlp_wire.reference("traces", raw)


def check(raw: bytes) -> bool:
    """The fast path and the reference agree on ``raw``; True when the fast path took it."""
    return otlp_wire.check("traces", fast_spans.decode, raw)


# -- wire data by hand --------------------------------------------------------------------------------
def wrap(spans: list[bytes], resource: bytes = b"", extra_rs: bytes = b"") -> bytes:
    """ExportTraceServiceRequest{resource_spans{resource, scope_spans{spans}}} from serialized spans."""
    ss = b"".join(ld(2, s) for s in spans)
    rs = (ld(1, resource) if resource else b"") + ld(2, ss) + extra_rs
    return ld(1, rs)


def vllm_span(extra: bytes = b"", name: bytes = b"llm_request") -> bytes:
    return (ld(1, bytes(range(16))) + ld(2, bytes(range(8))) + ld(5, name) + f64(7, T0) + f64(8, T0 + 10**9)
            + ld(9, kv_bytes("gen_ai.latency.e2e", dbl_any(1.0)))
            + ld(9, kv_bytes("gen_ai.latency.time_in_queue", dbl_any(0.25))) + extra)


RESOURCE = ld(1, kv_bytes("host.name", str_any(b"node-1"))) + ld(1, kv_bytes("service.name", str_any(b"vllm")))


def test_hand_made_baseline_takes_the_fast_path() -> None:
    assert check(wrap([vllm_span()], RESOURCE))
    assert check(wrap([vllm_span(), vllm_span(name=b"other")], RESOURCE))
    assert check(b"")  # an empty request: no rows


WIRE_CASES: dict[str, tuple[bytes, bool]] = {
    # (body, whether the fast path takes it)
    "scope_spans before resource": (ld(1, ld(2, ld(2, vllm_span())) + ld(1, RESOURCE)), True),
    "unknown scalar fields": (wrap([vllm_span(tag(40, 0) + varint(7) + tag(41, 5) + b"abcd" + f64(42, 1))],
                                   RESOURCE) + tag(9, 0) + varint(3), True),
    "unknown length-delimited field": (wrap([vllm_span(ld(40, b"\xff\xfe"))], RESOURCE), False),
    "repeated resource": (ld(1, ld(1, RESOURCE) + ld(1, RESOURCE) + ld(2, ld(2, vllm_span()))), False),
    "entity_refs": (wrap([vllm_span()], RESOURCE + ld(3, b""), b""), False),
    "repeated span name": (wrap([vllm_span(ld(5, b"db"))], RESOURCE), True),
    "repeated key (last wins)": (wrap([vllm_span(ld(9, kv_bytes("gen_ai.latency.e2e", dbl_any(3.5))))],
                                      RESOURCE), True),
    "kv with two values": (wrap([vllm_span(ld(9, kv_bytes("x", str_any(b"a")) + ld(2, str_any(b"b"))))]),
                           False),
    "two oneof members": (wrap([vllm_span(ld(9, kv_bytes("gen_ai.latency.e2e", dbl_any(2.0) + tag(3, 0)
                                                         + varint(5))))]), False),
    "string_value_strindex": (wrap([vllm_span(ld(9, kv_bytes("gen_ai.request.id", tag(8, 0) + varint(1))))]),
                              False),
    "bad utf-8 in a name": (wrap([vllm_span(name=b"llm\xff")]), False),
    "bad utf-8 in a value": (wrap([vllm_span(ld(9, kv_bytes("gen_ai.request.id", str_any(b"\xc0\x80"))))]), False),
    "bad utf-8 in a nested value": (wrap([vllm_span(ld(9, kv_bytes("x", ld(5, ld(1, str_any(b"\xed\xa0\x80"))))))]),
                                    False),
    "bad utf-8 in the scope": (ld(1, ld(2, ld(1, ld(1, b"\xff")) + ld(2, vllm_span()))), False),
    "bad utf-8 in a status": (wrap([vllm_span(ld(15, ld(2, b"\xff")))]), False),
    "bad utf-8 in an event": (wrap([vllm_span(ld(11, ld(2, b"\xf4\x90\x80\x80")))]), False),
    "good utf-8 everywhere": (wrap([vllm_span(ld(11, ld(2, "é✓😀".encode())) + ld(13, ld(3, b"t=1"))
                                              + ld(15, ld(2, b"ok") + tag(3, 0) + varint(1))
                                              + ld(9, kv_bytes("gen_ai.request.id", str_any("ñ😀".encode())))
                                              + ld(3, b"ts") + tag(16, 5) + b"\x01\0\0\0")], RESOURCE), True),
    "a group": (wrap([vllm_span(tag(40, 3) + tag(40, 4))]), False),
    "wrong wire type of a known field": (wrap([vllm_span(tag(5, 0) + varint(1))]), False),
    "start as varint": (wrap([vllm_span(tag(7, 0) + varint(5))]), False),
    "11-byte varint": (wrap([vllm_span(tag(6, 0) + b"\xff" * 10 + b"\x01")]), False),
    "10-byte varint with bits past 64": (wrap([vllm_span(tag(6, 0) + b"\xff" * 9 + b"\x7f")]), False),
    "negative int value (10 bytes)": (wrap([vllm_span(ld(9, kv_bytes("gen_ai.usage.prompt_tokens",
                                                                     tag(3, 0) + varint(-5))))]), True),
    "field number 0": (wrap([vllm_span(b"\x00\x01")]), False),
    "length past the end": (wrap([vllm_span()])[:-1] + b"", False),
    "empty ids": (wrap([ld(5, b"llm_request") + f64(8, T0)]), True),
    "times past 2262": (wrap([vllm_span(f64(7, 2**63) + f64(8, 2**64 - 1)), vllm_span(f64(8, 2**63))]), True),
    "zero start repaired": (wrap([vllm_span(f64(7, 0))]), True),
    "start repaired at float precision": (wrap([vllm_span(f64(7, 0) + f64(8, 2**60 + 1) + ld(9, kv_bytes(
        "gen_ai.latency.e2e", dbl_any(2**60 / 1e9))))]), True),
    "start not repaired at float precision": (wrap([vllm_span(f64(7, 0) + f64(8, 2**60) + ld(9, kv_bytes(
        "gen_ai.latency.e2e", dbl_any(2**60 / 1e9))))]), True),
    "start repair past int64": (wrap([vllm_span(f64(7, 0) + f64(8, 2**63 - 1) + ld(9, kv_bytes(
        "gen_ai.latency.e2e", dbl_any(1e300))))]), True),
    "int and bool latencies": (wrap([vllm_span(ld(9, kv_bytes("gen_ai.latency.time_to_first_token",
                                                              tag(3, 0) + varint(2**53 + 1)))
                                               + ld(9, kv_bytes("gen_ai.latency.time_in_queue", tag(2, 0) + varint(1)))
                                               + ld(9, kv_bytes("gen_ai.latency.e2e", dbl_any(-0.0))))]), True),
    "float count": (wrap([vllm_span(ld(9, kv_bytes("gen_ai.usage.completion_tokens", dbl_any(7.9))))]), True),
    "huge float count": (wrap([vllm_span(ld(9, kv_bytes("gen_ai.usage.completion_tokens", dbl_any(3e9)))
                                         + ld(9, kv_bytes("gen_ai.usage.output_tokens", tag(3, 0) + varint(4))))]),
                         True),
    "string latency": (wrap([vllm_span(ld(9, kv_bytes("gen_ai.latency.time_to_first_token", str_any(b"0.5"))))]),
                       False),
    "double model": (wrap([vllm_span(ld(9, kv_bytes("gen_ai.response.model", dbl_any(1.5))))]), False),
    "NUL in a request id": (wrap([vllm_span(ld(9, kv_bytes("gen_ai.request.id", str_any(b"a\0b"))))]), False),
    "array node name": (wrap([vllm_span()], ld(1, kv_bytes("host.name", ld(5, ld(1, str_any(b"n")))))), False),
    "empty array node name": (wrap([vllm_span()], ld(1, kv_bytes("host.name", ld(5, b"")))
                                   + ld(1, kv_bytes("Hostname", tag(3, 0) + varint(12)))), True),
}


def _nested(depth: int) -> bytes:
    v = str_any(b"leaf")
    for _ in range(depth):
        v = ld(5, ld(1, v))
    return v


WIRE_CASES["deep nesting"] = (wrap([vllm_span(ld(9, kv_bytes("x", _nested(60))))]), False)
WIRE_CASES["moderate nesting"] = (wrap([vllm_span(ld(9, kv_bytes("x", _nested(10))))]), True)
WIRE_CASES["bad utf-8 in a key"] = (wrap([vllm_span(ld(9, ld(1, b"k\xff")))]), False)


@pytest.mark.parametrize("case", sorted(WIRE_CASES))
def test_hand_made_wire_data(case: str) -> None:
    body, fast = WIRE_CASES[case]
    assert check(body) == fast


# -- messages made with the protobuf library -------------------------------------------------------------
def test_sdk_payloads_take_the_fast_path() -> None:
    for signal, body in CORPUS:
        if signal == "traces":
            assert check(body)


@FAST
@given(spec=REQS)
def test_vllm_v1_sdk_spans(spec: list[tuple[float, float, float, int, int, int]]) -> None:
    reqs = [Req(i, T0 + off, q, p, d, prompt, out) for i, (q, p, d, prompt, out, off) in enumerate(spec)]
    assert check(sdk_spans(reqs).SerializeToString())


@settings(FAST, max_examples=250)
@given(msg=trace_messages())
def test_fuzz_messages_with_wrong_types(msg: ExportTraceServiceRequest) -> None:
    check(msg.SerializeToString())


FLOATS = st.floats() | st.sampled_from([0.0, -0.0, 1e-310, 5e-324, 1e308, math.inf, -1.0, 2.5, 1e9, 2**31 - 0.5])
INTS = st.sampled_from([0, 1, 2, -1, 2**31 - 1, 2**31, 2**53 + 1, 2**63 - 1, -(2**63)]) | st.integers(-10, 10**6)
TEXT = st.sampled_from(["", "stop", "length", "GPU-1,GPU-2", "ñ", "0.5", "12", "pod-a"]) | st.text(max_size=6)
SCALAR = (TEXT.map(lambda v: AnyValue(string_value=v)) | INTS.map(lambda v: AnyValue(int_value=v))
          | FLOATS.map(lambda v: AnyValue(double_value=v)) | st.booleans().map(lambda v: AnyValue(bool_value=v))
          | st.binary(max_size=4).map(lambda v: AnyValue(bytes_value=v)) | st.just(AnyValue()))
VALUE = SCALAR | st.lists(SCALAR, max_size=3).map(lambda vs: AnyValue(array_value=ArrayValue(values=vs))) | \
    st.lists(st.tuples(TEXT, SCALAR), max_size=2).map(lambda kvs: AnyValue(kvlist_value=KeyValueList(
        values=[KeyValue(key=k, value=v) for k, v in kvs])))
# mostly the value types each key has in practice, sometimes any
LATENCY = st.floats(0.0, 50.0).map(lambda v: AnyValue(double_value=v))
COUNT = st.integers(0, 5000).map(lambda v: AnyValue(int_value=v))
NAME = st.sampled_from(["llama", "gpt-x", "c-1", "ns", "uid-9"]).map(lambda v: AnyValue(string_value=v))
STRINGS = st.lists(NAME, min_size=1, max_size=3).map(lambda vs: AnyValue(array_value=ArrayValue(values=vs)))
# request ids of every form the store splits (32 hex digits at the end, a UUID at the end, 32 hex digits before
# the last '-'), and near misses: upper case, a digit short, a dash moved, not ASCII
_HEX = st.text("0123456789abcdef", min_size=32, max_size=32)
_UUID = _HEX.map(lambda h: f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}")
_PREFIX = st.sampled_from(["", "cmpl-", "chatcmpl-", "ñ-", "a-b-", "-"])
_SUFFIX = st.sampled_from(["-0", "-12", "-", "-x-y", "-ñ"])
REQUEST_ID = st.one_of(
    NAME,
    st.tuples(_PREFIX, _HEX | _UUID).map("".join),
    st.tuples(_PREFIX, _HEX | _UUID, _SUFFIX).map("".join),
    st.tuples(_PREFIX, _HEX | _UUID).map(lambda t: t[0] + t[1].upper()),
    st.tuples(_PREFIX, _HEX).map(lambda t: t[0] + t[1][1:]),
    _UUID.map(lambda u: u[:8] + u[9] + "-" + u[10:]),
    st.text(min_size=30, max_size=40),
).map(lambda v: v if isinstance(v, AnyValue) else AnyValue(string_value=v))
SPAN_KEYS: dict[str, st.SearchStrategy[AnyValue]] = {
    **{f"gen_ai.latency.{k}": LATENCY for k in ("e2e", "time_in_queue", "time_to_first_token",
                                                "time_in_model_prefill", "time_in_model_decode",
                                                "time_in_model_inference", "time_in_model_forward",
                                                "time_in_model_execute")},
    "gen_ai.server.time_to_first_token": LATENCY,
    **{f"gen_ai.usage.{k}": COUNT for k in ("completion_tokens", "output_tokens", "prompt_tokens", "input_tokens")},
    "process.pid": COUNT,
    **{k: NAME for k in ("gen_ai.response.model", "gen_ai.request.model", "gen_ai.provider.name", "gen_ai.system",
                         "gen_ai.response.finish_reason",
                         "container.id", "k8s.pod.uid", "k8s.pod.name", "k8s.namespace.name", "gpu.uuids")},
    "gen_ai.response.finish_reasons": STRINGS,
    "gen_ai.request.id": REQUEST_ID, "gen_ai.response.id": REQUEST_ID,
    "gen_ai.request.max_tokens": COUNT,
}
RESOURCE_KEYS: dict[str, st.SearchStrategy[AnyValue]] = {
    **{k: NAME for k in ("k8s.node.name", "host.name", "Hostname", "hostname", "service.name",
                         "gen_ai.request.model", "gen_ai.response.model", "model", "vllm.model", "container.id",
                         "k8s.pod.uid", "k8s.pod.name", "k8s.namespace.name", "gpu.uuids", "telemetry.sdk.name")},
    "process.pid": COUNT,
}


def attributes(keys: dict[str, st.SearchStrategy[AnyValue]]) -> st.SearchStrategy[list[KeyValue]]:
    typical = st.sampled_from(sorted(keys)).flatmap(lambda k: st.tuples(st.just(k), keys[k]))
    any_type = st.tuples(st.sampled_from(sorted(keys)) | TEXT, VALUE)
    return st.lists(st.one_of(typical, typical, typical, any_type), max_size=10).map(
        lambda kvs: [KeyValue(key=k, value=v) for k, v in kvs])


TIMES = st.sampled_from([0, 1, T0, T0 + 10**9, 2**63 - 1, 2**63]) | st.integers(0, 2**64 - 1)


@st.composite
def span_messages(draw: st.DrawFn) -> ExportTraceServiceRequest:
    msg = ExportTraceServiceRequest()
    for _ in range(draw(st.integers(1, 3))):
        rs = msg.resource_spans.add()
        if draw(st.booleans()):
            rs.resource.attributes.extend(draw(attributes(RESOURCE_KEYS)))
        for _ in range(draw(st.integers(0, 2))):
            ss = rs.scope_spans.add()
            if draw(st.booleans()):
                ss.scope.name, ss.scope.version = "vllm.llm_engine", "1"
            for _ in range(draw(st.integers(0, 4))):
                span = ss.spans.add(
                    name=draw(st.sampled_from(["llm_request", "llm_request", "chat llama", "db", ""])),
                    trace_id=draw(st.binary(min_size=16, max_size=16) | st.binary(max_size=3)
                                  | st.binary(min_size=8, max_size=8)),
                    span_id=draw(st.binary(min_size=8, max_size=8) | st.binary(max_size=4)),
                    start_time_unix_nano=draw(TIMES), end_time_unix_nano=draw(TIMES),
                    attributes=draw(attributes(SPAN_KEYS)))
                if draw(st.booleans()):
                    span.status.code = Status.STATUS_CODE_OK
                    span.kind = Span.SPAN_KIND_SERVER
                    span.flags = 0x100
    return msg


@settings(FAST, max_examples=300)
@given(msg=span_messages())
def test_span_messages_of_every_shape(msg: ExportTraceServiceRequest) -> None:
    check(msg.SerializeToString())


def test_common_shapes_take_the_fast_path() -> None:
    """vLLM V1 (model on the resource), vLLM V0 (model on the span, forward/execute), GenAI spans and
    placement on span or resource: all taken by the fast path, with their values."""
    msg = ExportTraceServiceRequest()
    rs = msg.resource_spans.add()
    rs.resource.attributes.extend([
        KeyValue(key="k8s.node.name", value=AnyValue(string_value="node-3")),
        KeyValue(key="service.name", value=AnyValue(string_value="vllm")),
        KeyValue(key="k8s.pod.name", value=AnyValue(string_value="vllm-0")),
        KeyValue(key="k8s.namespace.name", value=AnyValue(string_value="serve")),
        KeyValue(key="gpu.uuids", value=AnyValue(array_value=ArrayValue(values=[
            AnyValue(string_value="GPU-a"), AnyValue(string_value="GPU-b")]))),
        KeyValue(key="process.pid", value=AnyValue(int_value=77))])
    ss = rs.scope_spans.add()

    def kvs(**kw: Any) -> list[KeyValue]:
        out = []
        for k, v in kw.items():
            key = k.replace("__", ".")
            out.append(KeyValue(key=key, value=AnyValue(double_value=v) if isinstance(v, float) else
                                AnyValue(int_value=v) if isinstance(v, int) else AnyValue(string_value=v)))
        return out

    ss.spans.add(name="llm_request", trace_id=b"\1" * 16, span_id=b"\2" * 8, start_time_unix_nano=T0,
                 end_time_unix_nano=T0 + 2 * 10**9, attributes=kvs(
                     gen_ai__latency__time_in_queue=0.1, gen_ai__latency__time_to_first_token=0.3,
                     gen_ai__latency__e2e=2.0, gen_ai__latency__time_in_model_forward=1.5,
                     gen_ai__response__model="llama-3", gen_ai__usage__prompt_tokens=10,
                     gen_ai__usage__completion_tokens=20, gen_ai__request__id="r0"))
    ss.spans.add(name="chat llama", trace_id=b"\3" * 16, span_id=b"\4" * 8, start_time_unix_nano=T0,
                 end_time_unix_nano=T0 + 10**9, attributes=kvs(
                     gen_ai__request__model="llama", gen_ai__usage__input_tokens=5, gen_ai__usage__output_tokens=1,
                     gen_ai__provider__name="openai", gen_ai__response__id="x", k8s__pod__name="other-pod",
                     process__pid=9, gen_ai__server__time_to_first_token=0.25))
    ss.spans.add(name="db", trace_id=b"\5" * 16, span_id=b"\6" * 8)
    raw = msg.SerializeToString()
    assert check(raw)
    batch = fast_spans.decode(raw)
    assert batch is not None and batch.ignored == 1
    r = batch.requests.data
    assert r["node"] == ["node-3", "node-3"] and r["engine"] == ["vllm", "openai"]
    assert r["model"] == ["llama-3", "llama"] and r["prefill_s"][0] == pytest.approx(0.2)
    assert r["decode_s"] == [pytest.approx(1.7), pytest.approx(0.75)] and r["tpot_s"][1] is None
    assert r["pod"] == ["vllm-0", "other-pod"] and r["pid"] == [77, 9] and r["gpu_uuids"] == ["GPU-a,GPU-b"] * 2
    assert r["trace_id"][0] == "01" * 16 and r["request_id"] == ["r0", "x"]


def test_json_bodies_with_hex_ids_give_the_same_rows_as_their_protobuf() -> None:
    """OTLP/JSON keeps the reference path; the same message as protobuf takes the fast path, same rows."""
    for signal, doc in JSON_CORPUS:
        if signal != "traces":
            continue
        via_json = decode("traces", json.dumps(doc).encode(), "application/json")
        raw = parse_message("traces", json.dumps(doc).encode(), "json").SerializeToString()
        fast = fast_spans.decode(raw)
        assert fast is not None
        assert_same_batch(fast, via_json)


# -- malformed bodies ---------------------------------------------------------------------------------------
BASE = [body for signal, body in CORPUS if signal == "traces"] + [
    wrap([vllm_span(ld(9, kv_bytes("gpu.uuids", ld(5, ld(1, str_any(b"a")) + ld(1, str_any(b"b"))))))], RESOURCE)]


@settings(FAST, max_examples=1000)
@given(data=st.data(), which=st.integers(0, len(BASE) - 1))
def test_truncated_or_corrupted_bodies(data: st.DataObject, which: int) -> None:
    body = BASE[which]
    b = bytearray(body[:data.draw(st.integers(0, len(body)), label="cut")])
    for _ in range(data.draw(st.integers(0, 4), label="edits")):
        if b:
            b[data.draw(st.integers(0, len(b) - 1))] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans(), label="insert") and b:
        i = data.draw(st.integers(0, len(b)))
        b[i:i] = data.draw(st.binary(min_size=1, max_size=3))
    check(bytes(b))


@settings(FAST, max_examples=500)
@given(body=st.binary(max_size=300))
def test_random_bytes(body: bytes) -> None:
    check(body)


def test_metrics_body_sent_as_traces() -> None:
    for signal, body in CORPUS:
        if signal == "metrics":
            check(body)


def test_threads_decode_at_once() -> None:
    """The C keeps no state between calls and runs without the GIL: the gRPC workers decode in parallel."""
    bodies = [sdk_spans([Req(i, T0 + i * 10**8 + k, 0.01, 0.05, 1.2, 100 + i, 1 + i + k) for i in range(50)])
              .SerializeToString() for k in range(8)]
    want = [reference(b) for b in bodies]
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(fast_spans.decode, bodies * 8))
    for g, w in zip(got, want * 8, strict=True):
        assert g is not None and isinstance(w, IngestBatch)
        assert_same_batch(g, w)


# -- who frees the rows ---------------------------------------------------------------------------------------
def _sdk_body(n: int = 40) -> bytes:
    return sdk_spans([Req(i, T0 + i * 10**8, 0.01, 0.05, 1.2, 100 + i, 3 + i) for i in range(n)]).SerializeToString()


def test_the_imported_table_outlives_the_decoder_result() -> None:
    """The rows go to Arrow without a copy; the C frees them when the table goes, not when decode returns: the
    table read after other bodies were decoded (reusing the freed memory) still has the reference's rows."""
    import gc

    body = _sdk_body()
    got = fast_spans.decode(body)
    want = reference(body)
    assert got is not None and isinstance(want, IngestBatch)
    table = got.requests.table  # type: ignore[attr-defined]
    assert table is not None and table.schema == fast_spans.STORED_REQUEST_SCHEMA
    copy = table.to_pylist()
    for _ in range(20):  # the allocator hands the memory of anything freed too soon to these
        fast_spans.decode(_sdk_body(60))
    gc.collect()
    assert table.to_pylist() == copy
    assert_same_batch(got, want)


def test_a_result_not_imported_or_whose_import_fails_is_freed_once() -> None:
    """fs_free alone frees a result nobody imported; an import that fails has Arrow release the array at once,
    and fs_free then frees the rest (a double free aborts the process; ASan reports either mistake)."""
    import ctypes

    import pyarrow as pa

    lib = fast_spans._LIB
    body = _sdk_body()
    for _ in range(50):
        p = lib.fs_decode(body, len(body))
        assert p and p.contents.status == 0 and p.contents.n == 40 and p.contents.arrow.release
        lib.fs_free(p)
    wrong = pa.schema([("start_ns", pa.int64())])  # one child where the array has 33
    for _ in range(50):
        p = lib.fs_decode(body, len(body))
        with pytest.raises(pa.ArrowException):
            pa.RecordBatch._import_from_c(ctypes.addressof(p.contents.arrow), wrong)
        assert not p.contents.arrow.release  # released by Arrow
        lib.fs_free(p)


# -- the switch ---------------------------------------------------------------------------------------------
def test_a_stale_or_missing_library_means_the_pure_path(tmp_path: Path) -> None:
    assert fast_spans._load(None) is None
    assert fast_spans._load(tmp_path / "missing.so") is None
    bogus = tmp_path / "bogus.so"
    bogus.write_bytes(b"not a library")
    assert fast_spans._load(bogus) is None

def _run(code: str, env: dict[str, str]) -> str:
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                         check=True, cwd=Path(__file__).parents[1])
    return out.stdout.strip()


def test_pure_python_switch_turns_the_fast_path_off() -> None:
    code = ("from correlator.ingest import fast_spans, payload; from tests.test_decoder_fuzz import CORPUS;"
            "b = payload.decode('traces', CORPUS[0][1], 'application/x-protobuf');"
            "print(fast_spans.available(), fast_spans.decode(CORPUS[0][1]) is not None, len(b.requests))")
    assert _run(code, {"STACKLENS_PURE_PYTHON": "1"}) == "False False 3"
    assert _run(code, {"STACKLENS_PURE_PYTHON": ""}) == "True True 3"
