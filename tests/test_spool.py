"""The spool (correlator/store/spool.py): exports acknowledged once their bodies are fsynced on it, committed
to DuckDB later in large groups; after a crash, the records past the last committed one are committed, each
once; a record whose rows cannot be committed is set aside on disk, never dropped."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from collector.export.otlp_encode import OtlpMetricsEncoder, ResourceInfo
from collector.records import NodeSnapshot
from collector.simulated import SimulatedGpuSource
from correlator.ingest.payload import decode_export, decode_record
from correlator.store.duckdb_store import Store
from correlator.store.spool import Spool, SpoolRecord, prepare

T0 = 1_790_000_000_000_000_000


def _bodies(n: int, node: str = "node-1", gpus: int = 2, first_s: int = 0) -> list[bytes]:
    """n OTLP metrics exports of the agent, one sample cycle each, a second apart."""
    src = SimulatedGpuSource(gpus, seed=5)
    enc = OtlpMetricsEncoder(ResourceInfo(node))
    out = []
    for i in range(first_s, first_s + n):
        t = T0 + i * 10**9
        out.append(enc.encode(NodeSnapshot(node, t, src.sample(t, slow=True, processes=False))))
    return out


def _record(body: bytes) -> SpoolRecord:
    return SpoolRecord("metrics", "protobuf", body)


def _samples(store: Store) -> list[tuple[int, int]]:
    """(time, count) of the stored GPU samples per sample time."""
    with store.reader() as cur:
        return [(int(t), int(n)) for t, n in
                cur.execute("SELECT time_ns, count(*) FROM gpu_samples GROUP BY ALL ORDER BY 1").fetchall()]


def _meta_seq(store: Store) -> str | None:
    with store.reader() as cur:
        rows = cur.execute("SELECT value FROM meta WHERE key = 'spool_seq'").fetchall()
    return rows[0][0] if rows else None


def _lazy_store(db: Path, **kw: Any) -> Store:
    """A store that commits spooled exports only when told (flush, close), never on its own."""
    return Store(db, spool=Spool(Path(f"{db}.spool"), decode_record, **kw.pop("spool_kw", {})),
                 spool_linger_s=3600, spool_commit_rows=10**9, **kw)


def _crash(store: Store) -> None:
    """What a kill -9 leaves: the acknowledged exports not yet committed exist only on the spool."""
    with store._cond:
        store._pending.clear()
        store._pending_rows = 0
    store.close()


def test_records_read_back_in_order_and_a_cut_short_or_damaged_one_ends_its_segment(tmp_path: Path) -> None:
    bodies = _bodies(3)
    spool = Spool(tmp_path, decode_record)
    assert list(spool.open(0)) == []
    acks = [spool.append(prepare(_record(b))) for b in bodies]
    assert [seq for seq, _ in acks] == [1, 2, 3]
    for _, synced in acks:
        synced.result(10)
    (segment,) = sorted(tmp_path.glob("*.spool"))
    with segment.open("ab") as f:  # a record the crash cut short: its header promises more than is there
        f.write(b"SLSP" + (4).to_bytes(8, "little") + (1000).to_bytes(4, "little") + b"\0" * 12 + b"partial")

    again = Spool(tmp_path, decode_record)
    got = list(again.open(0))
    assert [(seq, r.body) for seq, r in got] == list(zip([1, 2, 3], bodies, strict=True))
    assert all(r.signal == "metrics" and r.fmt == "protobuf" for _, r in got)
    assert again.append(prepare(_record(b"x")))[0] == 4  # numbering goes on past what was found, in a new segment
    again.close()
    spool.close()
    assert [seq for seq, _ in Spool(tmp_path, decode_record).open(2)] == [3, 4]

    # a damaged body (its CRC does not match): the records before it are read, none after it in that segment
    data = bytearray(segment.read_bytes())
    data[len(data) // 2] ^= 0xFF  # in the second record's body
    segment.write_bytes(bytes(data))
    assert [seq for seq, _ in Spool(tmp_path, decode_record).open(0)] == [1, 4]


def test_segments_rotate_and_are_deleted_once_their_records_are_committed(tmp_path: Path) -> None:
    spool = Spool(tmp_path, decode_record, segment_bytes=1)  # every append after the first starts a segment
    list(spool.open(0))
    for b in _bodies(3):
        spool.append(prepare(_record(b)))[1].result(10)
    assert len(list(tmp_path.glob("*.spool"))) == 3
    spool.committed(2)
    assert sorted(p.name for p in tmp_path.glob("*.spool")) == [f"{3:020d}.spool"]
    spool.committed(3)  # the current segment stays, for the next appends
    assert len(list(tmp_path.glob("*.spool"))) == 1
    spool.close()


def test_the_store_acknowledges_once_spooled_and_commits_the_exports_in_one_group(tmp_path: Path) -> None:
    store = _lazy_store(tmp_path / "s.duckdb")
    bodies = _bodies(5)
    acks = [store.submit(decode_export("metrics", b, "application/x-protobuf")[0], _record(b)) for b in bodies]
    for a in acks:
        a.result(10)  # durable on the spool ...
    assert _samples(store) == [] and store.stats.transactions == 0  # ... not yet in DuckDB
    assert store.stats.spooled_exports == 5
    store.flush()
    assert [t for t, _ in _samples(store)] == [T0 + i * 10**9 for i in range(5)]
    assert store.stats.transactions == 1 and store.stats.batches == 6  # the five and the flush
    assert _meta_seq(store) == "5"
    store.close()


def test_after_a_crash_each_acknowledged_export_is_committed_once(tmp_path: Path) -> None:
    db = tmp_path / "c.duckdb"
    bodies = _bodies(5)
    store = _lazy_store(db)
    for b in bodies[:3]:
        store.submit(decode_export("metrics", b, "application/x-protobuf")[0], _record(b)).result(10)
    store.flush()  # 1-3 committed (the watermark says 3)
    for b in bodies[3:]:
        store.submit(decode_export("metrics", b, "application/x-protobuf")[0], _record(b)).result(10)
    committed = _samples(store)
    assert len(committed) == 3
    _crash(store)

    store = _lazy_store(db)  # recovers 4 and 5, and only those
    assert store.stats.replayed_exports == 2
    per_time = _samples(store)
    assert [t for t, _ in per_time] == [T0 + i * 10**9 for i in range(5)]
    assert per_time[:3] == committed and per_time[3][1] == committed[0][1]  # none twice
    assert _meta_seq(store) == "5"
    assert list(Path(f"{db}.spool").glob("*.spool"))  # the segment for the next appends
    store.close()
    assert not Path(f"{db}.spool").exists()  # a clean stop: everything committed, the spool removed

    store = _lazy_store(db)  # nothing to recover
    assert store.stats.replayed_exports == 0 and _samples(store) == per_time
    store.close()


def test_an_export_whose_rows_cannot_be_committed_is_set_aside_and_the_others_are_stored(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "r.duckdb"
    store = _lazy_store(db)
    real_insert = Store._insert

    def insert_refusing_node_bad(self: Store, cur: Any, parts: dict[str, list[Any]]) -> None:
        for xs in parts.values():
            for x in xs:
                nodes = x.column("node").to_pylist() if isinstance(x, pa.Table) else x.data.get("node", [])
                if "node-bad" in nodes:
                    raise RuntimeError("a row DuckDB refuses")
        real_insert(self, cur, parts)

    monkeypatch.setattr(Store, "_insert", insert_refusing_node_bad)
    good, bad = _bodies(2), _bodies(1, node="node-bad", first_s=7)[0]
    for b in (good[0], bad, good[1]):
        store.submit(decode_export("metrics", b, "application/x-protobuf")[0], _record(b)).result(10)
    store.flush()
    assert [t for t, _ in _samples(store)] == [T0, T0 + 10**9]
    assert store.stats.rejected_exports == 1 and _meta_seq(store) == "3"
    (kept,) = (tmp_path / "r.duckdb.spool" / "rejected").glob("*.pb")
    assert kept.name == f"{2:020d}-metrics.pb" and kept.read_bytes() == bad
    assert "a row DuckDB refuses" in kept.with_suffix(".reason.txt").read_text()
    store.close()
    assert sorted(p.name for p in (tmp_path / "r.duckdb.spool").iterdir()) == ["rejected"]  # kept, the rest gone
    monkeypatch.setattr(Store, "_insert", real_insert)
    store = _lazy_store(db)  # set aside, so not recovered again
    assert store.stats.replayed_exports == 0 and len(_samples(store)) == 2
    store.close()


def test_past_the_backlog_an_export_is_acknowledged_only_by_its_commit(tmp_path: Path) -> None:
    store = _lazy_store(tmp_path / "b.duckdb", spool_backlog_rows=1)
    bodies = _bodies(2)
    first = store.submit(decode_export("metrics", bodies[0], "application/x-protobuf")[0], _record(bodies[0]))
    first.result(10)
    assert store.stats.spooled_exports == 1 and _samples(store) == []
    batch = decode_export("metrics", bodies[1], "application/x-protobuf")[0]
    store.submit(batch, _record(bodies[1])).result(10)  # waits for the commit, which takes the first along
    assert store.stats.spooled_exports == 1 and len(_samples(store)) == 2
    store.close()


def test_a_large_export_is_not_spooled_but_acknowledged_by_its_commit(tmp_path: Path) -> None:
    store = _lazy_store(tmp_path / "l.duckdb", spool_max_rows=150)
    small, large = _bodies(1, gpus=1)[0], _bodies(1, gpus=4, first_s=1)[0]
    small_batch = decode_export("metrics", small, "application/x-protobuf")[0]
    large_batch = decode_export("metrics", large, "application/x-protobuf")[0]
    assert small_batch.row_count() < 150 <= large_batch.row_count()
    store.submit(small_batch, _record(small)).result(10)
    assert store.stats.spooled_exports == 1 and _samples(store) == []
    store.submit(large_batch, _record(large)).result(10)  # committed before it is answered, the small one along
    assert store.stats.spooled_exports == 1 and [t for t, _ in _samples(store)] == [T0, T0 + 10**9]
    store.close()


def test_a_spool_that_cannot_be_written_falls_back_to_acknowledging_on_commit(tmp_path: Path) -> None:
    store = _lazy_store(tmp_path / "f.duckdb")
    spool = store._spool
    assert spool is not None and spool._fd is not None
    os.close(spool._fd)  # the next write fails (EBADF), as on a disk gone read-only
    spool._fd = os.open(os.devnull, os.O_RDONLY)
    body = _bodies(1)[0]
    store.submit(decode_export("metrics", body, "application/x-protobuf")[0], _record(body)).result(10)
    assert store.stats.spooled_exports == 0 and len(_samples(store)) == 1  # committed before it was answered
    assert store.stats.unspooled_exports == 1
    store.close()


def test_gzipped_json_spans_come_back_as_received(tmp_path: Path) -> None:
    """An OTLP/JSON export (gzip on the wire) is kept inflated with its format; after a crash the recovered
    request is the one the receiver decoded, hex ids and all."""
    import gzip

    from tests.test_correlator_ingest import _valid_spans_json

    db = tmp_path / "j.duckdb"
    body = _valid_spans_json()
    batch, record = decode_export("traces", gzip.compress(body), "application/json; charset=utf-8", "gzip")
    assert record == SpoolRecord("traces", "json", body)
    store = _lazy_store(db)
    store.submit(batch, record).result(10)
    _crash(store)
    store = _lazy_store(db)
    assert store.stats.replayed_exports == 1
    with store.reader() as cur:
        assert cur.execute("SELECT trace_id, span_id, ttft_s, output_tokens FROM requests").fetchall() == [
            ("5b8efff798038103d269b633813fc60c", "eee19b7ec3c1b174", 0.25, 11)]
    store.close()
