"""A simulated GPU node behind the same :class:`~collector.backend.GpuBackend` interface as NVML.

Deterministic for a seed, and driven only by the ``now_ns`` it is given (no wall clock), so tests and
the demo can run simulated time faster than real time. The model is first-order and consistent:
load drives power; temperature follows power with a thermal time constant; the SM clock drops, with
the matching clock-event reason, when power reaches the limit or temperature the slowdown point;
energy integrates power; PCIe and NVLink traffic follow load.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from collector.records import GpuIdentity, GpuProcess, GpuSample, Reading, XidEvent
from collector.signals import CLOCK_EVENT_REASONS


@dataclass(frozen=True, slots=True)
class GpuModel:
    name: str
    tdp_w: float
    idle_w: float
    sm_clock_max_hz: float
    memory_clock_hz: float
    fb_total_bytes: int
    pcie_gen: int
    pcie_width: int
    nvlinks: int
    nvlink_link_bytes_per_s: float  # per direction per link
    slowdown_temp_c: float
    thermal_resistance_c_per_w: float
    thermal_tau_s: float


GPU_MODELS: dict[str, GpuModel] = {
    "H100-SXM": GpuModel("NVIDIA H100 80GB HBM3", 700.0, 70.0, 1.98e9, 2.619e9, 80 * 2**30, 5, 16, 18,
                         25e9, 87.0, 0.075, 60.0),
    "A100-80GB": GpuModel("NVIDIA A100-SXM4-80GB", 400.0, 55.0, 1.41e9, 1.593e9, 80 * 2**30, 4, 16, 12,
                          25e9, 85.0, 0.11, 60.0),
    "L40S": GpuModel("NVIDIA L40S", 350.0, 35.0, 2.52e9, 9.001e9, 48 * 2**30, 4, 16, 0, 0.0, 88.0, 0.14,
                     45.0),
}

_REASON_BIT = {name: bit for bit, name in CLOCK_EVENT_REASONS.items()}
_AMBIENT_C = 30.0


@dataclass(slots=True)
class _GpuState:
    ident: GpuIdentity
    temp_c: float
    energy_j: float
    clock_hz: float
    last_ns: int | None = None
    lost: bool = False
    power_limit_w: float = 0.0


class SimulatedGpuSource:
    """N simulated GPUs of one model on one node. ``load`` (0..1) may be changed between samples."""

    def __init__(self, gpus: int = 8, model: str = "H100-SXM", seed: int = 0, node_index: int = 0,
                 load: float = 0.6) -> None:
        if model not in GPU_MODELS:
            raise ValueError(f"unknown GPU model {model!r}; known: {', '.join(GPU_MODELS)}")
        self.model = GPU_MODELS[model]
        self.load = load
        self._rng = random.Random(seed)
        self._gpus = [
            _GpuState(
                GpuIdentity(i, f"GPU-{seed:08x}-{node_index:04x}-4000-8000-{i:012x}", self.model.name,
                            f"00000000:{0x18 + 0x10 * i:02X}:00.0", i),
                temp_c=_AMBIENT_C + 5.0, energy_j=1.0e6 * (i + 1), clock_hz=self.model.sm_clock_max_hz,
                power_limit_w=self.model.tdp_w,
            )
            for i in range(gpus)
        ]
        self._events: list[XidEvent] = []
        self._pid_base = 4100 + 100 * node_index

    @property
    def status(self) -> str:
        return "ok"

    @property
    def driver_version(self) -> str | None:
        return "simulated"

    def open(self) -> str:
        return "ok"

    def identities(self) -> tuple[GpuIdentity, ...]:
        return tuple(g.ident for g in self._gpus)

    # fault hooks used by tests (the fleet simulator of the demo drives richer ones)
    def set_power_limit(self, index: int, watts: float) -> None:
        self._gpus[index].power_limit_w = watts

    def raise_xid(self, index: int, xid: int, now_ns: int) -> None:
        g = self._gpus[index]
        self._events.append(XidEvent(g.ident.uuid, index, xid, now_ns))

    def lose(self, index: int) -> None:
        self._gpus[index].lost = True

    def sample(self, now_ns: int, slow: bool, processes: bool) -> tuple[GpuSample, ...]:
        return tuple(self._sample_gpu(g, now_ns, slow, processes) for g in self._gpus)

    def _sample_gpu(self, g: _GpuState, now_ns: int, slow: bool, processes: bool) -> GpuSample:
        m = self.model
        if g.lost:
            return GpuSample(g.ident, now_ns, (Reading("gpu_lost", 1.0, now_ns),), lost=True)
        dt = 0.0 if g.last_ns is None else max(0.0, (now_ns - g.last_ns) / 1e9)
        g.last_ns = now_ns
        load = min(1.0, max(0.0, self.load + self._rng.gauss(0.0, 0.03)))
        clock_ratio = g.clock_hz / m.sm_clock_max_hz
        demand_w = m.idle_w + (m.tdp_w - m.idle_w) * load * clock_ratio**2
        reasons = 0
        target_clock = m.sm_clock_max_hz
        if demand_w >= g.power_limit_w:
            reasons |= _REASON_BIT["sw_power_cap"]
            target_clock = g.clock_hz * math.sqrt(g.power_limit_w / demand_w)
        if g.temp_c >= m.slowdown_temp_c:
            reasons |= _REASON_BIT["sw_thermal"]
            target_clock = min(target_clock, g.clock_hz * 0.9)
        if load < 0.02:
            reasons |= _REASON_BIT["gpu_idle"]
        g.clock_hz = min(m.sm_clock_max_hz, max(0.3 * m.sm_clock_max_hz, target_clock))
        power_w = min(demand_w, g.power_limit_w * 1.02)
        steady_c = _AMBIENT_C + power_w * m.thermal_resistance_c_per_w
        g.temp_c += (steady_c - g.temp_c) * (1.0 - math.exp(-dt / m.thermal_tau_s)) if dt else 0.0
        g.energy_j += power_w * dt
        t = now_ns
        r = [
            Reading("gpu_lost", 0.0, t),
            Reading("power_w", power_w, t),
            Reading("power_limit_w", g.power_limit_w, t),
            Reading("energy_j", g.energy_j, t),
            Reading("gpu_temp_c", round(g.temp_c), t),
            Reading("memory_temp_c", round(g.temp_c + 4.0), t),
            Reading("sm_clock_hz", round(g.clock_hz / 15e6) * 15e6, t),
            Reading("memory_clock_hz", m.memory_clock_hz, t),
            Reading("clock_event_reasons", float(reasons), t),
            Reading("gpu_util_ratio", round(min(1.0, load * 1.1), 2), t),
            Reading("memory_busy_ratio", round(load * 0.7, 2), t),
            Reading("fb_total_bytes", float(m.fb_total_bytes), t),
            Reading("fb_used_bytes", float(int(m.fb_total_bytes * 0.9)), t),
            Reading("fb_free_bytes", float(m.fb_total_bytes - int(m.fb_total_bytes * 0.9)), t),
            Reading("pcie_tx_bytes_per_s", 2e8 * load + self._rng.uniform(0, 1e7), t),
            Reading("pcie_rx_bytes_per_s", 6e8 * load + self._rng.uniform(0, 1e7), t),
            Reading("pcie_replay_total", 0.0, t),
            Reading("ecc_sbe_volatile_total", 0.0, t),
            Reading("ecc_dbe_volatile_total", 0.0, t),
        ]
        per_link = m.nvlink_link_bytes_per_s * 0.2 * load
        for link in range(m.nvlinks):
            labels = (("link", str(link)),)
            r.append(Reading("nvlink_tx_bytes_per_s", per_link, t, labels))
            r.append(Reading("nvlink_rx_bytes_per_s", per_link, t, labels))
        if m.nvlinks:
            r.append(Reading("nvlink_tx_total_bytes_per_s", per_link * m.nvlinks, t))
            r.append(Reading("nvlink_rx_total_bytes_per_s", per_link * m.nvlinks, t))
        if slow:
            r += [
                Reading("pcie_link_gen", float(m.pcie_gen), t),
                Reading("pcie_link_width", float(m.pcie_width), t),
                Reading("pcie_link_gen_max", float(m.pcie_gen), t),
                Reading("pcie_link_width_max", float(m.pcie_width), t),
                Reading("sm_clock_max_hz", m.sm_clock_max_hz, t),
            ]
            r += [Reading("nvlink_link_up", 1.0, t, (("link", str(link)),)) for link in range(m.nvlinks)]
        procs = (GpuProcess(self._pid_base + g.ident.index, int(m.fb_total_bytes * 0.88), "compute"),) \
            if processes else ()
        return GpuSample(g.ident, now_ns, tuple(r), procs)

    def drain_events(self) -> list[XidEvent]:
        out, self._events = self._events, []
        return out

    def close(self) -> None:
        return None
