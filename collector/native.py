"""Where setup.py puts a compiled helper (plain C loaded with ctypes): next to the module that loads it, named
like an extension module. Shared by the agent's field decoder and the correlator's OTLP decoders."""

from __future__ import annotations

import importlib.machinery
from pathlib import Path


def built_library(package_dir: Path, stem: str) -> Path | None:
    """The library ``stem`` (e.g. ``_fastspans``) built into ``package_dir``, or None when it was not built."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        p = package_dir / f"{stem}{suffix}"
        if p.exists():
            return p
    return None
