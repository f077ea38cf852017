"""The compiled fast path of span decoding: a serialized ``ExportTraceServiceRequest`` → request rows,
exactly as :func:`correlator.ingest.otlp_spans.decode_spans` makes them, without building the protobuf
message or a dict per span.

``_fastspans.c`` (compiled at install time, loaded here with ctypes) reads the wire format and applies
decode_spans' rules (``_f``, ``_i``, ``_s``, ``node_of``, ``is_request_span``, the derivations and the
start repair, in the same double arithmetic) into column buffers, already in the store's form (ids as
64-bit words, request ids split, latencies that equal their derivation flagged: what the store's
``request_rows`` makes of decode_spans' rows); this module turns them into one Arrow table
(``StoredRequests``: the store writes it as it is, without a Python object per value or a second pass;
whoever reads ``data`` gets the same lists as decode_spans'). Whatever the C does not handle
exactly (malformed or unusual wire data, a value that needs Python to convert, ...) it declines, and
:func:`decode` returns None: the caller then takes the reference path (upb parse + decode_spans) with the
same bytes, which also gives the same error for a bad body.

``STACKLENS_PURE_PYTHON=1`` turns the fast path off (the library is not loaded).
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from correlator.ingest import compiled
from correlator.ingest.batch import STORED_REQUEST_COLUMNS, IngestBatch, StoredRequests
from correlator.store.schema import DERIVED_LATENCIES

_ABI = 5  # _fastspans.c's FS_ABI: the struct's layout and the functions
# the C file's column order (enums F_*, I_*, S_*)
FLOAT_COLUMNS = ("ttft_s", "tpot_s", "e2e_s", "queue_s", "prefill_s", "decode_s", "inference_s")
INT_COLUMNS = ("start_ns", "end_ns", "prompt_tokens", "output_tokens", "pid")
DEDUP_COLUMNS = ("node", "service", "model", "engine", "finish_reason", "container_id", "pod_uid", "pod",
                 "namespace", "gpu_uuids")
ROW_COLUMNS = ("trace_text", "span_text", "request_text", "request_suffix")
WORD_COLUMNS = ("trace_hi", "trace_lo", "span_bin", "request_hi", "request_lo")  # W_*
_U_TRACE_WORDS, _U_SPAN_WORD, _U_REQ_FORM, _U_DERIVED = range(4)  # U_*
_REQ_TEXT, _REQ_NONE = 0, 255
_NF, _NI, _NS = len(FLOAT_COLUMNS), len(INT_COLUMNS), len(DEDUP_COLUMNS) + len(ROW_COLUMNS)
_NW, _NU = len(WORD_COLUMNS), 4
_NULLABLE_INTS = frozenset({"prompt_tokens", "output_tokens", "pid"})


class _Out(ctypes.Structure):
    """The public head of the C struct fs_out."""

    _fields_ = [("status", ctypes.c_int64), ("n", ctypes.c_int64), ("ignored", ctypes.c_int64),
                ("cap", ctypes.c_int64), ("f", ctypes.c_void_p * _NF), ("iv", ctypes.c_void_p * _NI),
                ("sidx", ctypes.c_void_p * _NS), ("blob", compiled.Blob * _NS),
                ("w", ctypes.c_void_p * _NW), ("u8", ctypes.c_void_p * _NU)]


def library_path() -> Path | None:
    """Where the compiled library is (next to this file, as setup.py builds it), or None."""
    return compiled.library_path("_fastspans")


def _load(path: Path | None) -> Any:
    """The library, or None: not built, or not the one this file was written for (a stale build)."""
    return compiled.load(path, _bind)


def _bind(lib: Any) -> Any:
    lib.fs_abi.restype = ctypes.c_int
    lib.fs_abi.argtypes = []
    if lib.fs_abi() != _ABI:
        return None
    lib.fs_init.restype = None
    lib.fs_init.argtypes = []
    lib.fs_init()  # at import (under the import lock): the key tables, before any thread decodes
    lib.fs_decode.restype = ctypes.POINTER(_Out)
    lib.fs_decode.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
    lib.fs_free.restype = None
    lib.fs_free.argtypes = [ctypes.POINTER(_Out)]
    return lib


_LIB: Any = None if compiled.PURE_PYTHON else _load(library_path())


def available() -> bool:
    """True when the compiled fast path is loaded (and not turned off by STACKLENS_PURE_PYTHON=1)."""
    return _LIB is not None


def decode(body: bytes) -> IngestBatch | None:
    """The request rows of a serialized ExportTraceServiceRequest, or None where the fast path does not
    apply (not built, turned off, or a message it declines): then use the reference path."""
    lib = _LIB
    if lib is None:
        return None
    return compiled.run(lib.fs_decode, lib.fs_free, body, _batch)


_array = compiled.array


def _entries(o: _Out, c: int) -> list[str]:
    return compiled.entries(o.blob[c])


_INT32_MAX = 2**31 - 1


def _row_strings(o: _Out, c: int, n: int, valid: np.ndarray[Any, Any]) -> pa.Array:
    """A per-row string column (one entry per row, each followed by a NUL; none contains one) as an Arrow
    string array without the NULs; None where not ``valid`` (the C's entry is empty there)."""
    if not valid.any():
        return pa.nulls(n, pa.string())
    size = int(o.blob[c].len)
    if size >= _INT32_MAX:  # pragma: no cover - over any body's limit
        raise ValueError("row strings over 2 GiB")
    blob = _array(o.blob[c].buf, ctypes.c_uint8, np.uint8, size)
    nul = blob == 0
    ends = np.flatnonzero(nul).astype(np.int32)  # the NUL after each entry
    if len(ends) != n:  # pragma: no cover - the C makes one entry per row
        raise ValueError("row strings do not match the rows")
    offsets = np.empty(n + 1, dtype=np.int32)
    offsets[0] = 0
    offsets[1:] = ends - np.arange(n, dtype=np.int32)  # each entry's end, less the NULs before it
    validity = None if valid.all() else pa.py_buffer(np.packbits(valid, bitorder="little"))
    data = blob[~nul]  # a copy: the C frees its own
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(data), validity)


