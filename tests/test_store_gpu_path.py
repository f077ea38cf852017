"""The metrics path into the store: a compiled decoder hands the store its samples as Arrow tables
(``ArrowRows``, string columns dictionary-encoded or plain), which the store turns into ids from the distinct
names only. Whatever form the rows come in, alone or mixed in one group commit, the store keeps exactly what
it keeps for the same rows as lists: the same rows, ids, GPUs, events and summaries; and a transaction that
fails leaves no id behind."""

from __future__ import annotations

import itertools
import math
import struct
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from benchmarks.ingest_throughput import T0, metric_bodies
from collector.signals import CLOCK_EVENT_REASONS
from correlator.ingest import fast_metrics
from correlator.ingest.batch import ArrowRows, IngestBatch, Rows
from correlator.ingest.otlp_metrics import decode_metrics
from correlator.ingest.payload import decode_protobuf, parse_message
from correlator.store import duckdb_store
from correlator.store.duckdb_store import Store
from tests.otlp_wire import fleet_bodies

S = 10**9
Dump = dict[str, list[tuple[object, ...]]]  # every compared table's rows
# what a metrics decoder may hand over as Arrow (engine samples too: the store takes any table so)
ARROW_TABLES = ("gpu_samples", "host_samples", "engine_samples", "placements", "gpu_info")
COMPARED = {  # every table the metrics path writes, in a deterministic order
    "nodes": "node_id", "gpus": "gpu_id", "signals": "signal_id", "gpu_samples": "rowid", "host_samples": "rowid",
    "engine_samples": "rowid", "placements": "rowid", "events": "rowid", "gpu_minutes": "ALL", "gpu_hours": "ALL",
    "host_minutes": "ALL", "engine_minutes": "ALL", "placement_minutes": "ALL",
}


def _lists(batch: IngestBatch) -> IngestBatch:
    """A copy of ``batch`` with every table as plain lists (whatever the decoder made of it)."""
    out = IngestBatch(ignored=batch.ignored)
    for name, rows in batch.tables().items():
        setattr(out, name, Rows(rows.columns, {c: list(rows.data[c]) for c in rows.columns}))
    return out


def _dictionary(values: list[object]) -> pa.Array:
    """Strings as a decoder may encode them: a dictionary in an order of its own (reversed sort, not first
    occurrence) holding a value no row has; a None as a null index."""
    distinct = sorted({str(v) for v in values if v is not None}, reverse=True)
    dictionary = [*distinct[:1], "unused-by-any-row", *distinct[1:]]
    at = {v: i for i, v in enumerate(dictionary)}
    indices = pa.array([None if v is None else at[str(v)] for v in values], pa.int32())
    return pa.DictionaryArray.from_arrays(indices, pa.array(dictionary, pa.string()))


