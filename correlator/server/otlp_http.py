"""The OTLP/HTTP receiver (``/v1/traces``, ``/v1/metrics``; protobuf or JSON; gzip), an ASGI app run
by uvicorn. A request is answered 200 only once its rows are durable (its body on the store's spool, or
its rows committed); a bad payload gets a 4xx with a clear message and nothing of it is stored; a store
failure gets 503 and Retry-After so that the exporter retries.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from google.rpc import status_pb2
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceResponse
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from correlator.ingest.batch import IngestBatch
from correlator.ingest.payload import (
    DEFAULT_LIMITS,
    Limits,
    PayloadError,
    Signal,
    decode_export,
    decode_inline,
    media_type,
)
from correlator.store.duckdb_store import StoreError
from correlator.store.spool import SpoolError, SpoolRecord

log = logging.getLogger("stacklens.otlp_http")


@dataclass(slots=True)
class IngestStats:
    accepted_requests: int = 0
    rejected_requests: int = 0
    rows: int = 0
    ignored: int = 0
    by_status: dict[int, int] = field(default_factory=dict)


class BatchSink:
    """Where decoded batches go: the store's submit, given the batch and the export it came from (for the
    spool); it returns a future resolved once the batch is durable."""

    def __init__(self, submit: Callable[[IngestBatch, SpoolRecord], Any]) -> None:
        self._submit = submit

    async def put(self, batch: IngestBatch, record: SpoolRecord) -> None:
        await asyncio.wrap_future(self._submit(batch, record))


def check_bearer(headers: Any, token: str | None) -> bool:
    if not token:
        return True
    got = headers.get("authorization", "")
    return hmac.compare_digest(got.encode(), f"Bearer {token}".encode())


def _error(status: int, message: str, json_body: bool) -> Response:
    if json_body:
        return Response(json.dumps({"code": status, "message": message}), status, media_type="application/json")
    body = status_pb2.Status(code=3 if status < 500 else 14, message=message).SerializeToString()
    return Response(body, status, media_type="application/x-protobuf")


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            n = int(declared)
        except ValueError as e:
            raise PayloadError(400, "Content-Length is not a number") from e
        if n > limit:
            raise PayloadError(413, f"body of {n} bytes is over the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadError(413, f"body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def otlp_routes(sink: BatchSink, limits: Limits, stats: IngestStats, token: str | None,
                timeout_s: float = 30.0) -> list[Route]:
    def handler(signal: Signal) -> Callable[[Request], Awaitable[Response]]:
        ok_body = (ExportTraceServiceResponse() if signal == "traces" else ExportMetricsServiceResponse())

        async def receive(request: Request) -> Response:
            json_body = media_type(request.headers.get("content-type", "")) == "application/json"
            status = 200
            try:
                if not check_bearer(request.headers, token):
                    status = 401
                    return _error(401, "missing or wrong bearer token", json_body)
                body = await asyncio.wait_for(_read_body(request, limits.max_body_bytes), timeout_s)
                ctype, cenc = request.headers.get("content-type", ""), request.headers.get("content-encoding", "")
                inline = decode_inline(signal, body, ctype, cenc, limits)
                if inline is not None:
                    batch, record = inline, SpoolRecord(signal, "protobuf", body)
                else:  # JSON, gzip, a large body, or one the compiled decoders decline
                    batch, record = await run_in_threadpool(decode_export, signal, body, ctype, cenc, limits)
                await asyncio.wait_for(sink.put(batch, record), timeout_s)
                stats.accepted_requests += 1
                stats.rows += batch.row_count()
                stats.ignored += batch.ignored
                if json_body:
                    return Response("{}", 200, media_type="application/json")
                return Response(ok_body.SerializeToString(), 200, media_type="application/x-protobuf")
            except PayloadError as e:
                status = e.status
                stats.rejected_requests += 1
                return _error(e.status, e.message, json_body)
            except (StoreError, SpoolError, TimeoutError) as e:
                status = 503
                log.warning("otlp/http: %s", e)
                resp = _error(503, f"not stored, retry later: {e}", json_body)
                resp.headers["Retry-After"] = "2"
                return resp
            finally:
                stats.by_status[status] = stats.by_status.get(status, 0) + 1

        return receive

    return [Route("/v1/traces", handler("traces"), methods=["POST"]),
            Route("/v1/metrics", handler("metrics"), methods=["POST"])]


def otlp_http_app(sink: BatchSink, limits: Limits = DEFAULT_LIMITS, stats: IngestStats | None = None,
                  token: str | None = None) -> Starlette:
    return Starlette(routes=otlp_routes(sink, limits, stats or IngestStats(), token))
