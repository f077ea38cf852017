"""Per-GPU, per-node and per-engine signal statistics in the baseline and the incident window, computed
in DuckDB from the per-minute summaries of the series and placements (and, in a long window, the hour
blocks of the gauges: ``correlator.store.rollups``), and the robust change score of each.

Maxima, counter deltas and rates, throttle and link-down shares and the share of placement snapshots a
process is in are exact; medians, MADs and an engine gauge's 95th percentile are those of the union of the
minutes' (hours') quantile representatives: the mixture of their distributions, a close approximation.

Robust change: z = (incident median − baseline median) / max(1.4826 · baseline MAD, floor), where the
floor is the smallest change of that signal that means anything (a watt of power is noise, 2 % of HBM
busy is not a cause), so that a perfectly flat baseline does not turn noise into infinite z.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import duckdb

from correlator.store import rollups

# smallest meaningful change per signal, in its canonical unit
FLOORS: dict[str, float] = {
    "power_w": 15.0, "power_limit_w": 5.0, "gpu_temp_c": 2.0, "memory_temp_c": 2.0, "sm_clock_hz": 45e6,
    "memory_clock_hz": 50e6, "gpu_util_ratio": 0.05, "sm_active_ratio": 0.05, "memory_busy_ratio": 0.05,
    "dram_active_ratio": 0.05, "fb_used_bytes": 2.0 * 2**30, "pcie_tx_bytes_per_s": 1e9, "pcie_rx_bytes_per_s": 1e9,
    "nvlink_tx_total_bytes_per_s": 5e9, "nvlink_rx_total_bytes_per_s": 5e9, "pcie_link_gen": 0.5,
    "pcie_link_width": 0.5, "host_cpu_util_ratio": 0.05, "host_cpu_steal_ratio": 0.02, "host_run_queue": 2.0,
    "host_load1": 2.0, "engine_kv_cache_usage_ratio": 0.05, "engine_requests_waiting": 2.0,
    "engine_requests_running": 2.0, "cgroup_throttled_ratio": 0.05, "engine_preemptions_per_s": 0.05,
}

# the gauges whose median/MAD the attribution reads (the costliest scan of ``why``: a signal nothing reads
# is not aggregated; memory temperature, SM active, DRAM active, framebuffer use, NVLink RX are not)
GPU_SIGNALS = ("power_w", "power_limit_w", "gpu_temp_c", "sm_clock_hz", "gpu_util_ratio", "memory_busy_ratio",
               "pcie_tx_bytes_per_s", "pcie_rx_bytes_per_s", "pcie_link_gen", "pcie_link_width",
               "pcie_link_gen_max", "pcie_link_width_max", "nvlink_tx_total_bytes_per_s")
GPU_COUNTERS = ("pcie_replay_total", "ecc_dbe_volatile_total", "ecc_sbe_volatile_total",
                "nvlink_crc_flit_errors_total", "nvlink_replay_errors_total")
HOST_SIGNALS = ("host_cpu_util_ratio", "host_cpu_steal_ratio", "host_run_queue", "host_load1", "host_cpu_count")
ENGINE_SIGNALS = ("engine_kv_cache_usage_ratio", "engine_requests_waiting", "engine_requests_running")

# usable PCIe bytes/s per lane and direction, by generation (after line encoding)
PCIE_LANE_BYTES_PER_S = {1: 0.25e9, 2: 0.5e9, 3: 0.985e9, 4: 1.969e9, 5: 3.938e9, 6: 7.563e9}


@dataclass(frozen=True, slots=True)
class Stat:
    base_median: float | None
    base_mad: float | None
    inc_median: float | None
    # the window's upper level: the maximum of a GPU or host signal, the 95th percentile of an engine gauge
    inc_high: float | None = None
    base_high: float | None = None

    def z(self, signal: str) -> float:
        if self.base_median is None or self.inc_median is None:
            return 0.0
        scale = max(1.4826 * (self.base_mad or 0.0), FLOORS.get(signal, abs(self.base_median) * 0.05 or 1e-9))
        return (self.inc_median - self.base_median) / scale


@dataclass(frozen=True, slots=True)
class QueuedSamples:
    """The engine's scrapes at which requests waited for the scheduler, and the batch it ran at those instants.

    The running and waiting gauges are scraped together, so the batch an engine ran *while* requests waited is
    known at once: an engine that queues only when its batch is full (max_num_seqs, or the KV cache) waits at
    its ceiling; one that queues with a batch below what it ran before without queueing has had its ceiling
    lowered (max_num_seqs or the token budget). The incident's per-minute gauge levels cannot say this: they
    mix the minutes before the batch was capped with those after."""

    n_base: int  # scrapes in the baseline
    waited_base: int  # of which with a request waiting
    n_inc: int
    waited_inc: int
    # the batch at or under which requests were seen waiting at two scrapes of the incident (the second smallest
    # batch of its scrapes with a request waiting): a scheduler leaves requests waiting only when it cannot admit
    # them, so this bounds its ceiling from above; the second, not the smallest, so that one request caught
    # between two scheduler steps does not set it (nor does the old batch still draining above a new ceiling)
    waiting_at_batch: float | None
    # the fullest the KV cache was at those scrapes (None: not reported): a scheduler out of KV blocks leaves
    # requests waiting under any batch ceiling, and the window's KV level lags as the batch's does
    kv_while_waiting: float | None = None


@dataclass
class Evidence:
    """Everything measured about the hardware and the engines in the two windows."""

    gpu: dict[int, dict[str, Stat]] = field(default_factory=dict)
    gpu_counter_delta: dict[int, dict[str, tuple[float, float]]] = field(default_factory=dict)  # (base, inc)
    throttle_share: dict[int, dict[str, tuple[float, float]]] = field(default_factory=dict)  # power/thermal
    links_down: dict[int, tuple[int, int]] = field(default_factory=dict)  # links seen down (base, inc)
    xids: dict[int, tuple[int, list[int], int | None]] = field(default_factory=dict)  # (count, codes, first ns)
    gpu_pids: dict[int, tuple[set[int], set[int]]] = field(default_factory=dict)  # pids seen (base, inc)
    host: dict[int, dict[str, Stat]] = field(default_factory=dict)
    engine: dict[tuple[int, int | None], dict[str, Stat]] = field(default_factory=dict)
    engine_queued: dict[tuple[int, int | None], QueuedSamples] = field(default_factory=dict)
    gpu_meta: dict[int, tuple[str, int | None, int, str | None]] = field(default_factory=dict)  # uuid, idx, node, model
    node_names: dict[int, str] = field(default_factory=dict)


# the baseline's scrapes read for how often requests waited (QueuedSamples): its last 15 minutes, 900 scrapes an
# engine at 1 s (an hour's read cost `why` ~8-16 % more at 512 GPUs and named every case the same)
_QUEUED_BASELINE_NS = 900 * 10**9
_BASELINE_PRESENCE = 0.25  # of the baseline's placement snapshots: a process that was there before
_INCIDENT_PRESENCE = 0.1  # of the incident's: one that came (a short foreign job counts)


def _signal_ids(cur: duckdb.DuckDBPyConnection, names: tuple[str, ...] | list[str]) -> dict[int, str]:
    """The store's ids of ``names`` (those it has): the scans filter on the integer id, which DuckDB pushes
    into the scan, instead of joining ``signals`` on every row."""
    return {int(i): str(n) for i, n in cur.execute(
        "SELECT signal_id, name FROM signals WHERE list_contains($names, name)", {"names": list(names)}).fetchall()}


def _in(ids: dict[int, str]) -> str:
    return ", ".join(str(int(i)) for i in sorted(ids))  # integers from the store, never user text


def collect(cur: duckdb.DuckDBPyConnection, b0: int, b1: int, i0: int, i1: int) -> Evidence:
    ev = Evidence()
    ev.node_names = dict(cur.execute("SELECT node_id, name FROM nodes").fetchall())
    for gid, uuid, idx, nid, model in cur.execute("SELECT gpu_id, uuid, gpu_index, node_id, model FROM gpus"
                                                  ).fetchall():
        ev.gpu_meta[gid] = (uuid, idx, nid, model)
    names = _signal_ids(cur, [*GPU_SIGNALS, *GPU_COUNTERS, "clock_event_reasons", "nvlink_link_up", *HOST_SIGNALS,
                              "cgroup_cpu_throttled_periods", "cgroup_cpu_periods", *ENGINE_SIGNALS,
                              "engine_preemptions_total"])

    def ids(wanted: tuple[str, ...] | list[str]) -> dict[int, str]:
        return {i: n for i, n in names.items() if n in wanted}

    def stats(rows: list[tuple[object, ...]], key_len: int = 1) -> dict[tuple[object, str], Stat]:
        # rows: key columns, signal id, window, median, MAD (of the baseline only: the incident's is never
        # used), max
        tmp: dict[tuple[object, str], dict[int, tuple[float | None, float | None, float | None]]] = {}
        for row in rows:
            key = row[0] if key_len == 1 else tuple(row[:key_len])
            sid, win, med, mad, mx = row[key_len:]
            tmp.setdefault((key, names[int(sid)]), {})[int(win)] = (med, mad, mx)  # type: ignore[call-overload,assignment]
        out = {}
        for k, v in tmp.items():
            b, i = v.get(0, (None, None, None)), v.get(1, (None, None, None))
            out[k] = Stat(b[0], b[1], i[0], i[2], b[2])
        return out

    # every series comes from its per-minute summaries (``correlator.store.rollups``: whole minutes from the
    # summary tables, the rest from the samples, the same either way): the baseline is w = 0, the incident
    # w = 1
    sig = rollups.signal_ids(cur)
    windows = [(b0, b1), (i0, i1 + 1)]
    reasons = ids(["clock_event_reasons"])

    def summaries(table: str, signals: dict[int, str]) -> tuple[str, dict[str, object]]:
        return rollups.window_summaries(cur, table, windows, sig, f"signal_id IN ({_in(signals)})")

    def gauges(table: str, keys: str, signals: dict[int, str], high: str = "hi") -> list[tuple[object, ...]]:
        # median and MAD over the union of the representatives of the window's minutes (or, in a long
        # window, of its hours; the MAD of the baseline only: the incident's is never used), and the
        # window's upper level: ``high`` of the same union, or the exact maximum
        src, sp = rollups.gauge_blocks(cur, table, windows, sig, f"signal_id IN ({_in(signals)})")
        return cur.execute(
            f"SELECT {keys}, w, m, CASE WHEN w = 0 THEN list_median(list_transform(l, lambda x: abs(x - m))) "
            f"END, {high} FROM (SELECT *, list_median(l) AS m FROM (SELECT {keys}, w, flatten(list(q)) AS l, "
            f"max(hi) AS hi FROM ({src}) GROUP BY ALL))", sp).fetchall()

    gpu_gauges = ids(GPU_SIGNALS)
    for (gid, name), st in stats(gauges("gpu_minutes", "gpu_id, signal_id", gpu_gauges) if gpu_gauges else []
                                 ).items():
        ev.gpu.setdefault(int(gid), {})[name] = st  # type: ignore[call-overload]

    counters = ids(GPU_COUNTERS)
    if counters:
        src, sp = summaries("gpu_minutes", counters)
        for gid, sid, win, lo, hi in cur.execute(
                f"SELECT gpu_id, signal_id, w, min(lo), max(hi) FROM ({src}) GROUP BY ALL", sp).fetchall():
            name = names[int(sid)]
            d = ev.gpu_counter_delta.setdefault(gid, {}).setdefault(name, (0.0, 0.0))
            delta = max(0.0, (hi or 0.0) - (lo or 0.0))
            ev.gpu_counter_delta[gid][name] = (delta, d[1]) if win == 0 else (d[0], delta)

    if reasons:
        src, sp = summaries("gpu_minutes", reasons)
        for gid, win, power, thermal in cur.execute(
                f"SELECT gpu_id, w, sum(power_n) / sum(n), sum(thermal_n) / sum(n) FROM ({src}) "
                "GROUP BY ALL HAVING sum(n) > 0", sp).fetchall():
            cur_share = ev.throttle_share.setdefault(gid, {"power": (0.0, 0.0), "thermal": (0.0, 0.0)})
            for k, v in (("power", power), ("thermal", thermal)):
                b, i = cur_share[k]
                cur_share[k] = (v, i) if win == 0 else (b, v)

    # links down in each window: down in most of the baseline's samples, in a tenth of the incident's (an
    # onset found a few seconds late must not hide a link that went down at the fault)
    link_up = ids(["nvlink_link_up"])
    if link_up:
        src, sp = summaries("gpu_minutes", link_up)
        for gid, win, down in cur.execute(
                f"SELECT gpu_id, w, count(*) FILTER (WHERE (w = 0 AND down >= 0.5) OR (w = 1 AND down >= 0.1)) FROM ("
                f"SELECT gpu_id, sub, w, sum(zeros) / sum(n) AS down FROM ({src}) GROUP BY ALL HAVING sum(n) > 0) "
                "GROUP BY ALL", sp).fetchall():
            b, i = ev.links_down.get(gid, (0, 0))
            ev.links_down[gid] = (int(down), i) if win == 0 else (b, int(down))

    for gid, n, codes, first in cur.execute(
            "SELECT gpu_id, count(*), list(DISTINCT code), min(time_ns) FROM events WHERE kind = 'xid' "
            "AND time_ns BETWEEN $i0 AND $i1 GROUP BY ALL", {"i0": i0, "i1": i1}).fetchall():
        ev.xids[gid] = (int(n), sorted(c for c in codes if c is not None), first)

    # processes on each GPU in each window, by the share of the placement snapshots they appear in: a
    # process seen in a few baseline snapshots (an onset found a little late) is still new in the incident
    src, sp = rollups.window_summaries(cur, "placement_minutes", windows, sig)
    for gid, win, pid, share in cur.execute(
            f"WITH p AS ({src}) SELECT gpu_id, w, pid, s / snaps FROM (SELECT gpu_id, w, pid, sum(snaps) AS s FROM p "
            "WHERE NOT all_pids AND pid > 0 GROUP BY ALL) JOIN (SELECT gpu_id, w, sum(snaps) AS snaps FROM p "
            "WHERE all_pids GROUP BY ALL) USING (gpu_id, w)", sp).fetchall():
        seen_b, seen_i = ev.gpu_pids.setdefault(gid, (set(), set()))
        if win == 0 and share >= _BASELINE_PRESENCE:
            seen_b.add(int(pid))
        elif win == 1 and share >= _INCIDENT_PRESENCE:
            seen_i.add(int(pid))

    host = ids(HOST_SIGNALS)
    for (nid, name), st in stats(gauges("host_minutes", "node_id, signal_id", host) if host else []).items():
        ev.host.setdefault(int(nid), {})[name] = st  # type: ignore[call-overload]
    # CFS throttling of the serving processes' cgroups: throttled periods / periods, per window
    cfs = ids(["cgroup_cpu_throttled_periods", "cgroup_cpu_periods"])
    throttled = [i for i, n in cfs.items() if n == "cgroup_cpu_throttled_periods"]
    periods = [i for i, n in cfs.items() if n == "cgroup_cpu_periods"]
    if cfs:
        src, sp = summaries("host_minutes", cfs)
    for nid, win, ratio in cur.execute(
            f"SELECT node_id, w, sum(CASE WHEN signal_id = $throttled THEN d END) / "
            f"nullif(sum(CASE WHEN signal_id = $periods THEN d END), 0) FROM ("
            f"SELECT node_id, sub, signal_id, w, max(hi) - min(lo) AS d FROM ({src}) GROUP BY ALL) GROUP BY ALL",
            {**sp, "throttled": throttled[0] if throttled else -1, "periods": periods[0] if periods else -1}
            ).fetchall() if cfs else []:
        h = ev.host.setdefault(nid, {})
        old = h.get("cgroup_throttled_ratio", Stat(None, 0.0, None))
        h["cgroup_throttled_ratio"] = Stat(ratio, 0.0, old.inc_median) if win == 0 else Stat(old.base_median, 0.0,
                                                                                              ratio)

    engine = ids(ENGINE_SIGNALS)
    # for the engines' gauges the "max" of a window is its 95th percentile: the level a batch is held at,
    # not a peak of the minute before the onset that an incident window found a little early still holds
    # (of the union of the representatives, as the median)
    rows = gauges("engine_minutes", "node_id, coalesce(pid, -1) AS pid, signal_id", engine,
                  "list_aggregate(l, 'quantile_cont', 0.95)") if engine else []
    for (key, name), st in stats(rows, 2).items():
        node_pid: tuple[int, int] = key  # type: ignore[assignment]
        ev.engine.setdefault((int(node_pid[0]), None if node_pid[1] == -1 else int(node_pid[1])), {})[name] = st
    preempt = ids(["engine_preemptions_total"])
    if preempt:
        src, sp = summaries("engine_minutes", preempt)
    for nid, pid, win, d, span in cur.execute(
            f"SELECT node_id, coalesce(pid, -1), w, max(hi) - min(lo), (max(t_hi) - min(t_lo)) / 1e9 "
            f"FROM ({src}) GROUP BY ALL", sp).fetchall() if preempt else []:
        key = (int(nid), None if pid == -1 else int(pid))
        e = ev.engine.setdefault(key, {})
        rate = (d or 0.0) / span if span else 0.0
        old = e.get("engine_preemptions_per_s", Stat(None, 0.0, None))
        e["engine_preemptions_per_s"] = Stat(rate, 0.0, old.inc_median) if win == 0 else Stat(old.base_median, 0.0,
                                                                                                rate)
    run_wait = ids(["engine_requests_running", "engine_requests_waiting"])
    if len(run_wait) == 2:
        # the two gauges at the same scrapes, from the samples (60 rows a minute per engine and gauge at 1 s): the
        # incident, and the baseline's last 15 minutes at most (how often requests waited before, a share)
        r_id = next(i for i, n in run_wait.items() if n == "engine_requests_running")
        w_id = next(i for i, n in run_wait.items() if n == "engine_requests_waiting")
        kv_id = next(iter(ids(["engine_kv_cache_usage_ratio"])), -1)
        base: dict[tuple[int, int | None], tuple[int, int]] = {}
        inc: dict[tuple[int, int | None], tuple[int, int, float | None, float | None]] = {}
        for nid, pid, win, n, waited, at_batch, kv_max in cur.execute(
                "SELECT node_id, pid, w, count(*), count(*) FILTER (WHERE waiting >= 1), "
                "list_sort(list(running) FILTER (WHERE waiting >= 1))[2], max(kv) FILTER (WHERE waiting >= 1) "
                "FROM (SELECT node_id, coalesce(pid, -1) AS pid, CASE WHEN time_ns >= $i0 THEN 1 ELSE 0 END AS w, "
                "max(value) FILTER (WHERE signal_id = $r) AS running, max(value) FILTER (WHERE signal_id = $w) "
                "AS waiting, max(value) FILTER (WHERE signal_id = $kv) AS kv FROM engine_samples "
                "WHERE signal_id IN ($r, $w, $kv) AND ((time_ns >= $b0 AND time_ns < $b1) "
                "OR (time_ns >= $i0 AND time_ns <= $i1)) GROUP BY node_id, pid, time_ns, w) "
                "WHERE running IS NOT NULL AND waiting IS NOT NULL GROUP BY ALL",
                {"r": r_id, "w": w_id, "kv": kv_id, "b0": max(b0, min(b1, i0) - _QUEUED_BASELINE_NS),
                 "b1": min(b1, i0), "i0": i0, "i1": i1}).fetchall():
            key = (int(nid), None if pid == -1 else int(pid))
            if win == 0:
                base[key] = (int(n), int(waited))
            else:
                inc[key] = (int(n), int(waited), None if at_batch is None else float(at_batch),
                            None if kv_max is None else float(kv_max))
        for key, (ni, wi, at, kv_w) in inc.items():
            ev.engine_queued[key] = QueuedSamples(*base.get(key, (0, 0)), ni, wi, at, kv_w)
    return ev


def pcie_capacity_bytes_per_s(stats: dict[str, Stat]) -> float | None:
    """Usable bytes/s per direction of the link as it runs now (current generation and width)."""
    gen = stats.get("pcie_link_gen") or stats.get("pcie_link_gen_max")
    width = stats.get("pcie_link_width") or stats.get("pcie_link_width_max")
    g = (gen.inc_median or gen.base_median) if gen else None
    wd = (width.inc_median or width.base_median) if width else None
    if not g or not wd:
        return None
    return PCIE_LANE_BYTES_PER_S.get(round(g), 0.0) * wd or None
