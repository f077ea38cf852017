"""Finding and loading the compiled decoders (``_fastspans``, ``_fastmetrics``: plain C built by setup.py
next to their Python modules, loaded with ctypes), and reading their buffers.

``STACKLENS_PURE_PYTHON=1`` turns every compiled path off (nothing is loaded)."""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa

from collector.native import built_library, load_library, pure_python

PURE_PYTHON = pure_python()
T = TypeVar("T")


def library_path(stem: str) -> Path | None:
    """Where the compiled library ``stem`` (e.g. ``_fastspans``) is, as setup.py builds it, or None."""
    return built_library(Path(__file__).parent, stem)


def load(path: Path | None, bind: Callable[[Any], Any]) -> Any:
    """The library at ``path`` with its functions bound by ``bind``, or None (see ``load_library``)."""
    return load_library(path, bind)


class Blob(ctypes.Structure):
    """_otlp_wire.h's blob_t: a column's NUL-terminated entries one after another."""

    _fields_ = [("buf", ctypes.c_void_p), ("len", ctypes.c_int64), ("cap", ctypes.c_int64), ("count", ctypes.c_int64)]


def array(addr: int | None, ctype: Any, dtype: Any, n: int) -> np.ndarray[Any, Any]:
    """A view of a C buffer of ``n`` values (valid until the C frees it: copy what is kept)."""
    return np.frombuffer((ctype * n).from_address(addr or 0), dtype=dtype)


def entries(blob: Blob) -> list[str]:
    """The NUL-terminated UTF-8 entries of a C blob (none of them holds a NUL)."""
    if blob.len <= 0:
        return []
    return ctypes.string_at(blob.buf or 0, blob.len - 1).decode("utf-8").split("\0")


def run(decode: Callable[[bytes, int], Any], free: Callable[[Any], None], body: bytes,
        convert: Callable[[Any], T]) -> T | None:
    """A C decoder's result for ``body`` through ``convert``, or None where it declined the body (status not 0)
    or ran out of memory: the caller then takes the reference path with the same bytes. ``decode`` runs
    without the GIL (ctypes releases it); what it returns is freed here."""
    if type(body) is not bytes:
        body = bytes(body)  # a bytearray or memoryview: ctypes passes only bytes without a copy
    p = decode(body, len(body))
    if not p:
        return None
    try:
        o = p.contents
        if o.status != 0:
            return None
        try:
            return convert(o)
        except (ValueError, UnicodeDecodeError, MemoryError, pa.ArrowException):  # pragma: no cover - C validated it
            return None  # the reference path then decides, as for any body declined
    finally:
        free(p)
