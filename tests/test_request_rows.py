"""Requests are stored compactly (``request_rows``: hex ids as numbers, latencies that equal their derivation
not stored) and read through the view ``requests`` exactly as they were written: every id character for
character, every latency bit for bit. A store of schema 1 (``requests`` a table) is migrated on open."""

from __future__ import annotations

import math
import random
import struct
from pathlib import Path
from typing import Any

import duckdb
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

from correlator.ingest.batch import REQUEST_COLUMNS, IngestBatch
from correlator.ingest.files import read_parquet
from correlator.ingest.otlp_spans import decode_spans
from correlator.store.duckdb_store import Store, StoreError
from correlator.store.schema import SCHEMA_VERSION

T0 = 1_790_000_000_000_000_000
LATENCIES = ("ttft_s", "tpot_s", "e2e_s", "queue_s", "prefill_s", "decode_s", "inference_s")


def _bits(v: object) -> object:
    """A value compared bit for bit: floats by their IEEE representation (-0.0 is not 0.0)."""
    return struct.pack("<d", v) if isinstance(v, float) else v


def _stored(store: Store) -> list[tuple[object, ...]]:
    cols = ", ".join(f"r.{c}" if c != "node" else "n.name" for c in REQUEST_COLUMNS)
    with store.reader() as cur:
        rows = cur.execute(f"SELECT {cols} FROM requests r JOIN nodes n USING (node_id)").fetchall()
    return sorted((tuple(_bits(v) for v in row) for row in rows), key=repr)


def _expected(batch: IngestBatch) -> list[tuple[object, ...]]:
    r = batch.requests
    rows = [tuple(_bits(r.data[c][i]) for c in REQUEST_COLUMNS) for i in range(len(r))]
    return sorted(rows, key=repr)


def _row(i: int, **kw: Any) -> dict[str, Any]:
    queue, prefill, decode, out = 0.001 * i, 0.05 + 0.001 * i, 0.3 + 0.01 * i, 10 + i
    start = T0 + i * 10**6
    end = start + 10**9 + i
    row: dict[str, Any] = {
        "start_ns": start, "end_ns": end, "node": "node-1", "service": "vllm", "model": "m", "engine": "vllm",
        "trace_id": f"{random.Random(i).getrandbits(128):032x}", "span_id": f"{random.Random(-i).getrandbits(64):016x}",
        "request_id": f"cmpl-{random.Random(2 * i).getrandbits(128):032x}",
        "ttft_s": queue + prefill, "tpot_s": decode / (out - 1), "e2e_s": (end - start) / 1e9, "queue_s": queue,
        "prefill_s": prefill, "decode_s": decode, "inference_s": prefill + decode, "prompt_tokens": 100 + i,
        "output_tokens": out, "finish_reason": "stop", "pid": 42, "container_id": None, "pod_uid": None,
        "pod": None, "namespace": None, "gpu_uuids": "GPU-0,GPU-1"}
    row.update(kw)
    return row


def _batch(rows: list[dict[str, Any]]) -> IngestBatch:
    b = IngestBatch()
    for row in rows:
        b.requests.append(*(row[c] for c in REQUEST_COLUMNS))
    return b


@pytest.fixture
def store(tmp_path: Path) -> Any:
    s = Store(tmp_path / "r.duckdb", linger_s=0.0)
    yield s
    s.close()


# ids that must come back exactly: hex ones are stored as numbers, the rest as text
TRACE_IDS = ["0" * 32, "f" * 32, "00000000000000000000000000000001", "0123456789abcdef0123456789ABCDEF", "",
             "abc", "0" * 34, "g" * 32, None, "é" * 32, " " + "a" * 31]
SPAN_IDS = ["0" * 16, "f" * 16, "000000000000000a", "ABCDEF0123456789", "", "0" * 15, None, "0123456789abcdeg"]
REQUEST_IDS = [
    "cmpl-0123456789abcdef0123456789abcdef", "chatcmpl-01234567-89ab-cdef-0123-456789abcdef",
    "cmpl-0123456789abcdef0123456789abcdef-0", "cmpl-0123456789abcdef0123456789abcdef-12-x",
    "0" * 32, "00000000-0000-0000-0000-000000000000", "f" * 40, "x-" + "a" * 32 + "-", "-" + "b" * 32,
    "cmpl-0123456789ABCDEF0123456789abcdef", "req-1", "", None, "é-" + "a" * 32, "a" * 32 + "-é",
    "line\n" + "c" * 32 + "\nbreak", "01234567-89ab-cdef-0123-456789abcdeF", "0123456789abcdef0123456789abcde",
    "01234567-89ab-cdef-0123456789abcdef0", "tab\t" + "d" * 32 + "-\u00e9",
]


