"""The span path into the store: the compiled decoder hands the store its rows as one Arrow table in the
store's own form (``StoredRequests``), which the store writes as it is, alone or in a group commit with
batches of lists; every value comes back exactly, a re-sent span is stored once (an exact (trace, span)
comparison behind a hash filter, and behind the writer's memory of the keys it stored lately), and a
transaction that fails stores nothing of any batch in it."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

from correlator.ingest import fast_spans
from correlator.ingest.batch import REQUEST_COLUMNS, STORED_REQUEST_COLUMNS, ArrowRows, IngestBatch, StoredRequests
from correlator.ingest.otlp_spans import decode_spans
from correlator.store import duckdb_store
from correlator.store.duckdb_store import Store, StoreError

T0 = 1_790_000_000_000_000_000
needs_fast_path = pytest.mark.skipif(not fast_spans.available(), reason="the compiled span decoder is not built")


def _kv(key: str, value: object) -> KeyValue:
    if isinstance(value, str):
        return KeyValue(key=key, value=AnyValue(string_value=value))
    if isinstance(value, float):
        return KeyValue(key=key, value=AnyValue(double_value=value))
    assert isinstance(value, int)
    return KeyValue(key=key, value=AnyValue(int_value=value))


def _body(spans: list[tuple[int, int, int, int]], node: str = "node-1", output_tokens: int = 20) -> bytes:
    """An export of request spans, each (trace hi, trace lo, span id, start offset in ms) as 64-bit words."""
    out = []
    for hi, lo, sid, ms in spans:
        start = T0 + ms * 10**6
        out.append(Span(
            trace_id=struct.pack(">QQ", hi, lo), span_id=struct.pack(">Q", sid), name="llm_request",
            start_time_unix_nano=start, end_time_unix_nano=start + 10**9 + ms,
            attributes=[_kv("gen_ai.latency.time_to_first_token", 0.1 + ms / 1e4),
                        _kv("gen_ai.latency.time_in_queue", ms / 1e5),
                        _kv("gen_ai.usage.completion_tokens", output_tokens),
                        _kv("gen_ai.usage.prompt_tokens", 100 + ms),
                        _kv("gen_ai.request.id", f"cmpl-{hi:016x}{sid:016x}"),
                        _kv("gen_ai.response.model", "m" if ms % 3 else "m2")]))
    req = ExportTraceServiceRequest(resource_spans=[ResourceSpans(
        resource=Resource(attributes=[_kv("host.name", node), _kv("service.name", "vllm")]),
        scope_spans=[ScopeSpans(spans=out)])])
    return req.SerializeToString()


def _reference(body: bytes) -> IngestBatch:
    return decode_spans(ExportTraceServiceRequest.FromString(body))


def _fast(body: bytes) -> IngestBatch:
    batch = fast_spans.decode(body)
    assert batch is not None, "the compiled decoder declined a plain export"
    return batch


def _bits(v: object) -> object:
    return struct.pack("<d", v) if isinstance(v, float) else v


def _rows(batch: IngestBatch) -> list[tuple[object, ...]]:
    r = batch.requests
    return sorted((tuple(_bits(r.data[c][i]) for c in REQUEST_COLUMNS) for i in range(len(r))), key=repr)


def _stored(store: Store) -> list[tuple[object, ...]]:
    cols = ", ".join(f"r.{c}" if c != "node" else "n.name" for c in REQUEST_COLUMNS)
    with store.reader() as cur:
        rows = cur.execute(f"SELECT {cols} FROM requests r JOIN nodes n USING (node_id)").fetchall()
    return sorted((tuple(_bits(v) for v in row) for row in rows), key=repr)


def _commit_together(store: Store, batches: list[IngestBatch]) -> list[Future[None]]:
    """The batches in one group commit, as the writer makes it when they arrive together."""
    taken: list[tuple[IngestBatch, Future[None]]] = [(b, Future()) for b in batches]
    with store._write_lock:
        store._commit(taken)
    return [f for _, f in taken]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "s.duckdb", linger_s=0.0)
    yield s
    s.close()


SPANS = [(0xA000 + i, 0xB000 + 7 * i, 0xC000 + 3 * i, i) for i in range(40)]


@needs_fast_path
def test_the_decoder_gives_an_arrow_table_of_the_stores_types_and_the_same_lists_to_whoever_reads_them() -> None:
    body = _body(SPANS)
    fast, ref = _fast(body), _reference(body)
    assert isinstance(fast.requests, StoredRequests)
    table = fast.requests.table
    assert table is not None and len(fast.requests) == 40 and fast.row_count() == 40
    assert table.column_names == list(STORED_REQUEST_COLUMNS)
    # already what the store makes of the lists (request_rows): the same schema and values, so the two can
    # share a commit; ids as words, the request ids split, every latency derivable from the others flagged
    ids = {"node-1": 7}
    want = duckdb_store._stored_requests(duckdb_store._arrow(ref.requests), ids)
    assert duckdb_store._stored_requests(table, ids).equals(want, check_metadata=True)
    assert table["trace_text"].null_count == 40 and table["request_form"].null_count == 0
    assert all(d & (2 | 4 | 8) == 2 | 4 | 8 for d in table["derived"].to_pylist())
    assert fast.requests.data == ref.requests.data
    assert fast.requests.table is None  # read as lists: the lists are the rows from now on


def test_arrow_rows_changed_through_their_lists_are_stored_as_changed(store: Store) -> None:
    ref = _reference(_body(SPANS[:5]))
    rows = ArrowRows(REQUEST_COLUMNS, duckdb_store._arrow(ref.requests))
    rows.data["request_id"][0] = "changed"  # a caller edits the lists: the table must not be stored instead
    rows.append(*(ref.requests.data[c][1] for c in REQUEST_COLUMNS[:6]), "f" * 32, "e" * 16,
                *(ref.requests.data[c][1] for c in REQUEST_COLUMNS[8:]))
    assert rows.table is None and len(rows) == 6
    batch = IngestBatch()
    batch.requests = rows
    store.write(batch)
    stored = _stored(store)
    assert len(stored) == 6 and _rows(batch) == stored
    assert any(r[REQUEST_COLUMNS.index("request_id")] == "changed" for r in stored)
    with pytest.raises(ValueError, match="columns"):
        ArrowRows(("start_ns",), duckdb_store._arrow(ref.requests))


@needs_fast_path
def test_a_group_commit_of_arrow_and_list_batches_stores_every_value_exactly(store: Store) -> None:
    a = _fast(_body(SPANS[:20]))
    b = _reference(_body(SPANS[20:30], node="node-2"))  # lists (the JSON path, importers)
    c = _fast(_body(SPANS[30:], node="node-3", output_tokens=1))
    futures = _commit_together(store, [a, b, c])
    assert all(f.result(0) is None for f in futures)
    want = sorted(_rows(_reference(_body(SPANS[:20]))) + _rows(b)
                  + _rows(_reference(_body(SPANS[30:], node="node-3", output_tokens=1))), key=repr)
    assert _stored(store) == want
    assert store.stats.rows == 40 and store.stats.transactions == 1


@needs_fast_path
def test_a_re_sent_export_is_stored_once_and_only_its_new_spans_are_added(store: Store) -> None:
    store.write(_fast(_body(SPANS[:10])))
    store.write(_fast(_body(SPANS[:10])))  # retried whole
    # retried with new spans, and near misses: the same trace with another span, the same span id in another
    # trace, a trace differing only in its high word
    near = [(SPANS[0][0], SPANS[0][1], 0xFFFF, 0), (0x1, SPANS[1][1], SPANS[1][2], 1),
            (SPANS[2][0] + 1, SPANS[2][1], SPANS[2][2], 2)]
    store.write(_fast(_body(SPANS[5:15] + near)))
    stored = _stored(store)
    assert len(stored) == 18
    want = sorted(_rows(_reference(_body(SPANS[:15] + near))), key=repr)
    assert stored == want


@needs_fast_path
def test_new_spans_skip_the_probe_of_stored_keys_and_a_re_sent_export_is_still_stored_once(store: Store) -> None:
    """The writer remembers the keys it stored lately: new spans are stored without asking DuckDB which keys
    it has; a re-sent one is found in that memory and checked exactly."""
    for k in range(4):
        store.write(_fast(_body(SPANS[10 * k:10 * k + 10])))
    assert store.stats.key_probes == 0
    store.write(_fast(_body(SPANS[5:15])))  # retried: the probe, which finds them
    assert store.stats.key_probes == 1
    assert _stored(store) == sorted(_rows(_reference(_body(SPANS))), key=repr)


@needs_fast_path
@pytest.mark.parametrize("generation", [3, 1 << 17])
def test_spans_stored_before_a_restart_or_forgotten_since_are_probed(tmp_path: Path, generation: int) -> None:
    """What the writer does not remember (stored before it started, or dropped from its memory since) is
    probed in DuckDB: a re-sent export of it is stored once."""
    path = tmp_path / "s.duckdb"
    s = Store(path, linger_s=0.0)
    s._recent_keys = duckdb_store._RecentKeys(-2**63, generation=generation)
    for k in range(4):
        s.write(_fast(_body(SPANS[10 * k:10 * k + 10])))
    forgotten = generation < 10
    assert s._recent_keys.covered_from_ns > T0 if forgotten else s._recent_keys.covered_from_ns == -2**63
    s.write(_fast(_body(SPANS[:10])))  # the oldest: forgotten with a small memory, found in a large one
    assert s.stats.key_probes == 1 and len(_stored(s)) == 40
    s.close()
    s = Store(path, linger_s=0.0)
    try:
        s.write(_fast(_body([*SPANS[30:40], (0x77, 0x78, 0x79, 39)])))  # stored before the restart, and one new
        s.write(_fast(_body([(0x77, 0x78, 0x7A, 41)])))  # after everything stored: nothing to probe
        assert s.stats.key_probes == 1
        want = [*SPANS, (0x77, 0x78, 0x79, 39), (0x77, 0x78, 0x7A, 41)]
        assert _stored(s) == sorted(_rows(_reference(_body(want))), key=repr)
    finally:
        s.close()


@needs_fast_path
def test_a_future_its_submitter_cancelled_does_not_stop_the_writer(store: Store) -> None:
    """A receiver that stops waiting (its timeout) cancels the future it awaited; the writer then commits the
    batch all the same and goes on with the next ones instead of dying of a future it cannot resolve."""
    with store._write_lock:  # the writer cannot commit until the future is cancelled
        given_up = store.submit(_fast(_body(SPANS[:10])))
        assert given_up.cancel()
    store.write(_fast(_body(SPANS[10:20])))  # would time out with the writer thread gone
    assert _stored(store) == sorted(_rows(_reference(_body(SPANS[:20]))), key=repr)


@needs_fast_path
def test_the_writer_outlives_a_failed_summary_step_and_a_commit_that_raises(store: Store,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever raises in the writer's loop (a summary step's unguarded read, a bug in a group commit) is
    logged and counted; the writer goes on, and a batch whose commit raised is answered with the error rather
    than left waiting for ever."""
    calls = {"rollup": 0, "commit": 0}
    real_commit = store._commit

    def failing_rollup() -> bool:
        calls["rollup"] += 1
        raise RuntimeError("summary step broke")

    def commit_failing_once(taken: list[tuple[IngestBatch, Future[None]]]) -> None:
        calls["commit"] += 1
        if calls["commit"] == 1:
            raise RuntimeError("commit broke before its transaction")
        real_commit(taken)

    monkeypatch.setattr(store, "_roll_up_requests_step", failing_rollup)
    monkeypatch.setattr(store, "_commit", commit_failing_once)
    with pytest.raises(StoreError, match="commit broke"):
        store.write(_fast(_body(SPANS[:10])), timeout_s=10)
    store.write(_fast(_body(SPANS[10:20])), timeout_s=10)  # would time out with the writer thread gone
    # a write is answered at its commit, before the summary step after it: one more turn of the writer's loop
    # (its commit comes after that step) makes the second step certain
    store.flush(timeout_s=10)
    assert calls["rollup"] >= 2 and store.stats.failed_rollups >= 2 and store.stats.failed_transactions == 1
    assert _stored(store) == sorted(_rows(_reference(_body(SPANS[10:20]))), key=repr)


