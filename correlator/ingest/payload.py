"""Bytes on the wire → OTLP messages → normalised rows, with every way a payload can be bad turned into
a :class:`PayloadError` carrying the HTTP status to answer with. Transport-free: the HTTP and gRPC
servers and ``stacklens import`` all call these functions.

Limits: a compressed body is read up to ``max_body_bytes``; it is inflated in bounded steps and refused
(413) as soon as it grows past ``max_decoded_bytes``, so a gzip bomb costs at most that much memory.
"""

from __future__ import annotations

import base64
import json
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, cast

from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from correlator.ingest import fast_metrics, fast_spans
from correlator.ingest.batch import IngestBatch
from correlator.ingest.otlp_metrics import decode_metrics
from correlator.ingest.otlp_spans import decode_spans
from correlator.store.spool import SpoolRecord


def _inflater() -> tuple[Callable[..., Any], tuple[type[Exception], ...]]:
    """zlib-ng's decompressobj (the same formats, inflated ~4x faster than by the system's zlib: a Collector
    gzips its exports) and its errors; the standard library's should the wheel be missing."""
    try:
        from zlib_ng import zlib_ng
    except ImportError:
        return zlib.decompressobj, (zlib.error,)
    return zlib_ng.decompressobj, (cast("type[Exception]", zlib_ng.error), zlib.error)


_decompressobj, _INFLATE_ERRORS = _inflater()

Signal = Literal["traces", "metrics"]
DEFAULT_MAX_BODY_BYTES = 16 << 20
DEFAULT_MAX_DECODED_BYTES = 64 << 20


class PayloadError(Exception):
    """A payload that cannot be accepted; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class Limits:
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES


def inflate(body: bytes, encoding: str, limit: int) -> bytes:
    """Undo Content-Encoding (gzip, deflate or none) without ever holding more than ``limit`` bytes."""
    enc = encoding.strip().lower()
    if enc in ("", "identity"):
        if len(body) > limit:
            raise PayloadError(413, f"payload of {len(body)} bytes is over the limit of {limit}")
        return body
    if enc not in ("gzip", "deflate"):
        raise PayloadError(415, f"unsupported Content-Encoding {encoding!r}: use gzip, deflate or none")
    d = _decompressobj(wbits=47)  # 32 + 15: zlib or gzip header, detected
    parts: list[bytes] = []  # joined at the end: the usual one-member body is handed on as zlib made it
    size = 0
    data = body
    try:
        while data:
            # never more than one byte past the limit per step: a bomb is stopped at the limit
            parts.append(d.decompress(data, limit + 1 - size))
            size += len(parts[-1])
            if size > limit:
                raise PayloadError(413, f"payload inflates past the limit of {limit} bytes")
            if d.eof:
                # gzip allows several members one after the other (and zero padding at the end)
                data = d.unused_data
                if not data.strip(b"\0"):
                    break
                d = _decompressobj(wbits=47)
            else:
                data = d.unconsumed_tail
        tail = d.flush()
    except _INFLATE_ERRORS as e:
        raise PayloadError(400, f"body is not valid {enc}: {e}") from e
    if not d.eof:
        raise PayloadError(400, f"{enc} body is truncated")
    if tail:
        parts.append(tail)
        size += len(tail)
    if size > limit:
        raise PayloadError(413, f"payload inflates past the limit of {limit} bytes")
    return b"".join(parts)  # one part: that very object, no copy


_ID_KEYS = ("traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id")


def _hex_ids_to_base64(node: Any) -> None:
    """OTLP/JSON writes trace and span ids as hex; protobuf's JSON mapping expects base64 for bytes."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k in _ID_KEYS and isinstance(v, str):
                try:
                    node[k] = base64.b64encode(bytes.fromhex(v)).decode()
                except ValueError as e:
                    raise PayloadError(400, f"{k} {v[:40]!r} is not hex") from e
            else:
                _hex_ids_to_base64(v)
    elif isinstance(node, list):
        for x in node:
            _hex_ids_to_base64(x)


def parse_message(signal: Signal, body: bytes, fmt: Literal["protobuf", "json"]) -> Any:
    msg: Any = ExportTraceServiceRequest() if signal == "traces" else ExportMetricsServiceRequest()
    if fmt == "protobuf":
        try:
            msg.ParseFromString(body)
        except DecodeError as e:
            raise PayloadError(400, f"body is not a valid OTLP {signal} protobuf message: {e}") from e
        return msg
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, ints over 4300 digits, deep nesting
        raise PayloadError(400, f"body is not valid JSON: {str(e)[:200]}") from e
    if not isinstance(doc, dict):
        raise PayloadError(400, "an OTLP/JSON body must be a JSON object")
    try:
        _hex_ids_to_base64(doc)
    except RecursionError as e:
        raise PayloadError(400, "OTLP/JSON body is nested too deeply") from e
    try:
        json_format.ParseDict(doc, msg, ignore_unknown_fields=True)
    except (json_format.ParseError, ValueError, TypeError, AttributeError, RecursionError) as e:
        raise PayloadError(400, f"body is not a valid OTLP/JSON {signal} message: {e}") from e
    return msg


