"""The compiled part of the build: the OTLP decoders' fast paths (correlator/ingest/_fastspans.c for spans,
_fastmetrics.c for metrics, sharing _otlp_wire.h), the agent's NVML field decoder and sampler thread
(collector/nvml/_fastfields.c) and its PCIe counter poller (collector/nvml/_pcie_poller.c), the two sharing
_monotonic_thread.h, plain C loaded with ctypes. Optional: without a C compiler the install goes on and everything
takes the pure-Python path. Everything else about the package is in pyproject.toml."""

from setuptools import Extension, setup

# no fused multiply-add: the derived latencies must be bit-identical to Python's arithmetic
_FLAGS = ["-O2", "-std=c99", "-ffp-contract=off", "-Wall", "-Wextra"]
_WIRE = ["correlator/ingest/_otlp_wire.h"]
# the agent's two compiled threads' lock, condition and clock
_THREAD = ["collector/nvml/_monotonic_thread.h"]

setup(ext_modules=[
    Extension("correlator.ingest._fastspans", ["correlator/ingest/_fastspans.c"], depends=_WIRE,
              extra_compile_args=_FLAGS, optional=True),
    Extension("correlator.ingest._fastmetrics", ["correlator/ingest/_fastmetrics.c"], depends=_WIRE,
              extra_compile_args=_FLAGS, optional=True),
    # the agent's field decoder (collector/nvml/compiled.py loads it)
    Extension("collector.nvml._fastfields", ["collector/nvml/_fastfields.c"], depends=_THREAD,
              extra_compile_args=[*_FLAGS, "-pthread"], extra_link_args=["-pthread"], optional=True),
    # the PCIe byte counters' poller thread (collector/nvml/pcie_native.py loads it)
    Extension("collector.nvml._pcie_poller", ["collector/nvml/_pcie_poller.c"], depends=_THREAD,
              extra_compile_args=[*_FLAGS, "-pthread"], extra_link_args=["-pthread"], optional=True),
    # the OTLP encoder's per-reading loop, a CPython extension (collector/export/otlp_encode.py imports it)
    Extension("collector.export._otlp_points", ["collector/export/_otlp_points.c"], extra_compile_args=_FLAGS,
              optional=True),
])
