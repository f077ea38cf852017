"""The interface every GPU backend of the agent implements: real NVML or the simulated node."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

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


@runtime_checkable
class RoundSampler(Protocol):
    """A backend that can make the fast cycles between two of the agent's cycles itself, off Python (the NVML
    backend's compiled sampler thread): the agent then wakes once a round, not once a cycle."""

    def start_round(self, first_at: float, period_s: float, ticks: int) -> int:
        """Make up to ``ticks`` of the next cycles, at ``first_at + k * period_s`` (time.monotonic): how many it
        will make (0: none, the caller makes them)."""
        ...

    def wait_round(self, limit: float) -> bool:
        """Wait until the round is over and the caller's next cycle is due, or it ended early, or until ``limit``
        (time.monotonic): whether it is over."""
        ...

    def end_round(self) -> None:
        """No tick after the one being made."""
        ...

    def round_samples(self) -> tuple[list[tuple[int, tuple[GpuSample, ...]]], int]:
        """Once over: per tick kept (its time in ns, its samples), and how many ticks were missed."""
        ...
