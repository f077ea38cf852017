"""A real OTLP receiver for tests: gRPC and HTTP/protobuf, metrics and traces.

:class:`OtlpSink` listens on two loopback ports at once:

* a gRPC server (grpcio) serving ``opentelemetry.proto.collector.metrics.v1.MetricsService/Export``
  and ``opentelemetry.proto.collector.trace.v1.TraceService/Export`` through the generated
  servicer registration functions shipped in the ``opentelemetry-proto`` package;
* an HTTP/1.1 server (standard library) accepting ``POST /v1/metrics`` and ``POST /v1/traces``
  with ``application/x-protobuf`` bodies (``Content-Encoding: gzip`` and ``deflate`` are
  decoded, chunked request bodies are accepted) and answering with the protobuf
  ``Export*ServiceResponse`` (or a ``google.rpc.Status`` body on failure), as the OTLP/HTTP
  specification requires.

Every export request that reaches the sink is recorded, thread-safely, together with its
transport, signal, request metadata/headers and whether it was accepted. Tests can

* make the next *n* exports fail (:meth:`OtlpSink.fail_next`), optionally telling the client
  how long to back off (gRPC ``google.rpc.RetryInfo`` trailer / HTTP ``Retry-After``), to
  exercise an exporter's retry logic quickly;
* take the endpoint away and bring it back on the same ports (:meth:`OtlpSink.stop` /
  :meth:`OtlpSink.start`); while stopped, both ports stay reserved by bound, non-listening
  sockets, so connection attempts are refused and no other process can take the ports;
* read flattened views of what arrived (:meth:`OtlpSink.metric_points`, :meth:`OtlpSink.spans`)
  and wait for a condition on them (:meth:`OtlpSink.wait_for_points`,
  :meth:`OtlpSink.wait_for_spans`).

Everything binds to 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import gzip
import math
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from concurrent import futures
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Literal, NoReturn, Self

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

__all__ = [
    "AttributeValue",
    "Attributes",
    "MetricKind",
    "MetricPoint",
    "OtlpSink",
    "ReceivedExport",
    "Signal",
    "SpanEventRecord",
    "SpanRecord",
    "Transport",
    "attributes_to_dict",
    "flatten_metrics",
    "flatten_spans",
]

_LOOPBACK = "127.0.0.1"
_METRICS_PATH = "/v1/metrics"
_TRACES_PATH = "/v1/traces"
_PROTOBUF = "application/x-protobuf"
_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_RETRY_INFO_TRAILER = "google.rpc.retryinfo-bin"

# The generated registration functions are unannotated; bind them to typed names once.
_AddServicer = Callable[[object, object], None]
_add_metrics_servicer: _AddServicer = metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server
_add_trace_servicer: _AddServicer = trace_service_pb2_grpc.add_TraceServiceServicer_to_server

AttributeValue = str | int | float | bool
Attributes = dict[str, AttributeValue]
Signal = Literal["metrics", "traces"]
Transport = Literal["grpc", "http"]
MetricKind = Literal["gauge", "sum", "histogram", "exponential_histogram", "summary"]
Temporality = Literal["unspecified", "delta", "cumulative"]
ExportRequest = ExportMetricsServiceRequest | ExportTraceServiceRequest

_TEMPORALITY: dict[int, Temporality] = {
    metrics_pb2.AGGREGATION_TEMPORALITY_UNSPECIFIED: "unspecified",
    metrics_pb2.AGGREGATION_TEMPORALITY_DELTA: "delta",
    metrics_pb2.AGGREGATION_TEMPORALITY_CUMULATIVE: "cumulative",
}


# --------------------------------------------------------------------------------------------
# Flattened views
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricPoint:
    """One data point of one metric, with everything needed to assert on it.

    ``kind`` is the OTLP data type. For ``gauge`` and ``sum`` the point is a NumberDataPoint
    and ``value`` is its value (``value_type`` says whether it was sent as ``as_int`` or
    ``as_double``; NaN if neither was set). For ``histogram``, ``exponential_histogram`` and
    ``summary`` points ``value`` is the sum (NaN when absent) and ``count`` the count.
    ``is_monotonic`` is only ever true for monotonic sums; ``temporality`` is
    ``"unspecified"`` for gauges and summaries.
    """

    name: str
    unit: str
    kind: MetricKind
    is_monotonic: bool
    value: float
    time_unix_nano: int
    start_time_unix_nano: int
    attributes: Attributes
    resource_attributes: Attributes
    description: str = ""
    temporality: Temporality = "unspecified"
    value_type: Literal["double", "int"] = "double"
    count: int | None = None
    scope_name: str = ""
    scope_version: str = ""


@dataclass(frozen=True)
class SpanEventRecord:
    """One event recorded on a span."""

    name: str
    time_unix_nano: int
    attributes: Attributes


@dataclass(frozen=True)
class SpanRecord:
    """One span, flattened. Ids are lower-case hex; ``parent_span_id`` is "" for a root span.

    ``kind`` is the lower-case span kind without prefix (``"internal"``, ``"server"``,
    ``"client"``, ``"producer"``, ``"consumer"``, ``"unspecified"``); ``status_code`` is
    ``"unset"``, ``"ok"`` or ``"error"``.
    """

    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: str
    start_time_unix_nano: int
    end_time_unix_nano: int
    attributes: Attributes
    resource_attributes: Attributes
    status_code: str
    status_message: str
    scope_name: str
    events: tuple[SpanEventRecord, ...] = ()


@dataclass(frozen=True)
class ReceivedExport:
    """One export request as it reached the sink.

    ``accepted`` is false when the sink answered it with a failure because of
    :meth:`OtlpSink.fail_next`. ``metadata`` holds the gRPC invocation metadata or the HTTP
    request headers, keys lower-cased (binary gRPC metadata values are hex-encoded).
    """

    signal: Signal
    transport: Transport
    request: ExportRequest
    metadata: dict[str, str]
    accepted: bool
    received_at: float


def _any_value(value: AnyValue) -> AttributeValue:
    which = value.WhichOneof("value")
    if which == "string_value":
        return value.string_value
    if which == "bool_value":
        return value.bool_value
    if which == "int_value":
        return value.int_value
    if which == "double_value":
        return value.double_value
    if which == "bytes_value":
        return value.bytes_value.hex()
    if which == "array_value":
        return repr([_any_value(item) for item in value.array_value.values])
    if which == "kvlist_value":
        return repr(attributes_to_dict(value.kvlist_value.values))
    return ""


def attributes_to_dict(attributes: Iterable[KeyValue]) -> Attributes:
    """Convert OTLP ``KeyValue`` attributes to a plain dict.

    Scalars keep their type; bytes become hex strings; arrays and key/value lists become the
    ``repr`` of the converted list/dict (enough to assert on in tests).
    """
    return {kv.key: _any_value(kv.value) for kv in attributes}


def _number_point(
    point: metrics_pb2.NumberDataPoint,
) -> tuple[float, Literal["double", "int"]]:
    which = point.WhichOneof("value")
    if which == "as_int":
        return float(point.as_int), "int"
    if which == "as_double":
        return point.as_double, "double"
    return math.nan, "double"


def flatten_metrics(requests: Iterable[ExportMetricsServiceRequest]) -> list[MetricPoint]:
    """Flatten export requests into one :class:`MetricPoint` per data point, in arrival order."""
    points: list[MetricPoint] = []
    for request in requests:
        for resource_metrics in request.resource_metrics:
            resource_attrs = attributes_to_dict(resource_metrics.resource.attributes)
            for scope_metrics in resource_metrics.scope_metrics:
                scope = scope_metrics.scope
                for metric in scope_metrics.metrics:
                    common: dict[str, Any] = {
                        "name": metric.name,
                        "unit": metric.unit,
                        "description": metric.description,
                        "resource_attributes": resource_attrs,
                        "scope_name": scope.name,
                        "scope_version": scope.version,
                    }
                    points.extend(_metric_points(metric, common))
    return points


def _metric_points(metric: metrics_pb2.Metric, common: dict[str, Any]) -> list[MetricPoint]:
    which = metric.WhichOneof("data")
    out: list[MetricPoint] = []
    if which in ("gauge", "sum"):
        if which == "gauge":
            number_points: Sequence[metrics_pb2.NumberDataPoint] = metric.gauge.data_points
            monotonic = False
            temporality: Temporality = "unspecified"
        else:
            number_points = metric.sum.data_points
            monotonic = metric.sum.is_monotonic
            temporality = _TEMPORALITY.get(metric.sum.aggregation_temporality, "unspecified")
        for point in number_points:
            value, value_type = _number_point(point)
            out.append(
                MetricPoint(
                    kind=which,
                    is_monotonic=monotonic,
                    value=value,
                    value_type=value_type,
                    time_unix_nano=point.time_unix_nano,
                    start_time_unix_nano=point.start_time_unix_nano,
                    attributes=attributes_to_dict(point.attributes),
                    temporality=temporality,
                    **common,
                )
            )
    elif which in ("histogram", "exponential_histogram"):
        histogram = metric.histogram if which == "histogram" else metric.exponential_histogram
        hist_temporality = _TEMPORALITY.get(histogram.aggregation_temporality, "unspecified")
        for hpoint in histogram.data_points:
            out.append(
                MetricPoint(
                    kind=which,
                    is_monotonic=False,
                    value=hpoint.sum if hpoint.HasField("sum") else math.nan,
                    count=hpoint.count,
                    time_unix_nano=hpoint.time_unix_nano,
                    start_time_unix_nano=hpoint.start_time_unix_nano,
                    attributes=attributes_to_dict(hpoint.attributes),
                    temporality=hist_temporality,
                    **common,
                )
            )
    elif which == "summary":
        for spoint in metric.summary.data_points:
            out.append(
                MetricPoint(
                    kind="summary",
                    is_monotonic=False,
                    value=spoint.sum,
                    count=spoint.count,
                    time_unix_nano=spoint.time_unix_nano,
                    start_time_unix_nano=spoint.start_time_unix_nano,
                    attributes=attributes_to_dict(spoint.attributes),
                    **common,
                )
            )
    return out


def _enum_suffix(name_of: Callable[[Any], str], value: int, prefix: str) -> str:
    try:
        name = name_of(value)
    except ValueError:
        return str(value)
    return name.removeprefix(prefix).lower()


def flatten_spans(requests: Iterable[ExportTraceServiceRequest]) -> list[SpanRecord]:
    """Flatten export requests into one :class:`SpanRecord` per span, in arrival order."""
    spans: list[SpanRecord] = []
    for request in requests:
        for resource_spans in request.resource_spans:
            resource_attrs = attributes_to_dict(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    spans.append(
                        SpanRecord(
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            kind=_enum_suffix(trace_pb2.Span.SpanKind.Name, span.kind, "SPAN_KIND_"),
                            start_time_unix_nano=span.start_time_unix_nano,
                            end_time_unix_nano=span.end_time_unix_nano,
                            attributes=attributes_to_dict(span.attributes),
                            resource_attributes=resource_attrs,
                            status_code=_enum_suffix(
                                trace_pb2.Status.StatusCode.Name, span.status.code, "STATUS_CODE_"
                            ),
                            status_message=span.status.message,
                            scope_name=scope_spans.scope.name,
                            events=tuple(
                                SpanEventRecord(
                                    name=event.name,
                                    time_unix_nano=event.time_unix_nano,
                                    attributes=attributes_to_dict(event.attributes),
                                )
                                for event in span.events
                            ),
                        )
                    )
    return spans


# --------------------------------------------------------------------------------------------
# Failure injection
# --------------------------------------------------------------------------------------------


@dataclass
class _FailurePlan:
    remaining: int
    grpc_code: grpc.StatusCode
    http_status: int
    retry_after_s: float | None
    message: str


def _rpc_status_body(code: int, message: str) -> bytes:
    body: bytes = status_pb2.Status(code=code, message=message).SerializeToString()
    return body


def _retry_info_bytes(delay_s: float) -> bytes:
    seconds = int(delay_s)
    nanos = round((delay_s - seconds) * 1e9)
    retry_info = error_details_pb2.RetryInfo(retry_delay=Duration(seconds=seconds, nanos=nanos))
    data: bytes = retry_info.SerializeToString()
    return data


# --------------------------------------------------------------------------------------------
# gRPC side
# --------------------------------------------------------------------------------------------


def _grpc_metadata(context: grpc.ServicerContext) -> dict[str, str]:
    metadata: dict[str, str] = {}
    for key, value in context.invocation_metadata() or ():
        metadata[str(key).lower()] = value.hex() if isinstance(value, bytes) else str(value)
    return metadata


def _grpc_abort(context: grpc.ServicerContext, plan: _FailurePlan) -> NoReturn:
    if plan.retry_after_s is not None:
        context.set_trailing_metadata(((_RETRY_INFO_TRAILER, _retry_info_bytes(plan.retry_after_s)),))
    context.abort(plan.grpc_code, plan.message)
    raise AssertionError("grpc ServicerContext.abort returned")  # pragma: no cover


class _MetricsServicer:
    """Duck-typed MetricsService servicer (registered via the generated add_* function)."""

    def __init__(self, sink: OtlpSink) -> None:
        self._sink = sink

    def Export(  # noqa: N802 - method name fixed by the generated service code
        self, request: ExportMetricsServiceRequest, context: grpc.ServicerContext
    ) -> ExportMetricsServiceResponse:
        plan = self._sink._record("metrics", "grpc", request, _grpc_metadata(context))
        if plan is not None:
            _grpc_abort(context, plan)
        return metrics_service_pb2.ExportMetricsServiceResponse()


class _TraceServicer:
    """Duck-typed TraceService servicer (registered via the generated add_* function)."""

    def __init__(self, sink: OtlpSink) -> None:
        self._sink = sink

    def Export(  # noqa: N802 - method name fixed by the generated service code
        self, request: ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> ExportTraceServiceResponse:
        plan = self._sink._record("traces", "grpc", request, _grpc_metadata(context))
        if plan is not None:
            _grpc_abort(context, plan)
        return trace_service_pb2.ExportTraceServiceResponse()


# --------------------------------------------------------------------------------------------
# HTTP side
# --------------------------------------------------------------------------------------------


class _SinkHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer that remembers its open connections so stop() can cut them."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int, sink: OtlpSink) -> None:
        self.sink = sink
        self._conn_lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        super().__init__((_LOOPBACK, port), _OtlpHttpHandler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if isinstance(request, socket.socket):
            with self._conn_lock:
                self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        if isinstance(request, socket.socket):
            with self._conn_lock:
                self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self._conn_lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class _OtlpHttpHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "stacklens-otlp-sink/1"
    timeout = 30  # seconds; a stuck client cannot pin a handler thread forever

    def log_message(self, format: str, *args: Any) -> None:
        """Keep test output quiet."""

    def _reply(self, status: int, body: bytes, extra_headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", _PROTOBUF)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (extra_headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def _reply_error(self, status: int, grpc_code: grpc.StatusCode, message: str) -> None:
        code: int = grpc_code.value[0]
        self._reply(status, _rpc_status_body(code, message))

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks: list[bytes] = []
            while True:
                size_line = self.rfile.readline(65537)
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    # Skip optional trailers up to the terminating empty line.
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline(3)
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length", "0") or "0")
        return self.rfile.read(length) if length > 0 else b""

    def do_GET(self) -> None:
        self._reply_error(405, grpc.StatusCode.UNIMPLEMENTED, "only POST is supported")

    def do_POST(self) -> None:
        server = self.server
        assert isinstance(server, _SinkHTTPServer)
        path = self.path.split("?", 1)[0]
        signal: Signal
        if path == _METRICS_PATH:
            signal = "metrics"
        elif path == _TRACES_PATH:
            signal = "traces"
        else:
            self._read_body()
            self._reply_error(404, grpc.StatusCode.UNIMPLEMENTED, f"unknown path {path}")
            return
        try:
            raw = self._read_body()
        except ValueError:
            self.close_connection = True
            self._reply_error(400, grpc.StatusCode.INVALID_ARGUMENT, "malformed request body framing")
            return
        content_type = self.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        if content_type != _PROTOBUF:
            self._reply_error(
                415, grpc.StatusCode.INVALID_ARGUMENT, f"unsupported content type {content_type!r}"
            )
            return
        encoding = self.headers.get("Content-Encoding", "identity").strip().lower()
        try:
            if encoding == "gzip":
                body = gzip.decompress(raw)
            elif encoding == "deflate":
                body = zlib.decompress(raw)
            elif encoding in ("", "identity"):
                body = raw
            else:
                self._reply_error(
                    415, grpc.StatusCode.INVALID_ARGUMENT, f"unsupported content encoding {encoding!r}"
                )
                return
        except (OSError, EOFError, zlib.error):
            self._reply_error(400, grpc.StatusCode.INVALID_ARGUMENT, f"corrupt {encoding} body")
            return
        request: ExportRequest
        try:
            if signal == "metrics":
                request = ExportMetricsServiceRequest.FromString(body)
            else:
                request = ExportTraceServiceRequest.FromString(body)
        except DecodeError as exc:
            self._reply_error(400, grpc.StatusCode.INVALID_ARGUMENT, f"bad protobuf: {exc}")
            return
        headers = {key.lower(): value for key, value in self.headers.items()}
        plan = server.sink._record(signal, "http", request, headers)
        if plan is not None:
            extra: dict[str, str] = {}
            if plan.retry_after_s is not None:
                extra["Retry-After"] = f"{plan.retry_after_s:g}"
            code: int = plan.grpc_code.value[0]
            self._reply(plan.http_status, _rpc_status_body(code, plan.message), extra)
            return
        response: ExportMetricsServiceResponse | ExportTraceServiceResponse = (
            ExportMetricsServiceResponse() if signal == "metrics" else ExportTraceServiceResponse()
        )
        self._reply(200, response.SerializeToString())


# --------------------------------------------------------------------------------------------
# The sink
# --------------------------------------------------------------------------------------------


def _reserve_port(port: int) -> socket.socket | None:
    """Bind (but do not listen on) ``port`` so connects are refused and nobody else takes it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((_LOOPBACK, port))
    except OSError:
        sock.close()
        return None
    return sock


