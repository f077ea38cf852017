"""Finding and loading the compiled decoders (``_fastspans``, ``_fastmetrics``: plain C built by setup.py
next to their Python modules, loaded with ctypes), and reading their buffers.

``STACKLENS_PURE_PYTHON=1`` turns every compiled path off (nothing is loaded)."""

from __future__ import annotations

import ctypes
import importlib.machinery
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

PURE_PYTHON = os.environ.get("STACKLENS_PURE_PYTHON") == "1"


def library_path(stem: str) -> Path | None:
    """Where the compiled library ``stem`` (e.g. ``_fastspans``) is, as setup.py builds it, or None."""
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        p = here / f"{stem}{suffix}"
        if p.exists():
            return p
    return None


def load(path: Path | None, bind: Callable[[Any], Any]) -> Any:
    """The library at ``path`` with its functions bound by ``bind``, or None: not built, not loadable, a
    symbol missing, or not the build ``bind`` was written for (it returns None for a stale one)."""
    if path is None:
        return None
    try:
        return bind(ctypes.CDLL(str(path)))
    except (OSError, AttributeError):
        return None


def array(addr: int | None, ctype: Any, dtype: Any, n: int) -> np.ndarray[Any, Any]:
    """A view of a C buffer of ``n`` values (valid until the C frees it: copy what is kept)."""
    return np.frombuffer((ctype * n).from_address(addr or 0), dtype=dtype)


def entries(blob: int | None, size: int) -> list[str]:
    """The NUL-terminated UTF-8 entries of a C blob of ``size`` bytes (none of them holds a NUL)."""
    if size <= 0:
        return []
    return ctypes.string_at(blob or 0, size - 1).decode("utf-8").split("\0")