def test_a_rolled_back_transaction_leaves_no_keys_in_the_writers_memory() -> None:
    keys = duckdb_store._RecentKeys(100)
    h = np.array([1, 2, 3], dtype=np.uint64)
    keys.stage(h, 500)
    assert keys.none_stored(100, h)  # not committed yet
    keys.rolled_back()
    keys.committed()
    assert keys.none_stored(100, h)
    keys.stage(h, 500)
    keys.committed()
    assert not keys.none_stored(100, h[:1]) and keys.none_stored(100, np.array([4], dtype=np.uint64))
    assert not keys.none_stored(99, np.array([4], dtype=np.uint64))  # before what it covers


def test_a_re_sent_export_spanning_a_long_range_of_starts_is_stored_once(store: Store) -> None:
    """An agent's buffered export after an outage: old and new spans in one batch, 20 minutes apart (the
    duplicate probe then runs in DuckDB, not over every stored key of the range in numpy)."""
    late = [(s[0], s[1], s[2], s[3] + 20 * 60 * 1000) for s in SPANS[10:14]]
    assert duckdb_store._PROBE_IN_PYTHON_NS < 20 * 60 * 10**9
    store.write(_fast(_body(SPANS[:6] + late)))
    store.write(_fast(_body(SPANS[:8] + late)))  # retried, with two new old spans
    stored = _stored(store)
    assert len(stored) == 12
    assert stored == sorted(_rows(_reference(_body(SPANS[:8] + late))), key=repr)


