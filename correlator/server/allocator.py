"""glibc's allocator, set for a server that takes multi-megabyte bodies on several threads.

An OpenTelemetry Collector forwards dcgm-exporter's series in ~2.5 MB exports. Each is read, joined, decoded
and turned into Arrow columns on a receiver or writer thread, and each of those buffers is freed a few
milliseconds later. With glibc's defaults the freed top of a thread's heap is handed back to the kernel
(its trim threshold follows the largest buffer freed lately, ~2x that) and the next export faults every page
in again, zeroed: ``perf`` put a fifth of ``serve``'s CPU under DCGM load in page faults and zeroing.
Keeping up to ``trim_bytes`` free at the top of each heap, and serving buffers up to ``mmap_bytes`` from the
heaps rather than fresh mappings, makes those pages reused instead. The process' peak memory is the same (it
is the same buffers); what it keeps after a burst is at most ``trim_bytes`` more per arena.

The environment's own settings (``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_MMAP_THRESHOLD_``, or the tunables
``GLIBC_TUNABLES=glibc.malloc.trim_threshold=...``) are left as they are.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform
from collections.abc import Mapping

log = logging.getLogger("stacklens.allocator")

M_TRIM_THRESHOLD = -1  # mallopt's parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
TRIM_BYTES = 128 << 20
MMAP_BYTES = 32 << 20  # glibc's own ceiling for its sliding mmap threshold


def keep_freed_memory(trim_bytes: int = TRIM_BYTES, mmap_bytes: int = MMAP_BYTES,
                      environ: Mapping[str, str] = os.environ) -> dict[str, int]:
    """Sets glibc's trim and mmap thresholds for this process unless the environment sets them; returns the
    ones set (by their tunable names), empty off glibc or where ``mallopt`` refuses."""
    if platform.libc_ver()[0] != "glibc":
        return {}
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return {}
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    tunables = environ.get("GLIBC_TUNABLES", "")
    done: dict[str, int] = {}
    for name, param, value in (("trim_threshold", M_TRIM_THRESHOLD, trim_bytes),
                               ("mmap_threshold", M_MMAP_THRESHOLD, mmap_bytes)):
        if f"MALLOC_{name.upper()}_" in environ or f"glibc.malloc.{name}=" in tunables:
            continue
        if mallopt(param, value) == 1:  # 1: done, 0: refused
            done[name] = value
        else:
            log.warning("allocator: mallopt refused %s = %d", name, value)
    return done
