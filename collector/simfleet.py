"""A simulated serving fleet with fault injection and ground truth: the demo, the test bed and the
evaluation's source of truth.

Each node has GPUs of one type; each replica (one vLLM-like engine process) serves one model over
``tp`` GPUs with continuous batching, modelled as ``max_num_seqs`` slots: a request waits for a slot
(queue), prefills (compute-bound: time grows with prompt tokens and falls with the SM clock), then
decodes token by token (memory-bound: the step time grows with the batch's KV reads and with any
share of HBM bandwidth lost to others; tensor-parallel all-reduce goes over NVLink). Step times are
calibrated on Splitwise's measured Llama-2-70B / H100 TP-2 numbers (docs/simulator.md).

GPU state follows the load: power from compute and memory activity (scaled by the clock squared),
temperature first-order toward ambient + R·P with the GPU's time constant, the SM clock held down when
power meets the limit (``sw_power_cap``) or temperature the slowdown point (``sw_thermal``/``hw_thermal``),
and a slower clock makes prefill slower. Simulated time only: no wall clock, deterministic per seed.
"""

from __future__ import annotations

import heapq
import json
import math
import random
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from collector.records import (
    DerivedLatencies,
    GpuIdentity,
    GpuProcess,
    GpuSample,
    HostSample,
    NodeSnapshot,
    Placement,
    Reading,
    XidEvent,
)
from collector.signals import CLOCK_EVENT_REASONS

_BIT = {name: bit for bit, name in CLOCK_EVENT_REASONS.items()}


@dataclass(frozen=True, slots=True)
class GpuType:
    name: str  # as NVML reports it
    tdp_w: float
    idle_w: float
    sm_clock_max_hz: float
    memory_clock_hz: float
    fb_total_bytes: int
    pcie_gen: int
    pcie_width: int
    nvlinks: int
    nvlink_link_bytes_per_s: float  # per direction
    hbm_bytes_per_s: float
    slowdown_temp_c: float
    thermal_resistance_c_per_w: float
    thermal_tau_s: float
    speed: float  # relative compute speed against H100 SXM (the calibration point): prefill
    mem_speed: float  # relative memory speed against H100 SXM: decode steps


# public spec sheets (NVIDIA H100 SXM5, A100 SXM4 80GB, L40S datasheets)
GPU_TYPES: dict[str, GpuType] = {
    "H100-SXM": GpuType("NVIDIA H100 80GB HBM3", 700.0, 70.0, 1.98e9, 2.619e9, 80 * 2**30, 5, 16, 18, 25e9, 3.35e12,
                        87.0, 0.072, 45.0, 1.0, 1.0),
    "A100-80GB": GpuType("NVIDIA A100-SXM4-80GB", 400.0, 55.0, 1.41e9, 1.593e9, 80 * 2**30, 4, 16, 12, 25e9, 2.04e12,
                         85.0, 0.12, 45.0, 0.45, 0.63),
    "L40S": GpuType("NVIDIA L40S", 350.0, 35.0, 2.52e9, 9.001e9, 48 * 2**30, 4, 16, 0, 0.0, 0.864e12, 88.0, 0.15,
                    40.0, 0.35, 0.26),
}

# Llama-2-70B on H100 TP-2, fitted to Splitwise's measurements (see docs/simulator.md)
PREFILL_FIXED_S = 0.010
PREFILL_PER_TOKEN_S = 0.000150
DECODE_STEP_S = 0.0365
DECODE_PER_SEQ_S = 0.00042
COMM_SHARE = 0.2  # share of a TP-2 decode step spent in the NVLink all-reduce
_AMBIENT_C = 28.0
_PCIE_LANE = {3: 0.985e9, 4: 1.969e9, 5: 3.938e9}

FAULT_KINDS: dict[str, tuple[str, str]] = {
    "hbm_contention": ("memory", "hbm_bandwidth"),
    "kv_pressure": ("memory", "kv_cache_pressure"),
    "pcie_saturation": ("interconnect", "pcie"),
    "nvlink_degraded": ("interconnect", "nvlink"),
    "thermal_throttle": ("thermal_power", "thermal_throttle"),
    "power_cap": ("thermal_power", "power_cap"),
    "arrival_burst": ("scheduling", "queueing"),
    "batching_misconfig": ("scheduling", "batching"),
    "noisy_neighbor": ("scheduling", "noisy_neighbor"),
    "cpu_contention": ("scheduling", "cpu_contention"),
    "xid_failure": ("hardware_fault", "xid"),
    "drift": ("none", ""),
}