def test_an_export_and_its_retry_in_one_group_commit_are_stored_once(store: Store) -> None:
    """A client retries an export the writer has not committed yet: both land in one transaction."""
    first, retry = _fast(_body(SPANS[:6])), _fast(_body(SPANS[3:9]))
    lists = _reference(_body(SPANS[:2]))  # and a batch of lists with two of the same spans
    assert all(f.exception() is None for f in _commit_together(store, [first, retry, lists]))
    stored = _stored(store)
    assert stored == sorted(_rows(_reference(_body(SPANS[:9]))), key=repr)


@needs_fast_path
def test_a_span_whose_key_hash_equals_a_stored_ones_is_not_taken_for_it(store: Store) -> None:
    hi, lo, sid = 0x1234, 0x5678, 0x9ABC
    hi2, sid2 = 0x4321, 0xCBA9
    m0, m1 = (int(x) for x in duckdb_store._MIX)
    mask = 2**64 - 1
    lo2 = (lo ^ (hi * m0 & mask) ^ (sid * m1 & mask)) ^ (hi2 * m0 & mask) ^ (sid2 * m1 & mask)
    words = [np.array([x], dtype=np.uint64) for x in (hi, lo, sid)]
    other = [np.array([x], dtype=np.uint64) for x in (hi2, lo2, sid2)]
    assert duckdb_store._key_hash(*words)[0] == duckdb_store._key_hash(*other)[0]  # a collision indeed
    table = pa.table({"trace_hi": pa.array(other[0]), "trace_lo": pa.array(other[1]), "span_bin": pa.array(other[2])})
    stored = {"trace_hi": words[0], "trace_lo": words[1], "span_bin": words[2]}
    assert not duckdb_store._stored_already(duckdb_store._key_words(table), stored).any()
    assert duckdb_store._stored_already(duckdb_store._key_words(table),
                                         {k: table[k].to_numpy() for k in stored}).all()
    # within one batch: the colliding keys are both kept, a true repeat is not (the first of it is)
    batch = [np.array([hi, hi2, hi, 7], dtype=np.uint64), np.array([lo, lo2, lo, 8], dtype=np.uint64),
             np.array([sid, sid2, sid, 9], dtype=np.uint64)]
    repeated = duckdb_store._repeated_in_batch((batch[0], batch[1], batch[2]))
    assert repeated is not None and repeated.tolist() == [False, False, True, False]
    assert duckdb_store._repeated_in_batch((batch[0][:2], batch[1][:2], batch[2][:2])) is None
    store.write(_fast(_body([(hi, lo, sid, 0), (1, 2, 3, 5)])))
    store.write(_fast(_body([(hi2, lo2, sid2, 1), (1, 2, 3, 5)])))  # the collision is new, (1, 2, 3) is not
    assert len(_stored(store)) == 3


