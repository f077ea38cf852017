"""``top``, ``slo`` and ``requests``: the other questions an SRE asks of the same joined data.

All take a DuckDB cursor and bound parameters; names from the user never reach SQL text.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

from correlator.analysis.request_stats import RequestScope
from correlator.analysis.requests import KEY_COLUMNS
from correlator.analysis.timeparse import format_ns


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


def energy_by_gpu(cur: duckdb.DuckDBPyConnection, start_ns: int, end_ns: int) -> dict[int, float]:
    """Joules each GPU used in the window, from its energy counter (or power integrated when absent)."""
    # the signal's id first: a filter on it is pushed into the scan, a join on the name is not
    sid = cur.execute("SELECT signal_id FROM signals WHERE name = 'energy_j'").fetchall()
    rows = cur.execute(
        "SELECT gpu_id, max(value) - min(value) FROM gpu_samples WHERE signal_id = ? AND time_ns BETWEEN ? AND ? "
        "GROUP BY gpu_id", [sid[0][0], start_ns, end_ns]).fetchall() if sid else []
    out = {int(g): float(j) for g, j in rows if j is not None}
    if len(out) < len(cur.execute("SELECT gpu_id FROM gpus").fetchall()):
        for g, j in cur.execute(
                "SELECT gpu_id, sum(w * dt) FROM (SELECT gpu_id, value AS w, (lead(time_ns) OVER (PARTITION BY gpu_id "
                "ORDER BY time_ns) - time_ns) / 1e9 AS dt FROM gpu_samples JOIN signals s USING (signal_id) "
                "WHERE s.name = 'power_w' AND time_ns BETWEEN ? AND ?) GROUP BY gpu_id", [start_ns, end_ns]).fetchall():
            if int(g) not in out and j is not None:
                out[int(g)] = float(j)
    return out


_METRICS = ("ttft", "tpot", "e2e")


def _column(metric: str) -> str:
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {', '.join(_METRICS)}")
    return f"{metric}_s"


def top(cur: duckdb.DuckDBPyConnection, start_ns: int, end_ns: int, service: str | None = None,
        model: str | None = None, node: str | None = None, metric: str = "ttft") -> list[dict[str, Any]]:
    """GPUs ranked by latency impact: the share of the window's excess latency (over the fleet median) their
    requests carry, with p99s and energy per output token. Aggregated in DuckDB, per replica."""
    col = _column(metric)
    scope = RequestScope(cur, start_ns, end_ns, service, model, node)
    if scope.empty:
        return []
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


def slo(cur: duckdb.DuckDBPyConnection, start_ns: int, end_ns: int, slos: list[Slo], service: str | None = None,
        model: str | None = None, node: str | None = None) -> list[dict[str, Any]]:
    """Percentiles and attainment (share of requests within the threshold) per model and node, per SLO:
    one grouped scan in DuckDB (thresholds and percentiles are bound parameters)."""
    scope = RequestScope(cur, start_ns, end_ns, service, model, node)
    if scope.empty:
        return []
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


def _energy_per_token_by_model(cur: duckdb.DuckDBPyConnection, scope: RequestScope, start_ns: int, end_ns: int
                               ) -> dict[Any, float | None]:
    """Joules per output token by model: each replica's GPUs' energy shared among the models it served by
    their share of its requests."""
    energy = energy_by_gpu(cur, start_ns, end_ns)
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