@dataclass(frozen=True, slots=True)
class Fault:
    kind: str
    node: int = 1  # index of the node
    gpu: int = 0  # index of the GPU on the node (the replica that holds it, for replica faults)
    onset_s: float = 600.0
    duration_s: float = 1e9
    intensity: float = 1.0

    def active(self, t_s: float) -> bool:
        return self.onset_s <= t_s < self.onset_s + self.duration_s


@dataclass(frozen=True, slots=True)
class GroundTruth:
    cause: str
    subcause: str
    node: str
    gpu_uuid: str | None
    onset_ns: int
    end_ns: int


@dataclass(frozen=True, slots=True)
class Scenario:
    nodes: int = 2
    gpus_per_node: int = 4
    gpu_type: str = "H100-SXM"
    model: str = "llama-2-70b"
    tp: int = 2
    max_num_seqs: int = 64
    rate_per_replica: float = 2.5  # requests/s
    duration_s: float = 900.0
    start_ns: int = 1_795_000_000 * 10**9
    seed: int = 7
    drift: bool = True
    faults: tuple[Fault, ...] = ()
    workload: str = "azure_conv"  # token lengths: "azure_conv", "azure_code", "mooncake" or "synthetic"
    # "poisson" at rate_per_replica, or "trace": the workload trace's own arrival times (its bursts and
    # lulls), stretched so each replica still averages rate_per_replica, each from its own offset
    arrivals: str = "poisson"

    @staticmethod
    def from_dict(d: dict[str, object]) -> Scenario:
        known = {f for f in Scenario.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown scenario keys: {', '.join(sorted(unknown))}")
        faults = []
        raw_faults: list[object] = list(d.get("faults") or [])  # type: ignore[call-overload]
        for i, f in enumerate(raw_faults):
            if not isinstance(f, dict) or f.get("kind") not in FAULT_KINDS:
                raise ValueError(f"fault #{i + 1}: kind must be one of {', '.join(FAULT_KINDS)}")
            try:
                faults.append(Fault(**f))
            except TypeError as e:
                raise ValueError(f"fault #{i + 1}: {e}") from e
        args = {k: v for k, v in d.items() if k != "faults"}
        try:
            s = Scenario(**args, faults=tuple(faults))  # type: ignore[arg-type]
        except TypeError as e:
            raise ValueError(str(e)) from e
        if s.gpu_type not in GPU_TYPES:
            raise ValueError(f"gpu_type must be one of {', '.join(GPU_TYPES)}")
        if s.arrivals not in ("poisson", "trace"):
            raise ValueError("arrivals must be 'poisson' or 'trace'")
        if s.arrivals == "trace" and s.workload not in _TRACES:
            raise ValueError(f"arrivals = 'trace' needs a trace workload: {', '.join(_TRACES)}")
        if s.gpus_per_node % s.tp:
            raise ValueError("gpus_per_node must be a multiple of tp")
        for f in s.faults:
            if not 0 <= f.node < s.nodes or not 0 <= f.gpu < s.gpus_per_node:
                raise ValueError(f"fault {f.kind}: node {f.node} / gpu {f.gpu} is outside the fleet")
        return s


def load_scenario(path: str | Path) -> Scenario:
    try:
        return Scenario.from_dict(tomllib.loads(Path(path).read_text()))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"{path}: {e}") from e


def fault_scenario(kind: str, seed: int = 7, onset_s: float = 600.0, duration_s: float = 900.0,
                   node: int = 1, gpu: int = 2, intensity: float = 1.0) -> Scenario:
    """The demo's default fleet with one fault (or ``drift`` alone, a healthy run)."""
    if kind not in FAULT_KINDS:
        raise ValueError(f"unknown fault {kind!r}; known: {', '.join(FAULT_KINDS)}")
    faults = () if kind == "drift" else (Fault(kind, node, gpu, onset_s, 1e9, intensity),)
    return Scenario(seed=seed, duration_s=onset_s + duration_s, faults=faults)


@dataclass(frozen=True, slots=True)
class SimRequest(DerivedLatencies):
    request_id: str
    replica: str
    node: str
    pid: int
    model: str
    gpu_uuids: tuple[str, ...]
    arrival_ns: int
    end_ns: int
    queue_s: float
    prefill_s: float
    decode_s: float
    prompt_tokens: int
    output_tokens: int
    finish_reason: str
    preemptions: int


@dataclass(frozen=True, slots=True)
class EngineGauges:
    node: str
    pid: int
    model: str
    time_ns: int
    running: int
    waiting: int
    kv_usage_ratio: float
    preemptions_total: int
    prompt_tokens_total: int
    generation_tokens_total: int