@needs_fast_path
def test_a_failed_group_commit_stores_nothing_of_its_arrow_batches(store: Store) -> None:
    good = _fast(_body(SPANS[:10]))
    bad = _reference(_body(SPANS[10:12]))
    bad.requests.data["prompt_tokens"] = [2**40, 1]  # over the INTEGER column (an importer's): the commit fails
    futures = _commit_together(store, [good, bad])
    for f in futures:
        with pytest.raises(StoreError):
            f.result(0)
    assert _stored(store) == [] and store.stats.failed_transactions == 1
    assert isinstance(good.requests, ArrowRows) and good.requests.table is not None  # still whole: a retry
    store.write(good)
    assert _stored(store) == _rows(_reference(_body(SPANS[:10])))


def _ids(rng: np.random.Generator, n: int, kind: str, odd_share: float) -> list[str | None]:
    """Ids of one shape a batch, with ``odd_share`` of others: upper case, a wrong character, one shorter,
    None."""
    out: list[str | None] = []
    for _ in range(n):
        digits = "".join(rng.choice(list("0123456789abcdef"), 32))
        x: str | None = {"trace": digits, "span": digits[:16], "request": f"cmpl-{digits}",
             "uuid": f"chatcmpl-{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}",
             "suffixed": f"cmpl-{digits}-0"}[kind]
        odd = rng.random() / odd_share if odd_share else 1.0
        if odd < 0.3:
            assert x is not None
            x = x.upper()
        elif odd < 0.6:
            assert x is not None
            i = int(rng.integers(0, len(x)))
            x = x[:i] + "g" + x[i + 1:]
        elif odd < 0.8:
            assert x is not None
            x = x[:-1]
        elif odd < 1.0:
            x = None
        out.append(x)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_ids_read_as_one_block_are_the_words_read_digit_by_digit(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 300))
    clean = seed % 2 == 0  # every id of the usual shape (the block path), or a few odd ones among them
    kinds = ("request", "uuid", "suffixed")[seed % 3]

    def column(kind: str) -> list[str | None]:
        return _ids(rng, n, kind, 0.0 if clean else 0.1)

    table = pa.table({
        "start_ns": pa.array(np.arange(n, dtype=np.int64) + T0), "end_ns": pa.array(np.arange(n, dtype=np.int64) + T0),
        "node_id": pa.array(np.ones(n, dtype=np.int32)), **{c: pa.nulls(n, pa.string())
                                                             for c in ("service", "model", "engine")},
        "trace_id": pa.array(column("trace"), pa.string()), "span_id": pa.array(column("span"), pa.string()),
        "request_id": pa.array(column(kinds), pa.string()),
        **{c: pa.nulls(n, pa.float64()) for c in ("ttft_s", "tpot_s", "e2e_s", "queue_s", "prefill_s", "decode_s",
                                                  "inference_s")},
        "prompt_tokens": pa.nulls(n, pa.int32()), "output_tokens": pa.nulls(n, pa.int32()),
        "finish_reason": pa.nulls(n, pa.string()), "pid": pa.nulls(n, pa.int32()),
        **{c: pa.nulls(n, pa.string()) for c in ("container_id", "pod_uid", "pod", "namespace", "gpu_uuids")}})
    fast = duckdb_store.request_rows(table)
    used: list[bool] = []
    block = duckdb_store._hex_words_evenly_spaced

    def spy(*a: object, **k: object) -> object:
        r = block(*a, **k)  # type: ignore[arg-type]
        used.append(r is not None)
        return r

    monkeypatch.setattr(duckdb_store, "_hex_words_evenly_spaced", spy)
    duckdb_store.request_rows(table)
    if clean:
        assert used and all(used[:2])  # trace and span ids of one length: read as one block
    monkeypatch.setattr(duckdb_store, "_hex_words_evenly_spaced", lambda *a, **k: None)
    assert duckdb_store.request_rows(table).equals(fast)
