"""The OTLP/gRPC receiver (TraceService/Export, MetricsService/Export) on grpcio's asyncio server, which runs
on an event loop of its own thread.

Requests arrive as raw bytes (no deserializer registered) so that a malformed message is answered
INVALID_ARGUMENT with our message rather than grpcio's generic INTERNAL; the answer is sent only once
the rows are durable (on the store's spool, or committed). A compressed message is inflated here, not by
grpcio (its own inflate cost ~1.45x the CPU of a Collector's gzip-compressed DCGM export: 312k against 450k
samples/s per core over HTTP, docs/performance.md): grpcio hands it over as it arrived, and gRPC's gzip and
deflate are told apart from a protobuf message by their first bytes (see _encoding). The compressed size is
limited by grpcio's options, the inflated one by ``Limits.max_decoded_bytes``. A body of at most
INLINE_DECODE_BYTES that a compiled decoder takes is decoded on the loop (no hand-off to a thread and back:
~1 ms for a 300 KB export); any other on a worker thread.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
from collections.abc import Awaitable, Callable
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
    decode_inline,
    decode_protobuf,
    inflate,
)
from correlator.server.otlp_http import IngestStats
from correlator.store.duckdb_store import StoreError
from correlator.store.spool import SpoolError, SpoolRecord

log = logging.getLogger("stacklens.otlp_grpc")

_SERVICES: dict[str, tuple[Signal, Any]] = {
    "opentelemetry.proto.collector.trace.v1.TraceService": ("traces", ExportTraceServiceResponse),
    "opentelemetry.proto.collector.metrics.v1.MetricsService": ("metrics", ExportMetricsServiceResponse),
}

_PB = "application/x-protobuf"

Submit = Callable[[IngestBatch, SpoolRecord], Any]  # the store's submit: a future resolved once durable


def _encoding(body: bytes) -> str:
    """How a message grpcio did not inflate is compressed: "gzip" (magic 1f 8b: 0x1f would be a field of wire
    type 7, which no protobuf message starts with), "deflate" (a zlib header: 0x78 could start a message only with
    an unknown field 15, so _decode falls back to the bytes as they are should it not inflate), or ""."""
    if body[:2] == b"\x1f\x8b":
        return "gzip"
    if len(body) >= 2 and body[0] & 0x0F == 8 and body[0] >> 4 <= 7 and (body[0] << 8 | body[1]) % 31 == 0:
        return "deflate"
    return ""


def _decode(signal: Signal, body: bytes, encoding: str, limits: Limits) -> tuple[IngestBatch, bytes]:
    """The rows of a message and the message itself, inflated."""
    try:
        message = inflate(body, encoding, limits.max_decoded_bytes)
    except PayloadError:
        if encoding != "deflate" or len(body) > limits.max_decoded_bytes:
            raise
        message = body  # not deflate after all: a message that starts with field 15
    return decode_protobuf(signal, message), message


async def _decoded(signal: Signal, body: bytes, limits: Limits) -> tuple[IngestBatch, bytes]:
    """The body's rows and its message (inflated): on the loop when it is not compressed, a compiled decoder
    takes it and it is small, else (inflating too) on a worker thread."""
    encoding = _encoding(body)
    batch = None if encoding else decode_inline(signal, body, _PB, "", limits)
    if batch is None:  # compressed, a large body, or one the compiled decoders decline (and so the errors)
        return await asyncio.get_running_loop().run_in_executor(None, _decode, signal, body, encoding, limits)
    return batch, body


def _handler(signal: Signal, response: Any, submit: Submit, limits: Limits,
             stats: IngestStats, token: str | None, timeout_s: float) -> Callable[[bytes, Any], Awaitable[bytes]]:
    ok: bytes = response().SerializeToString()

    async def export(body: bytes, context: Any) -> bytes:
        if token:
            md = dict(context.invocation_metadata() or ())
            if not hmac.compare_digest(md.get("authorization", "").encode(), f"Bearer {token}".encode()):
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
        try:
            batch, message = await _decoded(signal, body, limits)
        except PayloadError as e:
            stats.rejected_requests += 1
            code = grpc.StatusCode.RESOURCE_EXHAUSTED if e.status == 413 else grpc.StatusCode.INVALID_ARGUMENT
            await context.abort(code, e.message)
            raise  # abort raised already
        try:
            # the spool keeps the message as decoded (inflated)
            await asyncio.wait_for(asyncio.wrap_future(submit(batch, SpoolRecord(signal, "protobuf", message))),
                                   timeout_s)
        except (StoreError, SpoolError, TimeoutError) as e:
            log.warning("otlp/grpc: %s", e)
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"not stored, retry later: {e}")
        stats.accepted_requests += 1
        stats.rows += batch.row_count()
        stats.ignored += batch.ignored
        return ok

    return export


class GrpcReceiver:
    """grpc.aio's server on an event loop of its own thread, started and stopped from any other thread."""

    def __init__(self, address: str, submit: Submit, limits: Limits, stats: IngestStats,
                 token: str | None, timeout_s: float, credentials: Any) -> None:
        # a plain selector loop: grpc.aio does not run on uvloop, whatever policy uvicorn installed
        self._loop = asyncio.SelectorEventLoop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="otlp-grpc", daemon=True)
        self._thread.start()
        self._server: Any = None
        try:
            self.port: int = self._call(self._start(address, submit, limits, stats, token, timeout_s, credentials),
                                        30.0)
        except BaseException:
            self.stop()
            raise

    def _call(self, coro: Any, timeout_s: float) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    async def _start(self, address: str, submit: Submit, limits: Limits,
                     stats: IngestStats, token: str | None, timeout_s: float, credentials: Any) -> int:
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", limits.max_body_bytes),
                                          ("grpc.max_send_message_length", 4 << 20),
                                          ("grpc.per_message_decompression", 0)])  # inflated in _decode
        for service, (signal, response) in _SERVICES.items():
            handler = grpc.unary_unary_rpc_method_handler(
                _handler(signal, response, submit, limits, stats, token, timeout_s),
                request_deserializer=None, response_serializer=None)
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, {"Export": handler}),))
        port: int = (server.add_secure_port(address, credentials) if credentials is not None
                     else server.add_insecure_port(address))
        if port == 0:
            raise OSError(f"cannot listen on {address} for OTLP/gRPC")
        await server.start()
        self._server = server
        return port

    def stop(self, grace_s: float = 5.0) -> None:
        """Refuse new calls, give those under way ``grace_s`` to finish, then end the loop and its thread."""
        if self._server is not None:
            try:
                self._call(self._server.stop(grace_s), grace_s + 5.0)
            except futures.TimeoutError:
                log.warning("otlp/grpc: calls still under way at stop")
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10.0)
        if not self._thread.is_alive():
            self._loop.close()


def start_grpc_server(address: str, submit: Submit, limits: Limits = DEFAULT_LIMITS,
                      stats: IngestStats | None = None, token: str | None = None, timeout_s: float = 30.0,
                      credentials: Any = None) -> tuple[GrpcReceiver, int]:
    """Start the receiver on ``address`` (host:port; port 0 picks one). Returns (receiver, bound port)."""
    receiver = GrpcReceiver(address, submit, limits, stats or IngestStats(), token, timeout_s, credentials)
    return receiver, receiver.port