DEFAULT_LIMITS = Limits()


_PROTOBUF_TYPES = ("application/x-protobuf", "application/protobuf")


def media_type(content_type: str) -> str:
    """A Content-Type's media type, without parameters, in lower case."""
    return content_type.split(";", maxsplit=1)[0].strip().lower()


def decode(signal: Signal, body: bytes, content_type: str, content_encoding: str = "",
           limits: Limits = DEFAULT_LIMITS) -> IngestBatch:
    """One HTTP request body → normalised rows, or a PayloadError. Nothing is kept on error."""
    return decode_export(signal, body, content_type, content_encoding, limits)[0]


def decode_export(signal: Signal, body: bytes, content_type: str, content_encoding: str = "",
                  limits: Limits = DEFAULT_LIMITS) -> tuple[IngestBatch, SpoolRecord]:
    """:func:`decode`, and the export as the spool keeps it (inflated), from which :func:`decode_record`
    gives the same rows again."""
    ctype = media_type(content_type)
    if ctype in _PROTOBUF_TYPES:
        fmt: Literal["protobuf", "json"] = "protobuf"
    elif ctype == "application/json":
        fmt = "json"
    else:
        raise PayloadError(415, f"unsupported Content-Type {content_type!r}: use application/x-protobuf or "
                                "application/json")
    if len(body) > limits.max_body_bytes:
        raise PayloadError(413, f"body of {len(body)} bytes is over the limit of {limits.max_body_bytes}")
    raw = inflate(body, content_encoding, limits.max_decoded_bytes)
    record = SpoolRecord(signal, fmt, raw)
    return decode_record(record), record


def decode_record(record: SpoolRecord) -> IngestBatch:
    """The rows of an export kept on the spool (the same as when it was received)."""
    if record.fmt == "protobuf":
        return decode_protobuf(record.signal, record.body)
    return decode_message(record.signal, parse_message(record.signal, record.body, "json"))


# a body up to this size that a compiled decoder takes is decoded where it arrives (the event loop): ~1 ms of
# work for a 300 KB export, cheaper than the hand-off to a thread and back and the GIL's contention
INLINE_DECODE_BYTES = 1 << 20


def decode_inline(signal: Signal, body: bytes, content_type: str, content_encoding: str = "",
                  limits: Limits = DEFAULT_LIMITS) -> IngestBatch | None:
    """The rows of a plain (not compressed) protobuf body of at most INLINE_DECODE_BYTES (and within ``limits``)
    that a compiled decoder takes, or None: then :func:`decode` (on a worker thread) decides, errors included."""
    if content_encoding or len(body) > min(INLINE_DECODE_BYTES, limits.max_body_bytes, limits.max_decoded_bytes):
        return None
    if media_type(content_type) not in _PROTOBUF_TYPES:
        return None
    return _decode_compiled(signal, body)


def _decode_compiled(signal: Signal, raw: bytes) -> IngestBatch | None:
    """The rows the signal's compiled decoder makes of a serialized message, or None where it declines it."""
    return fast_spans.decode(raw) if signal == "traces" else fast_metrics.decode(raw)


def decode_protobuf(signal: Signal, raw: bytes) -> IngestBatch:
    """One serialized (inflated) OTLP protobuf message → normalised rows, or a PayloadError. Spans and metrics
    take the compiled fast paths (fast_spans, fast_metrics) where they apply: the same rows as the reference
    path, which takes every message they decline (and so gives the same error for a bad one)."""
    batch = _decode_compiled(signal, raw)
    if batch is not None:
        return batch
    return decode_message(signal, parse_message(signal, raw, "protobuf"))


def decode_message(signal: Signal, msg: Any) -> IngestBatch:
    try:
        return decode_spans(msg) if signal == "traces" else decode_metrics(msg)
    except (ValueError, TypeError, OverflowError) as e:  # pragma: no cover - defensive
        raise PayloadError(400, f"OTLP {signal} message could not be normalised: {e}") from e


def upb_active() -> bool:
    """True when protobuf runs on its C (upb) backend; the pure-Python one decodes ~20x slower."""
    from google.protobuf.internal import api_implementation

    return api_implementation.Type() == "upb"
