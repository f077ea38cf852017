"""The compiled fast path of span decoding: a serialized ``ExportTraceServiceRequest`` → request rows,
exactly as :func:`correlator.ingest.otlp_spans.decode_spans` makes them, without building the protobuf
message or a dict per span.

``_fastspans.c`` (compiled at install time, loaded here with ctypes) reads the wire format and applies
decode_spans' rules (``_f``, ``_i``, ``_s``, ``node_of``, ``is_request_span``, the derivations and the
start repair, in the same double arithmetic) into column buffers; this module turns them into the batch's
lists. Whatever the C does not handle exactly (malformed or unusual wire data, a value that needs Python
to convert, ...) it declines, and :func:`decode` returns None: the caller then takes the reference path
(upb parse + decode_spans) with the same bytes, which also gives the same error for a bad body.

``STACKLENS_PURE_PYTHON=1`` turns the fast path off (the library is not loaded).
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import os
from pathlib import Path
from typing import Any

import numpy as np

from correlator.ingest.batch import IngestBatch

_ABI = 2  # _fastspans.c's FS_ABI: the struct's layout and the functions
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
                ("sidx", ctypes.c_void_p * _NS), ("sblob", ctypes.c_void_p * _NS), ("slen", ctypes.c_int64 * _NS),
                ("scount", ctypes.c_int64 * _NS), ("snone", ctypes.c_int64 * _NS)]


def library_path() -> Path | None:
    """Where the compiled library is (next to this file, as setup.py builds it), or None."""
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        p = here / f"_fastspans{suffix}"
        if p.exists():
            return p
    return None


def _load(path: Path | None) -> Any:
    """The library, or None: not built, or not the one this file was written for (a stale build)."""
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(str(path))
        return _bind(lib)
    except (OSError, AttributeError):  # not loadable, or a symbol missing
        return None


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


_LIB: Any = None if os.environ.get("STACKLENS_PURE_PYTHON") == "1" else _load(library_path())


def available() -> bool:
    """True when the compiled fast path is loaded (and not turned off by STACKLENS_PURE_PYTHON=1)."""
    return _LIB is not None


def decode(body: bytes) -> IngestBatch | None:
    """The request rows of a serialized ExportTraceServiceRequest, or None where the fast path does not
    apply (not built, turned off, or a message it declines): then use the reference path."""
    lib = _LIB
    if lib is None:
        return None
    if type(body) is not bytes:
        body = bytes(body)  # a bytearray or memoryview: ctypes passes only bytes without a copy
    p = lib.fs_decode(body, len(body))  # the GIL is released meanwhile
    if not p:
        return None
    try:
        o = p.contents
        if o.status != 0:
            return None
        try:
            return _batch(o)
        except (ValueError, UnicodeDecodeError, MemoryError):  # pragma: no cover - the C validated it all
            return None  # the reference path then decides, as for any body declined
    finally:
        lib.fs_free(p)


def _array(addr: int | None, ctype: Any, dtype: Any, n: int) -> np.ndarray[Any, Any]:
    return np.frombuffer((ctype * n).from_address(addr or 0), dtype=dtype)


def _entries(o: _Out, c: int) -> list[str]:
    size = o.slen[c]
    if size <= 0:
        return []
    return ctypes.string_at(o.sblob[c], size - 1).decode("utf-8").split("\0")


def _batch(o: _Out) -> IngestBatch:
    batch = IngestBatch()
    batch.ignored = int(o.ignored)
    n = int(o.n)
    if n == 0:
        return batch
    data = batch.requests.data
    for k, name in enumerate(FLOAT_COLUMNS):
        a = _array(o.f[k], ctypes.c_double, np.float64, n)
        missing = np.isnan(a)  # None: no value of these columns is ever NaN
        if missing.any():
            x = a.astype(object)
            x[missing] = None
            data[name] = x.tolist()
        else:
            data[name] = a.tolist()
    for k, name in enumerate(INT_COLUMNS):
        a = _array(o.iv[k], ctypes.c_int64, np.int64, n)
        missing = a < 0 if name in _NULLABLE_INTS else None  # -1: None; no count or pid is negative
        if missing is not None and missing.any():
            x = a.astype(object)
            x[missing] = None
            data[name] = x.tolist()
        else:
            data[name] = a.tolist()
    for c, name in enumerate(DEDUP_COLUMNS):
        values = _entries(o, c)
        if len(values) == 1 and o.snone[c] == 0:
            data[name] = [values[0]] * n
            continue
        table = np.empty(len(values) + 1, dtype=object)
        table[:-1] = values
        table[-1] = None  # index -1: None
        data[name] = table[_array(o.sidx[c], ctypes.c_int32, np.int32, n)].tolist()
    for j, name in enumerate(ROW_COLUMNS):
        c = len(DEDUP_COLUMNS) + j
        rows: list[Any] = _entries(o, c)
        if o.snone[c]:
            rows = [s or None for s in rows]  # an empty entry: None (decode_spans' _s never gives "")
        data[name] = rows
    return batch
