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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import duckdb
import numpy as np
import polars as pl

from correlator.analysis.requests import KEY_COLUMNS, unit_map
from correlator.store import request_rollups, rollups

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
    # of these requests, how many a window of ``edge_s`` seconds that ends where the requests known end would
    # have seen, on average: sum(max(0, edge_s - duration)) / edge_s (None: not asked, or a long window)
    edge_visible_n: float | None = None

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
        # the filters on what a request is (its service, model, node): the same columns in the summaries
        filters: list[str] = []
        params: dict[str, object] = {}
        if service:
            filters.append("service = $service")
            params["service"] = service
        if model:
            filters.append("model = $model")
            params["model"] = model
        if node:
            filters.append("node_id = (SELECT node_id FROM nodes WHERE name = $node)")
            params["node"] = node
        where = ["start_ns >= $start", "start_ns <= $end", *filters]
        params.update({"start": start_ns, "end": end_ns})
        if known_by_ns is not None:
            where.append("end_ns <= $known")
            params["known"] = known_by_ns
        self._where, self._params = " AND ".join(where), params
        # the params of the filters alone (the summaries' queries have no $start/$end; DuckDB refuses extras)
        self._filter_params = {k: v for k, v in params.items() if k not in ("start", "end")}
        # the same conditions appended to a raw read of ``requests`` over part of a long window
        self._filter_sql = "".join(f" AND {f}" for f in filters)
        self._known_sql = " AND end_ns <= $known" if known_by_ns is not None else ""
        self._known = known_by_ns
        self._summarised: tuple[int | None] | None = None  # (summaries' end,) once read
        keys_sql = f"SELECT DISTINCT {', '.join(KEY_COLUMNS)} FROM requests WHERE {self._where}"
        if end_ns - start_ns > request_rollups.LONG_WINDOW_NS:
            # a long scope: its keys from the per-minute summaries where they stand for the requests
            cols = ", ".join(KEY_COLUMNS)
            src, sp = self._long_source(start_ns, end_ns + 1, f"SELECT {cols} FROM request_minutes", "minute_ns",
                                        rollups.MINUTE_NS, lambda raw: f"SELECT {cols} FROM {raw}")
            keys_sql = f"SELECT DISTINCT * FROM ({src})"
            params = {**self._filter_params, **sp}
        keys = pl.from_arrow(cur.sql(
            f"SELECT *, (SELECT name FROM nodes n WHERE n.node_id = k.node_id) AS node FROM ({keys_sql}) k",
            params=params).to_arrow_table())
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
    def _summarised_until(self) -> int | None:
        if self._summarised is None:
            self._summarised = (request_rollups.summarised_until(self.cur, self._known),)
        return self._summarised[0]

    def _long_source(self, lo_ns: int, hi_ns: int, summary_select: str, time_col: str, step_ns: int,
                     raw_select: Callable[[str], str], tag: str = "") -> tuple[str, dict[str, object]]:
        """SQL of the scope's requests that started in [lo_ns, hi_ns): ``summary_select`` (``SELECT ... FROM``
        a summary table) over the whole steps the summaries hold, ``raw_select(source)`` over ``requests``
        elsewhere (``source``: the table and its condition), UNION ALL; with its bound params."""
        rolled, raw = rollups.split_window(lo_ns, hi_ns, self._summarised_until(), step_ns)
        parts: list[str] = []
        params: dict[str, object] = {}
        filters = self._filter_sql
        if rolled is not None:
            parts.append(f"{summary_select} WHERE {time_col} >= $s{tag}a AND {time_col} < $s{tag}b{filters}")
            params.update({f"s{tag}a": rolled[0], f"s{tag}b": rolled[1]})
        for k, (a, b) in enumerate(raw):
            parts.append(raw_select(
                f"requests WHERE start_ns >= $x{tag}{k}a AND start_ns < $x{tag}{k}b{filters}{self._known_sql}"))
            params.update({f"x{tag}{k}a": a, f"x{tag}{k}b": b})
        if not parts:  # an empty range: no rows, the columns of the raw select
            parts.append(raw_select(f"requests WHERE false{filters}"))
        return " UNION ALL ".join(f"({p})" for p in parts), params

    def _from(self, extra_where: str = "") -> tuple[str, str]:
        """(FROM clause, group key expression) for the scope's requests, by replica."""
        cond = self._where + (f" AND {extra_where}" if extra_where else "")
        if not self._joined:
            return f"(SELECT * FROM requests WHERE {cond}) r", ", ".join(f"r.{c}" for c in self._used)
        return f"(SELECT * FROM requests WHERE {cond}) r {self._map_join}", "m.unit"

    @property
    def _map_join(self) -> str:
        """The join of rows ``r`` with the key columns to their replica ``m.unit`` (under :meth:`_unit_map`)."""
        on = " AND ".join(f"r.{c} IS NOT DISTINCT FROM m.{c}" for c in self._used)
        return f"JOIN {self._map_name} m ON {on}"

    @contextmanager
    def _unit_map(self) -> Iterator[None]:
        """The key→replica map registered for :attr:`_map_join` while a query runs (when :meth:`_from` joins
        it)."""
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

    def window_stats(self, windows: dict[str, tuple[int, int, bool]], p: float, edge_s: float | None = None
                     ) -> tuple[dict[str, WindowStat], dict[str, dict[str, WindowStat]]]:
        """Per window (name → (start, end, end included)): the fleet's stats and each replica's (with
        ``edge_s``, also each replica's :attr:`WindowStat.edge_visible_n` in the windows of 3 h or less)."""
        qs = sorted({0.5, 0.99, p})
        parts, params = [], {}
        fleet: dict[str, WindowStat] = {}
        per_unit: dict[str, dict[str, WindowStat]] = {}
        short: dict[str, tuple[int, int, bool]] = {}
        for name, (lo, hi, closed) in windows.items():
            if hi - lo > request_rollups.LONG_WINDOW_NS:
                fleet[name], units = self._long_window_stats(lo, hi + 1 if closed else hi, qs, p)
                for unit, stat in units.items():
                    per_unit.setdefault(unit, {})[name] = stat
            else:
                short[name] = (lo, hi, closed)
        if not short:
            return fleet, per_unit
        for i, (name, (lo, hi, closed)) in enumerate(short.items()):
            src, key = self._from(f"start_ns >= $lo{i} AND start_ns {'<=' if closed else '<'} $hi{i}")
            parts.append(f"SELECT {key} AS u, $w{i} AS w, r.* FROM {src}" if self._joined else
                         f"SELECT {key}, $w{i} AS w, r.ttft_s, r.tpot_s, r.queue_s, r.prefill_s, r.prompt_tokens, "
                         f"r.output_tokens, r.start_ns, r.end_ns FROM {src}")
            params.update({f"lo{i}": lo, f"hi{i}": hi, f"w{i}": name})
        group = "u" if self._joined else ", ".join(self._used)
        aggs = ("count(*), count(ttft_s), count(tpot_s), quantile_cont(ttft_s, $qs), quantile_cont(tpot_s, $qs), "
                "avg(ttft_s), avg(tpot_s), quantile_cont(queue_s, 0.9), "
                "quantile_cont(prefill_s / CASE WHEN prompt_tokens < 1 THEN 1 ELSE prompt_tokens END, 0.5), "
                "sum(output_tokens)")
        if edge_s is not None:
            aggs += ", sum(greatest(0.0, $edge - (end_ns - start_ns) / 1e9)) / $edge"
            params["edge"] = float(edge_s)
        union = " UNION ALL ".join(parts)
        rows = self._run(f"SELECT {group}, w, {aggs} FROM ({union}) GROUP BY ALL", {**params, "qs": qs})
        params.pop("edge", None)
        # the fleet's regression reads only the counts and the percentile p of each metric
        fleet_rows = self._run(
            "SELECT w, count(*), count(ttft_s), count(tpot_s), quantile_cont(ttft_s, $qs), "
            f"quantile_cont(tpot_s, $qs), NULL, NULL, NULL, NULL, NULL FROM ({union}) GROUP BY w",
            {**params, "qs": [p]})
        w = self._width
        for row in rows:
            per_unit.setdefault(self._unit(row, w), {})[str(row[w])] = _stat(row[w + 1:], qs)
        fleet.update({str(r[0]): _stat(r[1:], [p]) for r in fleet_rows})
        return fleet, per_unit

    def _long_window_stats(self, lo_ns: int, hi_ns: int, qs: list[float], p: float
                           ) -> tuple[WindowStat, dict[str, WindowStat]]:
        """The stats of the requests that started in [lo_ns, hi_ns), a long window: counts, means and tokens
        exact from the per-minute summaries, percentiles read off the binned counts (within 0.5 %; see
        :mod:`correlator.store.request_rollups`)."""
        scalars = self.long_sums(lo_ns, hi_ns)
        b = self.long_bins(lo_ns, hi_ns)
        units = np.asarray(b["unit"], dtype=object)
        metric = np.asarray(b["metric"], dtype=np.int64)
        bins = np.asarray(b["bin"], dtype=np.int64)
        counts = np.asarray(b["n"], dtype=np.int64)
        codes = group_codes(units)
        qmap: dict[tuple[str, int], dict[float, float | None]] = {}
        for m, wanted in ((0, qs), (1, qs), (2, [0.9]), (3, [0.5])):
            sel = metric == m
            groups, values = request_rollups.quantiles_from_bins(codes[sel], bins[sel], counts[sel], wanted)
            first = {int(c): str(u) for c, u in zip(codes[sel], units[sel], strict=True)}
            for g, row in zip(groups, values, strict=True):
                qmap[(first[int(g)], m)] = dict(zip(wanted, row.tolist(), strict=True))
        fleet_q: dict[int, dict[float, float | None]] = {}
        for m in (0, 1):
            sel = metric == m
            if not sel.any():
                continue
            ub, inv = np.unique(bins[sel], return_inverse=True)
            merged = np.bincount(inv, weights=counts[sel]).astype(np.int64)
            _, values = request_rollups.quantiles_from_bins(np.zeros(len(ub), dtype=np.int64), ub, merged, [p])
            fleet_q[m] = {p: float(values[0, 0])}
        per: dict[str, WindowStat] = {}
        tot = [0, 0, 0]
        for unit, n, n_ttft, n_tpot, s_ttft, s_tpot, tokens in scalars:
            u = str(unit)
            tot = [tot[0] + int(n), tot[1] + int(n_ttft), tot[2] + int(n_tpot)]
            per[u] = WindowStat(
                int(n), int(n_ttft), int(n_tpot), qmap.get((u, 0), dict.fromkeys(qs)),
                qmap.get((u, 1), dict.fromkeys(qs)), s_ttft / n_ttft if n_ttft else None,
                s_tpot / n_tpot if n_tpot else None, qmap.get((u, 2), {}).get(0.9),
                qmap.get((u, 3), {}).get(0.5), int(tokens or 0))
        fleet = WindowStat(tot[0], tot[1], tot[2], fleet_q.get(0, {p: None}), fleet_q.get(1, {p: None}),
                           None, None, None, None, 0)
        return fleet, per

    def _long_columns(self, unit: bool, by: tuple[str, ...]) -> list[str]:
        """The key columns a long window's summary query groups by: those that decide the replica (when
        ``unit``) and ``by`` (callers' names from :data:`request_rollups.KEYS`, never user text). Only these:
        grouping the union of summaries and edges by all eight key columns (strings) costs seconds."""
        if not set(by) <= set(request_rollups.KEYS):
            raise ValueError(f"not a key column: {by}")
        return list(dict.fromkeys([*(self._used if unit else []), *by]))

    def _long_frame(self, sql: str, params: dict[str, object], unit: bool, by: tuple[str, ...],
                    cols: list[str], sums: list[str], order: list[str]) -> pl.DataFrame:
        """The result of a long window's summary query (grouped by ``cols`` and ``order``'s others) with the
        replica in column ``unit`` (when asked: several keys of one replica summed) in place of the key
        columns that decide it, sorted by (unit,) ``by``, ``order``."""
        df = pl.from_arrow(self.cur.sql(sql, params=params).to_arrow_table())
        assert isinstance(df, pl.DataFrame)
        group = [*by, *order]
        if unit:
            keys = self._keys.cast({c: df.schema[c] for c in self._used})
            df = df.join(keys, on=self._used, how="inner", nulls_equal=True)
            df = df.group_by(["unit", *group]).agg(pl.col(c).sum() for c in sums)
            group = ["unit", *group]
        return df.select(*group, *sums).sort(group, nulls_last=True)

    def long_sums(self, lo_ns: int, hi_ns: int, unit: bool = True, by: tuple[str, ...] = ()
                  ) -> list[tuple[Any, ...]]:
        """Exact per-group sums of the requests that started in [lo_ns, hi_ns), per replica (``unit``) and
        value of the key columns ``by``: (group columns..., n, n_ttft, n_tpot, sum_ttft, sum_tpot,
        output_tokens), from the per-minute summaries where complete and the requests elsewhere."""
        rr = request_rollups
        cols = self._long_columns(unit, by)
        keys = ", ".join(cols)
        src, sp = self._long_source(
            lo_ns, hi_ns, f"SELECT {keys}, n, n_ttft, sum_ttft, n_tpot, sum_tpot, output_tokens FROM request_minutes",
            "minute_ns", rollups.MINUTE_NS, lambda raw: f"SELECT {keys}, {rr.SUMS} FROM {raw} GROUP BY ALL", "m")
        sums = ["n", "n_ttft", "n_tpot", "sum_ttft", "sum_tpot", "output_tokens"]
        df = self._long_frame(
            f"SELECT {keys}, sum(n)::BIGINT AS n, sum(n_ttft)::BIGINT AS n_ttft, sum(n_tpot)::BIGINT AS n_tpot, "
            "sum(sum_ttft) AS sum_ttft, sum(sum_tpot) AS sum_tpot, sum(output_tokens)::BIGINT AS output_tokens "
            f"FROM ({src}) GROUP BY ALL", {**self._filter_params, **sp}, unit, by, cols, sums, [])
        return df.rows()

    def long_bins(self, lo_ns: int, hi_ns: int, unit: bool = True, by: tuple[str, ...] = (),
                  metrics: tuple[int, ...] = (0, 1, 2, 3)) -> dict[str, np.ndarray]:
        """The binned latencies (:mod:`~correlator.store.request_rollups`) of the requests that started in
        [lo_ns, hi_ns), per replica (column ``unit``) and key columns ``by``, and ``metric`` (numbers of
        ``request_rollups.METRICS``), ``bin``, ``n``; sorted by group, metric, bin (as
        ``quantiles_from_bins`` needs). Whole hours from ``request_bins`` where complete, the rest binned
        from the requests with the writer's SQL."""
        cols = self._long_columns(unit, by)
        keys = ", ".join(cols)
        ms = ", ".join(str(int(m)) for m in metrics)
        src, bp = self._long_source(
            lo_ns, hi_ns, f"SELECT {keys}, metric, bin, n FROM request_bins",
            "hour_ns", rollups.HOUR_NS,
            # the raw edge binned as the writer bins, only the metrics asked for (binning costs per metric)
            lambda raw: f"SELECT {keys}, metric, bin, count(*)::INTEGER AS n "
                        f"FROM ({request_rollups.binned(raw, keys, metrics)}) GROUP BY ALL", "h")
        df = self._long_frame(f"SELECT {keys}, metric, bin, sum(n)::BIGINT AS n FROM ({src}) WHERE metric IN ({ms}) "
                              "GROUP BY ALL",
                              {**self._filter_params, **bp}, unit, by, cols, ["n"], ["metric", "bin"])
        return {c: df[c].to_numpy() for c in df.columns}

    def long_first_starts(self, lo_ns: int, hi_ns: int, by: tuple[str, ...]) -> dict[tuple[Any, ...], int]:
        """The exact first start (ns) of each group of the key columns ``by`` among the requests that started
        in [lo_ns, hi_ns): each group's first minute from the per-minute summaries, then only those minutes
        of the requests (usually one minute, not the window)."""
        cols = ", ".join(by)
        self._long_columns(False, by)
        src, sp = self._long_source(
            lo_ns, hi_ns, f"SELECT {cols}, minute_ns AS t FROM request_minutes", "minute_ns", rollups.MINUTE_NS,
            lambda raw: f"SELECT {cols}, min(start_ns) // {rollups.MINUTE_NS} * {rollups.MINUTE_NS} AS t FROM {raw} "
                        "GROUP BY ALL", "f")
        minutes = sorted({int(r[0]) for r in self.cur.execute(
            f"SELECT min(t) FROM ({src}) GROUP BY ALL", {**self._filter_params, **sp}).fetchall()})
        if not minutes:
            return {}
        parts, params = [], {}
        for k, m in enumerate(minutes):
            parts.append(f"SELECT {cols}, start_ns FROM requests WHERE start_ns >= $a{k} AND start_ns < $b{k}"
                         f"{self._filter_sql}{self._known_sql}")
            params.update({f"a{k}": max(m, lo_ns), f"b{k}": min(m + rollups.MINUTE_NS, hi_ns)})
        rows = self.cur.execute(
            f"SELECT {cols}, min(start_ns) FROM ({' UNION ALL '.join(parts)}) GROUP BY ALL",
            {**self._filter_params, **params}).fetchall()
        return {tuple(r[:-1]): int(r[-1]) for r in rows}

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
        holds its right edge, as ``numpy.histogram`` counts): (edges, counts by replica).

        Over a long range in whole-minute buckets the edges start at the minute ``t0_ns`` falls in (the
        requests still from ``t0_ns`` on), and whole minutes are counted from the per-minute summaries."""
        mn = rollups.MINUTE_NS
        long = t1_ns - t0_ns > request_rollups.LONG_WINDOW_NS and bucket_ns % mn == 0
        first = rollups.floor_to(t0_ns, mn) if long else t0_ns
        edges = np.arange(first, t1_ns + 1, bucket_ns, dtype=np.int64)
        if len(edges) < 2:
            return edges, {}
        nb = len(edges) - 1
        params = {"t0": first, "bucket": bucket_ns, "last": nb - 1}
        if long:
            cols = self._long_columns(True, ())
            keys = ", ".join(cols)
            src, sp = self._long_source(
                t0_ns, int(edges[-1]) + 1, f"SELECT {keys}, minute_ns, n FROM request_minutes", "minute_ns", mn,
                lambda raw: f"SELECT {keys}, start_ns // {mn} * {mn} AS minute_ns, count(*) AS n FROM {raw} "
                            "GROUP BY ALL", "a")
            df = self._long_frame(
                f"SELECT {keys}, least((minute_ns - $t0) // $bucket, $last) AS k, sum(n)::BIGINT AS n "
                f"FROM ({src}) GROUP BY ALL", {**self._filter_params, **sp, **params}, True, (), cols, ["n"], ["k"])
        else:
            src, key = self._from("start_ns >= $t0 AND start_ns <= $tend")
            unit = " AS unit" if self._joined else ""
            df = self._frame(f"SELECT {key}{unit}, least((r.start_ns - $t0) // $bucket, $last) AS k, count(*) AS n "
                             f"FROM {src} GROUP BY ALL", {**params, "tend": int(edges[-1])})
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
    n, n_ttft, n_tpot, ttft_q, tpot_q, ttft_mean, tpot_mean, queue_p90, pf, tokens = v[:10]
    edge = float(v[10]) if len(v) > 10 and v[10] is not None else None
    return WindowStat(int(n), int(n_ttft), int(n_tpot), _qmap(ttft_q, qs), _qmap(tpot_q, qs), ttft_mean, tpot_mean,
                      queue_p90, pf, int(tokens or 0), edge)


def _qmap(values: list[float | None] | None, qs: list[float]) -> dict[float, float | None]:
    return dict(zip(qs, values, strict=True)) if values is not None else dict.fromkeys(qs)


def group_codes(*columns: np.ndarray) -> np.ndarray:
    """0, 1, 2, ... for the runs of equal values of ``columns`` (rows sorted by them), as
    ``quantiles_from_bins`` groups rows."""
    n = len(columns[0]) if columns else 0
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    change = np.zeros(n - 1, dtype=bool)
    for c in columns:
        a = np.asarray(c, dtype=object)
        change |= a[1:] != a[:-1]
    return np.asarray(np.r_[0, np.cumsum(change)], dtype=np.int64)


def _bin_bounds(bins: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The lowest and highest value of each (non-zero) bin: bin b holds ln(x) * BINS_PER_E within b ± 0.5."""
    b = bins.astype(np.float64)
    per_e = float(request_rollups.BINS_PER_E)
    return np.exp((b - 0.5) / per_e), np.exp((b + 0.5) / per_e)


