"""serve's allocator settings: freed multi-megabyte buffers are reused, not faulted in again."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from correlator.server.allocator import MMAP_BYTES, TRIM_BYTES, keep_freed_memory

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")

# Three 3 MB buffers written and freed together, as a receiver's body, its join and a decoder's columns are:
# with glibc's defaults the freed 9 MB at the heap's top exceed its trim threshold (~2x the largest freed
# lately) and go back to the kernel, so every round faults them in again.
_ROUNDS = r"""
import ctypes, json, resource, sys
from correlator.server.allocator import keep_freed_memory
done = keep_freed_memory() if sys.argv[1] == "tuned" else {}
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 3 << 20
def one_round():
    bufs = [libc.malloc(size) for _ in range(3)]
    for b in bufs:
        ctypes.memset(b, 1, size)
    for b in bufs:
        libc.free(b)
for _ in range(2):  # glibc's sliding thresholds settle
    one_round()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    one_round()
print(json.dumps({"done": done, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _run(mode: str) -> dict[str, object]:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": "."}
    out = subprocess.run([sys.executable, "-c", _ROUNDS, mode], capture_output=True, text=True, env=env,
                         check=True, timeout=60)
    result: dict[str, object] = json.loads(out.stdout)
    return result


def test_freed_buffers_are_reused_instead_of_faulted_in_again() -> None:
    default, tuned = _run("default"), _run("tuned")
    pages_per_round = 3 * (3 << 20) // 4096
    assert tuned["done"] == {"trim_threshold": TRIM_BYTES, "mmap_threshold": MMAP_BYTES}
    assert isinstance(default["faults"], int) and isinstance(tuned["faults"], int)
    assert default["faults"] > 10 * pages_per_round  # the defaults fault most rounds' pages in again
    assert tuned["faults"] < pages_per_round  # all 20 rounds together fault less than one round's buffers


def test_the_environment_settings_are_left_alone() -> None:
    assert keep_freed_memory(environ={"MALLOC_TRIM_THRESHOLD_": str(1 << 20),
                                      "GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}) == {}
