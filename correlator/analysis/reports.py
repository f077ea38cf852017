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

from correlator.analysis.requests import resolve_units
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


def _window_requests(cur: duckdb.DuckDBPyConnection, start_ns: int, end_ns: int, service: str | None,
                     model: str | None, node: str | None) -> pl.DataFrame:
    from correlator.analysis.requests import load_requests

    return load_requests(cur, start_ns, end_ns, service, model, node)


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


def top(cur: duckdb.DuckDBPyConnection, start_ns: int, end_ns: int, service: str | None = None,
        model: str | None = None, node: str | None = None, metric: str = "ttft") -> list[dict[str, Any]]:
    """GPUs ranked by latency impact: the share of the window's excess latency (over the fleet median) their
    requests carry, with p99s and energy per output token."""
    reqs = _window_requests(cur, start_ns, end_ns, service, model, node)
    if reqs.is_empty():
        return []
    reqs, units = resolve_units(cur, reqs, start_ns, end_ns)
    col = f"{metric}_s"
    med = reqs[col].drop_nulls().median()
    reqs = reqs.with_columns((pl.col(col) - (med or 0)).clip(lower_bound=0).fill_null(0).alias("excess"))
    total = float(reqs["excess"].sum()) or 1.0
    meta = {g: (u, i, n) for g, u, i, n in cur.execute(
        "SELECT gpu_id, uuid, gpu_index, n.name FROM gpus JOIN nodes n USING (node_id)").fetchall()}
    energy = energy_by_gpu(cur, start_ns, end_ns)
    rows = []
    narrow = reqs.select("unit", "output_tokens", "ttft_s", "tpot_s", "excess")
    parts, empty = _by_unit(narrow), narrow.clear()
    for key, unit in units.items():
        r = parts.get(key, empty)
        tokens = int(r["output_tokens"].sum() or 0)
        for g in unit.gpu_ids or ():
            uuid, idx, nname = meta.get(g, (None, None, unit.node))
            rows.append({
                "node": nname, "gpu_index": idx, "gpu": uuid, "replica": key, "mapping": unit.mapping,
                "requests": len(r), "ttft_p99_s": _q(r["ttft_s"], 0.99), "tpot_p99_s": _q(r["tpot_s"], 0.99),
                "impact_share": round(float(r["excess"].sum()) / total / max(1, len(unit.gpu_ids)), 4),
                "energy_per_token_j": round(energy[g] / tokens, 4) if g in energy and tokens else None})
    rows.sort(key=lambda x: -float(x["impact_share"]))
    return rows


def slo(cur: duckdb.DuckDBPyConnection, start_ns: int, end_ns: int, slos: list[Slo], service: str | None = None,
        model: str | None = None, node: str | None = None, by: tuple[str, ...] = ("model", "node")
        ) -> list[dict[str, Any]]:
    """Percentiles and attainment (share of requests within the threshold) per group, per SLO."""
    reqs = _window_requests(cur, start_ns, end_ns, service, model, node)
    if reqs.is_empty():
        return []
    energy_tokens = _energy_per_token_by_model(cur, reqs, start_ns, end_ns)
    out = []
    # only the columns read per group: iterating groups gathers every column of each
    narrow = reqs.select(list(dict.fromkeys([*by, "service", "ttft_s", "tpot_s", "e2e_s"])))
    for keys, g in narrow.group_by(list(by), maintain_order=True):
        group = dict(zip(by, keys, strict=True))
        for s in slos:
            if (s.model and group.get("model") != s.model) or (s.service and s.service != service and
                                                                s.service not in g["service"].unique().to_list()):
                continue
            v = g[f"{s.metric}_s"].drop_nulls()
            if v.is_empty():
                continue
            att = float((v <= s.threshold_s).cast(pl.Float64).mean() or 0.0)  # type: ignore[arg-type]
            out.append({**group, "slo": f"{s.metric} p{s.percentile * 100:g} <= {s.threshold_s * 1000:g}ms",
                        "requests": len(v), "p50_s": _q(v, 0.5), "p90_s": _q(v, 0.9), "p99_s": _q(v, 0.99),
                        "percentile_s": _q(v, s.percentile), "attainment": round(att, 4),
                        "met": bool(_q(v, s.percentile) is not None and (_q(v, s.percentile) or 0) <= s.threshold_s),
                        "energy_per_token_j": energy_tokens.get(group.get("model"))})
    return out


def _energy_per_token_by_model(cur: duckdb.DuckDBPyConnection, reqs: pl.DataFrame, start_ns: int, end_ns: int
                               ) -> dict[Any, float | None]:
    joined, units = resolve_units(cur, reqs, start_ns, end_ns)
    energy = energy_by_gpu(cur, start_ns, end_ns)
    by_model: dict[Any, list[float]] = {}
    narrow = joined.select("unit", "model", "output_tokens")
    parts, empty = _by_unit(narrow), narrow.clear()
    for key, unit in units.items():
        r = parts.get(key, empty)
        for m, g in r.group_by("model"):
            share = len(g) / max(1, len(r))
            j = sum(energy.get(gid, 0.0) for gid in unit.gpu_ids) * share
            acc = by_model.setdefault(m[0], [0.0, 0.0])
            acc[0] += j
            acc[1] += float(g["output_tokens"].cast(pl.Float64).fill_null(0.0).sum())
    return {m: (round(j / t, 4) if t else None) for m, (j, t) in by_model.items()}


def slowest_requests(cur: duckdb.DuckDBPyConnection, start_ns: int, end_ns: int, service: str | None = None,
                     model: str | None = None, node: str | None = None, metric: str = "ttft", limit: int = 20
                     ) -> list[dict[str, Any]]:
    """The slowest requests with the state of their first GPU at their start (ASOF join on the samples)."""
    reqs = _window_requests(cur, start_ns, end_ns, service, model, node)
    if reqs.is_empty():
        return []
    reqs, units = resolve_units(cur, reqs, start_ns, end_ns)
    col = f"{metric}_s"
    worst = reqs.filter(pl.col(col).is_not_null()).sort(col, descending=True).head(limit)
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


def _by_unit(df: pl.DataFrame) -> dict[str, pl.DataFrame]:
    """Each replica's rows, in their order, split once (a filter per replica is O(replicas x rows))."""
    return {str(k[0]): part for k, part in df.partition_by("unit", as_dict=True, maintain_order=True).items()}


def _q(s: pl.Series, p: float) -> float | None:
    s = s.drop_nulls()
    return round(float(s.quantile(p, "linear")), 4) if len(s) else None  # type: ignore[arg-type]