def test_ids_come_back_exactly_and_hex_ones_are_stored_as_numbers(store: Store) -> None:
    rows = []
    n = max(len(TRACE_IDS), len(SPAN_IDS), len(REQUEST_IDS))
    for i in range(n):
        rows.append(_row(i, trace_id=TRACE_IDS[i % len(TRACE_IDS)], span_id=SPAN_IDS[i % len(SPAN_IDS)],
                         request_id=REQUEST_IDS[i % len(REQUEST_IDS)]))
    b = _batch(rows)
    store.write(b)
    assert _stored(store) == _expected(b)
    with store.reader() as cur:
        binary = cur.execute(
            "SELECT count(trace_hi), count(span_bin), count(request_hi) FROM request_rows").fetchall()[0]
        forms = dict(cur.execute("SELECT v.request_id, r.request_form FROM request_rows r JOIN requests v "
                                 "USING (start_ns, end_ns)").fetchall())
    assert binary == (sum(1 for i in range(n) if TRACE_IDS[i % len(TRACE_IDS)] in ("0" * 32, "f" * 32,
                                                                                   "0" * 31 + "1")),
                      sum(1 for i in range(n) if SPAN_IDS[i % len(SPAN_IDS)] in ("0" * 16, "f" * 16,
                                                                                "000000000000000a")), 8)
    assert forms["chatcmpl-01234567-89ab-cdef-0123-456789abcdef"] == 2
    assert forms["cmpl-0123456789abcdef0123456789abcdef-0"] == 1
    assert forms["req-1"] is None and forms["é-" + "a" * 32] is None


def _edge_rows() -> list[dict[str, Any]]:
    """Latencies that equal their derivation, that differ from it by one ulp, missing ones, -0.0, NaN,
    infinities, token counts around the TPOT condition, times around the e2e condition."""
    rng = random.Random(7)
    rows = []
    for i in range(400):
        row = _row(i)
        for c in LATENCIES:
            pick = rng.random()
            if pick < 0.08:
                row[c] = None
            elif pick < 0.14:
                row[c] = math.nextafter(row[c] if row[c] is not None else 1.0, math.inf)
            elif pick < 0.17:
                row[c] = -0.0
            elif pick < 0.19:
                row[c] = 0.0
            elif pick < 0.20:
                row[c] = math.nan
            elif pick < 0.21:
                row[c] = math.inf
        if rng.random() < 0.1:  # the derivation itself: the sum of two zeros, -0.0 + -0.0
            row["queue_s"], row["prefill_s"], row["ttft_s"] = -0.0, -0.0, -0.0
        row["output_tokens"] = rng.choice([None, 0, 1, 2, 3, 1000, row["output_tokens"]])
        o = row["output_tokens"]
        if rng.random() < 0.5 and row["decode_s"] is not None and o is not None and o >= 2:
            row["tpot_s"] = row["decode_s"] / (o - 1)
        elif rng.random() < 0.2:
            row["tpot_s"] = None
        t = rng.random()
        if t < 0.05:
            row["start_ns"] = 0
        elif t < 0.1:
            row["start_ns"] = -5
        elif t < 0.15:
            row["end_ns"] = row["start_ns"] - 1
        elif t < 0.17:
            row["start_ns"], row["end_ns"] = -(2**63), 2**63 - 1  # their difference overflows BIGINT
        if row["start_ns"] > 0 and row["end_ns"] >= row["start_ns"] and rng.random() < 0.5:
            row["e2e_s"] = (row["end_ns"] - row["start_ns"]) / 1e9
        rows.append(row)
    return rows


def test_view_gives_every_latency_back_bit_for_bit(store: Store) -> None:
    b = _batch(_edge_rows())
    store.write(b)
    assert _stored(store) == _expected(b)
    with store.reader() as cur:
        derived = cur.execute("SELECT count(*) FILTER (derived > 0), count(*) FILTER (derived = 15), "
                              "count(*) FILTER (derived = 0) FROM request_rows").fetchall()[0]
    assert derived[0] > 300 and derived[1] > 20 and derived[2] > 0  # the derivations are used, not only kept


