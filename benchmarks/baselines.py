"""The published metric-ranking baselines, BARO (its RobustScorer) and N-Sigma, as shipped in PyPI's
``fse-baro``, fed the same per-GPU, per-node and per-engine time series stacklens stores, on a 1 s grid.

Both rank columns by how far their incident values sit from the baseline (median/IQR for BARO,
mean/standard deviation for N-Sigma) and return the ranked column names. A column names a signal of
one GPU, node or engine; the cause vocabulary of DESIGN.md is what that signal is the primary evidence
of (``CAUSE_OF_SIGNAL``). Both are given the true injection time (an oracle stacklens does not get), as
RCAEval does for them. Latency columns are left out: they are the symptom being explained.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from typing import Any

import duckdb
import numpy as np
import pandas as pd

from correlator.store.rollups import POWER_MASK, THERMAL_MASK

# the cause each signal is primary evidence of (DESIGN.md's cause table)
CAUSE_OF_SIGNAL: dict[str, tuple[str, str]] = {
    "memory_busy_ratio": ("memory", "hbm_bandwidth"),
    "fb_used_bytes": ("memory", "framebuffer"),
    "engine_kv_cache_usage_ratio": ("memory", "kv_cache_pressure"),
    "engine_preemptions_total": ("memory", "kv_cache_pressure"),
    "pcie_rx_bytes_per_s": ("interconnect", "pcie"),
    "pcie_tx_bytes_per_s": ("interconnect", "pcie"),
    "nvlink_tx_total_bytes_per_s": ("interconnect", "nvlink"),
    "nvlink_rx_total_bytes_per_s": ("interconnect", "nvlink"),
    "nvlink_links_down": ("interconnect", "nvlink"),
    "gpu_temp_c": ("thermal_power", "thermal_throttle"),
    "memory_temp_c": ("thermal_power", "thermal_throttle"),
    "throttle_thermal": ("thermal_power", "thermal_throttle"),
    "power_w": ("thermal_power", "power_cap"),
    "power_limit_w": ("thermal_power", "power_cap"),
    "throttle_power": ("thermal_power", "power_cap"),
    "gpu_util_ratio": ("scheduling", "noisy_neighbor"),
    "gpu_processes": ("scheduling", "noisy_neighbor"),
    "engine_requests_waiting": ("scheduling", "queueing"),
    "engine_requests_running": ("scheduling", "queueing"),
    "arrivals_per_s": ("scheduling", "queueing"),
    "host_cpu_util_ratio": ("scheduling", "cpu_contention"),
    "host_cpu_steal_ratio": ("scheduling", "cpu_contention"),
    "host_run_queue": ("scheduling", "cpu_contention"),
    "xid_events": ("hardware_fault", "xid"),
}
_GPU_SIGNALS = [s for s in CAUSE_OF_SIGNAL if not s.startswith(("engine_", "host_", "throttle_", "gpu_processes",
                                                                 "xid_", "arrivals_", "nvlink_links"))]


def _per_gpu_second(cur: duckdb.DuckDBPyConnection, aggregates: str, table: str, where: str, p: dict[str, int]
                    ) -> list[tuple[Any, ...]]:
    """(second since t0, "<node>/gpu<index>", uuid, *aggregates) rows of a per-GPU table (SQL fragments are
    this module's constants, never user input)."""
    signals = " JOIN signals s USING (signal_id)" if table == "gpu_samples" else ""
    return cur.execute(
        f"SELECT (time_ns - $t0) // 1000000000, n.name || '/gpu' || g.gpu_index, g.uuid, {aggregates} "
        f"FROM {table} x{signals} JOIN gpus g ON g.gpu_id = x.gpu_id JOIN nodes n ON n.node_id = g.node_id "
        f"WHERE time_ns BETWEEN $t0 AND $t1 AND {where} GROUP BY ALL", p).fetchall()


def series_frame(cur: duckdb.DuckDBPyConnection, start_ns: int, end_ns: int) -> tuple[pd.DataFrame, dict[str, Any]]:
    """One row per second, one column per (GPU | node | engine, signal); and what each column is about:
    ``{"column": ("gpu", uuid) | ("node", name) | ("engine", (node, pid))}``."""
    p = {"t0": start_ns, "t1": end_ns}
    names = ", ".join(f"'{s}'" for s in _GPU_SIGNALS)  # constants of this module, not user input
    gpu = _per_gpu_second(cur, "s.name, avg(value)", "gpu_samples",
                          f"sub IS NULL AND s.name IN ({names})", p)
    flags = _per_gpu_second(cur, f"max((((value::BIGINT) & {POWER_MASK}) != 0)::INT), "
                                 f"max((((value::BIGINT) & {THERMAL_MASK}) != 0)::INT)", "gpu_samples",
                            "s.name = 'clock_event_reasons'", p)
    links = _per_gpu_second(cur, "sum((value = 0)::INT)", "gpu_samples", "s.name = 'nvlink_link_up'", p)
    procs = _per_gpu_second(cur, "count(DISTINCT pid)", "placements", "true", p)
    xids = _per_gpu_second(cur, "count(*)", "events", "kind = 'xid'", p)
    host = cur.execute(
        "SELECT (time_ns - $t0) // 1000000000, n.name, s.name, avg(value) FROM host_samples "
        "JOIN signals s USING (signal_id) JOIN nodes n USING (node_id) WHERE time_ns BETWEEN $t0 AND $t1 "
        "AND sub IS NULL AND s.name IN ('host_cpu_util_ratio', 'host_cpu_steal_ratio', 'host_run_queue') "
        "GROUP BY ALL", p).fetchall()
    engine = cur.execute(
        "SELECT (time_ns - $t0) // 1000000000, n.name || '/pid' || e.pid, n.name, e.pid, s.name, avg(value) "
        "FROM engine_samples e JOIN signals s USING (signal_id) JOIN nodes n USING (node_id) "
        "WHERE time_ns BETWEEN $t0 AND $t1 AND s.name IN ('engine_kv_cache_usage_ratio', "
        "'engine_preemptions_total', 'engine_requests_waiting', 'engine_requests_running') GROUP BY ALL",
        p).fetchall()
    arrivals = cur.execute(
        "SELECT (start_ns - $t0) // 1000000000, n.name || '/pid' || r.pid, n.name, r.pid, count(*) FROM requests r "
        "JOIN nodes n USING (node_id) WHERE start_ns BETWEEN $t0 AND $t1 GROUP BY ALL", p).fetchall()

    cols: dict[str, dict[int, float]] = {}
    about: dict[str, Any] = {}

    def put(t: int, col: str, v: float | None, what: Any) -> None:
        cols.setdefault(col, {})[int(t)] = float(v) if v is not None else np.nan
        about[col] = what

    for t, who, uuid, name, v in gpu:
        put(t, f"{who}_{name}", v, ("gpu", uuid))
    for t, who, uuid, pw, th in flags:
        put(t, f"{who}_throttle_power", pw, ("gpu", uuid))
        put(t, f"{who}_throttle_thermal", th, ("gpu", uuid))
    for t, who, uuid, down in links:
        put(t, f"{who}_nvlink_links_down", down, ("gpu", uuid))
    for t, who, uuid, n in procs:
        put(t, f"{who}_gpu_processes", n, ("gpu", uuid))
    for t, who, name, v in host:
        put(t, f"{who}_{name}", v, ("node", who))
    for t, who, node, pid, name, v in engine:
        put(t, f"{who}_{name}", v, ("engine", (node, pid)))
    n_s = int((end_ns - start_ns) // 10**9) + 1
    frame = pd.DataFrame({c: pd.Series(v, dtype=float) for c, v in cols.items()}).reindex(range(n_s))
    # placement is sampled every few seconds and events are sparse: carry the last value, count absences as 0
    proc_cols = [c for c in frame.columns if c.endswith("_gpu_processes")]
    frame[proc_cols] = frame[proc_cols].ffill()
    for t, who, uuid, n in xids:
        put(t, f"{who}_xid_events", n, ("gpu", uuid))
    for t, who, node, pid, n in arrivals:
        put(t, f"{who}_arrivals_per_s", n, ("engine", (node, pid)))
    sparse = [c for c in cols if c.endswith(("_xid_events", "_arrivals_per_s"))]
    for c in sparse:
        frame[c] = pd.Series(cols[c], dtype=float).reindex(range(n_s)).fillna(0.0)
    for c in [c for c in frame.columns if c not in sparse]:
        frame[c] = frame[c].ffill().bfill()
    frame = frame.copy()
    frame.insert(0, "time", np.arange(n_s, dtype=float))
    return frame, about


def rank(method: str, frame: pd.DataFrame, inject_s: float) -> list[str]:
    """Columns ranked by the published method (``baro``: RobustScorer; ``nsigma``)."""
    from baro.root_cause_analysis import nsigma, robust_scorer

    fn: Callable[..., dict[str, Any]] = robust_scorer if method == "baro" else nsigma
    with contextlib.redirect_stdout(io.StringIO()):
        out = fn(frame, inject_time=inject_s)
    return list(out["ranks"])


def findings_from_ranks(ranks: list[str], about: dict[str, Any], replica_gpus: dict[tuple[str, int], list[str]]
                        ) -> list[tuple[str, str, str | None, str | None]]:
    """(cause, subcause, culprit GPU uuid, node) for each ranked column, in order, one per distinct cause."""
    out: list[tuple[str, str, str | None, str | None]] = []
    seen: set[tuple[str, str]] = set()
    for col in ranks:
        signal = next((s for s in CAUSE_OF_SIGNAL if col.endswith("_" + s)), None)
        if signal is None:
            continue
        cause = CAUSE_OF_SIGNAL[signal]
        if cause in seen:
            continue
        seen.add(cause)
        kind, what = about[col]
        if kind == "gpu":
            out.append((*cause, what, col.split("/")[0]))
        elif kind == "engine":
            gpus = replica_gpus.get(what, [])
            out.append((*cause, gpus[0] if gpus else None, what[0]))
        else:
            out.append((*cause, None, what))
    return out