@dataclass(frozen=True, slots=True)
class FleetTick:
    time_ns: int
    snapshots: tuple[NodeSnapshot, ...]
    finished: tuple[SimRequest, ...]
    engines: tuple[EngineGauges, ...]


_TRACES = {"azure_conv": "AzureLLMInferenceTrace_conv.csv", "azure_code": "AzureLLMInferenceTrace_code.csv",
           "mooncake": "mooncake_conversation_trace.jsonl"}


def trace_rows(workload: str) -> list[tuple[float, int, int]]:
    """(seconds since the trace's first request, prompt tokens, output tokens) of a real trace in
    ../shared/data (the Azure LLM inference traces, Mooncake's conversation trace); [] when absent."""
    path = Path(__file__).resolve().parents[2] / "shared" / "data" / _TRACES.get(workload, "")
    rows: list[tuple[float, int, int]] = []
    if workload not in _TRACES or not path.is_file():
        return rows
    with path.open() as f:
        if path.suffix == ".jsonl":
            for line in f:
                d = json.loads(line)
                rows.append((float(d["timestamp"]) / 1e3, int(d["input_length"]), int(d["output_length"])))
        else:
            next(f)
            for line in f:
                parts = line.rstrip().split(",")
                if len(parts) == 3:
                    t = datetime.fromisoformat(parts[0][:26]).replace(tzinfo=UTC).timestamp()
                    rows.append((t, int(parts[1]), int(parts[2])))
    rows.sort()
    t0 = rows[0][0] if rows else 0.0
    return [(t - t0, max(1, min(p, 8000)), max(1, min(o, 1500))) for t, p, o in rows]


def _token_lengths(workload: str, rng: random.Random) -> list[tuple[int, int]]:
    pairs = [(p, o) for _, p, o in trace_rows(workload)]
    if not pairs:  # the traces are not shipped with the package: a lognormal fit of the conversation trace
        pairs = [(max(8, min(8000, int(rng.lognormvariate(6.6, 0.9)))), max(2, min(1500, int(rng.lognormvariate(5.2,
                 0.8))))) for _ in range(20000)]
    return pairs


@dataclass
class _Gpu:
    ident: GpuIdentity
    t: GpuType
    temp_c: float
    energy_j: float
    clock_ratio: float = 1.0
    power_w: float = 0.0
    reasons: int = 0
    compute_act: float = 0.0
    mem_act: float = 0.0


@dataclass
class _Replica:
    name: str
    node: int
    pid: int
    gpus: list[_Gpu]
    max_num_seqs: int
    slots: list[float] = field(default_factory=list)  # heap of times (s) the slots free up
    running: list[tuple[float, float, int]] = field(default_factory=list)  # (start, end, kv tokens)
    waiting: int = 0
    preemptions: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    pending: list[SimRequest] = field(default_factory=list)
    small_slots: list[float] | None = None
    trace_pos: int | None = None  # the next trace row (arrivals = "trace")
    trace_next_s: float = 0.0


