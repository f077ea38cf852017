"""Per-minute summaries of the host and engine series and of the placements, and the hour blocks of long
windows (``correlator.store.rollups``): the writer keeps them complete and fresh (late data, retention,
stores made before them), and ``why``'s evidence is the same whether it reads them or the samples."""

from __future__ import annotations

import random
from pathlib import Path

import duckdb
import numpy as np

from correlator.analysis.evidence import Evidence, collect
from correlator.ingest.batch import IngestBatch
from correlator.store import rollups
from correlator.store.duckdb_store import Store

T0 = 1_795_000_000 * 10**9 + 17 * 10**9  # not on a minute boundary
S = 10**9
GPUS = ("GPU-a", "GPU-b", "GPU-c")
NODES = ("node-1", "node-2")
PIDS = (4000, 4001)


def _fleet(first_s: int, seconds: int, step_s: int = 1, seed: int = 5, fault_from_s: int | None = None
           ) -> IngestBatch:
    """Every ``step_s`` seconds: GPU gauges and a counter, host gauges (one integer-valued) and cgroup
    counters, engine gauges and the preemption counter of two replicas per node (and one without a pid),
    and every fifth second a placement snapshot (a foreign process on GPU-b from ``fault_from_s``)."""
    rng = random.Random(seed * 1_000_003 + first_s)
    b = IngestBatch()
    for s in range(first_s, first_s + seconds, step_s):
        t = T0 + s * S
        hot = fault_from_s is not None and s >= fault_from_s
        for i, uuid in enumerate(GPUS):
            bad = hot and uuid == "GPU-b"
            b.gpu_samples.append(t + i * 1000, "node-1", uuid, i, "power_w", None,
                                 rng.gauss(450 + 30 * i + (120 if bad else 0), 12.0))
            b.gpu_samples.append(t + i * 1000, "node-1", uuid, i, "gpu_util_ratio", None, rng.random())
            b.gpu_samples.append(t, "node-1", uuid, i, "pcie_replay_total", None, float(s // 7))
        for n, node in enumerate(NODES):
            busy = hot and node == "node-1"
            b.host_samples.append(t, node, "host_cpu_util_ratio", None, min(1.0, rng.gauss(0.4 + 0.4 * busy, 0.05)))
            b.host_samples.append(t, node, "host_run_queue", None, float(rng.randint(2, 6) + (8 if busy else 0)))
            b.host_samples.append(t, node, "host_load1", None, None)  # missing, never 0
            b.host_samples.append(t, node, "cgroup_cpu_periods", "c0ffee", float(10 * s))
            b.host_samples.append(t, node, "cgroup_cpu_throttled_periods", "c0ffee", float(s // (3 - busy)))
            for pid in PIDS:
                b.engine_samples.append(t + pid, node, "svc", "m", pid, "engine_requests_running", float(
                    rng.randint(20, 30) if not (busy and pid == PIDS[0]) else rng.randint(8, 12)))
                b.engine_samples.append(t + pid, node, "svc", "m", pid, "engine_kv_cache_usage_ratio",
                                        min(1.0, rng.gauss(0.5 + 0.45 * busy, 0.03)))
                b.engine_samples.append(t + pid, node, "svc", "m", pid, "engine_preemptions_total",
                                        float((s + n) // (40 if not busy else 4)))
            b.engine_samples.append(t, node, "svc", "m", None, "engine_requests_waiting", float(rng.randint(0, 3)))
        if s % 5 == 0:
            for i, uuid in enumerate(GPUS):
                b.placements.append(t + 7, "node-1", uuid, 100 + i, "ctr", "pod-uid", "pod", "ns", "c", 1e9)
                if hot and uuid == "GPU-b" and s % 10 == 0:
                    b.placements.append(t + 7, "node-1", uuid, 300, "x", "x-uid", "x", "ns", "x", 2e9)
            b.placements.append(t + 9, "node-1", "GPU-c", 0, None, None, None, None, None, None)  # an empty slot
    return b


def _write(store: Store, first_s: int, seconds: int, step_s: int = 1, chunk_s: int = 60,
           fault_from_s: int | None = None) -> None:
    for first in range(first_s, first_s + seconds, chunk_s):
        store.write(_fleet(first, min(chunk_s, first_s + seconds - first), step_s, fault_from_s=fault_from_s))


def _evidence_both_ways(store: Store, b0: int, b1: int, i0: int, i1: int, keep: tuple[str, ...] = ()
                        ) -> tuple[Evidence, Evidence]:
    """Evidence from the summaries, and as if nothing but the tables in ``keep`` had been rolled up."""
    with store.reader() as cur:
        rolled = collect(cur, b0, b1, i0, i1)
        cur.execute("BEGIN TRANSACTION")
        for table in rollups.TABLES:
            if table not in keep:
                cur.execute("DELETE FROM meta WHERE key = ?", [rollups.SUMMARIES[table].watermark_key])
        raw = collect(cur, b0, b1, i0, i1)
        cur.execute("ROLLBACK")
    return rolled, raw


def _ids(cur: duckdb.DuckDBPyConnection, table: str, key: str) -> dict[str, int]:
    return {str(k): int(v) for k, v in cur.execute(f"SELECT {key}, {table[:-1]}_id FROM {table}").fetchall()}


def test_host_engine_and_placement_evidence_is_the_same_from_summaries_and_raw(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.duckdb")
    try:
        _write(store, 0, 20 * 60, fault_from_s=14 * 60 + 20)
        store.catch_up_rollups()
        with store.reader() as cur:
            newest = cur.execute("SELECT max(time_ns) FROM host_samples").fetchall()[0][0]
            for table in ("host_minutes", "engine_minutes", "placement_minutes"):
                assert rollups.watermark(cur, table) == rollups.floor_minute(newest - rollups.GRACE_NS)
            # missing values are not counted; a series with a sub has no representatives
            assert cur.execute("SELECT sum(n) FROM host_minutes JOIN signals USING (signal_id) "
                               "WHERE name = 'host_load1'").fetchall()[0][0] == 0
            assert cur.execute("SELECT count(*) FROM host_minutes WHERE q IS NOT NULL AND sub IS NOT NULL"
                               ).fetchall()[0][0] == 0
            assert cur.execute("SELECT count(*) FROM engine_minutes JOIN signals USING (signal_id) "
                               "WHERE q IS NOT NULL AND name = 'engine_preemptions_total'").fetchall()[0][0] == 0
        i0, i1 = T0 + (14 * 60 + 20) * S + 123, T0 + (20 * 60 - 1) * S
        b0, b1 = T0 + 37 * S, i0
        rolled, raw = _evidence_both_ways(store, b0, b1, i0, i1)
        assert rolled == raw
        with store.reader() as cur:
            node, gpu = _ids(cur, "nodes", "name"), _ids(cur, "gpus", "uuid")
            runq = [v for (v,) in cur.execute(
                "SELECT value FROM host_samples JOIN signals USING (signal_id) WHERE name = 'host_run_queue' "
                "AND node_id = ? AND time_ns >= ? AND time_ns < ?", [node["node-1"], b0, b1]).fetchall()]
            preempt = cur.execute(
                "SELECT max(value) - min(value), (max(time_ns) - min(time_ns)) / 1e9 FROM engine_samples "
                "JOIN signals USING (signal_id) WHERE name = 'engine_preemptions_total' AND node_id = ? AND pid = ? "
                "AND time_ns >= ? AND time_ns <= ?", [node["node-1"], PIDS[0], i0, i1]).fetchall()[0]
        host = rolled.host[node["node-1"]]
        assert host["host_run_queue"].base_high == max(runq)  # maxima are exact
        assert abs((host["host_run_queue"].base_median or 0) - float(np.median(runq))) <= 0.5
        assert host["host_cpu_util_ratio"].z("host_cpu_util_ratio") > 5
        assert abs(rolled.host[node["node-2"]]["host_cpu_util_ratio"].z("host_cpu_util_ratio")) < 1.5
        assert "host_load1" not in host
        # counter rates and shares are exact
        rate = rolled.engine[(node["node-1"], PIDS[0])]["engine_preemptions_per_s"].inc_median
        assert rate == preempt[0] / preempt[1]
        assert host["cgroup_throttled_ratio"].inc_median == 0.05 and host["cgroup_throttled_ratio"].base_median
        running = rolled.engine[(node["node-1"], PIDS[0])]["engine_requests_running"]
        assert running.inc_high is not None and running.inc_high <= 12 and running.z("engine_requests_running") < -3
        assert (node["node-1"], None) in rolled.engine
        assert rolled.gpu_pids[gpu["GPU-b"]] == ({101}, {101, 300}) and rolled.gpu_pids[gpu["GPU-c"]][0] == {102}
    finally:
        store.close()


def test_long_windows_take_medians_from_hour_blocks_the_same_at_any_progress(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.duckdb")
    try:
        _write(store, 0, 3 * 3600 + 40 * 60, step_s=10, chunk_s=1200, fault_from_s=3 * 3600 + 20 * 60)
        store.catch_up_rollups()
        with store.reader() as cur:
            until = rollups.watermark(cur, "gpu_hours")
            assert until is not None and until % rollups.HOUR_NS == 0
            assert until == rollups.floor_minute(rollups.watermark(cur, "gpu_minutes") or 0) // rollups.HOUR_NS * \
                rollups.HOUR_NS
            hours = cur.execute("SELECT count(DISTINCT hour_ns), min(len(q)), max(len(q)) FROM gpu_hours").fetchall()
            assert hours[0][0] >= 3 and hours[0][1] < hours[0][2] == rollups.HOUR_REPS  # a partial first hour
            assert cur.execute("SELECT count(*) FROM host_hours").fetchall()[0][0] > 0
            assert cur.execute("SELECT count(*) FROM engine_hours").fetchall()[0][0] > 0
        i0, i1 = T0 + (3 * 3600 + 20 * 60) * S + 123, T0 + (3 * 3600 + 36 * 60) * S
        b0, b1 = T0 + 37 * S, i0 - 30 * S
        assert b1 - b0 >= rollups.LONG_WINDOW_NS
        rolled, raw = _evidence_both_ways(store, b0, b1, i0, i1)
        assert rolled == raw
        minutes_only, _ = _evidence_both_ways(store, b0, b1, i0, i1, keep=("gpu_minutes", "host_minutes",
                                                                           "engine_minutes", "placement_minutes"))
        assert minutes_only == rolled
        with store.reader() as cur:
            gpu = _ids(cur, "gpus", "uuid")
            exact = [v for (v,) in cur.execute(
                "SELECT value FROM gpu_samples JOIN signals USING (signal_id) WHERE name = 'power_w' AND sub IS NULL "
                "AND gpu_id = ? AND time_ns >= ? AND time_ns < ?", [gpu["GPU-a"], b0, b1]).fetchall()]
            # the union of the minutes' representatives, as a shorter window takes it
            sig = rollups.signal_ids(cur)
            src, params = rollups.window_summaries(cur, "gpu_minutes", [(b0, b1)], sig,
                                                   f"signal_id = {sig['power_w']} AND gpu_id = {gpu['GPU-a']}")
            union = np.array(cur.execute(f"SELECT flatten(list(q)) FROM ({src}) WHERE sub IS NULL", params
                                         ).fetchall()[0][0])
        a, b = rolled.gpu[gpu["GPU-a"]]["power_w"], rolled.gpu[gpu["GPU-b"]]["power_w"]
        med = float(np.median(exact))
        mad = float(np.median(np.abs(np.array(exact) - med)))
        u_med = float(np.median(union))
        u_mad = float(np.median(np.abs(union - u_med)))
        assert a.base_median is not None and a.base_mad is not None
        # the hour blocks against the minutes' union: what they add to the approximation
        assert abs(a.base_median - u_med) < 0.05 * u_mad and abs(a.base_mad - u_mad) < 0.05 * u_mad
        # against the exact statistics (six samples a minute: a minute's representatives are narrower)
        assert abs(a.base_median - med) < 0.1 * mad and abs(a.base_mad - mad) < 0.2 * mad
        assert a.base_high == max(exact)
        assert b.z("power_w") > 5 and abs(a.z("power_w")) < 1.5
        # a late sample inside a summarised hour: its minute and its hour are summarised again
        minute = rollups.floor_minute(T0 + 3600 * S + 200 * S)
        hour = minute // rollups.HOUR_NS * rollups.HOUR_NS
        late = IngestBatch()
        late.gpu_samples.append(minute + 3 * S, "node-1", "GPU-a", 0, "power_w", None, 5000.0)
        late.host_samples.append(minute + 3 * S, "node-2", "host_cpu_util_ratio", None, 0.99)
        before = store.stats.late_rollups
        store.write(late)
        assert store.stats.late_rollups == before + 2
        with store.reader() as cur:
            assert cur.execute("SELECT max(hi) FROM gpu_hours WHERE hour_ns = ? AND gpu_id = ?",
                               [hour, gpu["GPU-a"]]).fetchall()[0][0] == 5000.0
            assert cur.execute("SELECT max(hi) FROM host_hours JOIN signals USING (signal_id) WHERE hour_ns = ? "
                               "AND name = 'host_cpu_util_ratio'", [hour]).fetchall()[0][0] == 0.99
        rolled, raw = _evidence_both_ways(store, b0, b1, i0, i1)
        assert rolled == raw and rolled.gpu[gpu["GPU-a"]]["power_w"].base_high == 5000.0
    finally:
        store.close()


def test_late_host_engine_and_placement_rows_are_summarised_again(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.duckdb")
    try:
        _write(store, 0, 10 * 60)
        store.catch_up_rollups()
        minute = rollups.floor_minute(T0 + 120 * S)
        late = IngestBatch()  # a third node's buffered export, for minute 2, after it was summarised
        late.host_samples.append(minute + 5 * S, "node-3", "host_run_queue", None, 3.0)
        late.host_samples.append(minute + 6 * S, "node-3", "host_run_queue", None, 9.0)
        late.engine_samples.append(minute + 5 * S, "node-3", "svc", "m", 7, "engine_requests_running", 4.0)
        late.placements.append(minute + 5 * S, "node-3", "GPU-z", 7, None, None, None, None, None, None)
        before = store.stats.late_rollups
        store.write(late)
        assert store.stats.late_rollups == before + 3
        with store.reader() as cur:
            host = cur.execute("SELECT n, lo, hi FROM host_minutes JOIN nodes USING (node_id) WHERE name = 'node-3'"
                               ).fetchall()
            engine = cur.execute("SELECT n, hi, t_lo FROM engine_minutes WHERE pid = 7").fetchall()
            place = cur.execute("SELECT pid, snaps, all_pids FROM placement_minutes JOIN gpus USING (gpu_id) "
                                "WHERE uuid = 'GPU-z' ORDER BY all_pids").fetchall()
        assert host == [(2, 3.0, 9.0)] and engine == [(1, 4.0, minute + 5 * S)]
        assert place == [(7, 1, False), (None, 1, True)]
        rolled, raw = _evidence_both_ways(store, T0, T0 + 300 * S, T0 + 300 * S, T0 + 599 * S)
        assert rolled == raw
    finally:
        store.close()


def test_retention_prunes_the_summaries_and_summarises_the_cut_minute_again(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.duckdb")
    try:
        _write(store, 0, 6 * 60)
        store.catch_up_rollups()
        cut = T0 + 150 * S + 500  # inside a minute
        pruned = store.prune(cut)
        for table in ("gpu_minutes", "host_minutes", "engine_minutes", "placement_minutes"):
            assert pruned[table] > 0
        with store.reader() as cur:
            for table, source in (("host_minutes", "host_samples"), ("engine_minutes", "engine_samples"),
                                  ("gpu_minutes", "gpu_samples")):
                n = cur.execute(f"SELECT sum(n) FROM {table} WHERE minute_ns = ?", [rollups.floor_minute(cut)]
                                ).fetchall()[0][0]
                left = cur.execute(f"SELECT count(value) FROM {source} WHERE time_ns < ?",
                                   [rollups.floor_minute(cut) + rollups.MINUTE_NS]).fetchall()[0][0]
                assert n == left > 0
                assert cur.execute(f"SELECT min(minute_ns) FROM {table}").fetchall()[0][0] == rollups.floor_minute(cut)
        rolled, raw = _evidence_both_ways(store, T0, T0 + 240 * S, T0 + 240 * S, T0 + 359 * S)
        assert rolled == raw
    finally:
        store.close()


def test_a_store_made_before_these_summaries_gets_them_on_open(tmp_path: Path) -> None:
    path = tmp_path / "old.duckdb"
    store = Store(path)
    try:
        _write(store, 0, 12 * 60, fault_from_s=9 * 60)
        store.catch_up_rollups()
    finally:
        store.close()
    con = duckdb.connect(str(path))  # as a store of before: GPU minutes only
    for table in rollups.TABLES:
        if table != "gpu_minutes":
            con.execute(f"DROP TABLE {table}")
            con.execute("DELETE FROM meta WHERE key = ?", [rollups.SUMMARIES[table].watermark_key])
    con.close()
    ro = Store(path, read_only=True)
    try:
        with ro.reader() as cur:  # read-only, it is read as it is (every window from the samples)
            assert rollups.watermark(cur, "gpu_minutes") is not None
    finally:
        ro.close()
    store = Store(path)
    try:
        with store.reader() as cur:  # made on open (the writer summarises in the background from then)
            made = {t for (t,) in cur.execute("SELECT table_name FROM information_schema.tables").fetchall()}
            assert made >= set(rollups.TABLES)
        assert store.catch_up_rollups() == 0  # the GPU minutes were summarised already
        with store.reader() as cur:
            gpu_until = rollups.watermark(cur, "gpu_minutes")
            for table in ("host_minutes", "engine_minutes", "placement_minutes"):
                assert rollups.watermark(cur, table) == gpu_until
                assert cur.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0] > 0
            assert rollups.watermark(cur, "gpu_hours") is None  # no hour is complete yet
            assert cur.execute("SELECT count(*) FROM gpu_hours").fetchall()[0][0] == 0
        rolled, raw = _evidence_both_ways(store, T0, T0 + 540 * S, T0 + 540 * S, T0 + 719 * S)
        assert rolled == raw
        exported = {Path(p).name for p in store.export_parquet(tmp_path / "export")}
        assert exported.isdisjoint(rollups.TABLES) and {"host_samples", "placements"} <= exported
    finally:
        store.close()
