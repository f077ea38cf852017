"""The OTLP/gRPC receiver (TraceService/Export, MetricsService/Export) on grpcio.

Requests arrive as raw bytes (no deserializer registered) so that a malformed message is answered
INVALID_ARGUMENT with our message rather than grpcio's generic INTERNAL; the answer is sent only after
the rows are committed. gzip is handled by grpcio itself; the message size limit by its options.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceResponse
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from correlator.ingest.batch import IngestBatch
from correlator.ingest.payload import (
    DEFAULT_LIMITS,
    Limits,
    PayloadError,
    Signal,
    decode_protobuf,
    inflate,
)
from correlator.server.otlp_http import IngestStats
from correlator.store.duckdb_store import StoreError

log = logging.getLogger("stacklens.otlp_grpc")

_SERVICES: dict[str, tuple[Signal, Any]] = {
    "opentelemetry.proto.collector.trace.v1.TraceService": ("traces", ExportTraceServiceResponse),
    "opentelemetry.proto.collector.metrics.v1.MetricsService": ("metrics", ExportMetricsServiceResponse),
}


def _handler(signal: Signal, response: Any, submit: Callable[[IngestBatch], Any], limits: Limits,
             stats: IngestStats, token: str | None, timeout_s: float) -> Callable[[bytes, Any], bytes]:
    ok: bytes = response().SerializeToString()

    def export(body: bytes, context: Any) -> bytes:
        if token:
            md = dict(context.invocation_metadata())
            if not hmac.compare_digest(md.get("authorization", "").encode(), f"Bearer {token}".encode()):
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
        try:
            raw = inflate(body, "", limits.max_decoded_bytes)
            batch = decode_protobuf(signal, raw)
        except PayloadError as e:
            stats.rejected_requests += 1
            code = grpc.StatusCode.RESOURCE_EXHAUSTED if e.status == 413 else grpc.StatusCode.INVALID_ARGUMENT
            context.abort(code, e.message)
        try:
            submit(batch).result(timeout_s)
        except (StoreError, futures.TimeoutError) as e:
            log.warning("otlp/grpc: %s", e)
            context.abort(grpc.StatusCode.UNAVAILABLE, f"not stored, retry later: {e}")
        stats.accepted_requests += 1
        stats.rows += batch.row_count()
        stats.ignored += batch.ignored
        return ok

    return export


def start_grpc_server(address: str, submit: Callable[[IngestBatch], Any], limits: Limits = DEFAULT_LIMITS,
                      stats: IngestStats | None = None, token: str | None = None, workers: int = 8,
                      timeout_s: float = 30.0, credentials: Any = None) -> tuple[Any, int]:
    """Start the receiver on ``address`` (host:port; port 0 picks one). Returns (server, bound port)."""
    st = stats or IngestStats()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="otlp-grpc"),
                         options=[("grpc.max_receive_message_length", limits.max_body_bytes),
                                  ("grpc.max_send_message_length", 4 << 20)])
    for service, (signal, response) in _SERVICES.items():
        handler = grpc.unary_unary_rpc_method_handler(
            _handler(signal, response, submit, limits, st, token, timeout_s),
            request_deserializer=None, response_serializer=None)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, {"Export": handler}),))
    port = server.add_secure_port(address, credentials) if credentials is not None else server.add_insecure_port(
        address)
    if port == 0:
        raise OSError(f"cannot listen on {address} for OTLP/gRPC")
    server.start()
    return server, port
