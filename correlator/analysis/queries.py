"""The query commands by name, shared by the CLI (on a database file) and the JSON API (inside ``serve``,
where the CLI ends up when ``serve`` holds the file), so both give the same answer."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import duckdb

from correlator.analysis.reports import DEFAULT_SLOS, load_slos, slo, slowest_requests, top
from correlator.analysis.requests import data_extent
from correlator.analysis.timeparse import parse_time_ns
from correlator.analysis.why import NoData, RootCause, WhyQuery

KINDS = ("why", "top", "slo", "requests", "findings")


class QueryError(ValueError):
    """A bad parameter (exit code 2 on the CLI, 400 on the API)."""


def _window(cur: duckdb.DuckDBPyConnection, p: Mapping[str, Any]) -> tuple[int, int]:
    extent = data_extent(cur)
    if extent is None:
        raise NoData("no requests in the database yet: send spans to `stacklens serve` or run `stacklens import`")
    anchor = extent[1]
    start = parse_time_ns(p["since"], anchor) if p.get("since") else anchor - 15 * 60 * 10**9
    end = parse_time_ns(p["until"], anchor) if p.get("until") else anchor
    return start, end


def run(kind: str, cur: duckdb.DuckDBPyConnection, p: Mapping[str, Any]) -> Any:
    metric = p.get("metric") or ("auto" if kind == "why" else "ttft")
    if metric not in ("ttft", "tpot", "auto") or (metric == "auto" and kind != "why"):
        raise QueryError(f"--metric must be ttft or tpot{' or auto' if kind == 'why' else ''}")
    service: str | None = p.get("service") or None
    model: str | None = p.get("model") or None
    node: str | None = p.get("node") or None
    if kind == "why":
        return RootCause(cur).why(WhyQuery(since=p.get("since"), until=p.get("until"),
                                           baseline_since=p.get("baseline_since"),
                                           baseline_until=p.get("baseline_until"), metric=metric, service=service,
                                           model=model, node=node))
    if kind == "top":
        return top(cur, *_window(cur, p), metric=metric, service=service, model=model, node=node)
    if kind == "slo":
        slos = load_slos(p["slo_file"]) if p.get("slo_file") else DEFAULT_SLOS
        return slo(cur, *_window(cur, p), slos, service=service, model=model, node=node)
    if kind == "requests":
        try:
            limit = int(p.get("limit") or 20)
        except ValueError as e:
            raise QueryError("--limit must be a number") from e
        return slowest_requests(cur, *_window(cur, p), metric=metric, limit=limit, service=service, model=model,
                                node=node)
    if kind == "findings":
        rows = cur.execute("SELECT body FROM findings ORDER BY created_ns DESC LIMIT 100").fetchall()
        import json

        return [json.loads(r[0]) for r in rows]
    raise QueryError(f"unknown query {kind!r}")