def _dedup_strings(values: list[str], idx: np.ndarray[Any, Any]) -> pa.Array:
    """A column of distinct ``values`` given by index per row (-1: None) as an Arrow string array."""
    n = len(idx)
    if not values:
        return pa.nulls(n, pa.string())
    encoded = [v.encode("utf-8") for v in values]
    missing = idx < 0
    if len(encoded) == 1 and not missing.any():  # the usual column: one value for the whole export
        v = encoded[0]
        offsets = np.arange(n + 1, dtype=np.int64) * len(v)
        if offsets[-1] >= _INT32_MAX:  # pragma: no cover - over any body's limit
            raise ValueError("strings over 2 GiB")
        return pa.StringArray.from_buffers(n, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(v * n))
    vlen = np.array([len(v) for v in encoded] + [0], dtype=np.int64)  # the last: a None's
    vstart = np.zeros(len(vlen), dtype=np.int64)
    vstart[1:] = np.cumsum(vlen[:-1])
    blob = np.frombuffer(b"".join(encoded) or b"\0", dtype=np.uint8)
    at = np.where(missing, len(vlen) - 1, idx)
    lengths = vlen[at]
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] >= _INT32_MAX:  # pragma: no cover - over any body's limit
        raise ValueError("strings over 2 GiB")
    # each row's bytes: its value's start, then one after another
    positions = np.repeat(vstart[at] - offsets[:-1], lengths) + np.arange(offsets[-1], dtype=np.int64)
    validity = pa.py_buffer(np.packbits(~missing, bitorder="little")) if missing.any() else None
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(blob[positions]),
                                       validity)


def _words(o: _Out, c: int, n: int, valid: np.ndarray[Any, Any]) -> pa.Array:
    a = np.array(_array(o.w[c], ctypes.c_uint64, np.uint64, n))  # a copy: the C frees its own
    return pa.array(a, pa.uint64(), mask=None if valid.all() else ~valid)


def _batch(o: _Out) -> IngestBatch:
    """The C's columns as one table in the store's form (``StoredRequests``)."""
    batch = IngestBatch()
    batch.ignored = int(o.ignored)
    n = int(o.n)
    if n == 0:
        return batch
    flags = [np.array(_array(o.u8[k], ctypes.c_uint8, np.uint8, n)) for k in range(_NU)]
    derived, form = flags[_U_DERIVED], flags[_U_REQ_FORM]
    cols: dict[str, pa.Array] = {"derived": pa.array(derived, pa.uint8())}
    for k, name in enumerate(FLOAT_COLUMNS):
        a = np.array(_array(o.f[k], ctypes.c_double, np.float64, n))
        missing = np.isnan(a)  # None: no value of these columns is ever NaN
        bit = DERIVED_LATENCIES.get(name)
        if bit is not None:
            missing |= (derived & bit) != 0  # equal to its derivation: not stored
        cols[name] = pa.array(a, pa.float64(), mask=missing if missing.any() else None)
    for k, name in enumerate(INT_COLUMNS):
        a = np.array(_array(o.iv[k], ctypes.c_int64, np.int64, n))
        if name not in _NULLABLE_INTS:
            cols[name] = pa.array(a, pa.int64())
            continue
        missing = a < 0  # -1: None; no count or pid is negative
        if (a > _INT32_MAX).any():  # pragma: no cover - the C gives None for these, as decode_spans' _i
            raise ValueError(f"{name} over 32 bits")  # the reference path then
        cols[name] = pa.array(a.astype(np.int32), pa.int32(), mask=missing if missing.any() else None)
    for c, name in enumerate(DEDUP_COLUMNS):
        cols[name] = _dedup_strings(_entries(o, c), _array(o.sidx[c], ctypes.c_int32, np.int32, n))
    trace_words, span_word = flags[_U_TRACE_WORDS] != 0, flags[_U_SPAN_WORD] != 0
    has_words = (form != _REQ_TEXT) & (form != _REQ_NONE)
    valid = {"trace_text": ~trace_words, "span_text": ~span_word, "request_text": form != _REQ_NONE,
             "request_suffix": form == 3}
    for j, name in enumerate(ROW_COLUMNS):
        cols[name] = _row_strings(o, len(DEDUP_COLUMNS) + j, n, valid[name])
    for k, (name, ok) in enumerate(zip(WORD_COLUMNS, (trace_words, trace_words, span_word, has_words, has_words),
                                       strict=True)):
        cols[name] = _words(o, k, n, ok)
    cols["request_form"] = pa.array(np.where(form == 2, 2, 1).astype(np.uint8), pa.uint8(),
                                    mask=None if has_words.all() else ~has_words)
    batch.requests = StoredRequests(pa.table({c: cols[c] for c in STORED_REQUEST_COLUMNS}))
    return batch
