"""``top``, ``slo`` and ``requests``: the other questions an SRE asks of the same joined data.

All take a DuckDB cursor and bound parameters; names from the user never reach SQL text.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import polars as pl

from correlator.analysis.request_stats import (
    RequestScope,
    at_most_from_bins,
    excess_from_bins,
    group_codes,
    median_in_bins,
)
from correlator.analysis.requests import KEY_COLUMNS
from correlator.analysis.timeparse import format_ns
from correlator.store import request_rollups, rollups


@dataclass(frozen=True, slots=True)
class Slo:
    """One contract, e.g. ``ttft p99 <= 500ms`` for a model (or every model)."""

    metric: str  # "ttft" | "tpot" | "e2e"
    percentile: float
    threshold_s: float
    model: str | None = None
    service: str | None = None


def load_slos(path: str | Path) -> list[Slo]:
    """SLO contracts from TOML: ``[[slo]] metric = "ttft"  percentile = 99  threshold_ms = 500  model = "..."``."""
    try:
        doc = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"{path}: {e}") from e
    out = []
    for i, s in enumerate(doc.get("slo", []), 1):
        metric = s.get("metric")
        if metric not in ("ttft", "tpot", "e2e"):
            raise ValueError(f"{path}: slo #{i}: metric must be ttft, tpot or e2e")
        pct = float(s.get("percentile", 99))
        if not 0 < pct < 100:
            raise ValueError(f"{path}: slo #{i}: percentile must be between 0 and 100")
        if "threshold_ms" in s:
            thr = float(s["threshold_ms"]) / 1000
        elif "threshold_s" in s:
            thr = float(s["threshold_s"])
        else:
            raise ValueError(f"{path}: slo #{i}: threshold_ms or threshold_s is required")
        out.append(Slo(metric, pct / 100, thr, s.get("model"), s.get("service")))
    return out


DEFAULT_SLOS = [Slo("ttft", 0.99, 0.5), Slo("tpot", 0.99, 0.1)]


def _long(start_ns: int, end_ns: int) -> bool:
    """Whether a window is read from the summaries (as ``why``'s windows are: by its length alone)."""
    return end_ns - start_ns > request_rollups.LONG_WINDOW_NS


def energy_by_gpu(cur: duckdb.DuckDBPyConnection, start_ns: int, end_ns: int) -> dict[int, float]:
    """Joules each GPU used in the window, from its energy counter (or power integrated when absent).

    Over a long window the counter's delta (max - min) comes from the per-minute lo/hi of ``gpu_minutes``
    (whole minutes) and the samples at the window's edges: the same exact value without reading a day of
    samples. A GPU without the counter has its power integrated: sample by sample (each value held until the
    next) over a short window; over a long one, minute by minute from the summaries (each minute's mean
    power, as the mean of its eight quantile representatives, over the part of the window it covers): within
    a fraction of a percent on a steady load, but a gap in the samples counts as no power, where holding
    the last value would count it at that value."""
    sig = rollups.signal_ids(cur)
    rows: list[tuple[Any, ...]] = []
    if "energy_j" in sig and _long(start_ns, end_ns):
        # [start, end] of the samples' BETWEEN is [start, end + 1) in the summaries' half-open ranges
        src, params = rollups.window_summaries(cur, "gpu_minutes", [(start_ns, end_ns + 1)], sig,
                                               f"signal_id = {sig['energy_j']}")
        rows = cur.execute(f"SELECT gpu_id, max(hi) - min(lo) FROM ({src}) WHERE n > 0 GROUP BY gpu_id",
                           params).fetchall()
    elif "energy_j" in sig:
        # the signal's id first: a filter on it is pushed into the scan, a join on the name is not
        rows = cur.execute(
            "SELECT gpu_id, max(value) - min(value) FROM gpu_samples WHERE signal_id = ? AND time_ns BETWEEN ? AND ? "
            "GROUP BY gpu_id", [sig["energy_j"], start_ns, end_ns]).fetchall()
    out = {int(g): float(j) for g, j in rows if j is not None}
    missing = [int(g) for (g,) in cur.execute("SELECT gpu_id FROM gpus").fetchall() if int(g) not in out]
    if missing and "power_w" in sig:
        ids = ", ".join(str(g) for g in missing)  # the store's integers
        if _long(start_ns, end_ns):
            # the GPUs without a counter over a long window: each minute's mean power (that of its eight
            # quantile representatives in gpu_minutes) times the part of the window the minute covers, in
            # place of a window function over a day of samples (see energy_by_gpu's docstring)
            src, params = rollups.window_summaries(cur, "gpu_minutes", [(start_ns, end_ns + 1)], sig,
                                                   f"signal_id = {sig['power_w']} AND gpu_id IN ({ids})")
            found = cur.execute(
                f"SELECT gpu_id, sum(list_avg(q) * (least(minute_ns + {rollups.MINUTE_NS}, $hi_e) - "
                f"greatest(minute_ns, $lo_e)) / 1e9) FROM ({src}) WHERE q IS NOT NULL AND n > 0 GROUP BY gpu_id",
                {**params, "lo_e": start_ns, "hi_e": end_ns + 1}).fetchall()
        else:
            # only the GPUs without a counter reading: their power samples integrated
            found = cur.execute(
                "SELECT gpu_id, sum(w * dt) FROM (SELECT gpu_id, value AS w, (lead(time_ns) OVER (PARTITION BY "
                "gpu_id ORDER BY time_ns) - time_ns) / 1e9 AS dt FROM gpu_samples WHERE signal_id = ? AND "
                f"gpu_id IN ({ids}) AND time_ns BETWEEN ? AND ?) GROUP BY gpu_id",
                [sig["power_w"], start_ns, end_ns]).fetchall()
        out.update({int(g): float(j) for g, j in found if j is not None})
    return out


_METRICS = ("ttft", "tpot", "e2e")
_BINNED = {"ttft": 0, "tpot": 1, "e2e": request_rollups.E2E}  # their numbers in request_bins


def _binned(cur: duckdb.DuckDBPyConnection) -> dict[str, int]:
    """The metrics a long window reads from ``request_bins``: e2e too where the store has its bins (a store
    summarised before they were kept, opened read-only, has not: e2e is scanned exactly there)."""
    return _BINNED if request_rollups.has_e2e_bins(cur) else {k: v for k, v in _BINNED.items() if k != "e2e"}


def _column(metric: str) -> str:
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {', '.join(_METRICS)}")
    return f"{metric}_s"


def top(cur: duckdb.DuckDBPyConnection, start_ns: int, end_ns: int, service: str | None = None,
        model: str | None = None, node: str | None = None, metric: str = "ttft") -> list[dict[str, Any]]:
    """GPUs ranked by latency impact: the share of the window's excess latency (over the fleet median) their
    requests carry, with p99s and energy per output token. Aggregated in DuckDB, per replica.

    A window longer than 3 h (``request_rollups.LONG_WINDOW_NS``) of TTFT or TPOT is read from the request
    summaries (:func:`_top_long`: counts, tokens and energy exact, percentiles within 0.5 %, shares within a
    fraction of a percent); e2e too, where the store has its bins (:func:`_binned`)."""
    col = _column(metric)
    scope = RequestScope(cur, start_ns, end_ns, service, model, node)
    if scope.empty:
        return []
    if _long(start_ns, end_ns) and metric in _binned(cur):
        per = _top_long(scope, start_ns, end_ns + 1, metric)
    else:
        med = scope.fleet_quantile(col, 0.5)
        per = scope.per_unit(
            "count(*), quantile_cont(ttft_s, 0.99), quantile_cont(tpot_s, 0.99), "
            f"sum(greatest({col} - $med, 0)), sum(output_tokens)", {"med": med or 0.0})
    total = float(sum(float(v[3] or 0.0) for v in per.values())) or 1.0
    meta = {g: (u, i, n) for g, u, i, n in cur.execute(
        "SELECT gpu_id, uuid, gpu_index, n.name FROM gpus JOIN nodes n USING (node_id)").fetchall()}
    energy = energy_by_gpu(cur, start_ns, end_ns)
    rows = []
    for key, unit in scope.units.items():
        n, ttft_p99, tpot_p99, excess, tokens = per.get((key, None), (0, None, None, 0.0, 0))
        tokens = int(tokens or 0)
        for g in unit.gpu_ids or ():
            uuid, idx, nname = meta.get(g, (None, None, unit.node))
            rows.append({
                "node": nname, "gpu_index": idx, "gpu": uuid, "replica": key, "mapping": unit.mapping,
                "requests": int(n), "ttft_p99_s": _round(ttft_p99), "tpot_p99_s": _round(tpot_p99),
                "impact_share": round(float(excess or 0.0) / total / max(1, len(unit.gpu_ids)), 4),
                "energy_per_token_j": round(energy[g] / tokens, 4) if g in energy and tokens else None})
    rows.sort(key=lambda x: -float(x["impact_share"]))
    return rows


def _top_long(scope: RequestScope, lo_ns: int, hi_ns: int, metric: str
              ) -> dict[tuple[str, Any], tuple[Any, ...]]:
    """``top``'s per-replica aggregates (requests, TTFT p99, TPOT p99, excess over the fleet median, output
    tokens) of the requests that started in [lo_ns, hi_ns), from the summaries: counts and tokens exact, the
    percentiles within 0.5 %, the fleet median placed within its bin by rank (:func:`median_in_bins`) and
    the excess from the bins (each value placed evenly in log space within its 1 %-wide bin; see
    :func:`excess_from_bins`)."""
    sums = scope.long_sums(lo_ns, hi_ns)
    m = _BINNED[metric]
    b = scope.long_bins(lo_ns, hi_ns, metrics=tuple(sorted({0, 1, m})))
    units = np.asarray(b["unit"], dtype=object)
    metrics = np.asarray(b["metric"], dtype=np.int64)
    bins = np.asarray(b["bin"], dtype=np.int64)
    counts = np.asarray(b["n"], dtype=np.int64)
    codes = group_codes(units)
    name = {int(c): str(u) for c, u in zip(codes, units, strict=True)}
    sel = metrics == m
    med = 0.0
    if sel.any():
        # the fleet's median: every replica's bins merged
        ub, inv = np.unique(bins[sel], return_inverse=True)
        med = median_in_bins(ub, np.bincount(inv, weights=counts[sel]).astype(np.int64))
    excess = np.bincount(codes[sel], weights=excess_from_bins(bins[sel], counts[sel], med),
                         minlength=len(name)) if len(codes) else np.zeros(0)
    p99: dict[tuple[str, int], float] = {}
    for k in (0, 1):
        on = metrics == k
        groups, values = request_rollups.quantiles_from_bins(codes[on], bins[on], counts[on], [0.99])
        p99.update({(name[int(g)], k): float(v[0]) for g, v in zip(groups, values, strict=True)})
    ex = {name[c]: float(excess[c]) for c in range(len(excess))}
    return {(str(u), None): (int(n), p99.get((str(u), 0)), p99.get((str(u), 1)), ex.get(str(u), 0.0), tokens)
            for u, n, _nt, _np, _st, _sp, tokens in sums}


def slo(cur: duckdb.DuckDBPyConnection, start_ns: int, end_ns: int, slos: list[Slo], service: str | None = None,
        model: str | None = None, node: str | None = None) -> list[dict[str, Any]]:
    """Percentiles and attainment (share of requests within the threshold) per model and node, per SLO:
    one grouped scan in DuckDB (thresholds and percentiles are bound parameters), or, over a window longer
    than 3 h whose SLOs are all of binned metrics (:func:`_binned`), the request summaries
    (:func:`_slo_groups_long`)."""
    scope = RequestScope(cur, start_ns, end_ns, service, model, node)
    if scope.empty:
        return []
    if _long(start_ns, end_ns) and all(x.metric in _binned(cur) for x in slos):
        groups = _slo_groups_long(cur, scope, start_ns, end_ns + 1, slos)
    else:
        aggs: list[str] = []
        params: dict[str, object] = {}
        for i, s in enumerate(slos):
            col = _column(s.metric)
            aggs.append(f"count({col}), quantile_cont({col}, $q{i}), avg(({col} <= $t{i})::DOUBLE)")
            params.update({f"q{i}": [0.5, 0.9, 0.99, s.percentile], f"t{i}": s.threshold_s})
        groups = cur.execute(
            "SELECT model, (SELECT name FROM nodes n WHERE n.node_id = r.node_id) AS node, list(DISTINCT service), "
            f"{', '.join(aggs)} FROM requests r WHERE {scope.where} GROUP BY model, node_id ORDER BY min(start_ns)",
            {**scope.params, **params}).fetchall()
    energy_tokens = _energy_per_token_by_model(cur, scope, start_ns, end_ns)
    out = []
    for row in groups:
        g_model, g_node, services = row[:3]
        for i, s in enumerate(slos):
            if (s.model and g_model != s.model) or (s.service and s.service != service and
                                                    s.service not in (services or [])):
                continue
            n, qs, att = row[3 + 3 * i: 6 + 3 * i]
            if not n:
                continue
            p50, p90, p99, pq = (_round(v) for v in qs)
            out.append({"model": g_model, "node": g_node,
                        "slo": f"{s.metric} p{s.percentile * 100:g} <= {s.threshold_s * 1000:g}ms",
                        "requests": int(n), "p50_s": p50, "p90_s": p90, "p99_s": p99, "percentile_s": pq,
                        "attainment": round(float(att or 0.0), 4), "met": bool(pq is not None and pq <= s.threshold_s),
                        "energy_per_token_j": energy_tokens.get(g_model)})
    return out


def _slo_groups_long(cur: duckdb.DuckDBPyConnection, scope: RequestScope, lo_ns: int, hi_ns: int, slos: list[Slo]
                     ) -> list[tuple[Any, ...]]:
    """``slo``'s rows per model and node (model, node, services, then per SLO: count, [p50, p90, p99, its
    percentile], attainment) of the requests that started in [lo_ns, hi_ns), from the summaries, in the
    order of the groups' first requests (as the exact scan orders them). Counts exact; percentiles within
    0.5 %; attainment off by at most the share of the group's values in the threshold's 1 %-wide bin."""
    by = ("model", "node_id")
    first = scope.long_first_starts(lo_ns, hi_ns, by)
    n_by: dict[tuple[Any, ...], list[int]] = {}
    services: dict[tuple[Any, ...], set[Any]] = {}
    for model, node_id, service, _n, n_ttft, n_tpot, *_ in scope.long_sums(lo_ns, hi_ns, False, (*by, "service")):
        acc = n_by.setdefault((model, node_id), [0, 0])
        acc[0] += int(n_ttft)
        acc[1] += int(n_tpot)
        services.setdefault((model, node_id), set()).add(service)
    b = scope.long_bins(lo_ns, hi_ns, False, by, metrics=tuple(sorted({_BINNED[x.metric] for x in slos})))
    models, node_ids = np.asarray(b["model"], dtype=object), np.asarray(b["node_id"], dtype=object)
    metrics = np.asarray(b["metric"], dtype=np.int64)
    bins = np.asarray(b["bin"], dtype=np.int64)
    counts = np.asarray(b["n"], dtype=np.int64)
    codes = group_codes(models, node_ids)
    key = {int(c): (m, int(nid)) for c, m, nid in zip(codes, models, node_ids, strict=True)}
    per: dict[tuple[Any, ...], list[Any]] = {}
    for i, x in enumerate(slos):
        on = metrics == _BINNED[x.metric]
        groups, values = request_rollups.quantiles_from_bins(
            codes[on], bins[on], counts[on], [0.5, 0.9, 0.99, x.percentile])
        within = np.bincount(codes[on], weights=at_most_from_bins(bins[on], counts[on], x.threshold_s),
                             minlength=len(key))
        total = np.bincount(codes[on], weights=counts[on].astype(np.float64), minlength=len(key))
        for g, v in zip(groups, values, strict=True):
            k = key[int(g)]
            per.setdefault(k, [None] * len(slos))[i] = (v.tolist(), float(within[g] / total[g]), int(total[g]))
    names = dict(cur.execute("SELECT node_id, name FROM nodes").fetchall())
    out = []
    for k in sorted(n_by, key=lambda k: (first.get(k, hi_ns), str(k[0]), k[1])):
        row: list[Any] = [k[0], names.get(k[1]), sorted(services.get(k, set()), key=str)]
        for i, x in enumerate(slos):
            got = per.get(k, [None] * len(slos))[i]
            # the count of TTFTs and TPOTs from the minutes; of e2e values (never negative), their bins'
            n = n_by[k][_BINNED[x.metric]] if x.metric != "e2e" else (got[2] if got is not None else 0)
            row += [n, got[0], got[1]] if n and got is not None else [n, [None] * 4, None]
        out.append(tuple(row))
    return out


def _energy_per_token_by_model(cur: duckdb.DuckDBPyConnection, scope: RequestScope, start_ns: int, end_ns: int
                               ) -> dict[Any, float | None]:
    """Joules per output token by model: each replica's GPUs' energy shared among the models it served by
    their share of its requests."""
    energy = energy_by_gpu(cur, start_ns, end_ns)
    if _long(start_ns, end_ns):  # exact from the per-minute summaries
        per = {(str(u), m): (n, tokens) for u, m, n, _nt, _np, _st, _sp, tokens
               in scope.long_sums(start_ns, end_ns + 1, by=("model",))}
    else:
        per = scope.per_unit("count(*), sum(output_tokens)", by="model")
    unit_n: dict[str, int] = {}
    for (unit, _m), (n, _t) in per.items():
        unit_n[unit] = unit_n.get(unit, 0) + int(n)
    by_model: dict[Any, list[float]] = {}
    for (unit, m), (n, tokens) in per.items():
        u = scope.units[unit]
        j = sum(energy.get(gid, 0.0) for gid in u.gpu_ids) * int(n) / max(1, unit_n[unit])
        acc = by_model.setdefault(m, [0.0, 0.0])
        acc[0] += j
        acc[1] += float(tokens or 0)
    return {m: (round(j / t, 4) if t else None) for m, (j, t) in by_model.items()}


def slowest_requests(cur: duckdb.DuckDBPyConnection, start_ns: int, end_ns: int, service: str | None = None,
                     model: str | None = None, node: str | None = None, metric: str = "ttft", limit: int = 20
                     ) -> list[dict[str, Any]]:
    """The slowest requests with the state of their first GPU at their start (ASOF join on the samples)."""
    col = _column(metric)
    scope = RequestScope(cur, start_ns, end_ns, service, model, node)
    if scope.empty:
        return []
    worst = pl.from_arrow(cur.sql(
        "SELECT start_ns, (SELECT name FROM nodes n WHERE n.node_id = r.node_id) AS node, model, ttft_s, tpot_s, "
        f"queue_s, prefill_s, decode_s, prompt_tokens, output_tokens, {', '.join(KEY_COLUMNS)} FROM requests r "
        f"WHERE {scope.where} AND {col} IS NOT NULL ORDER BY {col} DESC, start_ns LIMIT $limit",
        params={**scope.params, "limit": int(limit)}).to_arrow_table())
    assert isinstance(worst, pl.DataFrame)
    worst = worst.with_columns(pl.Series("unit", [scope.unit_of_key(r) for r in worst.iter_rows(named=True)],
                                         dtype=pl.String))
    units = scope.units
    gpu_of = {k: (u.gpu_ids[0] if u.gpu_ids else None, u.mapping) for k, u in units.items()}
    probe = pl.DataFrame({"i": list(range(len(worst))), "gpu_id": [gpu_of.get(k, (None, ""))[0] for k in worst["unit"]],
                          "t": worst["start_ns"].to_list()}, schema={"i": pl.Int64, "gpu_id": pl.Int32, "t": pl.Int64})
    cur.register("_probe", probe.to_arrow())
    try:
        state = cur.execute(
            "WITH s AS (SELECT gpu_id, time_ns, max(value) FILTER (WHERE name = 'sm_clock_hz') AS sm_clock_hz, "
            "max(value) FILTER (WHERE name = 'power_w') AS power_w, "
            "max(value) FILTER (WHERE name = 'gpu_temp_c') AS gpu_temp_c, "
            "max(value) FILTER (WHERE name = 'clock_event_reasons') AS clock_event_reasons "
            "FROM gpu_samples JOIN signals USING (signal_id) WHERE time_ns BETWEEN ? AND ? AND gpu_id IN "
            "(SELECT gpu_id FROM _probe) AND name IN ('sm_clock_hz', 'power_w', 'gpu_temp_c', 'clock_event_reasons')"
            " GROUP BY ALL) SELECT p.i, s.sm_clock_hz, s.power_w, s.gpu_temp_c, s.clock_event_reasons, g.uuid, "
            "g.gpu_index FROM _probe p ASOF LEFT JOIN s ON p.gpu_id = s.gpu_id AND p.t >= s.time_ns "
            "LEFT JOIN gpus g ON g.gpu_id = p.gpu_id ORDER BY p.i",
            [start_ns - 60 * 10**9, end_ns]).fetchall()
    finally:
        cur.unregister("_probe")
    from collector.signals import decode_clock_event_reasons

    out = []
    for row, st in zip(worst.iter_rows(named=True), state, strict=True):
        out.append({
            "start": format_ns(row["start_ns"]), "node": row["node"], "model": row["model"], "pid": row["pid"],
            "ttft_s": row["ttft_s"], "tpot_s": row["tpot_s"], "queue_s": row["queue_s"], "prefill_s": row["prefill_s"],
            "decode_s": row["decode_s"], "prompt_tokens": row["prompt_tokens"], "output_tokens": row["output_tokens"],
            "gpu": st[5], "gpu_index": st[6], "mapping": gpu_of.get(row["unit"], (None, "inferred"))[1],
            "sm_clock_mhz": round(st[1] / 1e6) if st[1] is not None else None,
            "power_w": st[2], "gpu_temp_c": st[3],
            "throttle": ",".join(r for r in decode_clock_event_reasons(int(st[4])) if r != "gpu_idle")
            if st[4] is not None else None})
    return out


def _round(v: float | None) -> float | None:
    return None if v is None else round(float(v), 4)
