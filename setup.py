"""The compiled part of the build: the span decoder's fast path (correlator/ingest/_fastspans.c), plain C
loaded with ctypes. Optional: without a C compiler the install goes on and spans take the pure-Python path.
Everything else about the package is in pyproject.toml."""

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "correlator.ingest._fastspans", ["correlator/ingest/_fastspans.c"],
    # no fused multiply-add: the derived latencies must be bit-identical to Python's arithmetic
    extra_compile_args=["-O2", "-std=c99", "-ffp-contract=off", "-Wall", "-Wextra"],
    optional=True)])