def _span(i: int, attrs: dict[str, Any], start: int | None = None, end: int | None = None) -> Span:
    kv = []
    for k, v in attrs.items():
        if isinstance(v, bool) or v is None:
            continue
        if isinstance(v, float):
            kv.append(KeyValue(key=k, value=AnyValue(double_value=v)))
        elif isinstance(v, int):
            kv.append(KeyValue(key=k, value=AnyValue(int_value=v)))
        elif isinstance(v, list):
            kv.append(KeyValue(key=k, value=AnyValue(array_value=ArrayValue(
                values=[AnyValue(string_value=x) for x in v]))))
        else:
            kv.append(KeyValue(key=k, value=AnyValue(string_value=str(v))))
    rng = random.Random(i)
    s = T0 + i * 10**6 if start is None else start
    return Span(trace_id=rng.randbytes(16), span_id=rng.randbytes(8), name="llm_request",
                start_time_unix_nano=s, end_time_unix_nano=s + rng.randrange(10**6, 10**10) if end is None else end,
                attributes=kv)


def test_decoded_spans_read_back_as_the_decoder_made_them(store: Store) -> None:
    """vLLM V1 and V0 shapes, spans with some latencies missing, a one-token request: what the view gives
    is what the decoder produced (and what the table held before request_rows)."""
    rng = random.Random(3)
    spans = []
    for i in range(300):
        q, p, d = rng.expovariate(50), rng.uniform(0.01, 0.4), rng.uniform(0, 20)
        out = rng.choice([1, 2, 5, 900])
        attrs: dict[str, Any] = {"gen_ai.usage.prompt_tokens": rng.randrange(1, 4000),
                                 "gen_ai.usage.completion_tokens": out,
                                 "gen_ai.request.id": f"cmpl-{rng.getrandbits(128):032x}",
                                 "gen_ai.response.finish_reasons": ["stop"]}
        shape = i % 4
        if shape == 0:  # V1: everything reported
            attrs.update({"gen_ai.latency.time_in_queue": q, "gen_ai.latency.time_to_first_token": q + p,
                          "gen_ai.latency.e2e": q + p + d, "gen_ai.latency.time_in_model_prefill": p,
                          "gen_ai.latency.time_in_model_decode": d,
                          "gen_ai.latency.time_in_model_inference": p + d})
        elif shape == 1:  # V0: queue, TTFT and e2e only; prefill and decode derived by the decoder
            attrs.update({"gen_ai.latency.time_in_queue": q, "gen_ai.latency.time_to_first_token": q + p * 1.01,
                          "gen_ai.latency.e2e": q + p + d})
        elif shape == 2:  # prefill and decode only: TTFT from queue + prefill, e2e from the span's times
            attrs.update({"gen_ai.latency.time_in_queue": q, "gen_ai.latency.time_in_model_prefill": p,
                          "gen_ai.latency.time_in_model_decode": d})
        else:  # a server that measures TTFT itself
            attrs.update({"gen_ai.latency.time_in_queue": q, "gen_ai.latency.time_to_first_token": q + p + 1e-4,
                          "gen_ai.latency.time_in_model_prefill": p, "gen_ai.latency.time_in_model_decode": d,
                          "gen_ai.latency.time_in_model_inference": p + d + 1e-6})
        spans.append(_span(i, attrs, start=0 if i == 7 else None))
    req = ExportTraceServiceRequest(resource_spans=[ResourceSpans(
        resource=Resource(attributes=[KeyValue(key="host.name", value=AnyValue(string_value="node-1")),
                                      KeyValue(key="service.name", value=AnyValue(string_value="vllm"))]),
        scope_spans=[ScopeSpans(spans=spans)])])
    b = decode_spans(req)
    assert len(b.requests) == 300
    store.write(b)
    assert _stored(store) == _expected(b)
    with store.reader() as cur:
        kept = cur.execute("SELECT count(ttft_s), count(tpot_s), count(e2e_s), count(inference_s), "
                           "count(trace_hi), count(span_bin), count(request_hi) FROM request_rows").fetchall()[0]
    assert kept[1] == 0 and kept[4:] == (300, 300, 300)  # TPOT always derived, ids always binary
    assert 0 < kept[0] < 300 and 0 < kept[3] < 300  # a TTFT or inference the source measured itself is kept


