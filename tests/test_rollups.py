"""Per-minute GPU summaries (``gpu_minutes``): the writer keeps them complete and fresh, and ``why``'s
evidence is the same whether it reads them or summarises the raw samples itself."""

from __future__ import annotations

import random
from pathlib import Path

import duckdb
import numpy as np
import pytest

from correlator.analysis.evidence import Evidence, collect
from correlator.ingest.batch import IngestBatch
from correlator.store import rollups
from correlator.store.duckdb_store import Store

T0 = 1_795_000_000 * 10**9 + 17 * 10**9  # not on a minute boundary
S = 10**9
GPUS = ("GPU-a", "GPU-b", "GPU-c")
POWER_CAP = 0x4  # sw_power_cap


def _samples(first_s: int, seconds: int, seed: int = 3, fault_from_s: int | None = None) -> IngestBatch:
    """One sample a second per GPU: noisy gauges, counters, a clock-event mask (power cap now and then) and
    two NVLinks (one of GPU-b down from ``fault_from_s``)."""
    rng = random.Random(seed + first_s)
    b = IngestBatch()
    for s in range(first_s, first_s + seconds):
        t = T0 + s * S
        for i, uuid in enumerate(GPUS):
            hot = fault_from_s is not None and s >= fault_from_s and uuid == "GPU-b"
            vals = {"power_w": rng.gauss(450 + 30 * i + (120 if hot else 0), 12.0),
                    "sm_clock_hz": rng.gauss(1.7e9, 3e7),
                    "pcie_rx_bytes_per_s": rng.uniform(1e9, 3e9) * (20 if hot else 1),
                    "gpu_util_ratio": rng.random(), "pcie_replay_total": float(s // 7 + (s if hot else 0)),
                    "clock_event_reasons": float(POWER_CAP if rng.random() < (0.6 if hot else 0.1) else 0)}
            for name, v in vals.items():
                b.gpu_samples.append(t + i * 1000, "node-1", uuid, i, name, None, v)
            b.gpu_samples.append(t, "node-1", uuid, i, "power_w", "ignored-sub", 1.0)  # a gauge with a sub
            for link in ("0", "1"):
                down = hot and link == "1"
                b.gpu_samples.append(t, "node-1", uuid, i, "nvlink_link_up", link, 0.0 if down else 1.0)
            b.gpu_samples.append(t, "node-1", uuid, i, "gpu_temp_c", None, None)  # missing, never 0
    return b


def _evidence_both_ways(store: Store, b0: int, b1: int, i0: int, i1: int) -> tuple[Evidence, Evidence]:
    with store.reader() as cur:
        rolled = collect(cur, b0, b1, i0, i1)
        cur.execute("BEGIN TRANSACTION")
        cur.execute("DELETE FROM meta WHERE key = ?", [rollups.WATERMARK_KEY])  # as if never rolled up
        raw = collect(cur, b0, b1, i0, i1)
        cur.execute("ROLLBACK")
    return rolled, raw


def test_evidence_is_the_same_from_summaries_and_from_raw_samples(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.duckdb")
    try:
        for first in range(0, 20 * 60, 60):
            store.write(_samples(first, 60, fault_from_s=14 * 60 + 20))
        store.catch_up_rollups()
        # the writer rolled them up as they came: every minute the grace has passed, from the first sample's
        expected = (rollups.floor_minute(T0 + 1199 * S - rollups.GRACE_NS) - rollups.floor_minute(T0)) // (60 * S)
        assert store.stats.minutes_rolled_up == expected == 19
        with store.reader() as cur:
            until = rollups.watermark(cur)
            assert until is not None and until % rollups.MINUTE_NS == 0
            newest = cur.execute("SELECT max(time_ns) FROM gpu_samples").fetchall()[0][0]
            assert until == rollups.floor_minute(newest - rollups.GRACE_NS)
            # one row per minute and series; missing values are not counted
            n_temp = cur.execute("SELECT sum(n) FROM gpu_minutes JOIN signals USING (signal_id) "
                                 "WHERE name = 'gpu_temp_c'").fetchall()[0][0]
            assert n_temp == 0
            assert cur.execute("SELECT count(*) FROM gpu_minutes WHERE q IS NOT NULL AND sub IS NOT NULL"
                               ).fetchall()[0][0] == 0
        # windows with ragged edges, and an incident running past the summaries into raw samples
        i0, i1 = T0 + (14 * 60 + 20) * S + 123, T0 + (20 * 60 - 1) * S
        b0, b1 = T0 + 37 * S, i0
        rolled, raw = _evidence_both_ways(store, b0, b1, i0, i1)
        assert rolled == raw
    finally:
        store.close()


def test_summaries_see_the_fault_and_match_exact_statistics(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.duckdb")
    try:
        for first in range(0, 20 * 60, 60):
            store.write(_samples(first, 60, fault_from_s=14 * 60))
        store.catch_up_rollups()
        i0, i1 = T0 + 14 * 60 * S, T0 + 18 * 60 * S
        b0, b1 = T0, i0
        with store.reader() as cur:
            ev = collect(cur, b0, b1, i0, i1)
            gid = dict(cur.execute("SELECT uuid, gpu_id FROM gpus").fetchall())
            exact = [v for (v,) in cur.execute(
                "SELECT value FROM gpu_samples JOIN signals USING (signal_id) WHERE name = 'power_w' AND sub IS NULL "
                "AND gpu_id = ? AND time_ns >= ? AND time_ns < ?", [gid["GPU-a"], b0, b1]).fetchall()]
        a, b = ev.gpu[gid["GPU-a"]]["power_w"], ev.gpu[gid["GPU-b"]]["power_w"]
        med = float(np.median(exact))
        mad = float(np.median(np.abs(np.array(exact) - med)))
        assert a.base_median is not None and a.base_mad is not None
        assert abs(a.base_median - med) < 0.1 * mad  # the mixture's median, within a tenth of the spread
        assert abs(a.base_mad - mad) < 0.1 * mad
        assert a.base_high == pytest.approx(max(exact))  # maxima are exact
        assert b.z("power_w") > 5 and abs(a.z("power_w")) < 1.5
        assert ev.links_down[gid["GPU-b"]] == (0, 1) and ev.links_down[gid["GPU-a"]] == (0, 0)
        power_b, power_a = ev.throttle_share[gid["GPU-b"]]["power"], ev.throttle_share[gid["GPU-a"]]["power"]
        assert power_b[1] > 0.45 and power_a[1] < 0.2
        # counter deltas are exact: the replay counter of GPU-b jumps by the fault's seconds
        base_d, inc_d = ev.gpu_counter_delta[gid["GPU-b"]]["pcie_replay_total"]
        assert inc_d > 4 * 60 and base_d < 14 * 60 / 7 + 1
    finally:
        store.close()


def test_samples_that_come_late_are_summarised_again(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.duckdb")
    try:
        store.write(_samples(0, 10 * 60))
        store.catch_up_rollups()
        minute = rollups.floor_minute(T0 + 120 * S)
        with store.reader() as cur:
            before = cur.execute("SELECT sum(n) FROM gpu_minutes WHERE minute_ns = ?", [minute]).fetchall()[0][0]
        # an agent's buffered export: a second GPU's samples for minute 2, after it was summarised
        late = IngestBatch()
        late.gpu_samples.append(minute + 5 * S + 7, "node-1", "GPU-late", 9, "power_w", None, 300.0)
        late.gpu_samples.append(minute + 6 * S + 7, "node-1", "GPU-late", 9, "power_w", None, 900.0)
        store.write(late)
        assert store.stats.late_rollups == 1
        with store.reader() as cur:
            after = cur.execute("SELECT sum(n) FROM gpu_minutes WHERE minute_ns = ?", [minute]).fetchall()[0][0]
            row = cur.execute("SELECT n, lo, hi FROM gpu_minutes JOIN gpus USING (gpu_id) WHERE uuid = 'GPU-late'"
                              ).fetchall()
        assert after == before + 2 and row == [(2, 300.0, 900.0)]
        rolled, raw = _evidence_both_ways(store, T0, T0 + 300 * S, T0 + 300 * S, T0 + 599 * S)
        assert rolled == raw
    finally:
        store.close()


def test_writer_rolls_up_as_data_arrives_and_retention_prunes_summaries(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.duckdb")
    try:
        store.write(_samples(0, 30))
        store.catch_up_rollups()
        with store.reader() as cur:
            assert rollups.watermark(cur) is None  # nothing complete yet: the newest sample is within the grace
        for first in range(30, 6 * 60, 30):
            store.write(_samples(first, 30))
        store.catch_up_rollups()
        with store.reader() as cur:
            until = rollups.watermark(cur)
            assert until == rollups.floor_minute(T0 + (6 * 60 - 1) * S - rollups.GRACE_NS)
            first_minute = cur.execute("SELECT min(minute_ns) FROM gpu_minutes").fetchall()[0][0]
            assert first_minute == rollups.floor_minute(T0)
        pruned = store.prune(T0 + 3 * 60 * S)
        assert pruned["gpu_minutes"] > 0
        with store.reader() as cur:
            assert cur.execute("SELECT min(minute_ns) FROM gpu_minutes").fetchall()[0][0] >= T0 + 3 * 60 * S - 60 * S
    finally:
        store.close()
    # reopening keeps the watermark: nothing is summarised twice
    again = Store(tmp_path / "s.duckdb")
    try:
        assert again.catch_up_rollups() == 0
    finally:
        again.close()


def test_under_load_the_writer_summarises_whole_chunks_of_minutes_it_did_not_count(tmp_path: Path) -> None:
    """Minutes with rows stored before this writer (its rows per minute unknown): with batches waiting, a summary
    step (~5-10 ms whatever its length) waits for a whole chunk of complete minutes; idle, every complete minute
    is summarised."""
    chunk = Store._ROLL_UP_CHUNK_MINUTES

    def reopened_after(first_s: int, seconds: int) -> Store:
        writer = Store(tmp_path / "s.duckdb")
        writer.roll_up_enabled = False
        writer.write(_samples(first_s, seconds))
        writer.close()
        store = Store(tmp_path / "s.duckdb")
        store.roll_up_enabled = False
        return store

    def step(store: Store, whole_chunks: bool) -> bool:
        with store._write_lock:  # as the writer thread steps (it does not: roll-ups are off meanwhile)
            store.roll_up_enabled = True
            try:
                return store._roll_up_step(whole_chunks=whole_chunks, now_s=100.0)
            finally:
                store.roll_up_enabled = False

    store = reopened_after(0, 3 * 60)  # minutes 0-2 complete (past the grace), fewer than a chunk
    try:
        assert not step(store, whole_chunks=True)
        assert store._rolled_until.get("gpu_minutes") == rollups.floor_minute(T0)  # where it starts: nothing written
    finally:
        store.close()
    store = reopened_after(3 * 60, (chunk + 1) * 60)
    try:
        assert step(store, whole_chunks=True)  # a whole chunk: summarised in one step
        until = store._rolled_until["gpu_minutes"]
        assert until is not None and until - rollups.floor_minute(T0) == chunk * rollups.MINUTE_NS
        assert not step(store, whole_chunks=True)  # what is left is less than a chunk
        assert step(store, whole_chunks=False)  # idle: the rest of what is complete
        assert store._rolled_until["gpu_minutes"] == rollups.floor_minute(
            T0 + ((chunk + 4) * 60 - 1) * S - rollups.GRACE_NS)
    finally:
        store.close()


def test_a_summary_step_takes_a_number_of_rows_or_what_a_second_brought(tmp_path: Path) -> None:
    """Minutes whose rows this writer counted: a step summarises whole minutes until it has
    ``_ROLL_UP_STEP_ROWS`` rows (however many minutes that is); fewer wait until a second after the last step."""
    store = Store(tmp_path / "s.duckdb")
    store._ROLL_UP_STEP_ROWS = 4_000  # ~2 minutes of the three GPUs' rows

    def step(now_s: float) -> bool:
        with store._write_lock:
            store.roll_up_enabled = True
            try:
                return store._roll_up_step(whole_chunks=True, now_s=now_s)
            finally:
                store.roll_up_enabled = False

    def rows(lo: int, hi: int) -> int:
        with store.reader() as cur:
            n: int = cur.execute("SELECT count(*) FROM gpu_samples WHERE time_ns >= ? AND time_ns < ?",
                                 [lo, hi]).fetchall()[0][0]
        return n

    try:
        store.roll_up_enabled = False
        for first in range(0, 12 * 60, 90):  # 12 minutes, in exports of 90 s
            store.write(_samples(first, 90))
        complete = rollups.floor_minute(T0 + (12 * 60 - 1) * S - rollups.GRACE_NS)
        start = rollups.floor_minute(T0)
        ends = []
        now = 100.0
        while step(now):
            end = store._rolled_until["gpu_minutes"]
            assert end is not None
            ends.append(end)
            if end < complete:  # a full step: enough rows, and a minute fewer would not have been
                assert rows(start, end) >= 4_000 > rows(start, end - rollups.MINUTE_NS)
            start = end
            now += 0.1
        assert len(ends) >= 3 and ends[-1] < complete  # full steps at once; the rest waits
        assert rows(ends[-1], complete) < 4_000
        assert not step(now + 0.5)  # still within a second of the last step
        assert step(now + 1.0)  # a second later: what is complete, whatever its rows
        assert store._rolled_until["gpu_minutes"] == complete
        assert all(m >= complete for m in store._minute_rows["gpu_samples"])  # counts of summarised minutes go
        with store.reader() as cur:
            exact = cur.execute("SELECT count(*) FROM (SELECT DISTINCT time_ns // 60000000000, gpu_id, signal_id, sub "
                                "FROM gpu_samples WHERE time_ns < ?)", [complete]).fetchall()[0][0]
            assert cur.execute("SELECT count(*) FROM gpu_minutes").fetchall()[0][0] == exact
    finally:
        store.close()


def test_rows_appended_past_the_writer_are_summarised_in_chunks_of_minutes(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A bulk load past the writer (what catch_up_rollups is for): the writer did not count those rows, so it
    must not take their minutes for empty ones and summarise them all in one step."""
    store = Store(tmp_path / "s.duckdb")
    try:
        store.roll_up_enabled = False
        store.write(_samples(0, 60))
        with store.reader() as cur:  # 20 more minutes of the same rows, appended straight to the table
            for k in range(1, 21):
                cur.execute("INSERT INTO gpu_samples SELECT time_ns + ? * 60000000000, gpu_id, signal_id, sub, value "
                            "FROM gpu_samples WHERE time_ns < ?", [k, T0 + 60 * S])
        steps: list[tuple[str, int, int]] = []
        real = store._roll_up

        def record(plan: list[tuple[str, int, int]], now_s: float | None = None) -> bool:
            steps.extend(plan)
            return real(plan, now_s)

        monkeypatch.setattr(store, "_roll_up", record)
        store.roll_up_enabled = True
        assert store.catch_up_rollups() >= 19
        spans = [(end - start) // rollups.MINUTE_NS for table, start, end in steps if table == "gpu_minutes"]
        assert len(spans) >= 4 and max(spans) <= Store._ROLL_UP_CHUNK_MINUTES
    finally:
        store.close()


def _with_host(b: IngestBatch, first_s: int, seconds: int) -> IngestBatch:
    for s in range(first_s, first_s + seconds):
        b.host_samples.append(T0 + s * S, "node-1", "cpu_util_ratio", None, 0.25 + (s % 7) / 100)
    return b


def _exact_gpu_minutes(cur: duckdb.DuckDBPyConnection, until: int) -> list[tuple[object, ...]]:
    return cur.execute("SELECT minute_ns, gpu_id, signal_id, sub, n, lo, hi FROM gpu_minutes WHERE minute_ns < ? "
                       "ORDER BY ALL", [until]).fetchall()


def test_a_summary_step_writes_every_table_in_one_transaction_and_each_alone_when_that_fails(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(tmp_path / "s.duckdb")
    try:
        store.roll_up_enabled = False
        store.write(_with_host(_samples(0, 8 * 60), 0, 8 * 60))
        real = rollups.roll_up
        calls: list[str] = []

        def failing_host(cur: duckdb.DuckDBPyConnection, table: str, *a: object, **k: object) -> int:
            calls.append(table)
            if table == "host_minutes":
                raise duckdb.ConversionException("host summaries broken")
            return real(cur, table, *a, **k)  # type: ignore[arg-type]

        monkeypatch.setattr(rollups, "roll_up", failing_host)
        with store._write_lock:
            store.roll_up_enabled = True
            assert store._roll_up_step()
        # tried together first (gpu, then host), then each alone: the GPU minutes are written, the host's not
        assert calls == ["gpu_minutes", "host_minutes", "gpu_minutes", "host_minutes"]
        gpu_until = store._rolled_until["gpu_minutes"]
        assert gpu_until is not None and gpu_until > rollups.floor_minute(T0)
        assert store._rolled_until["host_minutes"] == rollups.floor_minute(T0)  # where it starts: nothing written
        with store.reader() as cur:
            assert rollups.watermark(cur, "gpu_minutes") == gpu_until
            assert rollups.watermark(cur, "host_minutes") is None
            assert cur.execute("SELECT count(*) FROM host_minutes").fetchall()[0][0] == 0
        monkeypatch.setattr(rollups, "roll_up", real)
        calls.clear()
        with store._write_lock:
            assert store._roll_up_step()  # the host's chunk and the GPUs' next one, in one transaction
        with store.reader() as cur:
            host_until = rollups.watermark(cur, "host_minutes")
            assert host_until == store._rolled_until["host_minutes"] != rollups.floor_minute(T0)
            assert cur.execute("SELECT count(*) FROM host_minutes").fetchall()[0][0] > 0
    finally:
        store.close()


def test_summaries_left_past_the_watermark_are_cleared_once_not_kept_twice(tmp_path: Path) -> None:
    """A summary past the watermark is none the writer made (it moves the watermark in the transaction that
    adds summaries): the first step of a table clears from its watermark on, later steps need not."""
    store = Store(tmp_path / "s.duckdb")
    try:
        store.write(_samples(0, 4 * 60))
        store.catch_up_rollups()
        with store.reader() as cur:
            until = rollups.watermark(cur)
            assert until is not None
            good = _exact_gpu_minutes(cur, until)
            # a stray summary of a minute not summarised yet (as an older writer could leave behind)
            cur.execute("INSERT INTO gpu_minutes (minute_ns, gpu_id, signal_id, sub, n, lo, hi) "
                        "SELECT ?, gpu_id, signal_id, sub, 999, -1, -1 FROM gpu_minutes WHERE minute_ns = ?",
                        [until + rollups.MINUTE_NS, until - rollups.MINUTE_NS])
    finally:
        store.close()
    store = Store(tmp_path / "s.duckdb")
    try:
        for first in range(4 * 60, 12 * 60, 60):
            store.write(_samples(first, 60))
            store.catch_up_rollups()
        with store.reader() as cur:
            end = rollups.watermark(cur)
            assert end is not None and end > until + 2 * rollups.MINUTE_NS
            assert cur.execute("SELECT count(*) FROM gpu_minutes WHERE n = 999").fetchall()[0][0] == 0
            assert _exact_gpu_minutes(cur, until) == good
            # one summary per minute and series, each that of its own samples
            dup = cur.execute("SELECT count(*) FROM (SELECT minute_ns, gpu_id, signal_id, sub FROM gpu_minutes "
                              "GROUP BY ALL HAVING count(*) > 1)").fetchall()[0][0]
            assert dup == 0
            exact = cur.execute(
                "SELECT time_ns // 60000000000 * 60000000000 AS m, gpu_id, signal_id, sub, count(value)::INTEGER, "
                "min(value), max(value) FROM gpu_samples WHERE time_ns < ? GROUP BY ALL ORDER BY ALL",
                [end]).fetchall()
            assert _exact_gpu_minutes(cur, end) == exact
    finally:
        store.close()


def test_set_metas_updates_and_adds_keys_in_one_go(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.duckdb")
    try:
        with store.reader() as cur:
            rollups.set_meta(cur, "a_until_ns", "1")
            rollups.set_metas(cur, {"a_until_ns": "5", "b_until_ns": "7", "c_until_ns": "9"})
            rollups.set_metas(cur, {"a_until_ns": "6", "c_until_ns": "10"})
            got = dict(cur.execute("SELECT key, value FROM meta WHERE key LIKE '%_until_ns' "
                                   "AND key IN ('a_until_ns', 'b_until_ns', 'c_until_ns')").fetchall())
        assert got == {"a_until_ns": "6", "b_until_ns": "7", "c_until_ns": "10"}
    finally:
        store.close()


@pytest.mark.parametrize(("lo", "hi", "until", "rolled", "raw"), [
    (90, 400, None, None, [(90, 400)]),
    (90, 400, 300, (120, 300), [(90, 120), (300, 400)]),
    (120, 360, 600, (120, 360), []),
    (130, 170, 600, None, [(130, 170)]),  # no whole minute inside
    (90, 400, 60, None, [(90, 400)]),  # nothing summarised yet in the window
    (200, 200, 600, None, []),
])
def test_split_window(lo: int, hi: int, until: int | None, rolled: tuple[int, int] | None,
                      raw: list[tuple[int, int]]) -> None:
    m = rollups.MINUTE_NS // 60  # one "second" in these cases
    got = rollups.split_window(lo * m, hi * m, until * m if until is not None else None)
    assert got == ((rolled[0] * m, rolled[1] * m) if rolled else None, [(a * m, b * m) for a, b in raw])


def test_quantile_signals_cover_what_the_evidence_reads() -> None:
    from correlator.analysis.evidence import GPU_SIGNALS

    assert set(GPU_SIGNALS) <= set(rollups.QUANTILE_SIGNALS)
    assert "clock_event_reasons" not in rollups.QUANTILE_SIGNALS


def test_import_writes_the_summaries_of_what_it_imported(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from correlator.cli import app

    src = Store(tmp_path / "src.duckdb")
    try:
        src.roll_up_enabled = False  # the source has none: the import must make them
        src.write(_samples(0, 20 * 60))  # one file: one commit, after which the writer rolls up 5 minutes
        src.export_parquet(tmp_path / "export")
    finally:
        src.close()
    db = tmp_path / "imported.duckdb"
    res = CliRunner().invoke(app, ["import", "--db", str(db), str(tmp_path / "export" / "gpu_samples")])
    assert res.exit_code == 0, res.output
    store = Store(db)
    try:
        with store.reader() as cur:
            until = rollups.watermark(cur)
            newest = cur.execute("SELECT max(time_ns) FROM gpu_samples").fetchall()[0][0]
            assert until == rollups.floor_minute(newest - rollups.GRACE_NS)
            assert cur.execute("SELECT count(DISTINCT minute_ns) FROM gpu_minutes").fetchall()[0][0] == 19
        rolled, raw = _evidence_both_ways(store, T0, T0 + 600 * S, T0 + 600 * S, T0 + 1199 * S)
        assert rolled == raw
    finally:
        store.close()
