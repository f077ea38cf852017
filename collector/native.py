"""The compiled helpers built by setup.py and loaded with ctypes: where they are (next to the module that loads
them, named like an extension module) and how they are opened. Shared by the agent's field decoder and PCIe
poller and the correlator's OTLP decoders. ``STACKLENS_PURE_PYTHON=1`` turns every compiled path off."""

from __future__ import annotations

import ctypes
import importlib.machinery
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def pure_python() -> bool:
    """Whether the compiled paths are turned off (``STACKLENS_PURE_PYTHON=1``), as the environment says now."""
    return os.environ.get("STACKLENS_PURE_PYTHON") == "1"


def built_library(package_dir: Path, stem: str) -> Path | None:
    """The library ``stem`` (e.g. ``_fastspans``) built into ``package_dir``, or None when it was not built."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        p = package_dir / f"{stem}{suffix}"
        if p.exists():
            return p
    return None


def load_library(path: Path | None, bind: Callable[[Any], T | None]) -> T | None:
    """The library at ``path`` with its functions bound by ``bind``, or None: not built, not loadable, a symbol
    missing, or not the build ``bind`` was written for (it returns None for a stale one)."""
    if path is None:
        return None
    try:
        return bind(ctypes.CDLL(str(path)))
    except (OSError, AttributeError):
        return None