def test_a_retried_export_is_stored_once_a_request_without_ids_every_time(store: Store) -> None:
    rows = [_row(i) for i in range(5)] + [_row(5, trace_id=None), _row(6, span_id=None),
                                          _row(7, trace_id="odd", span_id="also odd")]
    store.write(_batch(rows))
    store.write(_batch(rows))
    with store.reader() as cur:
        counts = dict(cur.execute("SELECT coalesce(trace_id, '-') || '/' || coalesce(span_id, '-'), count(*) "
                                  "FROM requests GROUP BY 1").fetchall())
    assert sorted(counts.values()) == [1] * 6 + [2, 2]
    assert counts["odd/also odd"] == 1


def test_prune_and_export_use_the_stored_table_and_the_readable_view(store: Store, tmp_path: Path) -> None:
    b = _batch([_row(i) for i in range(10)])
    store.write(b)
    out = store.export_parquet(tmp_path / "export")
    assert any(p.endswith("requests") for p in out) and not any(p.endswith("request_rows") for p in out)
    files = sorted((tmp_path / "export" / "requests").rglob("*.parquet"))
    back = IngestBatch()
    for f in files:
        back.extend(read_parquet(f))
    assert _expected(back) == _expected(b)  # hex ids, every latency, as they were
    assert store.prune(T0 + 5 * 10**6)["request_rows"] == 5
    with store.reader() as cur:
        assert cur.execute("SELECT count(*) FROM requests").fetchall() == [(5,)]


# the requests table as schema 1 had it
SCHEMA1 = """
CREATE TABLE meta (key VARCHAR PRIMARY KEY, value VARCHAR);
CREATE TABLE nodes (node_id INTEGER PRIMARY KEY, name VARCHAR NOT NULL UNIQUE);
CREATE TABLE requests (
    start_ns BIGINT NOT NULL, end_ns BIGINT NOT NULL, node_id INTEGER NOT NULL, service VARCHAR, model VARCHAR,
    engine VARCHAR, trace_id VARCHAR, span_id VARCHAR, request_id VARCHAR,
    ttft_s DOUBLE, tpot_s DOUBLE, e2e_s DOUBLE, queue_s DOUBLE, prefill_s DOUBLE, decode_s DOUBLE,
    inference_s DOUBLE, prompt_tokens INTEGER, output_tokens INTEGER, finish_reason VARCHAR,
    pid INTEGER, container_id VARCHAR, pod_uid VARCHAR, pod VARCHAR, namespace VARCHAR, gpu_uuids VARCHAR);
INSERT INTO meta VALUES ('schema_version', '1');
INSERT INTO nodes VALUES (1, 'node-1');
"""


def _schema1_store(path: Path, rows: list[dict[str, Any]]) -> None:
    con = duckdb.connect(str(path))
    con.execute(SCHEMA1)
    cols = [c for c in REQUEST_COLUMNS if c != "node"]
    con.executemany(f"INSERT INTO requests ({', '.join(cols)}, node_id) VALUES ({', '.join('?' * len(cols))}, 1)",
                    [[r[c] for c in cols] for r in rows])
    con.close()


def test_a_schema_1_store_is_read_as_it_is_and_migrated_when_opened_for_writing(tmp_path: Path) -> None:
    rows = _edge_rows()[:200]
    for i, r in enumerate(rows):
        r["trace_id"], r["request_id"] = TRACE_IDS[i % len(TRACE_IDS)], REQUEST_IDS[i % len(REQUEST_IDS)]
    path = tmp_path / "old.duckdb"
    _schema1_store(path, rows)
    expected = _expected(_batch(rows))

    ro = Store(path, read_only=True)  # the readers' columns are the old table's
    assert _stored(ro) == expected
    ro.close()

    s = Store(path)
    try:
        assert _stored(s) == expected
        with s.reader() as cur:
            kinds = dict(cur.execute("SELECT table_name, table_type FROM information_schema.tables "
                                     "WHERE table_name IN ('requests', 'request_rows', 'requests_schema1')").fetchall())
            version = cur.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall()
        assert kinds == {"requests": "VIEW", "request_rows": "BASE TABLE"}
        assert version == [(SCHEMA_VERSION,)]
        s.write(_batch([_row(1000)]))  # and it takes new rows
    finally:
        s.close()
    s = Store(path)  # opening it again changes nothing
    try:
        assert len(_stored(s)) == len(rows) + 1
    finally:
        s.close()


def test_a_store_of_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "new.duckdb"
    Store(path).close()
    con = duckdb.connect(str(path))
    con.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    con.close()
    for read_only in (False, True):
        with pytest.raises(StoreError, match="schema version 99, newer than this stacklens reads"):
            Store(path, read_only=read_only)
