"""What the agent produces: immutable records, one snapshot per sample cycle.

Times are UTC nanoseconds since the epoch. A value of ``None`` means the source did not give one
(not supported, an error, a lost GPU, the first read of a counter); it is exported as missing and never
as 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple


class Reading(NamedTuple):
    """One value of one canonical signal (see :mod:`collector.signals`) at its source's own time.

    Immutable like the other records; a NamedTuple because the agent builds several hundred of these
    per cycle and a frozen dataclass costs several times more to construct."""

    signal: str
    value: float | None
    time_ns: int
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class GpuIdentity:
    index: int
    uuid: str
    name: str
    pci_bus_id: str
    minor_number: int | None = None

    @property
    def device(self) -> str:
        """The device node name dcgm-exporter puts in its ``device`` label."""
        return f"nvidia{self.minor_number if self.minor_number is not None else self.index}"


@dataclass(frozen=True, slots=True)
class GpuProcess:
    pid: int
    used_memory_bytes: int | None
    kind: Literal["compute", "graphics"]


@dataclass(frozen=True, slots=True)
class GpuSample:
    gpu: GpuIdentity
    time_ns: int
    readings: tuple[Reading, ...]
    processes: tuple[GpuProcess, ...] = ()
    lost: bool = False


@dataclass(frozen=True, slots=True)
class XidEvent:
    gpu_uuid: str
    gpu_index: int
    xid: int
    time_ns: int


@dataclass(frozen=True, slots=True)
class Placement:
    """A process holding a GPU, resolved as far as the node allows: container, then pod."""

    gpu_uuid: str
    gpu_index: int
    pid: int
    time_ns: int
    used_memory_bytes: int | None = None
    container_id: str | None = None
    pod_uid: str | None = None
    pod: str | None = None
    namespace: str | None = None
    container: str | None = None


@dataclass(frozen=True, slots=True)
class HostSample:
    time_ns: int
    readings: tuple[Reading, ...]


@dataclass(frozen=True, slots=True)
class NodeSnapshot:
    """Everything one sample cycle saw on one node."""

    node: str
    time_ns: int
    gpus: tuple[GpuSample, ...]
    host: HostSample | None = None
    # None: placement was not resolved this cycle (it runs on its own cadence); () : resolved, none
    placements: tuple[Placement, ...] | None = None
    events: tuple[XidEvent, ...] = ()
    # why there are no GPU samples, if there are none (e.g. "library_not_found" on a CPU-only node)
    gpu_status: str = "ok"
    driver_version: str | None = None


class DerivedLatencies:
    """TTFT, end-to-end time and TPOT of a finished request, derived as DESIGN.md defines them from the
    fields a request record holds (a base of the dataclasses that hold them)."""

    __slots__ = ()
    arrival_ns: int
    end_ns: int
    queue_s: float
    prefill_s: float
    decode_s: float
    output_tokens: int

    @property
    def ttft_s(self) -> float:
        return self.queue_s + self.prefill_s

    @property
    def e2e_s(self) -> float:
        return (self.end_ns - self.arrival_ns) / 1e9

    @property
    def tpot_s(self) -> float | None:
        return self.decode_s / (self.output_tokens - 1) if self.output_tokens > 1 else None