class OtlpSink:
    """A real OTLP/gRPC + OTLP/HTTP receiver on 127.0.0.1 that records what it receives.

    Use as a context manager (``with OtlpSink() as sink: ...``); the servers start on
    ``__enter__`` (or an explicit :meth:`start`) on free ports chosen by the kernel, and
    keep those ports for the sink's whole life, across :meth:`stop` / :meth:`start`.
    """

    def __init__(self, *, max_workers: int = 8) -> None:
        self._max_workers = max_workers
        self._cond = threading.Condition()
        self._exports: list[ReceivedExport] = []
        self._failure: _FailurePlan | None = None
        self._grpc_port: int | None = None
        self._http_port: int | None = None
        self._grpc_server: Any = None
        self._http_server: _SinkHTTPServer | None = None
        self._http_thread: threading.Thread | None = None
        self._reservations: list[socket.socket] = []
        self._lifecycle = threading.Lock()
        self._closed = False

    # -- lifecycle --------------------------------------------------------------------------

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def running(self) -> bool:
        """True while both servers accept exports."""
        return self._grpc_server is not None

    def start(self) -> None:
        """Start both servers (no-op if running). After :meth:`stop`, re-binds the same ports."""
        with self._lifecycle:
            if self._closed:
                raise RuntimeError("OtlpSink is closed")
            if self._grpc_server is not None:
                return
            self._release_reservations()
            try:
                self._start_grpc()
                self._start_http()
            except BaseException:
                self._stop_servers()
                raise

    def stop(self) -> None:
        """Make the endpoint unreachable: stop both servers, cut open connections (in-flight
        gRPC calls are cancelled) and keep both ports reserved so connects are refused."""
        with self._lifecycle:
            if self._grpc_server is None:
                return
            self._stop_servers()
            for port in (self._grpc_port, self._http_port):
                if port is not None and (sock := _reserve_port(port)) is not None:
                    self._reservations.append(sock)

    def close(self) -> None:
        """Stop everything and release the ports for good."""
        with self._lifecycle:
            self._stop_servers()
            self._release_reservations()
            self._closed = True

    def _start_grpc(self) -> None:
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self._max_workers, thread_name_prefix="otlp-sink-grpc"),
            options=[
                ("grpc.so_reuseport", 0),
                ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
            ],
        )
        _add_metrics_servicer(_MetricsServicer(self), server)
        _add_trace_servicer(_TraceServicer(self), server)
        wanted = self._grpc_port or 0
        port = 0
        for attempt in range(20):
            try:
                port = int(server.add_insecure_port(f"{_LOOPBACK}:{wanted}"))
            except RuntimeError:
                port = 0
            if port or not wanted:
                break
            time.sleep(0.05 * (attempt + 1))
        if not port:
            raise RuntimeError(f"OtlpSink: could not bind gRPC server to {_LOOPBACK}:{wanted}")
        server.start()
        self._grpc_server = server
        self._grpc_port = port

    def _start_http(self) -> None:
        wanted = self._http_port or 0
        last_error: OSError | None = None
        for attempt in range(20):
            try:
                server = _SinkHTTPServer(wanted, self)
                break
            except OSError as exc:
                last_error = exc
                if not wanted:
                    raise
                time.sleep(0.05 * (attempt + 1))
        else:
            raise RuntimeError(f"OtlpSink: could not bind HTTP server to {_LOOPBACK}:{wanted}: {last_error}")
        self._http_port = int(server.server_address[1])
        thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="otlp-sink-http", daemon=True
        )
        thread.start()
        self._http_server = server
        self._http_thread = thread

    def _stop_servers(self) -> None:
        grpc_server, self._grpc_server = self._grpc_server, None
        if grpc_server is not None:
            grpc_server.stop(grace=None).wait(5)
        http_server, self._http_server = self._http_server, None
        if http_server is not None:
            http_server.shutdown()
            http_server.close_connections()
            http_server.server_close()
        thread, self._http_thread = self._http_thread, None
        if thread is not None:
            thread.join(5)

    def _release_reservations(self) -> None:
        for sock in self._reservations:
            sock.close()
        self._reservations.clear()

    # -- endpoints --------------------------------------------------------------------------

    @property
    def grpc_port(self) -> int:
        if self._grpc_port is None:
            raise RuntimeError("OtlpSink has not been started")
        return self._grpc_port

    @property
    def http_port(self) -> int:
        if self._http_port is None:
            raise RuntimeError("OtlpSink has not been started")
        return self._http_port

    @property
    def grpc_endpoint(self) -> str:
        """``"127.0.0.1:PORT"`` — pass to an OTLP/gRPC exporter with ``insecure=True``."""
        return f"{_LOOPBACK}:{self.grpc_port}"

    @property
    def http_endpoint(self) -> str:
        """``"http://127.0.0.1:PORT"`` — append ``/v1/metrics`` or ``/v1/traces``."""
        return f"http://{_LOOPBACK}:{self.http_port}"

    @property
    def http_metrics_url(self) -> str:
        return self.http_endpoint + _METRICS_PATH

    @property
    def http_traces_url(self) -> str:
        return self.http_endpoint + _TRACES_PATH

    # -- failure injection ------------------------------------------------------------------

    def fail_next(
        self,
        n: int,
        grpc_code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE,
        http_status: int = 503,
        *,
        retry_after_s: float | None = None,
        message: str = "injected failure (OtlpSink.fail_next)",
    ) -> None:
        """Answer the next ``n`` export requests (any signal, either transport) with a failure.

        gRPC calls end with ``grpc_code``; HTTP requests get ``http_status`` and a
        ``google.rpc.Status`` body. With ``retry_after_s`` the answer also carries a
        ``google.rpc.RetryInfo`` trailer (gRPC) / ``Retry-After`` header (HTTP, formatted
        with ``%g``, so it may be fractional) telling the client how long to back off.
        Failed requests are still recorded, with ``accepted=False``. Replaces any earlier
        plan; ``fail_next(0)`` cancels it.
        """
        if n < 0:
            raise ValueError("n must be >= 0")
        if retry_after_s is not None and retry_after_s < 0:
            raise ValueError("retry_after_s must be >= 0")
        with self._cond:
            self._failure = _FailurePlan(n, grpc_code, http_status, retry_after_s, message) if n else None

    @property
    def pending_failures(self) -> int:
        """How many of the injected failures are still to be served."""
        with self._cond:
            return self._failure.remaining if self._failure is not None else 0

    def _record(
        self, signal: Signal, transport: Transport, request: ExportRequest, metadata: dict[str, str]
    ) -> _FailurePlan | None:
        with self._cond:
            plan = self._failure
            failing = plan is not None and plan.remaining > 0
            if plan is not None and failing:
                plan.remaining -= 1
                if plan.remaining == 0:
                    self._failure = None
            self._exports.append(
                ReceivedExport(
                    signal=signal,
                    transport=transport,
                    request=request,
                    metadata=metadata,
                    accepted=not failing,
                    received_at=time.time(),
                )
            )
            self._cond.notify_all()
        return plan if failing else None

    # -- recorded data ----------------------------------------------------------------------

    def exports(self, *, include_rejected: bool = True) -> list[ReceivedExport]:
        """Every export request received so far, in arrival order."""
        with self._cond:
            return [e for e in self._exports if include_rejected or e.accepted]

    @property
    def rejected_count(self) -> int:
        """How many requests were answered with an injected failure."""
        with self._cond:
            return sum(1 for e in self._exports if not e.accepted)

    def metrics_requests(self) -> list[ExportMetricsServiceRequest]:
        """Accepted ExportMetricsServiceRequests, in arrival order."""
        with self._cond:
            return [
                e.request
                for e in self._exports
                if e.accepted and isinstance(e.request, ExportMetricsServiceRequest)
            ]

    def trace_requests(self) -> list[ExportTraceServiceRequest]:
        """Accepted ExportTraceServiceRequests, in arrival order."""
        with self._cond:
            return [
                e.request
                for e in self._exports
                if e.accepted and isinstance(e.request, ExportTraceServiceRequest)
            ]

    def metric_points(self) -> list[MetricPoint]:
        """All data points of all accepted metric exports, flattened (see :class:`MetricPoint`)."""
        return flatten_metrics(self.metrics_requests())

    def spans(self) -> list[SpanRecord]:
        """All spans of all accepted trace exports, flattened (see :class:`SpanRecord`)."""
        return flatten_spans(self.trace_requests())

    def clear(self) -> None:
        """Forget everything received so far (the failure plan is kept)."""
        with self._cond:
            self._exports.clear()

    # -- waiting ----------------------------------------------------------------------------

    def _wait(self, ready: Callable[[], bool], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                if ready():
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.25))

    def wait_for_exports(
        self, count: int, *, signal: Signal | None = None, accepted_only: bool = True, timeout_s: float = 10.0
    ) -> list[ReceivedExport]:
        """Wait until at least ``count`` matching export requests have arrived; return them."""

        def matching() -> list[ReceivedExport]:
            return [
                e
                for e in self._exports
                if (signal is None or e.signal == signal) and (e.accepted or not accepted_only)
            ]

        if not self._wait(lambda: len(matching()) >= count, timeout_s):
            with self._cond:
                got = len(matching())
            raise AssertionError(
                f"OtlpSink: expected {count} {signal or 'any'} export(s) within {timeout_s}s, "
                f"got {got}; {self._summary()}"
            )
        with self._cond:
            return matching()

    def wait_for_points(
        self, predicate: Callable[[list[MetricPoint]], bool], timeout_s: float = 10.0
    ) -> list[MetricPoint]:
        """Wait until ``predicate(self.metric_points())`` is true; return those points.

        Raises AssertionError on timeout, describing what did arrive.
        """
        last: list[MetricPoint] = []

        def ready() -> bool:
            nonlocal last
            last = flatten_metrics(
                e.request
                for e in self._exports
                if e.accepted and isinstance(e.request, ExportMetricsServiceRequest)
            )
            return predicate(last)

        if not self._wait(ready, timeout_s):
            names = sorted({p.name for p in last})
            tail = "\n  ".join(repr(p) for p in last[-5:])
            raise AssertionError(
                f"OtlpSink: metric predicate not satisfied within {timeout_s}s; {self._summary()}; "
                f"{len(last)} point(s), metric names {names}; last points:\n  {tail}"
            )
        return last

    def wait_for_spans(
        self, predicate: Callable[[list[SpanRecord]], bool], timeout_s: float = 10.0
    ) -> list[SpanRecord]:
        """Wait until ``predicate(self.spans())`` is true; return those spans."""
        last: list[SpanRecord] = []

        def ready() -> bool:
            nonlocal last
            last = flatten_spans(
                e.request
                for e in self._exports
                if e.accepted and isinstance(e.request, ExportTraceServiceRequest)
            )
            return predicate(last)

        if not self._wait(ready, timeout_s):
            names = sorted({s.name for s in last})
            raise AssertionError(
                f"OtlpSink: span predicate not satisfied within {timeout_s}s; {self._summary()}; "
                f"{len(last)} span(s), names {names}"
            )
        return last

    def _summary(self) -> str:
        with self._cond:
            total = len(self._exports)
            rejected = sum(1 for e in self._exports if not e.accepted)
            by_kind: dict[str, int] = {}
            for e in self._exports:
                key = f"{e.transport}/{e.signal}"
                by_kind[key] = by_kind.get(key, 0) + 1
        state = "running" if self.running else "stopped"
        return f"sink {state}, {total} request(s) received ({rejected} rejected) {by_kind}"