def _arrow_rows(rows: Rows, dictionary: bool, chunks: int = 1) -> ArrowRows:
    """``rows`` as the compiled decoder hands them over: the store's types, strings plain or dictionary-encoded,
    in ``chunks`` chunks (each dictionary chunk with a dictionary of its own)."""
    n = len(rows)
    cuts = [n * k // chunks for k in range(chunks + 1)]
    tables = []
    for lo, hi in itertools.pairwise(cuts):
        part = Rows(rows.columns, {c: rows.data[c][lo:hi] for c in rows.columns})
        t = duckdb_store._arrow(part)
        if dictionary:
            for i, field in enumerate(t.schema):
                if field.type == pa.string():
                    t = t.set_column(i, field.name, _dictionary(part.data[field.name]))
        tables.append(t)
    return ArrowRows(rows.columns, tables[0] if chunks == 1 else pa.concat_tables(tables))


def _as_arrow(batch: IngestBatch, dictionary: bool, chunks: int = 1) -> IngestBatch:
    out = _lists(batch)
    for name in ARROW_TABLES:
        rows = getattr(out, name)
        if len(rows):
            setattr(out, name, _arrow_rows(rows, dictionary, chunks))
    return out


def _extra(node: str, t0: int) -> IngestBatch:
    """What the agent's bodies lack: a GPU known only by its index (null and empty uuid), missing values,
    subs, an XID counter and last-XID gauge that move, throttle transitions, host samples, placements (one of
    a GPU no sample names), identity of a GPU first met in gpu_info, and samples past a minute's grace."""
    b = IngestBatch()
    g = b.gpu_samples
    for k in range(4):
        t = t0 + k * S
        g.append(t, node, None, 3, "gpu_util_ratio", None, 0.5 if k % 2 else None)
        g.append(t, node, "", 5, "power_w", None, 100.0 + k)
        g.append(t, node, None, None, "power_w", None, 90.0)  # named "<node>/gpuNone", as the lists' rows name it
        g.append(t, node, "GPU-extra-a", 0, "nvlink_rx_bytes_per_s", str(k % 2), float(k))
        g.append(t, node, "GPU-extra-a", 0, "xid_events_total", "79", float(k // 2))
        g.append(t, node, "GPU-extra-a", 0, "xid_last", None, [0.0, 31.0, 31.0, 43.0][k])
        g.append(t, node, "GPU-extra-a", 0, "clock_event_reasons", None, float([0x1, 0x8, 0x8 | 0x20, 0x1][k]))
        g.append(t, node, "GPU-extra-b", None, "clock_event_reasons", "reason", float(0x4 * (k % 2)))
    g.append(t0 + 200 * S, node, "GPU-extra-a", 0, "gpu_temp_c", None, 61.0)  # summaries of the minutes before
    h = b.host_samples
    for k in range(3):
        h.append(t0 + k * S, node, "cpu_util_ratio", f"cpu{k}", None if k == 1 else 0.25 * k)
        h.append(t0 + k * S, "host-only-node", "mem_used_bytes", None, 1e9 + k)
    h.append(t0 + 200 * S, node, "cpu_util_ratio", "cpu0", 0.5)
    e = b.engine_samples
    for k in range(3):
        e.append(t0 + k * S, node, "vllm", "m" if k else None, 4242 if k else None, "num_requests_running", float(k))
    e.append(t0 + 200 * S, node, "vllm", "m", 4242, "num_requests_running", None)
    p = b.placements
    p.append(t0, node, "GPU-extra-a", 4242, "c1", "uid-1", "pod-a", "ns", "main", 2e9)
    p.append(t0, node, "GPU-only-placed", None, None, None, None, None, None, None)
    p.append(t0 + S, node, "GPU-extra-a", 4243, "c2", "uid-2", "pod-b", "ns", None, 1e9)
    i = b.gpu_info
    i.append(t0, node, "GPU-only-info", 7, "NVIDIA A100", "00000000:07:00.0", "nvidia7")
    i.append(t0, node, "GPU-extra-b", None, None, "00000000:99:00.0", None)  # what is missing stays as it was
    i.append(t0, node, "GPU-extra-a", 0, "NVIDIA H100", None, "nvidia0")
    i.append(t0 + S, node, "GPU-extra-a", 0, "NVIDIA H100 80GB", "00000000:18:00.0", "nvidia0")  # the latest wins
    return b


def _batches() -> list[IngestBatch]:
    bodies, _ = metric_bodies(20)
    agent = [_lists(decode_protobuf("metrics", body)) for body in bodies]
    return [agent[0], _extra("node-2", T0 + 5 * S), agent[1], _extra("node-0", T0 + 7 * S)]


def _bits(v: object) -> object:
    return struct.pack("<d", v) if isinstance(v, float) else v


def _dump(store: Store) -> Dump:
    store.catch_up_rollups()
    with store.reader() as cur:
        return {t: [tuple(_bits(v) for v in row) for row in cur.execute(f"SELECT * FROM {t} ORDER BY {o}").fetchall()]
                for t, o in COMPARED.items()}


def _commit_together(store: Store, batches: list[IngestBatch]) -> list[Future[None]]:
    """The batches in one group commit, as the writer makes it when they arrive together."""
    taken: list[tuple[IngestBatch, Future[None]]] = [(b, Future()) for b in batches]
    with store._write_lock:
        store._commit(taken)
    return [f for _, f in taken]


@pytest.fixture(scope="module")
def batches() -> list[IngestBatch]:
    return _batches()


@pytest.fixture(scope="module")
def reference(batches: list[IngestBatch], tmp_path_factory: pytest.TempPathFactory) -> Dump:
    """What the store keeps of the batches as lists, in one group commit."""
    store = Store(tmp_path_factory.mktemp("ref") / "s.duckdb", linger_s=0.0)
    try:
        assert all(f.result(0) is None for f in _commit_together(store, [_lists(b) for b in batches]))
        return _dump(store)
    finally:
        store.close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "s.duckdb", linger_s=0.0)
    yield s
    s.close()


def test_the_reference_holds_every_case(reference: Dump) -> None:
    names = {row[1] for row in reference["gpus"]}
    assert {"node-2/gpu3", "node-2/gpu5", "node-0/gpu3", "GPU-only-placed", "GPU-only-info"} <= names
    kinds = {(row[3], row[4]) for row in reference["events"]}
    assert ("xid", 79) in kinds and ("xid", 31) in kinds and ("xid", 43) in kinds
    assert any(row[3] == "throttle" for row in reference["events"])
    assert any(row[4] is None for row in reference["gpu_samples"]) and any(row[3] for row in reference["gpu_samples"])
    assert "node-2/gpuNone" in names
    assert reference["gpu_minutes"] and reference["host_minutes"] and reference["engine_minutes"]
    assert reference["placements"] and reference["engine_samples"]
    assert ("NVIDIA H100 80GB", "00000000:18:00.0") in {(row[4], row[5]) for row in reference["gpus"]}


@pytest.mark.parametrize(("dictionary", "chunks"), [(True, 1), (False, 1), (True, 3)],
                         ids=["dictionary", "plain", "dictionary-chunked"])
def test_arrow_batches_in_one_commit_are_stored_as_their_lists(
        store: Store, batches: list[IngestBatch], reference: Dump, dictionary: bool, chunks: int) -> None:
    arrow = [_as_arrow(b, dictionary, chunks) for b in batches]
    assert isinstance(arrow[0].gpu_samples, ArrowRows)
    assert all(f.result(0) is None for f in _commit_together(store, arrow))
    assert _dump(store) == reference
    # the store read the tables as they are: a caller's batch is still whole (a retry sends the same)
    assert all(b.gpu_samples.table is not None for b in arrow if isinstance(b.gpu_samples, ArrowRows))
    assert store.stats.rows == sum(b.row_count() for b in batches) and store.stats.transactions == 1


def test_a_group_commit_of_lists_dictionary_and_plain_arrow_is_stored_as_the_lists(
        store: Store, batches: list[IngestBatch], reference: Dump) -> None:
    forms = [_lists(batches[0]), _as_arrow(batches[1], True), _as_arrow(batches[2], False),
             _as_arrow(batches[3], True)]
    forms[3].host_samples = _lists(batches[3]).host_samples  # one table of a batch as lists, the others Arrow
    assert all(f.result(0) is None for f in _commit_together(store, forms))
    assert _dump(store) == reference


@pytest.mark.skipif(not fast_metrics.available(), reason="the compiled metrics decoder is not built")
def test_the_compiled_decoders_tables_are_stored_as_the_reference_decoders_lists(tmp_path: Path) -> None:
    bodies = fleet_bodies("xid_failure", 20) + fleet_bodies("power_cap", 20)
    dumps = []
    for k, arrow in enumerate((False, True)):
        s = Store(tmp_path / f"{k}.duckdb", linger_s=0.0)
        try:
            batches = []
            for body in bodies:
                fast = fast_metrics.decode(body) if arrow else None
                if arrow:
                    assert fast is not None and isinstance(fast.gpu_samples, ArrowRows)
                batches.append(fast or decode_metrics(parse_message("metrics", body, "protobuf")))
            for i in range(0, len(batches), 6):  # group commits, and the last ones one by one
                if i < len(batches) // 2:
                    assert all(f.result(0) is None for f in _commit_together(s, batches[i:i + 6]))
                else:
                    for b in batches[i:i + 6]:
                        s.write(b)
            dumps.append(_dump(s))
        finally:
            s.close()
    assert dumps[0] == dumps[1]
    assert {row[3] for row in dumps[0]["events"]} == {"xid", "throttle"}


def test_batches_written_one_by_one_are_stored_alike(tmp_path: Path, batches: list[IngestBatch]) -> None:
    dumps = []
    for k, form in enumerate(("lists", "dictionary", "plain")):
        s = Store(tmp_path / f"{k}.duckdb", linger_s=0.0)
        try:
            for b in batches:
                s.write(_lists(b) if form == "lists" else _as_arrow(b, form == "dictionary"))
            dumps.append(_dump(s))
        finally:
            s.close()
    assert dumps[0] == dumps[1] == dumps[2]


@pytest.mark.parametrize("form", ["lists", "dictionary"])
def test_a_failed_transaction_leaves_no_ids_and_the_next_one_numbers_as_if_it_never_was(
        tmp_path: Path, batches: list[IngestBatch], form: str) -> None:
    def as_form(b: IngestBatch) -> IngestBatch:
        return _lists(b) if form == "lists" else _as_arrow(b, True)

    bad = _extra("node-bad", T0)  # new node, GPUs and signals, and a sample without a time: refused
    bad.gpu_samples.append(T0, "node-bad", "GPU-bad", 1, "a_new_signal", None, 1.0)
    bad.gpu_samples.data["time_ns"][-1] = None
    dumps = []
    for k, fail in enumerate((False, True)):
        s = Store(tmp_path / f"{form}{k}.duckdb", linger_s=0.0)
        try:
            s.write(as_form(batches[0]))
            if fail:
                ids = {name: dict(m) for name, m in s._ids.items()}
                info = dict(s._gpu_info)
                futures = _commit_together(s, [as_form(batches[1]), as_form(bad)])
                assert all(isinstance(f.exception(0), duckdb_store.StoreError) for f in futures)
                assert s._ids == ids and s._gpu_info == info and s.stats.failed_transactions == 1
            s.write(as_form(batches[2]))
            s.write(as_form(batches[3]))
            dumps.append(_dump(s))
        finally:
            s.close()
    assert dumps[0] == dumps[1]


def test_first_rows_of_codes_in_any_order() -> None:
    rng = np.random.default_rng(3)
    for n, k in ((0, 1), (1, 1), (50, 3), (500, 40)):
        codes = rng.integers(-1, k, size=n)  # -1: a null
        expected = []
        seen: set[int] = set()
        for row, c in enumerate(codes.tolist()):
            if c >= 0 and c not in seen:
                seen.add(c)
                expected.append(row)
        assert duckdb_store._first_rows(codes).tolist() == expected
        order: dict[int, int] = {}  # renumbered in order of first occurrence: the fast way
        renumbered = np.array([-1 if c < 0 else order.setdefault(c, len(order)) for c in codes.tolist()],
                              dtype=np.int64)
        assert duckdb_store._first_rows(renumbered).tolist() == expected


def test_used_values_are_those_rows_have() -> None:
    enc = _dictionary(["b", None, "a", "b"])
    assert sorted(duckdb_store._used(enc), key=repr) == sorted(["a", "b", None], key=repr)
    assert sorted(duckdb_store._used(_dictionary(["x"])), key=repr) == ["x"]


def _events_as_before(rows: list[dict[str, object]], sig_ids: dict[str, int], last_mask: dict[int, int],
                      last_xid: dict[tuple[int, str], float]) -> list[tuple[object, ...]]:
    """Events of a gpu_samples view's rows (``view.to_pylist()``) as the store derived them value by value
    before it derived them in numpy: the reference (GPUs on no node: node 0)."""
    by_id = {v: k for k, v in sig_ids.items()}
    wanted = {sig_ids[n] for n in ("clock_event_reasons", "xid_events_total", "xid_last") if n in sig_ids}
    events: list[tuple[object, ...]] = []
    for row in sorted((r for r in rows if r["signal_id"] in wanted), key=lambda r: r["time_ns"]):  # type: ignore[arg-type,return-value]
        v: Any = row["value"]
        if v is None or not math.isfinite(v) or (row["signal_id"] != sig_ids.get("xid_events_total")
                                                 and abs(v) >= 2**31):
            continue  # no reading: no mask, count or XID (nor an INTEGER event code)
        gid: Any = row["gpu_id"]
        t, name, sub = row["time_ns"], by_id[row["signal_id"]], row["sub"]  # type: ignore[index]
        if name == "clock_event_reasons":
            m = int(v) & ~1
            prev = last_mask.get(gid, 0)
            if m != prev:
                added = [r for bit, r in CLOCK_EVENT_REASONS.items() if m & bit and not prev & bit]
                events.append((t, 0, gid, "throttle", m, ",".join(added) if added else "cleared"))
            last_mask[gid] = m
        else:
            key = (gid, str(sub) if name == "xid_events_total" else "last")
            prev_v = last_xid.get(key)
            last_xid[key] = v
            if name == "xid_events_total" and (prev_v is None or v > prev_v):
                code = str(sub or 0)
                events.append((t, 0, gid, "xid", int(code) if code.lstrip("-").isdecimal() else None, None))
            elif name == "xid_last" and v not in (0, prev_v):
                events.append((t, 0, gid, "xid", int(v), None))
    return events


def _derived_events(store: Store, view: pa.Table, sig_ids: dict[str, int], columns: str) -> list[tuple[Any, ...]]:
    """The events ``_derive_events`` makes of ``view`` (``columns`` of them, in the order written)."""
    cur = store.cursor()
    try:
        cur.execute("DELETE FROM events")
        store._derive_events(cur, view, sig_ids)
        return cur.execute(f"SELECT {columns} FROM events ORDER BY rowid").fetchall()
    finally:
        cur.close()


def test_events_are_derived_as_value_by_value(store: Store) -> None:
    """Random masks (repeated, cleared, idle bit), XIDs (missing, NaN, going back), ties in time, several GPUs
    and the state carried from one view to the next: the same events and state as the value-by-value loop."""
    sig_ids = {"clock_event_reasons": 1, "xid_events_total": 2, "xid_last": 3, "gpu_util_ratio": 4}
    rng = np.random.default_rng(11)
    choices = {1: [0.0, 1.0, 8.0, 9.0, 32.0, 40.0, 41.0, None], 2: [0.0, 1.0, 2.0, 1.0, float("nan"), None, 3.0],
               3: [0.0, 31.0, 31.0, 43.0, None], 4: [0.5, float("nan"), None]}  # a NaN mask or last XID: see below
    last_mask: dict[int, int] = {}
    last_xid: dict[tuple[int, str], float] = {}
    for round_ in range(6):
        n = int(rng.integers(0, 300))
        sids = rng.integers(1, 5, size=n).tolist()
        values = [choices[s][int(rng.integers(len(choices[s])))] for s in sids]
        view = pa.table({
            "time_ns": pa.array((T0 + rng.integers(0, 40, size=n) * S).tolist(), pa.int64()),
            "gpu_id": pa.array(rng.integers(1, 4, size=n).tolist(), pa.int32()),
            "signal_id": pa.array(sids, pa.int16()),
            "sub": _dictionary([["79", "48", None][int(rng.integers(3))] if s == 2 else None for s in sids]),
            "value": pa.array(values, pa.float64())})
        if round_ % 2:  # as a group commit's view: parts, one chunk each
            view = pa.concat_tables([view.slice(0, n // 2), view.slice(n // 2)])
        expected = _events_as_before(view.to_pylist(), sig_ids, last_mask, last_xid)
        got = _derived_events(store, view, sig_ids, "*")
        assert [tuple(_bits(v) for v in e) for e in got] == [tuple(_bits(v) for v in e) for e in expected]
        assert store._last_mask == last_mask
        assert {k: _bits(v) for k, v in store._last_xid.items()} == {k: _bits(v) for k, v in last_xid.items()}
    # a reading that is no mask or XID (NaN, infinite, past 32 bits) or a per-XID counter whose label names no number
    # fails nothing: the transaction of everything committed with it would otherwise fail on every retry
    odd = pa.table({"time_ns": pa.array([T0 + 100 * S] * 5, pa.int64()), "gpu_id": pa.array([1] * 5, pa.int32()),
                    "signal_id": pa.array([1, 3, 1, 3, 2], pa.int16()),
                    "sub": pa.array([None, None, None, None, "x9"], pa.string()),
                    "value": pa.array([float("nan"), float("inf"), 2.0**40, -(2.0**33), 1e6])})
    mask_before = dict(store._last_mask)
    got = _derived_events(store, odd, sig_ids, "kind, code")
    assert store._last_mask == mask_before
    assert got == [("xid", None)]  # the counter's first reading: an XID, of no code
    assert store._last_xid[(1, "x9")] == 1e6
