"""Request statistics computed where the requests are: in DuckDB, one grouped scan per question.

``why`` needs, for the fleet and for each replica, a latency percentile per 30 s bucket (to find the
onset) and, per window, percentiles, counts, means and token sums. Loading millions of requests into
Python to compute them cost seconds at 1k requests/s; DuckDB's exact quantiles (``quantile_cont``: the
linear interpolation of ``numpy.quantile``) over the same rows take a fraction of that, and nothing per
request leaves the database.

Replicas come from :func:`~correlator.analysis.requests.unit_map` over the scope's distinct join keys.
When every key is its own replica (the usual case) the scans group by the key columns; when several keys
make one replica (requests tagged by pid and others by pod) they join the key→replica map first, so that
a replica's percentiles are over all its requests.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import duckdb
import numpy as np
import polars as pl

from correlator.analysis.requests import KEY_COLUMNS, unit_map

_ids = itertools.count()
Series = tuple[np.ndarray, np.ndarray]  # bucket start times (ns), values


@dataclass(frozen=True, slots=True)
class WindowStat:
    """The requests of one window (of one replica, or of the fleet)."""

    n: int  # requests
    n_ttft: int  # of which with a TTFT
    n_tpot: int
    ttft_q: dict[float, float | None]  # quantile → value
    tpot_q: dict[float, float | None]
    ttft_mean_s: float | None
    tpot_mean_s: float | None
    queue_p90_s: float | None
    prefill_per_token_p50_s: float | None
    output_tokens: int

    def count(self, metric: str) -> int:
        return self.n_ttft if metric == "ttft" else self.n_tpot

    def q(self, metric: str, p: float) -> float | None:
        return (self.ttft_q if metric == "ttft" else self.tpot_q).get(p)

    def mean(self, metric: str) -> float | None:
        return self.ttft_mean_s if metric == "ttft" else self.tpot_mean_s


EMPTY = WindowStat(0, 0, 0, {}, {}, None, None, None, None, 0)


class RequestScope:
    """The requests that started in [start_ns, end_ns] (and ended by ``known_by_ns``), filtered by service,
    model and node, with their replicas (``units``). Every filter value is a bound parameter."""

    def __init__(self, cur: duckdb.DuckDBPyConnection, start_ns: int, end_ns: int, service: str | None = None,
                 model: str | None = None, node: str | None = None, known_by_ns: int | None = None) -> None:
        self.cur = cur
        where = ["start_ns >= $start", "start_ns <= $end"]
        params: dict[str, object] = {"start": start_ns, "end": end_ns}
        if known_by_ns is not None:
            where.append("end_ns <= $known")
            params["known"] = known_by_ns
        if service:
            where.append("service = $service")
            params["service"] = service
        if model:
            where.append("model = $model")
            params["model"] = model
        if node:
            where.append("node_id = (SELECT node_id FROM nodes WHERE name = $node)")
            params["node"] = node
        self._where, self._params = " AND ".join(where), params
        keys = pl.from_arrow(cur.sql(
            f"SELECT DISTINCT {', '.join(KEY_COLUMNS)}, (SELECT name FROM nodes n WHERE n.node_id = r.node_id) AS node "
            f"FROM requests r WHERE {self._where}", params=params).to_arrow_table())
        assert isinstance(keys, pl.DataFrame)
        self.empty = keys.is_empty()
        mapping, self.units = unit_map(cur, keys, start_ns, end_ns)
        # group by the key columns that are ever set; map each group's key to its replica in Python, or,
        # where several keys make one replica, join the map in SQL so that quantiles span all its requests
        self._used = [c for c in KEY_COLUMNS if mapping[c].null_count() < len(mapping)] or ["node_id"]
        self._unit_of: dict[tuple[Any, ...], str] = {
            tuple(r[:-1]): r[-1] for r in mapping.select(*self._used, "unit").iter_rows()}
        self._joined = mapping["unit"].n_unique() < len(mapping)
        self._map_name = f"_unit_map_{next(_ids)}"
        self._keys = mapping.select(*self._used, "unit")
        self._map = self._keys.to_arrow()

    @property
    def where(self) -> str:
        """The scope's condition on ``requests`` (with :attr:`params`: every value is bound)."""
        return self._where

    @property
    def params(self) -> dict[str, object]:
        return dict(self._params)

    def unit_of_key(self, row: dict[str, Any]) -> str | None:
        """The replica of one request, from its join-key columns."""
        return self._unit_of.get(tuple(row[c] for c in self._used))

    # -- SQL pieces ---------------------------------------------------------------------------------
    def _from(self, extra_where: str = "") -> tuple[str, str]:
        """(FROM clause, group key expression) for the scope's requests, by replica."""
        cond = self._where + (f" AND {extra_where}" if extra_where else "")
        if not self._joined:
            return f"(SELECT * FROM requests WHERE {cond}) r", ", ".join(f"r.{c}" for c in self._used)
        on = " AND ".join(f"r.{c} IS NOT DISTINCT FROM m.{c}" for c in self._used)
        return f"(SELECT * FROM requests WHERE {cond}) r JOIN {self._map_name} m ON {on}", "m.unit"

    @contextmanager
    def _unit_map(self) -> Iterator[None]:
        """The key→replica map registered for :meth:`_from`'s join while a query runs (when it joins)."""
        if not self._joined:
            yield
            return
        self.cur.register(self._map_name, self._map)
        try:
            yield
        finally:
            self.cur.unregister(self._map_name)

    def _run(self, sql: str, params: dict[str, object] | None = None) -> list[tuple[Any, ...]]:
        with self._unit_map():
            return self.cur.execute(sql, {**self._params, **(params or {})}).fetchall()

    def _frame(self, sql: str, params: dict[str, object] | None = None) -> pl.DataFrame:
        """The result of a per-replica query (its group key first) as a frame with a ``unit`` column in place
        of the key: for results of tens of thousands of rows, where a Python loop per row would cost."""
        with self._unit_map():
            df = pl.from_arrow(self.cur.sql(sql, params={**self._params, **(params or {})}).to_arrow_table())
        assert isinstance(df, pl.DataFrame)
        if self._joined:
            return df
        keys = self._keys.cast({c: df.schema[c] for c in self._used})
        return df.join(keys, on=self._used, how="left", nulls_equal=True, maintain_order="left").drop(self._used)

    def _unit(self, row: tuple[Any, ...], width: int) -> str:
        return str(row[0]) if self._joined else self._unit_of[tuple(row[:width])]

    @property
    def _width(self) -> int:
        return 1 if self._joined else len(self._used)

    # -- questions ----------------------------------------------------------------------------------
    def bucket_series(self, metrics: list[str], bucket_ns: int, fleet_q: float = 0.9, unit_q: float = 0.5,
                      min_requests: int = 5) -> dict[str, tuple[Series, dict[str, Series]]]:
        """Per metric: the ``fleet_q`` quantile of it per start-time bucket over the fleet, and the ``unit_q``
        quantile per bucket of each replica (buckets of at least ``min_requests`` values, in time order)."""
        cols = [f"{m}_s" for m in metrics]
        params: dict[str, object] = {"bucket": bucket_ns}
        fleet = self.cur.execute(
            "SELECT start_ns // $bucket * $bucket AS b, "
            + ", ".join(f"quantile_cont({c}, {float(fleet_q)!r}), count({c})" for c in cols)
            + f" FROM requests WHERE {self._where} GROUP BY b ORDER BY b", {**self._params, **params}).fetchall()
        src, key = self._from()
        df = self._frame(
            f"SELECT {key}{' AS unit' if self._joined else ''}, r.start_ns // $bucket * $bucket AS b, "
            + ", ".join(f"quantile_cont(r.{c}, {float(unit_q)!r}) AS v{k}, count(r.{c}) AS n{k}"
                        for k, c in enumerate(cols))
            + f" FROM {src} GROUP BY ALL", params)
        df = df.sort("unit", "b")
        out: dict[str, tuple[Series, dict[str, Series]]] = {}
        for k, m in enumerate(metrics):
            # a bucket with fewer than ``min_requests`` values of this metric is left out of its series
            kept = df.filter((pl.col(f"n{k}") >= min_requests) & pl.col(f"v{k}").is_not_null())
            units = kept["unit"].to_numpy()
            b, v = kept["b"].to_numpy().astype(np.int64), kept[f"v{k}"].to_numpy().astype(float)
            cuts = np.flatnonzero(units[1:] != units[:-1]) + 1
            per = {str(units[lo]): (b[lo:hi], v[lo:hi])
                   for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(units)], strict=True) if hi > lo}
            out[m] = (_series([(int(r[0]), r[1 + 2 * k], r[2 + 2 * k]) for r in fleet], min_requests), per)
        return out

    def window_stats(self, windows: dict[str, tuple[int, int, bool]], p: float
                     ) -> tuple[dict[str, WindowStat], dict[str, dict[str, WindowStat]]]:
        """Per window (name → (start, end, end included)): the fleet's stats and each replica's."""
        qs = sorted({0.5, 0.99, p})
        parts, params = [], {}
        for i, (name, (lo, hi, closed)) in enumerate(windows.items()):
            src, key = self._from(f"start_ns >= $lo{i} AND start_ns {'<=' if closed else '<'} $hi{i}")
            parts.append(f"SELECT {key} AS u, $w{i} AS w, r.* FROM {src}" if self._joined else
                         f"SELECT {key}, $w{i} AS w, r.ttft_s, r.tpot_s, r.queue_s, r.prefill_s, r.prompt_tokens, "
                         f"r.output_tokens FROM {src}")
            params.update({f"lo{i}": lo, f"hi{i}": hi, f"w{i}": name})
        group = "u" if self._joined else ", ".join(self._used)
        aggs = ("count(*), count(ttft_s), count(tpot_s), quantile_cont(ttft_s, $qs), quantile_cont(tpot_s, $qs), "
                "avg(ttft_s), avg(tpot_s), quantile_cont(queue_s, 0.9), "
                "quantile_cont(prefill_s / CASE WHEN prompt_tokens < 1 THEN 1 ELSE prompt_tokens END, 0.5), "
                "sum(output_tokens)")
        union = " UNION ALL ".join(parts)
        rows = self._run(f"SELECT {group}, w, {aggs} FROM ({union}) GROUP BY ALL", {**params, "qs": qs})
        # the fleet's regression reads only the counts and the percentile p of each metric
        fleet_rows = self._run(
            "SELECT w, count(*), count(ttft_s), count(tpot_s), quantile_cont(ttft_s, $qs), "
            f"quantile_cont(tpot_s, $qs), NULL, NULL, NULL, NULL, NULL FROM ({union}) GROUP BY w",
            {**params, "qs": [p]})
        w = self._width
        per_unit: dict[str, dict[str, WindowStat]] = {}
        for row in rows:
            per_unit.setdefault(self._unit(row, w), {})[str(row[w])] = _stat(row[w + 1:], qs)
        fleet = {str(r[0]): _stat(r[1:], [p]) for r in fleet_rows}
        return fleet, per_unit

    def fleet_quantile(self, column: str, q: float) -> float | None:
        """The ``q`` quantile of a column (one of the request table's, chosen by the caller) over the scope."""
        row = self.cur.execute(f"SELECT quantile_cont({column}, $q) FROM requests WHERE {self._where}",
                               {**self._params, "q": q}).fetchall()
        return None if not row or row[0][0] is None else float(row[0][0])

    def per_unit(self, aggregates: str, params: dict[str, object] | None = None, by: str | None = None
                 ) -> dict[tuple[str, Any], tuple[Any, ...]]:
        """``aggregates`` (SQL over the request columns, written by the caller, never from user text) of each
        replica, or of each replica and value of the column ``by``: {(unit, by value): aggregates}."""
        src, key = self._from()
        extra = f", r.{by}" if by else ""
        rows = self._run(f"SELECT {key}{extra}, {aggregates} FROM {src} GROUP BY ALL", params)
        w = self._width
        off = w + (1 if by else 0)
        return {(self._unit(row, w), row[w] if by else None): tuple(row[off:]) for row in rows}

    def arrival_counts(self, t0_ns: int, t1_ns: int, bucket_ns: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Requests per replica per bucket of ``numpy.arange(t0, t1 + 1, bucket)`` edges (the last bucket
        holds its right edge, as ``numpy.histogram`` counts): (edges, counts by replica)."""
        edges = np.arange(t0_ns, t1_ns + 1, bucket_ns, dtype=np.int64)
        if len(edges) < 2:
            return edges, {}
        nb = len(edges) - 1
        src, key = self._from("start_ns >= $t0 AND start_ns <= $tend")
        unit = " AS unit" if self._joined else ""
        df = self._frame(f"SELECT {key}{unit}, least((r.start_ns - $t0) // $bucket, $last) AS k, count(*) AS n "
                         f"FROM {src} GROUP BY ALL",
                         {"t0": t0_ns, "tend": int(edges[-1]), "bucket": bucket_ns, "last": nb - 1})
        out: dict[str, np.ndarray] = {}
        for (unit,), part in df.partition_by("unit", as_dict=True).items():
            counts = np.zeros(nb)
            np.add.at(counts, part["k"].to_numpy().astype(np.int64), part["n"].to_numpy().astype(float))
            out[str(unit)] = counts
        return edges, out


def _series(points: list[tuple[int, Any, int]], min_requests: int) -> Series:
    """(times, values) of the (bucket, value, count) points with at least ``min_requests`` values."""
    kept = [(t, float(v)) for t, v, n in points if n >= min_requests and v is not None]
    return np.array([t for t, _ in kept], dtype=np.int64), np.array([v for _, v in kept], dtype=float)


def _stat(v: tuple[Any, ...], qs: list[float]) -> WindowStat:
    n, n_ttft, n_tpot, ttft_q, tpot_q, ttft_mean, tpot_mean, queue_p90, pf, tokens = v
    return WindowStat(int(n), int(n_ttft), int(n_tpot), _qmap(ttft_q, qs), _qmap(tpot_q, qs), ttft_mean, tpot_mean,
                      queue_p90, pf, int(tokens or 0))


def _qmap(values: list[float | None] | None, qs: list[float]) -> dict[float, float | None]:
    return dict(zip(qs, values, strict=True)) if values is not None else dict.fromkeys(qs)
