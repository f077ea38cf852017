"""The compiled fast path of span decoding: a serialized ``ExportTraceServiceRequest`` → request rows,
exactly as :func:`correlator.ingest.otlp_spans.decode_spans` makes them, without building the protobuf
message or a dict per span.

``_fastspans.c`` (compiled at install time, loaded here with ctypes) reads the wire format and applies
decode_spans' rules (``_f``, ``_i``, ``_s``, ``node_of``, ``is_request_span``, the derivations and the
start repair, in the same double arithmetic) into column buffers; this module turns them into the batch's
request rows as one Arrow table (``ArrowRows``: the store takes it as it is, without a Python object per
value; whoever reads ``data`` gets the same lists as decode_spans'). Whatever the C does not handle
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
from correlator.ingest.batch import REQUEST_COLUMNS, ArrowRows, IngestBatch

_ABI = 3  # _fastspans.c's FS_ABI: the struct's layout and the functions
# the C file's column order (enums F_*, I_*, S_*)
FLOAT_COLUMNS = ("ttft_s", "tpot_s", "e2e_s", "queue_s", "prefill_s", "decode_s", "inference_s")
INT_COLUMNS = ("start_ns", "end_ns", "prompt_tokens", "output_tokens", "pid")
DEDUP_COLUMNS = ("node", "service", "model", "engine", "finish_reason", "container_id", "pod_uid", "pod",
                 "namespace", "gpu_uuids")
ROW_COLUMNS = ("trace_id", "span_id", "request_id")
_NF, _NI, _NS = len(FLOAT_COLUMNS), len(INT_COLUMNS), len(DEDUP_COLUMNS) + len(ROW_COLUMNS)
_NULLABLE_INTS = frozenset({"prompt_tokens", "output_tokens", "pid"})


class _Out(ctypes.Structure):
    """The public head of the C struct fs_out."""

    _fields_ = [("status", ctypes.c_int64), ("n", ctypes.c_int64), ("ignored", ctypes.c_int64),
                ("cap", ctypes.c_int64), ("f", ctypes.c_void_p * _NF), ("iv", ctypes.c_void_p * _NI),
                ("sidx", ctypes.c_void_p * _NS), ("blob", compiled.Blob * _NS), ("snone", ctypes.c_int64 * _NS)]


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


def _row_strings(o: _Out, c: int, n: int) -> pa.Array:
    """A per-row string column (one entry per row, each followed by a NUL; none contains one) as an Arrow
    string array without the NULs; an empty entry is None when the C counted Nones."""
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
    validity = None
    if o.snone[c]:  # an empty entry: None (decode_spans' _s never gives "")
        validity = pa.py_buffer(np.packbits(offsets[1:] > offsets[:-1], bitorder="little"))
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


def _batch(o: _Out) -> IngestBatch:
    batch = IngestBatch()
    batch.ignored = int(o.ignored)
    n = int(o.n)
    if n == 0:
        return batch
    cols: dict[str, pa.Array] = {}
    for k, name in enumerate(FLOAT_COLUMNS):
        a = np.array(_array(o.f[k], ctypes.c_double, np.float64, n))  # a copy: the C frees its own
        missing = np.isnan(a)  # None: no value of these columns is ever NaN
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
    for j, name in enumerate(ROW_COLUMNS):
        cols[name] = _row_strings(o, len(DEDUP_COLUMNS) + j, n)
    batch.requests = ArrowRows(REQUEST_COLUMNS, pa.table({c: cols[c] for c in REQUEST_COLUMNS}))
    return batch