class Fleet:
    """The fleet of a scenario. ``run()`` yields one :class:`FleetTick` per simulated second."""

    def __init__(self, scenario: Scenario) -> None:
        self.s = scenario
        self.rng = random.Random(scenario.seed)
        self.gpu_type = GPU_TYPES[scenario.gpu_type]
        self.lengths = _token_lengths(scenario.workload, self.rng)
        self._trace: list[tuple[float, int, int]] = []
        if scenario.arrivals == "trace":
            self._trace = trace_rows(scenario.workload)
            if len(self._trace) < 2:
                raise ValueError(f"arrivals = 'trace': the {scenario.workload} trace is not in ../shared/data")
        self.nodes = [f"node-{n + 1}" for n in range(scenario.nodes)]
        self.replicas: list[_Replica] = []
        self.gpus: list[list[_Gpu]] = []
        for n in range(scenario.nodes):
            gpus = [_Gpu(GpuIdentity(i, f"GPU-{scenario.seed:04x}{n:04x}-5e1f-4c0a-9d7e-{n:04x}{i:08x}",
                                     self.gpu_type.name, f"00000000:{0x18 + 0x10 * i:02X}:00.0", i),
                         self.gpu_type, _AMBIENT_C + 20, 5.0e7 * (i + 1))
                    for i in range(scenario.gpus_per_node)]
            self.gpus.append(gpus)
            for r in range(scenario.gpus_per_node // scenario.tp):
                g = gpus[r * scenario.tp:(r + 1) * scenario.tp]
                self.replicas.append(_Replica(f"{self.nodes[n]}/vllm-{r}", n, 4000 + 100 * n + r, g,
                                              scenario.max_num_seqs, [0.0] * scenario.max_num_seqs))
        self.kv_capacity_tokens = 180_000  # free HBM after weights on TP-2, at Llama-2-70B's 320 KiB/token (GQA)
        self._seq = 0
        self._xid_next: dict[str, float] = {}
        self._kv_usage: dict[str, float] = {}
        self._cg_periods: dict[int, float] = {}
        self._cg_thr: dict[int, float] = {}

    @property
    def ground_truth(self) -> list[GroundTruth]:
        out = []
        for f in self.s.faults:
            cause, sub = FAULT_KINDS[f.kind]
            gpu = self.gpus[f.node][f.gpu].ident.uuid if f.kind != "cpu_contention" else None
            end = min(self.s.duration_s, f.onset_s + f.duration_s)
            out.append(GroundTruth(cause, sub, self.nodes[f.node], gpu, self.s.start_ns + int(f.onset_s * 1e9),
                                   self.s.start_ns + int(end * 1e9)))
        return out

    def replica_of(self, node: int, gpu: int) -> _Replica:
        return next(r for r in self.replicas if r.node == node and any(g.ident.index == gpu for g in r.gpus))

    def _faults(self, t_s: float, kind: str) -> list[Fault]:
        return [f for f in self.s.faults if f.kind == kind and f.active(t_s)]

    def _on(self, t_s: float, kind: str, node: int, gpu: int | None = None) -> Fault | None:
        for f in self._faults(t_s, kind):
            if f.node == node and (gpu is None or f.gpu == gpu):
                return f
        return None

    def _replica_fault(self, t_s: float, kind: str, rep: _Replica) -> Fault | None:
        for f in self._faults(t_s, kind):
            if f.node == rep.node and any(g.ident.index == f.gpu for g in rep.gpus):
                return f
        return None

    # -- the engine ------------------------------------------------------------------------------
    def _serve(self, rep: _Replica, t_s: float) -> None:
        s, rng = self.s, self.rng
        rate = s.rate_per_replica
        if s.drift:  # diurnal load: ±8 % over a 20-minute period, the same on every replica
            rate *= 1.0 + 0.08 * math.sin(2 * math.pi * t_s / 1200.0)
        burst = self._replica_fault(t_s, "arrival_burst", rep)
        if burst:
            rate *= 1.0 + 0.8 * burst.intensity
        kv = self._replica_fault(t_s, "kv_pressure", rep)
        misconf = self._replica_fault(t_s, "batching_misconfig", rep)
        slots_allowed = max(2, int(rep.max_num_seqs * 0.45 / misconf.intensity)) if misconf else rep.max_num_seqs
        n = _poisson(rng, rate)
        clock = min(g.clock_ratio for g in rep.gpus)
        compute_share = 1.0
        mem_share = 1.0
        overhead = 0.0
        for g in rep.gpus:
            nn = self._on(t_s, "noisy_neighbor", rep.node, g.ident.index)
            if nn:
                compute_share = min(compute_share, 1.0 - 0.3 * nn.intensity)
                mem_share = min(mem_share, 1.0 - 0.15 * nn.intensity)
            hbm = self._on(t_s, "hbm_contention", rep.node, g.ident.index)
            if hbm:
                mem_share = min(mem_share, 1.0 - 0.3 * hbm.intensity)
        cpu = self._on(t_s, "cpu_contention", rep.node)
        if cpu:
            overhead = 0.012 * cpu.intensity  # scheduler/detokeniser steps held up by the host
        pcie = any(self._on(t_s, "pcie_saturation", rep.node, g.ident.index) for g in rep.gpus)
        nvl = [self._on(t_s, "nvlink_degraded", rep.node, g.ident.index) for g in rep.gpus]
        links_frac = 1.0
        if any(nvl):
            links_frac = max(0.1, 1.0 - 0.5 * max(f.intensity for f in nvl if f))
        xid = any(self._on(t_s, "xid_failure", rep.node, g.ident.index) for g in rep.gpus)
        rep.running = [r for r in rep.running if r[1] > t_s]
        burst_rate = s.rate_per_replica * 0.8 * burst.intensity if burst else 0.0
        for arrival, trace_prompt, out in self._arrivals(rep, t_s, n, burst_rate):
            prompt = min(16000, int(trace_prompt * (1 + 7 * kv.intensity)) + 2000) if kv else trace_prompt
            heap = rep.slots
            if misconf:
                # a misconfigured engine (max_num_seqs set too low) uses only a few of its slots
                if rep.small_slots is None:
                    rep.small_slots = sorted(rep.slots)[:slots_allowed]
                heap = rep.small_slots
            elif rep.small_slots is not None:
                rep.small_slots = None
            free_at = heapq.heappop(heap)
            start = max(arrival, free_at)
            queue = start - arrival
            # the batch and the KV it holds when this request starts: requests still waiting for a slot
            # neither decode with it nor hold KV blocks (vLLM allocates KV at admission)
            in_batch = [r for r in rep.running if r[0] <= start < r[1]]
            b = max(1, min(len(in_batch), rep.max_num_seqs))
            kv_used = sum(r[2] for r in in_batch)
            prefill = (PREFILL_FIXED_S + prompt * PREFILL_PER_TOKEN_S) / (clock * compute_share * g0_speed(rep))
            if links_frac < 1.0 and self.s.tp > 1:
                prefill *= 1.0 + COMM_SHARE * 0.5 * (1.0 / links_frac - 1.0)
            if pcie:
                # host-to-device transfers of the prompt's KV/embeddings wait behind the saturated link
                prefill += 0.25 + prompt * 0.00035
            comm = DECODE_STEP_S * COMM_SHARE * (1.0 / links_frac - 1.0) if self.s.tp > 1 else 0.0
            step = ((DECODE_STEP_S + DECODE_PER_SEQ_S * b) / (mem_share * rep.gpus[0].t.mem_speed)
                    + comm + overhead) * (1.0 + 0.25 * (1.0 - clock) ** 2)
            if xid:
                step *= 1.3
                prefill *= 1.3
            preempted = 0
            need = prompt + out
            if kv_used + need > self.kv_capacity_tokens:
                # KV exhausted: the request is preempted once and recomputed (vLLM's default)
                preempted = 1 + int((kv_used + need - self.kv_capacity_tokens) / max(1, need) > 1)
                rep.preemptions += preempted
                prefill *= 1 + preempted
                queue += 0.5 * preempted
                start += 0.5 * preempted
            decode = step * max(0, out - 1)
            end = start + prefill + decode
            heapq.heappush(heap, end)
            rep.running.append((start, end, need))
            rep.prompt_tokens += prompt
            rep.generation_tokens += out
            self._seq += 1
            rep.pending.append(SimRequest(
                f"cmpl-{self.s.seed}-{self._seq}", rep.name, self.nodes[rep.node], rep.pid, s.model,
                tuple(g.ident.uuid for g in rep.gpus), s.start_ns + int(arrival * 1e9),
                s.start_ns + int((arrival + queue + prefill + decode) * 1e9), queue, prefill, decode, prompt, out,
                "length" if out >= 1500 else "stop", preempted))
        rep.waiting = sum(1 for r in rep.running if r[0] > t_s + 1.0)
        active = [r for r in rep.running if r[0] <= t_s + 1.0]
        occupancy = min(1.0, len(active) / rep.max_num_seqs)
        kv_now = sum(r[2] for r in active) / self.kv_capacity_tokens
        self._kv_usage[rep.name] = min(1.0, kv_now)
        for g in rep.gpus:
            g.compute_act = min(1.0, 0.25 + 0.7 * occupancy) * (0.85 if cpu else 1.0) if active else 0.02
            g.mem_act = min(1.0, 0.3 + 0.55 * occupancy) if active else 0.02

    def _arrivals(self, rep: _Replica, t_s: float, n: int, burst_rate: float
                  ) -> Iterator[tuple[float, int, int]]:
        """This second's arrivals (time, prompt tokens, output tokens): ``n`` Poisson ones, or the trace's
        (plus Poisson ones at ``burst_rate`` during an arrival burst)."""
        if not self._trace:
            for _ in range(n):
                arrival = t_s + self.rng.random()
                prompt, out = self.lengths[self.rng.randrange(len(self.lengths))]
                yield arrival, prompt, out
            return
        trace = self._trace
        span_s = trace[-1][0] - trace[0][0]
        stretch = (len(trace) / span_s) / self.s.rate_per_replica  # trace time per simulated second
        if rep.trace_pos is None:  # each replica replays from its own offset into the trace
            k = self.replicas.index(rep)
            rep.trace_pos = k * len(trace) // len(self.replicas)
            rep.trace_next_s = 0.0
        while rep.trace_next_s < t_s + 1.0:
            i = rep.trace_pos % len(trace)
            if rep.trace_next_s >= t_s:
                yield rep.trace_next_s, trace[i][1], trace[i][2]
            gap = trace[(i + 1) % len(trace)][0] - trace[i][0] if i + 1 < len(trace) else span_s / len(trace)
            rep.trace_next_s += gap * stretch
            rep.trace_pos += 1
        for _ in range(_poisson(self.rng, burst_rate)):  # an arrival burst on top of the trace
            arrival = t_s + self.rng.random()
            prompt, out = self.lengths[self.rng.randrange(len(self.lengths))]
            yield arrival, prompt, out

    # -- the hardware ------------------------------------------------------------------------------
    def _gpu_physics(self, node: int, g: _Gpu, t_s: float, dt: float) -> tuple[Reading, ...]:
        ty = g.t
        limit = ty.tdp_w
        pc = self._on(t_s, "power_cap", node, g.ident.index)
        if pc:
            limit = ty.tdp_w * max(0.25, 1.0 - 0.6 * pc.intensity)
        r_th = ty.thermal_resistance_c_per_w
        th = self._on(t_s, "thermal_throttle", node, g.ident.index)
        if th:
            r_th *= 1.0 + 1.5 * th.intensity  # cooling loss: a failed fan / blocked airflow
        hbm = self._on(t_s, "hbm_contention", node, g.ident.index)
        nn = self._on(t_s, "noisy_neighbor", node, g.ident.index)
        compute = min(1.0, g.compute_act + (0.35 * nn.intensity if nn else 0.0) + (0.05 if hbm else 0.0))
        mem = min(1.0, g.mem_act + (0.5 * hbm.intensity if hbm else 0.0) + (0.1 if nn else 0.0))
        wander = 0.02 * math.sin(2 * math.pi * t_s / 700.0 + g.ident.index) if self.s.drift else 0.0
        xid = self._on(t_s, "xid_failure", node, g.ident.index)
        target = 1.0 + min(0.0, wander)
        reasons = 0
        load = power_share(compute, mem)
        demand = ty.idle_w + (ty.tdp_w - ty.idle_w) * load * target ** 2
        if demand > limit:
            target = min(target, math.sqrt(max(0.05, (limit - ty.idle_w) / max(1.0, demand - ty.idle_w))) * target)
            reasons |= _BIT["sw_power_cap"]
        if g.temp_c >= ty.slowdown_temp_c:
            target = min(target, max(0.5, 1.0 - 0.06 * (g.temp_c - ty.slowdown_temp_c + 1)))
            reasons |= _BIT["sw_thermal"] | (_BIT["hw_thermal"] if g.temp_c >= ty.slowdown_temp_c + 4 else 0)
        if xid:
            target = min(target, 0.55)
        if compute < 0.05:
            reasons |= _BIT["gpu_idle"]
        g.clock_ratio += (target - g.clock_ratio) * min(1.0, dt / 2.0)
        g.power_w = min(limit, ty.idle_w + (ty.tdp_w - ty.idle_w) * load * g.clock_ratio ** 2)
        g.power_w *= 1.0 + 0.01 * self.rng.gauss(0, 1)
        steady = _AMBIENT_C + g.power_w * r_th
        g.temp_c += (steady - g.temp_c) * (1.0 - math.exp(-dt / ty.thermal_tau_s))
        g.energy_j += g.power_w * dt
        g.reasons = reasons
        t = self.s.start_ns + int(t_s * 1e9)
        lane = _PCIE_LANE.get(ty.pcie_gen, 1e9) * ty.pcie_width
        pcie_f = self._on(t_s, "pcie_saturation", node, g.ident.index)
        rx = lane * (0.93 * min(1.0, pcie_f.intensity)) if pcie_f else 0.6e9 + 0.4e9 * compute
        tx = 0.2e9 + 0.2e9 * compute + (lane * 0.1 if pcie_f else 0.0)
        rx *= 1.0 + 0.03 * self.rng.gauss(0, 1)
        readings = [
            Reading("gpu_lost", 0.0, t), Reading("power_w", round(g.power_w, 2), t),
            Reading("power_limit_w", limit, t), Reading("energy_j", round(g.energy_j, 1), t),
            Reading("gpu_temp_c", float(round(g.temp_c)), t), Reading("memory_temp_c", float(round(g.temp_c + 6)), t),
            Reading("sm_clock_hz", round(ty.sm_clock_max_hz * g.clock_ratio / 15e6) * 15e6, t),
            Reading("sm_clock_max_hz", ty.sm_clock_max_hz, t), Reading("memory_clock_hz", ty.memory_clock_hz, t),
            Reading("clock_event_reasons", float(reasons), t),
            Reading("gpu_util_ratio", round(min(1.0, compute * 1.05), 2), t),
            Reading("memory_busy_ratio", round(min(1.0, mem), 3), t),
            Reading("fb_total_bytes", float(ty.fb_total_bytes), t),
            Reading("fb_used_bytes", float(int(ty.fb_total_bytes * (0.9 if g.mem_act > 0.02 else 0.05))), t),
            Reading("pcie_rx_bytes_per_s", max(0.0, rx), t), Reading("pcie_tx_bytes_per_s", tx, t),
            Reading("pcie_replay_total", 0.0, t), Reading("pcie_link_gen", float(ty.pcie_gen), t),
            Reading("pcie_link_width", float(ty.pcie_width), t), Reading("pcie_link_gen_max", float(ty.pcie_gen), t),
            Reading("pcie_link_width_max", float(ty.pcie_width), t),
            Reading("ecc_sbe_volatile_total", 0.0, t), Reading("ecc_dbe_volatile_total", 0.0, t),
        ]
        nvf = self._on(t_s, "nvlink_degraded", node, g.ident.index)
        down = round(ty.nvlinks * 0.5 * nvf.intensity) if nvf else 0
        if ty.nvlinks and self.s.tp > 1:
            total = 18e9 * compute
            per_up = total / max(1, ty.nvlinks - down)
            for link in range(ty.nvlinks):
                up = link >= down
                lab = (("link", str(link)),)
                readings += [Reading("nvlink_link_up", 1.0 if up else 0.0, t, lab),
                             Reading("nvlink_tx_bytes_per_s", per_up if up else 0.0, t, lab),
                             Reading("nvlink_rx_bytes_per_s", per_up if up else 0.0, t, lab)]
            readings += [Reading("nvlink_tx_total_bytes_per_s", total, t),
                         Reading("nvlink_rx_total_bytes_per_s", total, t)]
        return tuple(readings)

    def _host(self, node: int, t_s: float) -> HostSample:
        cpu = self._on(t_s, "cpu_contention", node)
        busy = 0.35 + 0.03 * self.rng.random()
        rq = 6.0 + self.rng.random() * 2
        steal = 0.002
        thr = 0.01
        if cpu:
            busy = min(1.0, 0.95)
            rq = 6.0 + 60 * cpu.intensity
            steal = 0.02 + 0.08 * cpu.intensity
            thr = 0.4 * cpu.intensity
        t = self.s.start_ns + int(t_s * 1e9)
        self._cg_periods[node] = self._cg_periods.get(node, 0.0) + 10.0
        self._cg_thr[node] = self._cg_thr.get(node, 0.0) + 10.0 * thr
        lab = (("cgroup", "/kubepods/vllm"), ("container_id", "c0ffee"))
        return HostSample(t, (
            Reading("host_cpu_util_ratio", round(busy, 3), t), Reading("host_cpu_steal_ratio", round(steal, 4), t),
            Reading("host_run_queue", round(rq), t), Reading("host_cpu_count", 64.0, t),
            Reading("cgroup_cpu_periods", self._cg_periods[node], t, lab),
            Reading("cgroup_cpu_throttled_periods", round(self._cg_thr[node]), t, lab)))

    def run(self, tick_s: float = 1.0) -> Iterator[FleetTick]:
        self._kv_usage = {}
        self._cg_periods, self._cg_thr = {}, {}
        steps = int(self.s.duration_s / tick_s)
        for k in range(steps):
            t_s = k * tick_s
            for rep in self.replicas:
                self._serve(rep, t_s)
            t_ns = self.s.start_ns + int(t_s * 1e9)
            snaps = []
            for n, gpus in enumerate(self.gpus):
                samples, placements = [], []
                events: list[XidEvent] = []
                for g in gpus:
                    readings = self._gpu_physics(n, g, t_s, tick_s)
                    rep = next(r for r in self.replicas if g in r.gpus)
                    procs = [GpuProcess(rep.pid, int(g.t.fb_total_bytes * 0.85), "compute")]
                    if self._on(t_s, "noisy_neighbor", n, g.ident.index) or self._on(t_s, "hbm_contention", n,
                                                                                      g.ident.index):
                        procs.append(GpuProcess(9100 + g.ident.index, 4 * 2**30, "compute"))
                    samples.append(GpuSample(g.ident, t_ns, readings, tuple(procs)))
                    placements += [Placement(g.ident.uuid, g.ident.index, p.pid, t_ns, p.used_memory_bytes)
                                   for p in procs]
                    xf = self._on(t_s, "xid_failure", n, g.ident.index)
                    if xf and t_s >= self._xid_next.get(g.ident.uuid, 0.0):
                        events.append(XidEvent(g.ident.uuid, g.ident.index, 48 if k % 2 else 94, t_ns))
                        self._xid_next[g.ident.uuid] = t_s + 20.0 / xf.intensity
                snaps.append(NodeSnapshot(self.nodes[n], t_ns, tuple(samples), self._host(n, t_s),
                                          tuple(placements) if k % 5 == 0 else None, tuple(events), "ok", "simulated"))
            finished: list[SimRequest] = []
            engines = []
            for rep in self.replicas:
                done = [r for r in rep.pending if r.end_ns <= t_ns + int(tick_s * 1e9)]
                rep.pending = [r for r in rep.pending if r.end_ns > t_ns + int(tick_s * 1e9)]
                finished += done
                engines.append(EngineGauges(self.nodes[rep.node], rep.pid, self.s.model, t_ns,
                                            sum(1 for r in rep.running if r[0] <= t_s + 1.0 < r[1]), rep.waiting,
                                            round(self._kv_usage.get(rep.name, 0.0), 4), rep.preemptions,
                                            rep.prompt_tokens, rep.generation_tokens))
            yield FleetTick(t_ns, tuple(snaps), tuple(finished), tuple(engines))
        # the requests still running at the end finish after it: flush them so nothing is silently lost
        rest = [r for rep in self.replicas for r in rep.pending]
        if rest:
            t_end = self.s.start_ns + int(self.s.duration_s * 1e9)
            yield FleetTick(t_end, (), tuple(replace(r) for r in rest), ())


def power_share(compute: float, mem: float) -> float:
    """The share of (TDP - idle) a GPU draws at this activity: a serving GPU draws most of its power as soon
    as it runs kernels at all (fitted to Splitwise's A100 Llama-2-70B rows: 0.74 of the limit on average at
    batch 1, 0.79 at batch 16), kept under TDP at full load so that only a fault throttles."""
    activity = 0.6 * compute + 0.4 * mem
    return 0.55 + 0.4 * activity if compute >= 0.05 else activity


def g0_speed(rep: _Replica) -> float:
    return rep.gpus[0].t.speed


def _poisson(rng: random.Random, lam: float) -> int:
    if lam <= 0:
        return 0
    limit, k, p = math.exp(-lam), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


class FleetNodeBackend:
    """One node of a simulated fleet behind the agent's :class:`~collector.backend.GpuBackend` interface:
    its GPUs with the fleet's physics, load from its engines and its scenario's faults, driven only by the
    time the agent gives it (the fleet is stepped, one simulated second a tick, up to ``now_ns``; the
    scenario's clock starts at the first sample). ``stacklens-agent --simulate-scenario FILE``."""

    def __init__(self, scenario: Scenario, node: int = 0) -> None:
        if not 0 <= node < scenario.nodes:
            raise ValueError(f"node {node} is outside the scenario's {scenario.nodes} nodes")
        self.scenario = scenario
        self.node = node
        self._fleet: Fleet | None = None
        self._ticks: Iterator[FleetTick] | None = None
        self._last: NodeSnapshot | None = None
        self._events: list[XidEvent] = []
        self._status = "closed"

    @property
    def status(self) -> str:
        return self._status

    @property
    def driver_version(self) -> str | None:
        return "simulated"

    def open(self) -> str:
        self._status = "ok"
        return self._status

    def identities(self) -> tuple[GpuIdentity, ...]:
        fleet = self._fleet or Fleet(self.scenario)
        return tuple(g.ident for g in fleet.gpus[self.node])

    def sample(self, now_ns: int, slow: bool, processes: bool) -> tuple[GpuSample, ...]:
        if self._fleet is None:
            self._fleet = Fleet(replace(self.scenario, start_ns=now_ns, duration_s=10 * 365 * 86400.0))
            self._ticks = self._fleet.run()
        assert self._ticks is not None
        while self._last is None or self._last.time_ns + 10**9 <= now_ns:
            tick = next(self._ticks)
            self._last = tick.snapshots[self.node]
            self._events += self._last.events
        # the fleet's readings at its last tick, stamped with the agent's time as NVML would stamp them
        out = []
        for s in self._last.gpus:
            readings = tuple(r._replace(time_ns=now_ns) for r in s.readings)
            out.append(replace(s, time_ns=now_ns, readings=readings, processes=s.processes if processes else ()))
        return tuple(out)

    def drain_events(self) -> list[XidEvent]:
        events, self._events = self._events, []
        return events

    def close(self) -> None:
        self._status = "closed"