def excess_from_bins(bins: np.ndarray, counts: np.ndarray, median: float) -> np.ndarray:
    """Per row (a bin of some group and its count): the sum of max(x - median, 0) over the row's values, taking
    them spread evenly in log space across the bin. Exact but for where the values lie within their 1 %-wide
    bins: each value is off by at most 1 % of itself, and the bin holding the median is split at it."""
    lo, hi = _bin_bounds(bins)
    width = 1.0 / request_rollups.BINS_PER_E  # of a bin, in ln units
    mean = (hi - lo) / width  # of a log-uniform value in [lo, hi]
    m = max(float(median), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        # the bin straddling the median: its integral of (x - m) over [m, hi] under the density 1/(x width)
        part = ((hi - m) - m * (np.log(hi) - np.log(m if m > 0 else 1.0))) / width if m > 0 else mean
    each = np.where(m <= lo, mean - m, np.where(m >= hi, 0.0, part))
    each = np.where(bins == request_rollups.ZERO_BIN, 0.0, each)
    return np.asarray(each * counts.astype(np.float64), dtype=np.float64)


def median_in_bins(bins: np.ndarray, counts: np.ndarray) -> float:
    """The median (``quantile_cont``'s rank (n - 1) / 2) of binned values (sorted bins, one group), placed
    within its bin by its rank among the bin's values spread evenly in log space: for the excess over a
    fleet's median, where a bin's centre (up to 0.5 % off) would shift every replica's excess by the
    requests above it times that error, and crowded bins make the rank's place in its bin telling."""
    cum = np.cumsum(counts.astype(np.int64))
    if len(cum) == 0 or cum[-1] == 0:
        return 0.0
    rank = 0.5 * float(cum[-1] - 1)
    i = int(np.searchsorted(cum, rank, side="right"))
    if int(bins[i]) == request_rollups.ZERO_BIN:
        return 0.0
    frac = (rank - float(cum[i] - counts[i]) + 0.5) / float(counts[i])
    return float(np.exp((float(bins[i]) - 0.5 + frac) / request_rollups.BINS_PER_E))


def at_most_from_bins(bins: np.ndarray, counts: np.ndarray, threshold: float) -> np.ndarray:
    """Per row (a bin and its count): how many of its values are <= ``threshold``: bins below the threshold's
    bin whole, the threshold's own bin in proportion to where the threshold falls in it in log space (off by
    at most that one bin's count), zeros whole."""
    if threshold <= 0:
        frac = np.where(bins == request_rollups.ZERO_BIN, 1.0, 0.0)
    else:
        pos = np.log(threshold) * request_rollups.BINS_PER_E
        frac = np.clip(pos - bins.astype(np.float64) + 0.5, 0.0, 1.0)
        frac = np.where(bins == request_rollups.ZERO_BIN, 1.0, frac)
    return np.asarray(frac * counts.astype(np.float64), dtype=np.float64)
