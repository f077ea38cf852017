"""The read-only JSON API (``/api/v1/why|top|slo|requests|findings``; Grafana's Infinity datasource reads
it, and the CLI when ``serve`` holds the database file), ``/healthz`` and ``/metrics``."""

from __future__ import annotations

import json
import math
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from correlator.analysis.queries import KINDS, QueryError, run
from correlator.analysis.timeparse import TimeParseError
from correlator.analysis.why import NoData
from correlator.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from correlator.server.metrics import IngestCounters, render_metrics
from correlator.server.otlp_http import IngestStats, check_bearer
from correlator.store.duckdb_store import Store

_PARAMS = ("since", "until", "baseline_since", "baseline_until", "service", "model", "node", "metric", "limit")


def _clean(o: Any) -> Any:
    if isinstance(o, float) and (math.isnan(o) or math.isinf(o)):
        return None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, list):
        return [_clean(v) for v in o]
    return o


def api_routes(store: Store, stats: IngestStats, token: str | None = None) -> list[BaseRoute]:
    def query(kind: str) -> Any:
        async def handler(request: Request) -> Response:
            if not check_bearer(request.headers, token):
                return JSONResponse({"error": "missing or wrong bearer token"}, 401)
            params = {k: request.query_params[k] for k in _PARAMS if k in request.query_params}

            def work() -> Any:
                with store.reader() as cur:
                    return run(kind, cur, params)

            try:
                result = await run_in_threadpool(work)
            except NoData as e:
                return JSONResponse({"error": str(e)}, 404)
            except (QueryError, TimeParseError, ValueError) as e:
                return JSONResponse({"error": str(e)}, 400)
            return Response(json.dumps(_clean(result)), media_type="application/json")

        return handler

    async def healthz(_: Request) -> Response:
        return JSONResponse({"status": "ok", "rows": store.stats.rows})

    async def metrics(_: Request) -> Response:
        w = store.stats
        counters = IngestCounters(by_status=dict(stats.by_status), rows=w.rows, transactions=w.transactions,
                                  failed_transactions=w.failed_transactions, spooled_exports=w.spooled_exports,
                                  rejected_exports=w.rejected_exports, unspooled_exports=w.unspooled_exports,
                                  pending_rows=store.pending_rows())

        def work() -> str:
            with store.reader() as cur:
                return render_metrics(cur, counters)

        return PlainTextResponse(await run_in_threadpool(work), media_type=METRICS_CONTENT_TYPE)

    return [Route("/healthz", healthz), Route("/metrics", metrics),
            *(Route(f"/api/v1/{k}", query(k)) for k in KINDS)]
