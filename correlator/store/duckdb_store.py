"""The DuckDB store and its single writer.

Durability rule: a batch is acknowledged (the HTTP/gRPC answer is sent) only after the transaction
that holds it has committed, so kill -9 at any moment loses nothing that was acknowledged and an
export the client will retry was never half-written. To keep commits few under load, the writer groups
every batch that arrives while it is busy or within ``linger_s`` into one transaction (group commit),
up to ``max_batch_rows``: one Arrow insert per table, never executemany. DuckDB's insert and commit cost a
few milliseconds each almost whatever their size, so the limit is high (32k rows: four of the agent's
exports of an 8-GPU node, ~0.16 µs per GPU sample for the insert against ~0.32 at 8k rows).

Reads run on their own cursors while the writer writes (DuckDB's MVCC gives them a consistent view).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from collector.signals import CLOCK_EVENT_REASONS
from correlator.ingest.batch import REQUEST_COLUMNS, STORED_REQUEST_COLUMNS, ArrowRows, IngestBatch, Rows
from correlator.store import request_rollups, rollups
from correlator.store.schema import DDL, DERIVED_LATENCIES, READ_AS, SCHEMA_VERSION, TIMED_TABLES
from correlator.store.spool import Spool, SpoolError, SpoolRecord, prepare
from correlator.store.spool import settle as _settle

log = logging.getLogger("stacklens.store")

_ARROW_TYPES: dict[str, pa.DataType] = {
    "time_ns": pa.int64(), "start_ns": pa.int64(), "end_ns": pa.int64(), "value": pa.float64(),
    "gpu_index": pa.int32(), "pid": pa.int32(), "prompt_tokens": pa.int32(), "output_tokens": pa.int32(),
    "used_memory_bytes": pa.float64(),
    **{c: pa.float64() for c in ("ttft_s", "tpot_s", "e2e_s", "queue_s", "prefill_s", "decode_s", "inference_s")},
}
_REASON_IDLE = 0x1
_TABLE_COLUMNS: dict[str, tuple[str, ...]] = {name: rows.columns for name, rows in IngestBatch().tables().items()}
_SIGNAL_TABLES = ("gpu_samples", "host_samples", "engine_samples")  # whose rows name a signal

REQUEST_ROW_COLUMNS = (
    "start_ns", "end_ns", "node_id", "service", "model", "engine", "trace_hi", "trace_lo", "span_bin",
    "request_hi", "request_lo", "request_form", "trace_text", "span_text", "request_text", "request_suffix", "derived",
    "ttft_s", "tpot_s", "e2e_s", "queue_s", "prefill_s", "decode_s", "inference_s", "prompt_tokens",
    "output_tokens", "finish_reason", "pid", "container_id", "pod_uid", "pod", "namespace", "gpu_uuids")

# the Arrow types of request_rows' columns (the DDL's); the others are strings. The compiled span decoder's
# table (STORED_REQUEST_COLUMNS) has these types too
REQUEST_ROW_TYPES: dict[str, pa.DataType] = {
    "start_ns": pa.int64(), "end_ns": pa.int64(), "node_id": pa.int32(), "prompt_tokens": pa.int32(),
    "output_tokens": pa.int32(), "pid": pa.int32(), "request_form": pa.uint8(), "derived": pa.uint8(),
    **{c: pa.uint64() for c in ("trace_hi", "trace_lo", "span_bin", "request_hi", "request_lo")},
    **{c: pa.float64() for c in DERIVED_LATENCIES.keys() | {"queue_s", "prefill_s", "decode_s"}}}
_REQUEST_ROW_SCHEMA = pa.schema([(c, REQUEST_ROW_TYPES.get(c, pa.string())) for c in REQUEST_ROW_COLUMNS])


def _valid(a: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return np.asarray(pc.is_valid(a).to_numpy(zero_copy_only=False), dtype=bool)


def _derive_latencies(t: pa.Table) -> pa.Table:
    """The latencies that equal their derivation (DERIVED_LATENCIES: bit for bit, a missing one equal to a
    missing derivation) set to NULL, and a ``derived`` column with their bits; vectorised, like the view that
    derives them back."""
    def f64(c: str) -> tuple[np.ndarray, np.ndarray]:
        return _numpy(t[c], np.float64), _valid(t[c])

    queue, q_ok = f64("queue_s")
    prefill, p_ok = f64("prefill_s")
    decode, d_ok = f64("decode_s")
    out = _numpy(t["output_tokens"].fill_null(0), np.int64)
    start, end = _numpy(t["start_ns"], np.int64), _numpy(t["end_ns"], np.int64)
    e2e_ok = (start > 0) & (end >= start)
    with np.errstate(all="ignore"):  # the rows outside each derivation's condition are not used
        derivations = {
            "ttft_s": (queue + prefill, q_ok & p_ok),
            "tpot_s": (decode / (out - 1).astype(np.float64), d_ok & _valid(t["output_tokens"]) & (out >= 2)),
            "e2e_s": (np.where(e2e_ok, end - start, 0).astype(np.float64) / 1e9, e2e_ok),
            "inference_s": (prefill + decode, p_ok & d_ok),
        }
    flags = np.zeros(len(t), dtype=np.uint8)
    for c, bit in DERIVED_LATENCIES.items():
        value, ok = f64(c)
        d, d_valid = derivations[c]
        same = np.where(ok & d_valid, (value == d) & (np.signbit(value) == np.signbit(d)), ok == d_valid)
        flags |= np.where(same, bit, 0).astype(np.uint8)
        t = t.set_column(t.schema.get_field_index(c), c, pc.if_else(pa.array(same), pa.scalar(None, pa.float64()),
                                                                  t[c]))
    return t.append_column("derived", pa.array(flags, pa.uint8()))


_NIBBLE = np.full(256, 255, dtype=np.uint8)  # a byte's value as a lower-case hex digit; 255: not one
_NIBBLE[np.frombuffer(b"0123456789abcdef", dtype=np.uint8)] = np.arange(16, dtype=np.uint8)
_UUID_HEX = np.array([i for i in range(36) if i not in (8, 13, 18, 23)])
_UUID_DASH = np.array([8, 13, 18, 23])


def _hex_words(data: np.ndarray, starts: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray,
                                                                                       np.ndarray]:
    """The 16 or 32 hex digits at ``starts + positions`` of each string as 64-bit words (the second all 0
    for 16), and whether all are lower-case hex digits."""
    n, width = len(starts), len(positions)
    if n and positions[0] == 0 and positions[-1] == width - 1:  # the digits one after another
        fast = _hex_words_evenly_spaced(data, starts, width)
        if fast is not None:
            return fast
    nib = _NIBBLE[data[starts[:, None] + positions]]
    ok = nib.max(axis=1) < 16
    # two digits a byte, eight bytes a big-endian word
    words = np.ascontiguousarray((nib[:, 0::2] << 4) | nib[:, 1::2]).view(">u8").astype(np.uint64)
    return ok, words[:, 0], (words[:, 1] if len(positions) == 32 else np.zeros(len(words), dtype=np.uint64))


def _hex_words_evenly_spaced(data: np.ndarray, starts: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray,
                                                                                        np.ndarray] | None:
    """_hex_words of ``width`` digits from each start when the starts are evenly spaced (ids of one length, as
    a decoder's batch has them) and every digit is a lower-case hex one: the bytes as one block, converted by
    ``bytes.fromhex``. None otherwise (then the general way)."""
    n = len(starts)
    stride = int(starts[1] - starts[0]) if n > 1 else width
    first = int(starts[0])
    if stride < width or first + (n - 1) * stride + width > len(data):
        return None
    if n > 2 and not (np.diff(starts) == stride).all():
        return None
    if stride == width:
        block = data[first:first + n * width]
    else:
        block = np.lib.stride_tricks.as_strided(data[first:], shape=(n, width), strides=(stride, 1),
                                                writeable=False).ravel()  # a copy of just the digits
    if _NIBBLE[block].max() >= 16:  # some other character: decided row by row
        return None
    words = np.frombuffer(bytes.fromhex(block.tobytes().decode("ascii")), dtype=">u8").astype(np.uint64)
    ok = np.ones(n, dtype=bool)
    if width == 32:
        pairs = words.reshape(n, 2)
        return ok, np.ascontiguousarray(pairs[:, 0]), np.ascontiguousarray(pairs[:, 1])
    return ok, words, np.zeros(n, dtype=np.uint64)


def _string_layout(a: pa.ChunkedArray | pa.Array) -> tuple[pa.Array, np.ndarray, np.ndarray, np.ndarray]:
    """A string column as one array, its start offsets, byte lengths (0 for a null) and bytes."""
    arr = a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a
    arr = arr.cast(pa.large_string())
    n = len(arr)
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64, count=n + 1, offset=arr.offset * 8) \
        if n else np.zeros(1, dtype=np.int64)
    data_buf = arr.buffers()[2]
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, dtype=np.uint8)
    lengths = np.where(_valid(arr), offsets[1:] - offsets[:-1], 0)
    return arr, offsets[:-1], lengths, data


def _split_hex_id(a: pa.ChunkedArray | pa.Array, digits: int) -> tuple[pa.Array, pa.Array | None, pa.Array]:
    """Ids of exactly ``digits`` (16 or 32) lower-case hex digits as words (hi, lo; lo None for 16), NULL
    elsewhere; the other ids as text."""
    arr, starts, lengths, data = _string_layout(a)
    ok = lengths == digits
    rows = np.flatnonzero(ok)
    hi = np.zeros(len(arr), dtype=np.uint64)
    lo = np.zeros(len(arr), dtype=np.uint64)
    if len(rows):
        good, hi[rows], lo[rows] = _hex_words(data, starts[rows], np.arange(digits))
        ok[rows] = good
    text = pc.if_else(pa.array(ok), pa.scalar(None, pa.string()), arr.cast(pa.string()))
    return pa.array(hi, mask=~ok), (pa.array(lo, mask=~ok) if digits == 32 else None), text


def _split_request_id(a: pa.ChunkedArray | pa.Array) -> dict[str, pa.Array]:
    """Request ids that end in 32 hex digits (1), in a UUID (2), or have 32 hex digits before their last '-'
    (3, stored as form 1 with a suffix) as prefix, two words and suffix; other ids, and any that is not
    ASCII, as text."""
    arr, starts, lengths, data = _string_layout(a)
    n = len(arr)
    ascii_ = np.asarray(pc.fill_null(pc.string_is_ascii(arr), False).to_numpy(zero_copy_only=False), dtype=bool)
    form = np.zeros(n, dtype=np.uint8)  # 0: text; 1, 2, 3 as below
    hex_start = np.zeros(n, dtype=np.int64)  # where the 32 (or 36) characters begin, counted in the string
    suffix_len = np.zeros(n, dtype=np.int64)
    hi = np.zeros(n, dtype=np.uint64)
    lo = np.zeros(n, dtype=np.uint64)

    def take(rows: np.ndarray, begin: np.ndarray, positions: np.ndarray, kind: int) -> None:
        if not len(rows):
            return
        good, h, low = _hex_words(data, starts[rows] + begin, positions)
        if kind == 2:
            good &= (data[(starts[rows] + begin)[:, None] + _UUID_DASH] == ord("-")).all(axis=1)
        rows, h, low, begin = rows[good], h[good], low[good], begin[good]
        form[rows], hex_start[rows], hi[rows], lo[rows] = kind, begin, h, low

    c1 = np.flatnonzero(ascii_ & (lengths >= 32))
    take(c1, lengths[c1] - 32, np.arange(32), 1)
    c2 = np.flatnonzero(ascii_ & (form == 0) & (lengths >= 36))
    take(c2, lengths[c2] - 36, _UUID_HEX, 2)
    c3 = np.flatnonzero(ascii_ & (form == 0) & (lengths >= 34))
    if len(c3):
        # the last '-': its distance from the end in the reversed string (ASCII: characters are bytes)
        rev = pc.find_substring(pc.utf8_reverse(arr.take(pa.array(c3))), "-")
        dash = np.asarray(rev.to_numpy(zero_copy_only=False), dtype=np.int64)  # -1: none
        keep = (dash >= 0) & (lengths[c3] - dash - 1 >= 32)
        c3, dash = c3[keep], dash[keep]
        take(c3, lengths[c3] - dash - 1 - 32, np.arange(32), 3)
        suffix_len[c3] = dash + 1
    matched = form > 0
    rows = np.flatnonzero(matched)
    ids = arr.cast(pa.string())
    text: pa.Array = ids
    suffix: pa.Array = pa.nulls(n, pa.string())
    prefix_lens, suffix_lens = np.unique(hex_start[rows]), np.unique(suffix_len[rows])
    if len(rows) and len(prefix_lens) == 1 and len(suffix_lens) == 1:  # the usual batch: one engine's ids
        text = pc.if_else(pa.array(matched), pc.utf8_slice_codeunits(ids, 0, int(prefix_lens[0])), ids)
        if suffix_lens[0]:
            suffix = pc.if_else(pa.array(matched), pc.utf8_slice_codeunits(ids, -int(suffix_lens[0])), suffix)
    elif len(rows):
        texts: list[str | None] = ids.to_pylist()
        suffixes: list[str | None] = [None] * n
        for r in rows.tolist():
            s = texts[r]
            assert s is not None
            k = int(suffix_len[r])
            if k:
                suffixes[r] = s[len(s) - k:]
            texts[r] = s[:int(hex_start[r])]
        text, suffix = pa.array(texts, pa.string()), pa.array(suffixes, pa.string())
    return {"request_hi": pa.array(hi, mask=~matched), "request_lo": pa.array(lo, mask=~matched),
            "request_form": pa.array(np.where(form == 2, 2, 1).astype(np.uint8), mask=~matched),
            "request_text": text, "request_suffix": suffix}


_MIX = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F))


def _key_hash(hi: np.ndarray, lo: np.ndarray, span: np.ndarray) -> np.ndarray:
    """A 64-bit mix of a (trace, span) key: equal keys, equal hashes (not the converse: only a filter)."""
    with np.errstate(over="ignore"):
        return np.asarray(lo ^ (hi * _MIX[0]) ^ (span * _MIX[1]), dtype=np.uint64)


# a batch whose starts span at most this long probes the stored keys in numpy (seconds to minutes of live
# traffic: a few thousand keys); a longer one, in DuckDB
_PROBE_IN_PYTHON_NS = 300 * 10**9


_KEY_COLUMNS = ("trace_hi", "trace_lo", "span_bin")  # a request's (trace, span) when every id is a number


def _key_words(table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The (trace_hi, trace_lo, span_bin) words of ``table``'s rows (request_rows' columns, every id a number)."""
    hi, lo, span = (_numpy(table[c], np.uint64) for c in _KEY_COLUMNS)
    return hi, lo, span


def _repeated_in_batch(words: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray | None:
    """Rows whose key (:func:`_key_words`) an earlier row has (an export and its retry in one group commit),
    or None when there are none. The keys' hashes find the candidates (rows whose hash another row has:
    usually none), which are then compared whole, in row order."""
    n = len(words[0])
    h = _key_hash(*words)
    order = np.argsort(h, kind="stable")
    same = np.flatnonzero(h[order[1:]] == h[order[:-1]])
    if not len(same):
        return None
    candidate = np.zeros(n, dtype=bool)
    candidate[order[same]] = candidate[order[same + 1]] = True
    repeated = np.zeros(n, dtype=bool)
    seen: set[tuple[int, int, int]] = set()
    for i in np.flatnonzero(candidate).tolist():
        key = (int(words[0][i]), int(words[1][i]), int(words[2][i]))
        if key in seen:
            repeated[i] = True
        else:
            seen.add(key)
    return repeated if repeated.any() else None


def _stored_already(words: tuple[np.ndarray, np.ndarray, np.ndarray], stored: dict[str, np.ndarray]) -> np.ndarray:
    """Which rows (keys: :func:`_key_words`) have their key among ``stored``'s columns, exactly: the keys'
    hashes find the candidates, which are then compared whole."""
    have = [np.asarray(stored[c], dtype=np.uint64) for c in _KEY_COLUMNS]
    mine, theirs = _key_hash(*words), _key_hash(*have)
    order = np.sort(mine)
    at = np.minimum(np.searchsorted(order, theirs), len(order) - 1)
    hit = order[at] == theirs  # stored rows whose hash some row of the batch has
    out = np.zeros(len(mine), dtype=bool)
    if not hit.any():
        return out
    keys = set(zip(*(h[hit].tolist() for h in have), strict=True))
    for i in np.flatnonzero(np.isin(mine, theirs[hit])).tolist():
        out[i] = (int(words[0][i]), int(words[1][i]), int(words[2][i])) in keys
    return out


class _RecentKeys:
    """The (trace, span) keys of the requests this writer stored lately, as their hashes (:func:`_key_hash`): what
    lets a batch of new spans skip the probe of the stored keys. Every stored request with a numeric key and a
    start at or after ``covered_from_ns`` has its hash here (at first: those that start after every stored
    one, i.e. none); a batch whose starts are all in that range and none of whose hashes is here has none of
    its keys stored. A hash that is here (a re-sent span; in theory another key's hash) only sends the batch to
    the exact probe. Two generations of at most ``generation`` hashes; dropping the older one moves
    ``covered_from_ns`` past its starts. Hashes join only once their transaction has committed."""

    def __init__(self, covered_from_ns: int, generation: int = 1 << 17) -> None:
        self.covered_from_ns = covered_from_ns
        self._generation = generation
        self._new: set[int] = set()
        self._old: set[int] = set()
        self._new_newest_ns = self._old_newest_ns = covered_from_ns
        self._staged: list[tuple[list[int], int]] = []

    def none_stored(self, oldest_start_ns: int, hashes: np.ndarray) -> bool:
        if oldest_start_ns < self.covered_from_ns:
            return False
        h = hashes.tolist()
        return self._new.isdisjoint(h) and self._old.isdisjoint(h)

    def stage(self, hashes: np.ndarray, newest_start_ns: int) -> None:
        """Hashes of requests stored by the transaction under way (with the newest start among them)."""
        self._staged.append((hashes.tolist(), newest_start_ns))

    def committed(self) -> None:
        for h, newest in self._staged:
            self._new.update(h)
            self._new_newest_ns = max(self._new_newest_ns, newest)
            if len(self._new) >= self._generation:
                # the older generation goes, and with it the starts up to its newest
                self.covered_from_ns = max(self.covered_from_ns, self._old_newest_ns + 1)
                self._old, self._old_newest_ns = self._new, self._new_newest_ns
                self._new = set()
        self._staged.clear()

    def rolled_back(self) -> None:
        self._staged.clear()


def request_rows(t: pa.Table) -> pa.Table:
    """Rows with the columns of the view ``requests`` (hex ids as text, every latency, ``node_id``) as
    ``request_rows`` stores them, in REQUEST_ROW_COLUMNS order: the view gives back exactly ``t``.

    Trace and span ids of 32 and 16 lower-case hex digits are stored as 64-bit words. A request id is stored
    as prefix, two words and suffix when it ends in 32 hex digits or a UUID (vLLM's ``cmpl-<hex>``,
    ``chatcmpl-<uuid>``), or has 32 hex digits before its last ``-`` (``cmpl-<hex>-0``); any other id, and
    any that is not ASCII, as text. Vectorised: no Python per row but for the request ids' prefixes."""
    t = _derive_latencies(t)
    cols: dict[str, Any] = {c: t[c] for c in t.column_names}
    cols["trace_hi"], cols["trace_lo"], cols["trace_text"] = _split_hex_id(t["trace_id"], 32)
    cols["span_bin"], _, cols["span_text"] = _split_hex_id(t["span_id"], 16)
    cols.update(_split_request_id(t["request_id"]))
    return pa.table({c: cols[c] for c in REQUEST_ROW_COLUMNS})


def _stored_requests(t: pa.Table, node_ids: dict[str, int]) -> pa.Table:
    """Requests of a group commit as request_rows stores them: a compiled decoder's, in that form already
    (STORED_REQUEST_COLUMNS), with their node's id for its name; rows of REQUEST_COLUMNS through request_rows."""
    node_id = _to_ids(_encoded(t["node"]), node_ids, pa.int32())
    if tuple(t.column_names) == STORED_REQUEST_COLUMNS:
        t = t.set_column(t.schema.get_field_index("node"), "node_id", node_id)
    else:
        cols: dict[str, Any] = {c: t[c] for c in REQUEST_COLUMNS if c != "node"}
        cols["node_id"] = node_id
        t = request_rows(pa.table(cols))
    return t if t.schema == _REQUEST_ROW_SCHEMA else t.cast(_REQUEST_ROW_SCHEMA)


class StoreError(Exception):
    pass


@dataclass(slots=True)
class WriterStats:
    batches: int = 0
    transactions: int = 0
    rows: int = 0
    failed_transactions: int = 0
    minutes_rolled_up: int = 0
    late_rollups: int = 0  # transactions that summarised minutes again for samples that came late
    request_hours_rolled_up: int = 0
    late_request_rollups: int = 0  # transactions that summarised hours again for requests that came late
    failed_rollups: int = 0  # summary steps that raised (the writer goes on; the next step tries again)
    key_probes: int = 0  # request batches checked against the stored (trace, span) keys in DuckDB
    spooled_exports: int = 0  # acknowledged once on the spool's disk, committed later in large groups
    replayed_exports: int = 0  # found on the spool at start, past the last committed record, and committed
    rejected_exports: int = 0  # spooled exports whose rows could not be committed even alone: in rejected/
    unspooled_exports: int = 0  # small exports acknowledged on their commits because the spool could not be written


def _arrow(rows: Rows) -> pa.Table:
    cols = {c: pa.array(rows.data[c], type=_ARROW_TYPES.get(c, pa.string())) for c in rows.columns}
    return pa.table(cols)


# Arrow parts of a group commit (ArrowRows from a compiled decoder, or lists converted by _arrow): their names
# become ids from the distinct values only, so that the cost per row is Arrow's and numpy's, never Python's.
# A string column is either dictionary-encoded (a decoder's) or plain; a decoder's dictionary may hold values
# no row has, and nulls may be in its indices or its values.

def _one_array(a: pa.ChunkedArray | pa.Array) -> pa.Array:
    """A column as one array (a chunked dictionary column's dictionaries unified)."""
    if isinstance(a, pa.ChunkedArray):
        return a.chunk(0) if a.num_chunks == 1 else a.combine_chunks()
    return a


def _encoded(a: pa.ChunkedArray | pa.Array) -> pa.Array:
    """A string column as a dictionary array: a decoder's dictionary column as it is."""
    arr = _one_array(a)
    return arr if pa.types.is_dictionary(arr.type) else pc.dictionary_encode(arr)


def _codes(enc: pa.Array) -> np.ndarray:
    """A dictionary array's indices as numpy, -1 for a null index."""
    idx = enc.indices
    if idx.null_count:
        idx = pc.fill_null(idx, -1)
    return _numpy(idx, np.int64)


def _used(enc: pa.Array) -> list[object]:
    """The distinct values the rows of a dictionary array have (None for a null), in no particular order."""
    c = _codes(enc)
    valid = c[c >= 0] if enc.indices.null_count else c
    present = np.flatnonzero(np.bincount(valid, minlength=len(enc.dictionary)))
    values: list[object] = enc.dictionary.take(pa.array(present, pa.int64())).to_pylist()
    return [*values, None] if len(valid) < len(c) else values


def _new_names(enc: pa.Array, known: dict[str, int]) -> list[object]:
    """The distinct values of a dictionary array's rows that ``known`` lacks (None for a null, which str()
    names "None"): none, without a look at the rows, when its dictionary holds only known names."""
    if all(str(v) in known for v in enc.dictionary.to_pylist()) and (not enc.indices.null_count or "None" in known):
        return []
    return [v for v in _used(enc) if str(v) not in known]


def _first_rows(codes: np.ndarray) -> np.ndarray:
    """The row where each distinct code (>= 0; -1, a null, is skipped) first occurs, in row order."""
    n = len(codes)
    if not n:
        return np.zeros(0, dtype=np.int64)
    run = np.maximum.accumulate(codes)
    new = np.empty(n, dtype=bool)
    new[0] = codes[0] >= 0
    new[1:] = codes[1:] > run[:-1]
    first = np.flatnonzero(new)
    # codes numbered in order of first occurrence (dictionary_encode's, and a decoder's that appends as it
    # meets values): the rows where the running maximum grows are exactly the first ones
    if run[-1] == len(first) - 1 and np.array_equal(codes[first], np.arange(len(first))):
        return first
    valid = np.flatnonzero(codes >= 0)
    _, at = np.unique(codes[valid], return_index=True)
    return np.sort(valid[at])


def _pylist(a: pa.ChunkedArray | pa.Array, rows: np.ndarray) -> list[object]:
    """The values of a few rows as Python objects (a dictionary column's through its dictionary: Arrow's
    to_pylist of one is slow)."""
    arr = _one_array(a)
    if pa.types.is_dictionary(arr.type):
        values: list[object] = arr.dictionary.to_pylist()
        return [values[i] if i >= 0 else None for i in _codes(arr)[rows].tolist()]
    out: list[object] = arr.take(pa.array(rows, pa.int64())).to_pylist()
    return out


def _to_ids(enc: pa.Array, mapping: dict[str, int], type_: pa.DataType) -> pa.Array:
    """Names → ids of a dictionary array: the dictionary's values looked up (a value no row has, and a null,
    as NULL), then taken by the indices in numpy."""
    lut = np.array([-1 if v is None else mapping.get(str(v), -1) for v in enc.dictionary.to_pylist()] + [-1],
                   dtype=np.int64)
    ids = lut[_codes(enc)]  # a null index, -1, takes the last entry: -1
    missing = ids < 0
    values = ids.astype(type_.to_pandas_dtype())
    return pa.array(values, type_, mask=missing) if missing.any() else pa.array(values, type_)


def _numpy(a: pa.ChunkedArray | pa.Array, dtype: Any = None) -> np.ndarray:
    """A column as numpy (a copy where Arrow cannot lend its buffer: chunks, nulls), of ``dtype`` if given."""
    return np.asarray(a.to_numpy() if isinstance(a, pa.ChunkedArray) else a.to_numpy(zero_copy_only=False),
                      dtype=dtype)


def _view(parts: list[dict[str, pa.ChunkedArray | pa.Array]]) -> pa.Table:
    """One table of the parts' columns, numbers of the store's types (``_ARROW_TYPES``); a string column the
    parts all have of one type as it is (a decoder's dictionary strings too: DuckDB reads them as text), else
    as plain strings, so that the parts concatenate."""
    for c in parts[0]:
        type_ = _ARROW_TYPES.get(c)
        if type_ is None:
            if len({p[c].type for p in parts}) == 1:
                continue
            type_ = pa.string()
        for p in parts:
            if p[c].type != type_:
                p[c] = p[c].cast(type_)
    return pa.table(parts[0]) if len(parts) == 1 else pa.concat_tables([pa.table(p) for p in parts])


def _xid_code(label: object) -> int | None:
    """The XID a per-XID counter's label names (the agent's ``xid``), None when it names no 32-bit number."""
    text = str(label or 0).strip()
    if not text.lstrip("-").isdecimal() or not text.isascii():
        return None
    code = int(text)
    return code if -(2**31) <= code < 2**31 else None


class _Part:
    """One table's rows of one batch (or of consecutive batches of lists) as Arrow, its name columns
    dictionary-encoded once for both the distinct names and the names → ids mapping. ``rows``: the lists
    they came as (then names and GPUs are found as they always were, value by value), or None."""

    __slots__ = ("_enc", "rows", "table")

    def __init__(self, table: pa.Table, rows: Rows | None) -> None:
        self.table = table
        self.rows = rows
        self._enc: dict[str, pa.Array] = {}

    def encoded(self, column: str) -> pa.Array:
        enc = self._enc.get(column)
        if enc is None:
            enc = self._enc[column] = _encoded(self.table.column(column))
        return enc

    def name_unnamed_gpus(self) -> None:
        """gpu_samples: a GPU known only by its index (a DCGM series without UUID) is named f"{node}/gpu{index}"
        as the lists' rows name it: vectorised, and only when some row lacks its uuid (null or empty)."""
        enc = self.encoded("gpu_uuid")
        if not enc.indices.null_count and all(v for v in enc.dictionary.to_pylist()):
            return
        used = _used(enc)
        if None not in used and "" not in used:
            return
        t = self.table
        uuid = _one_array(t.column("gpu_uuid")).cast(pa.string())
        missing = pc.fill_null(pc.equal(uuid, ""), True)
        node = pc.fill_null(_one_array(t.column("node")).cast(pa.string()), "None")
        index = pc.fill_null(_one_array(t.column("gpu_index")).cast(pa.string()), "None")
        self._enc["gpu_uuid"] = pc.dictionary_encode(
            pc.if_else(missing, pc.binary_join_element_wise(node, index, "/gpu"), uuid))

    def first_gpus(self) -> list[tuple[object, object, object]]:
        """(uuid, node, index) of the first row of each GPU, in row order; every row when a uuid is null (a
        null is no GPU of its own, so the caller's loop decides as for lists)."""
        t = self.table
        enc = self.encoded("gpu_uuid")
        if enc.indices.null_count or enc.dictionary.null_count:
            rows = np.arange(t.num_rows)
        else:
            rows = _first_rows(_codes(enc))
        uuids = _pylist(enc, rows)
        nodes = _pylist(t.column("node"), rows)
        indices = _pylist(t.column("gpu_index"), rows) if "gpu_index" in t.column_names else [None] * len(rows)
        return list(zip(uuids, nodes, indices, strict=True))

    def latest_info_rows(self) -> list[tuple[object, ...]]:
        """gpu_info: the rows (GPU_INFO_COLUMNS, the time left out: None) that :meth:`Store._insert` keeps per
        GPU, the last of each (in no particular order); every row when a uuid is null."""
        t = self.table
        enc = self.encoded("gpu_uuid")
        if enc.indices.null_count or enc.dictionary.null_count:
            rows = np.arange(t.num_rows)
        else:
            codes = _codes(enc)
            _, at = np.unique(codes[::-1], return_index=True)  # the first of each in reverse: the last
            rows = len(codes) - 1 - at
        return list(zip(*([None] * len(rows) if c == "time_ns" else _pylist(t.column(c), rows)
                          for c in t.column_names), strict=True))


@dataclass(slots=True)
class _Pending:
    batch: IngestBatch
    future: Future[None]  # resolved once committed (or failed)
    seq: int | None  # the spool record's: its export was acknowledged once the spool had it on disk
    at_s: float  # time.monotonic() when submitted


class Store:
    """One DuckDB file. ``submit`` hands a batch to the writer; its future resolves once the batch is durable:
    committed, or, for a batch submitted with its export's body while the store has a spool, on the spool's
    disk (the writer then commits it with others, within ``spool_linger_s`` or at ``spool_commit_rows``)."""

    def __init__(self, path: str | os.PathLike[str], *, read_only: bool = False, linger_s: float = 0.01,
                 max_batch_rows: int = 32768, max_wait_s: float = 1.0, threads: int | None = None,
                 spool: Spool | None = None, spool_commit_rows: int = 8192, spool_linger_s: float = 1.0,
                 spool_backlog_rows: int = 262144, spool_max_rows: int = 4096) -> None:
        """``threads``: DuckDB's worker threads (None: its default, one per core). They serve every query of
        this process; the writer's small group commits run best on one (~10 % less CPU a span, measured in
        docs/performance.md), a scan of many hours on many.

        ``spool``: acknowledge exports once their bodies are on it (``correlator/store/spool.py``); its records
        past the last committed one are decoded and committed here before anything else. Past
        ``spool_backlog_rows`` rows spooled and not yet committed, submitters wait for the commit again
        (backpressure: the receivers answer only as fast as DuckDB takes the rows). An export of
        ``spool_max_rows`` rows or more is not spooled: its own commit already shares DuckDB's cost per commit
        among that many rows, and writing its body (an OpenTelemetry Collector's 8k-point batch of DCGM series
        is ~2.5 MB) would cost more than it saves (measured in docs/performance.md)."""
        self.path = str(path)
        self.read_only = read_only
        if threads is not None and threads < 1:
            raise StoreError(f"threads must be at least 1, not {threads}")
        try:
            self._con = duckdb.connect(self.path, read_only=read_only,
                                       config={} if threads is None else {"threads": threads})
        except duckdb.IOException as e:
            raise StoreError(f"cannot open {self.path}: {e}") from e
        try:
            self._check_schema()  # an older store is migrated, a newer one refused
        except Exception:
            self._con.close()
            raise
        if not read_only:
            self._con.execute(DDL)
            self._con.execute(rollups.DDL)
            self._con.execute(request_rollups.DDL)
            if not request_rollups.has_e2e_bins(self._con):  # a store summarised before e2e was binned
                self._con.execute("BEGIN TRANSACTION")
                try:
                    request_rollups.add_e2e_bins(self._con)
                    self._con.execute("COMMIT")
                except duckdb.Error as e:
                    self._con.execute("ROLLBACK")
                    self._con.close()
                    raise StoreError(f"{self.path}: adding the e2e bins failed, the store is unchanged: {e}") from e
            self._con.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", [SCHEMA_VERSION])
        self._linger_s = linger_s
        self._max_batch_rows = max_batch_rows
        self._max_wait_s = max_wait_s
        self._cond = threading.Condition()
        self._pending: list[_Pending] = []
        self._pending_rows = 0
        self._waited_on = 0  # pending batches whose submitters wait for the commit itself
        self._spool = spool
        self._spool_commit_rows = spool_commit_rows
        self._spool_linger_s = spool_linger_s
        self._spool_backlog_rows = spool_backlog_rows
        self._spool_max_rows = spool_max_rows
        self._closing = False
        self.stats = WriterStats()
        self._ids: dict[str, dict[str, int]] = {"nodes": {}, "gpus": {}, "signals": {}}
        self._last_mask: dict[int, int] = {}
        self._last_xid: dict[tuple[int, str], float] = {}
        self._thread: threading.Thread | None = None
        self._column_cache: dict[str, list[str]] = {}
        self._gpu_info: dict[str, tuple[object, ...]] = {}
        # per-minute (per-hour) summaries: complete before ``_rolled_until[table]``; the newest sample time
        # seen per sample table
        self._rolled_until: dict[str, int | None] = {}
        self._cleared_onward: set[str] = set()  # summary tables with nothing past their watermark (_roll_up)
        # rows added per minute of each sample table by this writer (from _counted_from[source] on, every row of
        # those minutes is counted: see _roll_up_span), and when each summary table was last stepped
        self._minute_rows: dict[str, dict[int, int]] = {source: {} for source in rollups.CHAINS}
        self._counted_from: dict[str, int] = {}
        self._stepped_at_s: dict[str, float] = {}
        self._newest_ns: dict[str, int | None] = {}
        self.roll_up_enabled = True
        # the request summaries of long windows: complete before ``_requests_rolled_until``; the newest start
        self._requests_rolled_until: int | None = None
        self._newest_request_ns: int | None = None
        self._recent_keys = _RecentKeys(-2**63)  # an empty store: every start covered
        self._write_lock = threading.Lock()  # the writer thread's, and a caller's of catch_up_rollups
        if not read_only:
            self._load_ids()
            self._rolled_until = {t: rollups.watermark(self._con, t) for t in rollups.TABLES}
            for source in rollups.CHAINS:
                row = self._con.execute(f"SELECT max(time_ns) FROM {source}").fetchall()
                self._newest_ns[source] = row[0][0] if row and row[0][0] is not None else None
                self._count_after_newest(source)
            self._requests_rolled_until = request_rollups.watermark(self._con)
            row = self._con.execute("SELECT max(start_ns) FROM request_rows").fetchall()
            self._newest_request_ns = row[0][0] if row and row[0][0] is not None else None
            if self._newest_request_ns is not None:  # nothing starts after it: that much is known at once
                self._recent_keys = _RecentKeys(self._newest_request_ns + 1)
            if spool is not None:
                self._recover(spool)
            self._thread = threading.Thread(target=self._run, name="stacklens-store-writer", daemon=True)
            self._thread.start()
        elif spool is not None:
            raise StoreError("a store opened read-only takes no spool")

    def _recover(self, spool: Spool) -> None:
        """Commit the spool's records past the last committed one (a crash left them), then open it for appends."""
        row = self._con.execute("SELECT value FROM meta WHERE key = 'spool_seq'").fetchall()
        committed = int(row[0][0]) if row else 0
        group: list[_Pending] = []
        rows = 0
        for seq, record in spool.open(committed):
            try:
                batch = spool.decode(record)
            except Exception as e:
                spool.reject(seq, f"decoding it again failed: {e}")
                self.stats.rejected_exports += 1
                continue
            group.append(_Pending(batch, Future(), seq, 0.0))
            rows += batch.row_count()
            if rows >= self._max_batch_rows:
                self._commit_pending(group)
                group, rows = [], 0
        if group:
            self._commit_pending(group)
        if self.stats.batches:
            log.warning("store: recovered %d acknowledged exports from the spool %s", self.stats.batches,
                        spool.directory)
        self.stats.replayed_exports = self.stats.batches

    # -- reading ------------------------------------------------------------------------------
    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A cursor of its own for one reader thread."""
        return self._con.cursor()

    @contextmanager
    def reader(self) -> Iterator[duckdb.DuckDBPyConnection]:
        cur = self.cursor()
        try:
            yield cur
        finally:
            cur.close()

    # -- writing ------------------------------------------------------------------------------
    def submit(self, batch: IngestBatch, record: SpoolRecord | None = None) -> Future[None]:
        """Queue ``batch`` for the writer; the future resolves once it is durable. With ``record`` (the export's
        inflated body, which ``batch`` was decoded from) and a spool, that is once the record is on the spool's
        disk; else once the batch is committed."""
        fut: Future[None] = Future()
        if self.read_only:
            fut.set_exception(StoreError("store is open read-only"))
            return fut
        rows = batch.row_count()
        if rows == 0:
            fut.set_result(None)
            return fut
        synced: Future[None] | None = None
        prepared = None
        if record is not None and self._spool is not None and rows < self._spool_max_rows:
            prepared = prepare(record)  # the body's CRC before the lock that orders appends: ~0.1 ms for 300 KB
        with self._cond:
            if self._closing:
                fut.set_exception(StoreError("store is closing"))
                return fut
            seq = None
            if prepared is not None and self._spool is not None and self._pending_rows < self._spool_backlog_rows:
                try:
                    seq, synced = self._spool.append(prepared)
                    self.stats.spooled_exports += 1
                except SpoolError as e:  # the commit acknowledges it instead (slower, as durable)
                    self.stats.unspooled_exports += 1
                    if self.stats.unspooled_exports == 1:  # once: it stays unwritable until restarted
                        log.error("store: %s; exports are acknowledged on their commits from now on", e)
            first = not self._pending
            self._pending.append(_Pending(batch, fut, seq, time.monotonic()))
            self._pending_rows += rows
            if seq is None:
                self._waited_on += 1
                self._cond.notify()
            elif first or self._pending_rows >= self._spool_commit_rows:
                self._cond.notify()
        if synced is None:
            return fut
        acknowledged: Future[None] = Future()

        def on_synced(f: Future[None]) -> None:
            if f.exception() is None:
                _settle(acknowledged)
            else:  # the spool could not sync it: the commit is what makes it durable
                fut.add_done_callback(lambda c: _settle(acknowledged, c.exception()))

        synced.add_done_callback(on_synced)
        return acknowledged

    def pending_rows(self) -> int:
        """Rows queued for the writer and not yet taken into a commit."""
        return self._pending_rows

    def flush(self, timeout_s: float = 60.0) -> None:
        """Wait until everything submitted before this call is committed (or has failed)."""
        fut: Future[None] = Future()
        with self._cond:
            if self._thread is None or self._closing:
                return
            self._pending.append(_Pending(IngestBatch(), fut, None, time.monotonic()))
            self._waited_on += 1
            self._cond.notify()
        fut.result(timeout_s)

    def write(self, batch: IngestBatch, timeout_s: float = 30.0) -> None:
        """Submit and wait until committed (raises what the commit raised)."""
        self.submit(batch).result(timeout_s)

    def _linger_done(self, first_at: float) -> bool:
        """Whether to commit what is pending now (under ``_cond``): someone waits for the commit itself, and
        ``linger_s`` passed or ``max_batch_rows`` are pending (concurrent exports share one commit); or only
        spooled exports are pending, and ``spool_linger_s`` passed since the oldest or ``spool_commit_rows``
        are pending (few, large commits: DuckDB's cost per commit is what spooling saves)."""
        if self._closing:
            return True
        if self._waited_on:
            return (self._pending_rows >= self._max_batch_rows
                    or time.monotonic() - first_at >= self._linger_s)
        return (self._pending_rows >= self._spool_commit_rows
                or time.monotonic() - self._pending[0].at_s >= self._spool_linger_s)

    def _run(self) -> None:
        while True:
            taken: list[_Pending] = []
            with self._cond:
                if not self._pending and not self._closing:
                    self._cond.wait(timeout=1.0)  # idle: catch up on the per-minute summaries below
                if not self._pending and self._closing:
                    return
                if self._pending:
                    first_at = time.monotonic()
                    while not self._linger_done(first_at):
                        wait_s = (self._linger_s if self._waited_on
                                  else self._pending[0].at_s + self._spool_linger_s - time.monotonic())
                        self._cond.wait(max(wait_s, 0.001))
                    rows = 0
                    while self._pending and (rows < self._max_batch_rows or not taken):
                        p = self._pending.pop(0)
                        taken.append(p)
                        rows += p.batch.row_count()
                        self._waited_on -= p.seq is None
                    self._pending_rows -= rows
            with self._write_lock:
                # the writer outlives anything that goes wrong here (its submitters would wait for ever):
                # a batch that fails is answered with the error, a summary step is tried again next time
                if taken:
                    try:
                        self._commit_pending(taken)
                    except Exception as e:
                        self.stats.failed_transactions += 1
                        log.exception("store: a group commit of %d batches failed", len(taken))
                        unsettled = [p for p in taken if not p.future.done()]
                        if any(p.seq is not None for p in unsettled):
                            # acknowledged exports whose rows are neither committed nor set aside: try again
                            with self._cond:
                                self._pending[:0] = [p for p in unsettled if p.seq is not None]
                                self._pending_rows += sum(p.batch.row_count() for p in unsettled
                                                          if p.seq is not None)
                            time.sleep(1.0)
                        for p in unsettled:
                            if p.seq is None:
                                _settle(p.future, StoreError(f"store write failed: {e}"))
                try:
                    # a summary step costs ~5-10 ms whatever its length (planning, the watermark, its commit) and
                    # ~0.15 µs per GPU sample: steps of ~256k rows or one a second, whichever comes first
                    self._roll_up_step(whole_chunks=bool(self._pending), now_s=time.monotonic())
                    self._roll_up_requests_step()
                except Exception:
                    self.stats.failed_rollups += 1
                    log.exception("store: a summary step failed; tried again after the next commit")

    def _commit_pending(self, taken: list[_Pending]) -> None:
        """Commit ``taken`` in one transaction, with the last spool record it covers. Should that fail, each
        spooled export is committed alone, and one that fails even so is copied to the spool's ``rejected/``
        (acknowledged, so never dropped); then its future has the error. Raises only if that copy fails: the
        caller keeps the exports queued."""
        seqs = [p.seq for p in taken if p.seq is not None]
        if not seqs:
            self._commit([(p.batch, p.future) for p in taken])
            return
        assert self._spool is not None
        if self._commit([(p.batch, Future()) for p in taken], spool_seq=max(seqs)) is None:
            self._spool.committed(max(seqs))
            for p in taken:
                _settle(p.future)
            return
        for p in taken:  # each alone: one batch's failure is not the others'
            error = self._commit([(p.batch, Future())], spool_seq=p.seq)
            if error is not None and p.seq is not None:
                self._spool.reject(p.seq, f"its rows could not be committed: {error}")
                self.stats.rejected_exports += 1
            _settle(p.future, None if error is None else StoreError(f"store write failed: {error}"))
        self._spool.committed(max(seqs))

    def _commit(self, taken: list[tuple[IngestBatch, Future[None]]],
                spool_seq: int | None = None) -> Exception | None:
        """One transaction of the batches in ``taken`` (and the spool's watermark ``spool_seq``); their futures
        are settled; the error, if it failed."""
        # each table's rows in batch order: an Arrow table as it came (ArrowRows: a compiled decoder's), lists
        # of consecutive batches merged into one Rows; requests' lists all first, as one
        parts: dict[str, list[Rows | pa.Table]] = {}
        requests = Rows(REQUEST_COLUMNS)
        request_tables: list[pa.Table] = []
        for b, _ in taken:
            for name, rows in b.tables().items():
                t = rows.table if isinstance(rows, ArrowRows) else None
                if name == "requests":
                    if t is not None:
                        request_tables.append(t)
                    else:
                        requests.extend(rows)
                    continue
                if not len(rows):
                    continue
                mine = parts.setdefault(name, [])
                if t is not None:
                    mine.append(t)
                    continue
                if not mine or not isinstance(mine[-1], Rows):
                    mine.append(Rows(_TABLE_COLUMNS[name]))
                mine[-1].extend(rows)
        parts["requests"] = ([requests] if len(requests) else []) + request_tables
        n_rows = sum(len(x) for xs in parts.values() for x in xs)
        ids_before = {k: dict(v) for k, v in self._ids.items()}
        mask_before, xid_before = dict(self._last_mask), dict(self._last_xid)
        info_before = dict(self._gpu_info)
        newest_before = dict(self._newest_ns)
        counted_before = {k: dict(v) for k, v in self._minute_rows.items()}
        newest_request_before = self._newest_request_ns
        cur = self._con.cursor()
        try:
            cur.execute("BEGIN TRANSACTION")
            self._insert(cur, parts)
            if spool_seq is not None:
                rollups.set_meta(cur, "spool_seq", str(spool_seq))
            cur.execute("COMMIT")
            self._recent_keys.committed()
        except Exception as e:
            with contextlib.suppress(duckdb.Error):
                cur.execute("ROLLBACK")
            self._recent_keys.rolled_back()
            self._ids, self._last_mask, self._last_xid = ids_before, mask_before, xid_before
            self._gpu_info = info_before
            self._newest_ns = newest_before
            self._minute_rows = counted_before
            self._newest_request_ns = newest_request_before
            self.stats.failed_transactions += 1
            log.error("store: transaction of %d rows failed: %s", n_rows, e)
            for _, f in taken:
                _settle(f, StoreError(f"store write failed: {e}"))
            return e
        finally:
            cur.close()
        self.stats.transactions += 1
        self.stats.batches += len(taken)
        self.stats.rows += n_rows
        for _, f in taken:
            _settle(f)
        return None

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._spool is not None:
            self._spool.close()
        self._con.close()

    # -- per-minute summaries ---------------------------------------------------------------------
    _ROLL_UP_CHUNK_MINUTES = 5  # per step where the rows are not counted: a backlog is caught up between commits
    _ROLL_UP_STEP_ROWS = 1 << 18  # rows a step summarises at most (~40 ms), at least a minute's
    _ROLL_UP_EVERY_S = 1.0  # fewer rows than that wait until a second after the table's last step

    def _roll_up_step(self, whole_chunks: bool = False, now_s: float | None = None) -> bool:
        """Summarise the complete minutes of each sample table (once its newest sample is ``GRACE_NS`` past
        them), and an hour once its minutes are, all in one transaction that also moves their watermarks (should
        it fail, each table in a transaction of its own: one's failure is not the others'). Where this writer
        counted the rows of those minutes, a step takes up to ``_ROLL_UP_STEP_ROWS`` of them (at least a
        minute), and, at ``now_s`` (the writer's clock; None: at once), fewer only ``_ROLL_UP_EVERY_S`` after the
        table's last step. Elsewhere (rows stored before this writer) a step takes up to
        ``_ROLL_UP_CHUNK_MINUTES``, with ``whole_chunks`` (more batches are waiting) only that many. Readers
        summarise the minutes after a watermark on the fly. True when it wrote some."""
        if self.read_only or not self.roll_up_enabled:
            return False
        plan, _ = self._roll_up_plan(whole_chunks, now_s)
        if not plan:
            return False
        return self._roll_up(plan, now_s) or self._roll_up_plan(whole_chunks, now_s, each=True)[1]

    def _roll_up_plan(self, whole_chunks: bool, now_s: float | None,
                      each: bool = False) -> tuple[list[tuple[str, int, int]], bool]:
        """The next summaries of every table, (table, start, end) in the order they are made (an hour table
        after its minutes, up to where they will be); with ``each``, written at once, each table in a
        transaction of its own (an hour table up to where its minutes got): then also whether any was."""
        plan: list[tuple[str, int, int]] = []
        wrote = False
        until = self._rolled_until if each else dict(self._rolled_until)
        for source, chain in rollups.CHAINS.items():
            newest = self._newest_ns.get(source)
            if newest is None:
                continue
            target: int | None = rollups.floor_minute(newest - rollups.GRACE_NS)
            for table in chain:  # minutes, then the hours they complete
                span = None if target is None else self._roll_up_span(table, target, whole_chunks, now_s, until)
                if span is not None and each:
                    wrote = self._roll_up([(table, *span)], now_s) or wrote  # moves until[table] when it commits
                elif span is not None:
                    plan.append((table, *span))
                    until[table] = span[1]
                target = until.get(table)
        return plan, wrote

    def _roll_up_span(self, table: str, target_ns: int, whole_chunks: bool, now_s: float | None,
                      until: dict[str, int | None]) -> tuple[int, int] | None:
        """The steps of ``table`` the next summary writes, [start, end): from its watermark in ``until`` towards
        ``target_ns`` (see _roll_up_step); None when there is nothing to write yet."""
        s = rollups.SUMMARIES[table]
        start = until.get(table)
        if start is None:
            row = self._con.execute(f"SELECT min({s.time}) FROM {s.source}").fetchall()
            if not row or row[0][0] is None:
                return None
            # nothing before the first sample needs a summary (a sample older than it is late, see below)
            start = self._rolled_until[table] = until[table] = int(row[0][0]) // s.step_ns * s.step_ns
        target = target_ns // s.step_ns * s.step_ns
        if target <= start:
            return None
        counted = self._minute_rows.get(s.source)
        if s.step_ns == rollups.MINUTE_NS and counted is not None and start >= self._counted_from.get(s.source, 2**63):
            rows, end = 0, start
            while end < target and (end == start or rows < self._ROLL_UP_STEP_ROWS):
                rows += counted.get(end, 0)
                end += rollups.MINUTE_NS
            last = self._stepped_at_s.get(table)
            if (rows < self._ROLL_UP_STEP_ROWS and now_s is not None and last is not None
                    and now_s - last < self._ROLL_UP_EVERY_S):
                return None
            return start, end
        chunk_ns = self._ROLL_UP_CHUNK_MINUTES * rollups.MINUTE_NS if s.step_ns == rollups.MINUTE_NS else s.step_ns
        if whole_chunks and target - start < chunk_ns:
            return None
        return start, min(target, start + chunk_ns)

    def _roll_up(self, plan: list[tuple[str, int, int]], now_s: float | None = None) -> bool:
        """Write the summaries of ``plan`` ((table, start, end), each starting at its table's watermark) and
        move the watermarks, in one transaction. Nothing at or past a watermark is kept but what the writer adds
        in the transaction that moves it, so a table's first step in this process clears everything from its
        watermark on (a summary left there by an older version is not trusted) and later steps clear nothing."""
        if not plan:
            return False
        cur = self._con.cursor()
        try:
            cur.execute("BEGIN TRANSACTION")
            for table, start, end in plan:
                rollups.roll_up(cur, table, start, end, self._ids["signals"],
                                clear="none" if table in self._cleared_onward else "onward")
            rollups.set_metas(cur, {rollups.SUMMARIES[t].watermark_key: str(end) for t, _, end in plan})
            cur.execute("COMMIT")
        except duckdb.Error as e:
            with contextlib.suppress(duckdb.Error):
                cur.execute("ROLLBACK")
            log.error("store: summaries %s failed: %s",
                      ", ".join(f"{t} of [{start}, {end})" for t, start, end in plan), e)
            return False
        finally:
            cur.close()
        for table, start, end in plan:
            self._rolled_until[table] = end
            self._cleared_onward.add(table)
            if now_s is not None:
                self._stepped_at_s[table] = now_s
            counted = self._minute_rows.get(rollups.SUMMARIES[table].source)
            if counted:
                for minute in [m for m in counted if m < end]:
                    del counted[minute]
            if table == "gpu_minutes":
                self.stats.minutes_rolled_up += (end - start) // rollups.MINUTE_NS
        return True

    def catch_up_rollups(self) -> int:
        """Summarise every complete minute now (benchmarks, tests, and a store opened after an import);
        returns the number of minutes written."""
        before = self.stats.minutes_rolled_up
        with self._write_lock:
            # rows may have been appended past the writer (a bulk load): the newest sample is the table's
            for source in rollups.CHAINS:
                row = self._con.execute(f"SELECT max(time_ns) FROM {source}").fetchall()
                if row and row[0][0] is not None:
                    self._newest_ns[source] = max(int(row[0][0]), self._newest_ns.get(source) or 0)
                    self._count_after_newest(source)  # this writer did not count those rows
            while self._roll_up_step():
                pass
            row = self._con.execute("SELECT max(start_ns) FROM request_rows").fetchall()
            if row and row[0][0] is not None:
                self._newest_request_ns = max(int(row[0][0]), self._newest_request_ns or 0)
            while self._roll_up_requests_step():
                pass
        return self.stats.minutes_rolled_up - before

    def _roll_up_requests_step(self) -> bool:
        """Summarise the requests of the oldest complete hour not yet summarised (once the newest request
        started ``request_rollups.GRACE_NS`` after its end), in a transaction of its own that also moves the
        watermark. True when it wrote one."""
        if self.read_only or not self.roll_up_enabled or self._newest_request_ns is None:
            return False
        hour = rollups.HOUR_NS
        start = self._requests_rolled_until
        if start is None:
            row = self._con.execute("SELECT min(start_ns) FROM request_rows").fetchall()
            if not row or row[0][0] is None:
                return False
            start = self._requests_rolled_until = rollups.floor_to(int(row[0][0]), hour)
        if rollups.floor_to(self._newest_request_ns - request_rollups.GRACE_NS, hour) <= start:
            return False
        end = start + hour
        cur = self._con.cursor()
        try:
            cur.execute("BEGIN TRANSACTION")
            request_rollups.roll_up(cur, start, end)
            rollups.set_meta(cur, request_rollups.WATERMARK_KEY, str(end))
            cur.execute("COMMIT")
        except duckdb.Error as e:
            with contextlib.suppress(duckdb.Error):
                cur.execute("ROLLBACK")
            log.error("store: request summaries of [%d, %d) failed: %s", start, end, e)
            return False
        finally:
            cur.close()
        self._requests_rolled_until = end
        self.stats.request_hours_rolled_up += 1
        return True

    def _summarise_late_requests(self, cur: duckdb.DuckDBPyConnection, start_ns: pa.ChunkedArray | pa.Array) -> None:
        """Requests that started in hours already summarised (one longer than the grace, or a buffered export
        after an outage): summarise those hours again, in this transaction."""
        newest = pc.max(start_ns).as_py()
        if newest is not None and (self._newest_request_ns is None or newest > self._newest_request_ns):
            self._newest_request_ns = int(newest)
        until = self._requests_rolled_until
        oldest = pc.min(start_ns).as_py()
        if until is None or oldest is None or oldest >= until:
            return
        hour = rollups.HOUR_NS
        late = pc.filter(start_ns, pc.less(start_ns, until))
        lo = rollups.floor_to(int(pc.min(late).as_py()), hour)
        hi = min(until, rollups.floor_to(int(pc.max(late).as_py()), hour) + hour)
        request_rollups.roll_up(cur, lo, hi)
        self.stats.late_request_rollups += 1

    # -- schema -------------------------------------------------------------------------------------
    def _check_schema(self) -> None:
        """A store of an older schema is migrated when opened for writing (opened read-only, it is read as it
        is: its tables have the columns the readers use); one of a newer schema is refused."""
        con = self._con
        tables = dict(con.execute("SELECT table_name, table_type FROM information_schema.tables "
                                  "WHERE table_schema = 'main' AND table_catalog = current_database()").fetchall())
        version = None
        if "meta" in tables:
            row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall()
            version = row[0][0] if row else None
        if version is not None and (not str(version).isdigit() or int(version) > int(SCHEMA_VERSION)):
            raise StoreError(f"{self.path} has schema version {version}, newer than this stacklens reads "
                             f"({SCHEMA_VERSION}): open it with the stacklens that wrote it")
        if not self.read_only and tables.get("requests") == "BASE TABLE":  # schema 1: requests was a table
            self._migrate_requests()

    def _migrate_requests(self) -> None:
        """Schema 1 → 2 in one transaction: the ``requests`` table's rows into ``request_rows``, read back
        through the view ``requests`` exactly as they were."""
        con = self._con
        n = con.execute("SELECT count(*) FROM requests").fetchall()[0][0]
        log.info("store: migrating %s from schema 1 to %s (%d requests)", self.path, SCHEMA_VERSION, n)
        con.execute("BEGIN TRANSACTION")
        try:
            con.execute("ALTER TABLE requests RENAME TO requests_schema1")
            con.execute(DDL)
            last = con.execute("SELECT max(rowid) FROM requests_schema1").fetchall()[0][0]
            for lo in range(0, -1 if last is None else last + 1, 1 << 20):  # a million rows at a time
                part = con.sql(f"SELECT * FROM requests_schema1 WHERE rowid >= {lo} AND rowid < {lo + (1 << 20)} "
                               "ORDER BY start_ns").to_arrow_table()
                con.register("_schema1_part", request_rows(part))
                try:
                    names = ", ".join(REQUEST_ROW_COLUMNS)
                    con.execute(f"INSERT INTO request_rows ({names}) SELECT {names} FROM _schema1_part")
                finally:
                    con.unregister("_schema1_part")
            con.execute("DROP TABLE requests_schema1")
            con.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", [SCHEMA_VERSION])
            con.execute("COMMIT")
        except duckdb.Error as e:
            with contextlib.suppress(duckdb.Error):
                con.execute("ROLLBACK")
            raise StoreError(f"{self.path}: migrating from schema 1 failed, the store is unchanged: {e}") from e

    # -- ids ------------------------------------------------------------------------------------
    def _load_ids(self) -> None:
        for name, nid in self._con.execute("SELECT name, node_id FROM nodes").fetchall():
            self._ids["nodes"][name] = nid
        for uuid, gid in self._con.execute("SELECT uuid, gpu_id FROM gpus").fetchall():
            self._ids["gpus"][uuid] = gid
        for name, sid in self._con.execute("SELECT name, signal_id FROM signals").fetchall():
            self._ids["signals"][name] = sid

    def _node_ids(self, cur: duckdb.DuckDBPyConnection, names: Sequence[str]) -> dict[str, int]:
        known = self._ids["nodes"]
        for n in names:
            if n not in known:
                known[n] = len(known) + 1
                cur.execute("INSERT INTO nodes VALUES (?, ?)", [known[n], n])
        return known

    def _signal_ids(self, cur: duckdb.DuckDBPyConnection, names: Sequence[str]) -> dict[str, int]:
        known = self._ids["signals"]
        for n in names:
            if n not in known:
                known[n] = len(known) + 1
                cur.execute("INSERT INTO signals VALUES (?, ?)", [known[n], n])
        return known

    def _gpu_ids(self, cur: duckdb.DuckDBPyConnection, keys: Sequence[tuple[str, str, int | None]]) -> dict[str, int]:
        known = self._ids["gpus"]
        for uuid, node, index in keys:
            if uuid not in known:
                known[uuid] = len(known) + 1
                nid = self._node_ids(cur, [node])[node]
                cur.execute("INSERT INTO gpus (gpu_id, uuid, node_id, gpu_index) VALUES (?, ?, ?, ?)",
                            [known[uuid], uuid, nid, index])
        return known

    # -- the insert of one transaction ----------------------------------------------------------
    def _insert(self, cur: duckdb.DuckDBPyConnection, parts: dict[str, list[Rows | pa.Table]]) -> None:
        """One transaction's rows: per table, parts in batch order (:meth:`_commit`), each as lists (Rows) or
        as an Arrow table (``ArrowRows.table``). Names become ids as they always did: nodes and signals in
        sorted order of their names, GPUs in order of the first row that names them (gpu_samples, gpu_info,
        placements); one insert per table."""
        ps: dict[str, list[_Part]] = {}
        for name, xs in parts.items():
            if name == "requests":
                continue
            ps[name] = []
            for x in xs:
                if isinstance(x, Rows):
                    if name == "gpu_samples":
                        # a GPU known only by its index (a DCGM series without UUID) is named after node and index
                        d = x.data
                        d["gpu_uuid"] = [u if u else f"{n}/gpu{i}" for u, n, i in
                                         zip(d["gpu_uuid"], d["node"], d["gpu_index"], strict=True)]
                    ps[name].append(_Part(_arrow(x), x))
                else:
                    ps[name].append(_Part(x, None))
        for part in ps.get("gpu_samples", []):
            if part.rows is None:
                part.name_unnamed_gpus()
        keys: dict[str, tuple[str, str, int | None]] = {}
        for name in ("gpu_samples", "gpu_info", "placements"):
            for part in ps.get(name, []):
                if part.rows is not None:
                    d = part.rows.data
                    firsts: Iterable[tuple[object, object, object]] = zip(
                        d["gpu_uuid"], d["node"], d.get("gpu_index", [None] * len(part.rows)), strict=True)
                elif _new_names(part.encoded("gpu_uuid"), self._ids["gpus"]):
                    firsts = part.first_gpus()  # the first row of each GPU only
                else:
                    continue  # every GPU known: no key of this part would be used
                for u, n, i in firsts:
                    if u not in keys:
                        keys[str(u)] = (str(u), str(n), i if isinstance(i, int) else None)
        # the names of every row as a set: an Arrow part's from its dictionaries, none if they hold only known
        # names (only new ones get ids)
        nodes: set[str] = set()
        sig_names: set[object] = set()
        for name, plist in ps.items():
            for part in plist:
                if part.rows is not None:
                    nodes.update(str(x) for x in part.rows.data["node"])
                    if name in _SIGNAL_TABLES:
                        sig_names.update(part.rows.data["signal"])
                else:
                    nodes.update(str(x) for x in _new_names(part.encoded("node"), self._ids["nodes"]))
                    if name in _SIGNAL_TABLES:
                        sig_names.update(_new_names(part.encoded("signal"), self._ids["signals"]))
        for x in parts.get("requests", []):
            if isinstance(x, Rows):
                nodes.update(str(n) for n in x.data["node"])
            else:
                nodes.update(str(n) for n in pc.unique(x["node"]).to_pylist())
        node_ids = self._node_ids(cur, sorted(nodes))
        gpu_ids = self._gpu_ids(cur, list(keys.values()))
        sig_ids = self._signal_ids(cur, sorted(str(s) for s in sig_names))

        if ps.get("gpu_info"):
            # identity changes rarely: keep the latest per GPU and write only what differs from the cache
            latest: dict[str, tuple[object, ...]] = {}
            for part in ps["gpu_info"]:
                info_rows: Iterable[tuple[object, ...]] = (
                    zip(*(part.rows.data[c] for c in part.rows.columns), strict=True) if part.rows is not None
                    else part.latest_info_rows())
                for _t, n, u, idx, model, bus, dev in info_rows:
                    latest[str(u)] = (node_ids[str(n)], idx, model, bus, dev)
            for u, info in latest.items():
                if self._gpu_info.get(u) == info:
                    continue
                cur.execute("UPDATE gpus SET node_id = ?, gpu_index = COALESCE(?, gpu_index), "
                            "model = COALESCE(?, model), pci_bus_id = COALESCE(?, pci_bus_id), "
                            "device = COALESCE(?, device) WHERE uuid = ?", [*info, u])
                self._gpu_info[u] = info

        def ids(part: _Part, column: str, mapping: dict[str, int], type_: pa.DataType) -> pa.Array:
            return _to_ids(part.encoded(column), mapping, type_)

        def same(part: _Part, *columns: str) -> dict[str, pa.ChunkedArray | pa.Array]:
            return {c: part.table.column(c) for c in columns}

        if ps.get("gpu_samples"):
            view = _view([{
                **same(p, "time_ns"), "gpu_id": ids(p, "gpu_uuid", gpu_ids, pa.int32()),
                "signal_id": ids(p, "signal", sig_ids, pa.int16()), **same(p, "sub", "value")}
                for p in ps["gpu_samples"]])
            self._append(cur, "gpu_samples", view)
            self._derive_events(cur, view, sig_ids)
            self._summarise_late(cur, "gpu_samples", view)
        if ps.get("host_samples"):
            host = _view([{
                **same(p, "time_ns"), "node_id": ids(p, "node", node_ids, pa.int32()),
                "signal_id": ids(p, "signal", sig_ids, pa.int16()), **same(p, "sub", "value")}
                for p in ps["host_samples"]])
            self._append(cur, "host_samples", host)
            self._summarise_late(cur, "host_samples", host)
        if ps.get("engine_samples"):
            engine = _view([{
                **same(p, "time_ns"), "node_id": ids(p, "node", node_ids, pa.int32()),
                **same(p, "service", "model", "pid"), "signal_id": ids(p, "signal", sig_ids, pa.int16()),
                **same(p, "value")}
                for p in ps["engine_samples"]])
            self._append(cur, "engine_samples", engine)
            self._summarise_late(cur, "engine_samples", engine)
        if ps.get("placements"):
            placements = _view([{
                **same(p, "time_ns"), "node_id": ids(p, "node", node_ids, pa.int32()),
                "gpu_id": ids(p, "gpu_uuid", gpu_ids, pa.int32()),
                **same(p, "pid", "container_id", "pod_uid", "pod", "namespace", "container", "used_memory_bytes")}
                for p in ps["placements"]])
            self._append(cur, "placements", placements)
            self._summarise_late(cur, "placements", placements)
        req = [_stored_requests(_arrow(x) if isinstance(x, Rows) else x, node_ids)
               for x in parts.get("requests", [])]
        req = [t for t in req if t.num_rows]
        if req:
            table = pa.concat_tables(req).combine_chunks() if len(req) > 1 else req[0]
            # a client that retries an export it did not see acknowledged sends the same spans again: a request
            # whose (trace, span) is stored already with a start in the batch's range is not stored twice (one
            # without either id is)
            span = pc.min_max(table["start_ns"])
            lo, hi = int(span["min"].as_py()), int(span["max"].as_py())
            numeric = table["trace_hi"].null_count == 0 and table["span_bin"].null_count == 0
            if numeric:
                # every id a number (what the decoder makes; such an id is never also stored as text): a retry
                # in the same group commit as its original is stored once too
                words = _key_words(table)
                repeated = _repeated_in_batch(words)
                if repeated is not None:
                    table = table.filter(pa.array(~repeated))
                    words = _key_words(table)
                hashes = _key_hash(*words)
            if numeric and self._recent_keys.none_stored(lo, hashes):
                # none of these keys among the recent ones, which are all there are at these starts: nothing
                # to probe
                self._append_requests(cur, table)
                self._recent_keys.stage(hashes, hi)
            elif numeric and hi - lo <= _PROBE_IN_PYTHON_NS:
                # a few seconds or minutes of starts: the stored keys of that range are probed here
                self.stats.key_probes += 1
                stored = cur.execute(
                    "SELECT trace_hi, trace_lo, span_bin FROM request_rows WHERE start_ns BETWEEN"
                    f" {lo} AND {hi} AND trace_hi IS NOT NULL AND trace_lo IS NOT NULL AND span_bin IS NOT NULL"
                ).fetchnumpy()
                if len(stored["trace_hi"]):
                    keep = ~_stored_already(words, stored)
                    if not keep.all():
                        table = table.filter(pa.array(keep))
                        hashes = hashes[keep]
                self._append_requests(cur, table)
                self._recent_keys.stage(hashes, hi)
            else:
                # ids as text or missing, or a batch over a long span of starts (a buffered export of old spans
                # with new ones: many stored keys in its range): the anti-join in DuckDB
                self.stats.key_probes += 1
                cur.register("_batch_requests", table)
                try:
                    names = ", ".join(REQUEST_ROW_COLUMNS)
                    cur.execute(
                        f"INSERT INTO request_rows ({names}) SELECT {names} FROM _batch_requests b"
                        " WHERE b.trace_hi IS NULL AND b.trace_text IS NULL"
                        " OR b.span_bin IS NULL AND b.span_text IS NULL OR NOT EXISTS (SELECT 1 FROM request_rows r"
                        f" WHERE r.start_ns BETWEEN {lo} AND {hi} AND r.trace_hi IS NOT DISTINCT FROM b.trace_hi"
                        " AND r.trace_lo IS NOT DISTINCT FROM b.trace_lo"
                        " AND r.trace_text IS NOT DISTINCT FROM b.trace_text"
                        " AND r.span_bin IS NOT DISTINCT FROM b.span_bin"
                        " AND r.span_text IS NOT DISTINCT FROM b.span_text)")
                finally:
                    cur.unregister("_batch_requests")
                # every key of the batch is stored now (those not inserted were there already)
                keyed = _valid(table["trace_hi"]) & _valid(table["span_bin"])
                if keyed.any():
                    self._recent_keys.stage(_key_hash(*_key_words(table.filter(pa.array(keyed)))), hi)
            self._summarise_late_requests(cur, table["start_ns"])

    def _append_requests(self, cur: duckdb.DuckDBPyConnection, table: pa.Table) -> None:
        """Rows of ``request_rows`` (REQUEST_ROW_COLUMNS) appended from an Arrow table: as a relation inserted
        by position (cheaper per statement than registering it and inserting by name) when the stored table
        has those columns in that order (the DDL's), else by name."""
        if self._columns(cur, "request_rows") == list(REQUEST_ROW_COLUMNS):
            cur.from_arrow(table).insert_into("request_rows")
        else:  # pragma: no cover - a table of another column order
            self._append(cur, "request_rows", table)

    def _count_after_newest(self, source: str) -> None:
        """Rows of ``source`` up to its newest one may have come past this writer (before it opened the store, or
        appended around it): only the minutes after the newest one's are counted, the others go in chunks of
        minutes (_roll_up_span)."""
        newest = self._newest_ns.get(source)
        self._counted_from[source] = (-2**63 if newest is None
                                      else rollups.floor_minute(int(newest)) + rollups.MINUTE_NS)

    def _count_minutes(self, source: str, view: pa.Table, until: int | None) -> None:
        """Add the rows of ``view`` to its table's rows per minute (those past the summaries' watermark
        ``until``): what a summary step takes is measured in rows (_roll_up_span)."""
        counted = self._minute_rows[source]
        minutes = _numpy(view["time_ns"]) // rollups.MINUTE_NS
        if not len(minutes):
            return
        lo, hi = int(minutes.min()), int(minutes.max())
        if hi - lo < 1 << 16:  # the usual: a few minutes of rows, counted in one pass
            counts = np.bincount(minutes - lo)
            firsts = np.flatnonzero(counts)
            keys, values = firsts + lo, counts[firsts]
        else:
            keys, values = np.unique(minutes, return_counts=True)
        for m, n in zip(keys.tolist(), values.tolist(), strict=True):
            minute = m * rollups.MINUTE_NS
            if until is None or minute >= until:
                counted[minute] = counted.get(minute, 0) + n

    def _summarise_late(self, cur: duckdb.DuckDBPyConnection, source: str, view: pa.Table) -> None:
        """Rows of ``source`` (its columns ``time_ns`` and the summaries' scope) just added: its newest time and
        rows per minute are kept (the summary steps' measure), and rows of minutes already summarised (a buffered
        export after an outage) have those minutes of those GPUs or nodes, and their hours, summarised again, in
        this transaction, so that the summaries never go stale."""
        newest = pc.max(view["time_ns"]).as_py()
        if newest is not None and (self._newest_ns.get(source) is None or newest > (self._newest_ns[source] or 0)):
            self._newest_ns[source] = int(newest)
        chain = rollups.CHAINS[source]
        until = self._rolled_until.get(chain[0])
        self._count_minutes(source, view, until)
        oldest = pc.min(view["time_ns"]).as_py()
        if until is None or oldest is None or oldest >= until:
            return
        late = view.filter(pc.less(view["time_ns"], until))
        lo = rollups.floor_minute(int(pc.min(late["time_ns"]).as_py()))
        hi = min(until, rollups.floor_minute(int(pc.max(late["time_ns"]).as_py())) + rollups.MINUTE_NS)
        scope = sorted({int(g) for g in pc.unique(late[rollups.SUMMARIES[chain[0]].scope]).to_pylist()})
        for table in chain:
            step, done = rollups.SUMMARIES[table].step_ns, self._rolled_until.get(table)
            a, b = lo // step * step, min(done or 0, -(-hi // step) * step)
            if done is not None and b > a:
                rollups.roll_up(cur, table, a, b, self._ids["signals"], scope)
        self.stats.late_rollups += 1

    def _columns(self, cur: duckdb.DuckDBPyConnection, table: str) -> list[str]:
        cols = self._column_cache.get(table)
        if cols is None:
            cols = [r[0] for r in cur.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = ? ORDER BY ordinal_position",
                [table]).fetchall()]
            self._column_cache[table] = cols
        return cols

    def _append(self, cur: duckdb.DuckDBPyConnection, table: str, data: pa.Table) -> None:
        name = f"_batch_{table}"
        cur.register(name, data)
        try:
            cols = ", ".join(data.column_names)
            cur.execute(f"INSERT INTO {table} ({cols}) SELECT {cols} FROM {name}")
        finally:
            cur.unregister(name)

    def _derive_events(self, cur: duckdb.DuckDBPyConnection, view: pa.Table, sig_ids: dict[str, int]) -> None:
        """XIDs (from the agent's per-XID counters or DCGM's last-XID gauge) and throttle transitions
        (changes of the clock-event bitmask) become rows of ``events``."""
        wanted = {sig_ids[n] for n in ("clock_event_reasons", "xid_events_total", "xid_last") if n in sig_ids}
        if not wanted:
            return
        # the rows of those signals with a value, by time (a stable sort, as Arrow's sort_by), in numpy
        sid = _numpy(view["signal_id"])
        hit = np.zeros(len(sid), dtype=bool)
        for w in wanted:  # three at most: cheaper than np.isin
            hit |= sid == w
        rows = np.flatnonzero(hit)
        if not len(rows):
            return
        times = _numpy(view["time_ns"])
        rows = rows[np.argsort(times[rows], kind="stable")]
        # a missing value says nothing, and neither does a NaN or an infinity (no mask, no count): skipped, so that
        # one odd reading never fails the transaction of everything committed with it, nor hides the next XID
        values = _numpy(view["value"])
        ok = _valid(view["value"])[rows] & np.isfinite(values[rows])
        clock, last = sig_ids.get("clock_event_reasons"), sig_ids.get("xid_last")
        # a mask or an XID is stored as an INTEGER event code: one past 32 bits is no mask or XID either
        ok &= ~(((sid[rows] == clock) | (sid[rows] == last)) & ~(np.abs(values[rows]) < 2.0**31))
        rows = rows[ok]
        values, gids, sids = values[rows], _numpy(view["gpu_id"])[rows], sid[rows]
        c = np.flatnonzero(sids == clock) if clock is not None else np.zeros(0, dtype=np.int64)
        if len(c):
            # a GPU's mask equal to its previous one is no transition and leaves the state as it is: only the
            # others go through the loop below
            masks = values[c].astype(np.int64) & ~_REASON_IDLE
            order = np.argsort(gids[c], kind="stable")  # each GPU's masks, in time order
            g, m = gids[c][order], masks[order]
            first = np.ones(len(g), dtype=bool)
            first[1:] = g[1:] != g[:-1]
            same = np.zeros(len(g), dtype=bool)
            same[1:] = ~first[1:] & (m[1:] == m[:-1])
            for i in np.flatnonzero(first).tolist():
                same[i] = self._last_mask.get(int(g[i])) == int(m[i])
            keep = np.ones(len(rows), dtype=bool)
            keep[c[order[same]]] = False
            rows, values, gids, sids = rows[keep], values[keep], gids[keep], sids[keep]
        if not len(rows):
            return
        xid_total = sig_ids.get("xid_events_total")
        subs: list[Any] = [None] * len(rows)
        if xid_total is not None and (at := np.flatnonzero(sids == xid_total)).size:
            for k, sub in zip(at.tolist(), _pylist(view["sub"], rows[at]), strict=True):
                subs[k] = sub
        by_id = {v: k for k, v in sig_ids.items()}
        gpu_nodes = dict(cur.execute("SELECT gpu_id, node_id FROM gpus").fetchall())
        events: list[tuple[int, int, int, str, int | None, str | None]] = []
        for t, gid, s, v, sub in zip(times[rows].tolist(), gids.tolist(), sids.tolist(), values.tolist(), subs,
                                     strict=True):
            name = by_id[s]
            node = gpu_nodes.get(gid, 0)
            if name == "clock_event_reasons":
                m = int(v) & ~_REASON_IDLE
                prev = self._last_mask.get(gid, 0)
                if m != prev:
                    added = [r for bit, r in CLOCK_EVENT_REASONS.items() if m & bit and not prev & bit]
                    events.append((t, node, gid, "throttle", m, ",".join(added) if added else "cleared"))
                self._last_mask[gid] = m
            else:
                key = (gid, str(sub) if name == "xid_events_total" else "last")
                prev_v = self._last_xid.get(key)
                self._last_xid[key] = v
                if name == "xid_events_total" and (prev_v is None or v > prev_v):
                    events.append((t, node, gid, "xid", _xid_code(sub), None))
                elif name == "xid_last" and v not in (0, prev_v):
                    events.append((t, node, gid, "xid", int(v), None))
        if events:
            self._append(cur, "events", pa.table({
                "time_ns": pa.array([e[0] for e in events], pa.int64()),
                "node_id": pa.array([e[1] for e in events], pa.int32()),
                "gpu_id": pa.array([e[2] for e in events], pa.int32()),
                "kind": pa.array([e[3] for e in events], pa.string()),
                "code": pa.array([e[4] for e in events], pa.int32()),
                "detail": pa.array([e[5] for e in events], pa.string())}))

    # -- housekeeping ---------------------------------------------------------------------------
    def prune(self, older_than_ns: int) -> dict[str, int]:
        """Retention by age: delete rows older than ``older_than_ns`` from every timed table."""
        out: dict[str, int] = {}
        with self.reader() as cur:
            for table, col in TIMED_TABLES.items():
                n = cur.execute(f"SELECT count(*) FROM {table} WHERE {col} < ?", [older_than_ns]).fetchall()
                cur.execute(f"DELETE FROM {table} WHERE {col} < ?", [older_than_ns])
                out[table] = int(n[0][0]) if n else 0
            # the minute (hour) the cut falls in lost its summary with its first part: summarise what is left
            with self._write_lock:
                for table, s in rollups.SUMMARIES.items():
                    until, step = self._rolled_until.get(table), s.step_ns
                    if not self.read_only and until is not None and older_than_ns % step and older_than_ns < until:
                        cut = older_than_ns // step * step
                        rollups.roll_up(cur, table, cut, min(cut + step, until), self._ids["signals"])
            # the hour the cut falls in lost its summaries with its first part: summarise what is left of it
            with self._write_lock:
                until = self._requests_rolled_until
                hour = rollups.floor_to(older_than_ns, rollups.HOUR_NS)
                if not self.read_only and until is not None and older_than_ns < until:
                    request_rollups.roll_up(cur, hour, min(hour + rollups.HOUR_NS, until))
        return out

    def export_parquet(self, directory: str | os.PathLike[str]) -> list[str]:
        """Hive-partitioned Parquet (``day=YYYY-MM-DD/node=NAME``) of every timed table, for archives and
        for engines beyond one machine. Node and GPU names are written out, not ids."""
        base = Path(directory)
        base.mkdir(parents=True, exist_ok=True)
        written: list[str] = []
        with self.reader() as cur:
            for stored, col in TIMED_TABLES.items():
                if stored in ("findings", *rollups.TABLES, *request_rollups.TABLES):  # derived: made again
                    continue
                table = READ_AS.get(stored, stored)  # requests with their ids in hex and every latency
                cols = self._columns(cur, table)
                select = ", ".join(f"t.{c}" for c in cols)
                gpu_join = "LEFT JOIN gpus g ON g.gpu_id = t.gpu_id" if "gpu_id" in cols else ""
                gpu_col = ", g.uuid AS gpu_uuid" if gpu_join else ""
                sig_join = "LEFT JOIN signals s ON s.signal_id = t.signal_id" if "signal_id" in cols else ""
                sig_col = ", s.name AS signal" if sig_join else ""
                node_expr = "n.name" if "node_id" in cols else "'all'"
                node_join = "LEFT JOIN nodes n ON n.node_id = t.node_id" if "node_id" in cols else ""
                if "node_id" not in cols and "gpu_id" in cols:
                    node_join = "LEFT JOIN nodes n ON n.node_id = g.node_id"
                    node_expr = "n.name"
                target = base / table
                cur.execute(
                    f"COPY (SELECT {select}{gpu_col}{sig_col}, "
                    f"strftime(make_timestamp(t.{col} // 1000), '%Y-%m-%d') AS day, {node_expr} AS node "
                    f"FROM {table} t {gpu_join} {sig_join} {node_join}) TO '{_sql_path(target)}' "
                    "(FORMAT parquet, COMPRESSION zstd, PARTITION_BY (day, node), OVERWRITE_OR_IGNORE)")
                written.append(str(target))
        return written


def _sql_path(p: Path) -> str:
    """A path for a COPY statement (COPY takes no parameters); refuses quotes rather than escaping them."""
    s = str(p)
    if "'" in s:
        raise StoreError(f"path {s!r} contains a quote")
    return s
