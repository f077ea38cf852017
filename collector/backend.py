"""The interface every GPU backend of the agent implements: real NVML or the simulated node."""

from __future__ import annotations

from typing import Protocol

from collector.records import GpuIdentity, GpuSample, XidEvent


class GpuBackend(Protocol):
    """A source of per-GPU samples and fault events for one node."""

    @property
    def status(self) -> str:
        """"ok", or why there are no GPUs ("library_not_found" on a CPU-only node, ...)."""
        ...

    @property
    def driver_version(self) -> str | None: ...

    def open(self) -> str:
        """Find the GPUs; returns :attr:`status`. Never raises for a missing or broken driver."""
        ...

    def identities(self) -> tuple[GpuIdentity, ...]: ...

    def sample(self, now_ns: int, slow: bool, processes: bool) -> tuple[GpuSample, ...]:
        """One sample of every GPU. ``slow`` adds the slowly changing signals (link generation and
        width, NVLink states, max clocks); ``processes`` adds the processes holding each GPU."""
        ...

    def drain_events(self) -> list[XidEvent]:
        """XID events seen since the last call."""
        ...

    def close(self) -> None: ...
