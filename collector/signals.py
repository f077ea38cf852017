"""The signal catalog: every signal stacklens knows, its canonical name and unit, and the names other
sources give it (dcgm-exporter, OpenTelemetry hardware conventions).

This is the one place that maps source names to canonical names. The agent exports canonical names
over OTLP (prefixed ``stacklens.``) and DCGM names on /metrics; the correlator normalises whatever it
receives through :func:`resolve`.

Canonical units (UCUM as OpenTelemetry uses them): ``s``, ``By``, ``By/s``, ``W``, ``J``, ``Cel``,
``Hz``, ``1`` (a ratio 0..1 or a count), ``{bitmask}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal


class Group(StrEnum):
    POWER_THERMAL = "power_thermal"
    CLOCKS = "clocks"
    MEMORY = "memory"
    INTERCONNECT = "interconnect"
    COMPUTE = "compute"
    FAULTS = "faults"
    PLACEMENT = "placement"
    HOST = "host"


Kind = Literal["gauge", "counter"]
# What one reading of the signal is attached to: a GPU, one NVLink of a GPU, one decoded clock-event
# reason of a GPU, a process on a GPU, a cgroup of the host, or the host itself.
Scope = Literal["gpu", "gpu_link", "gpu_reason", "gpu_process", "cgroup", "host"]


@dataclass(frozen=True, slots=True)
class SourceName:
    """A name another source uses for a signal; ``scale`` converts canonical values into its unit
    (source_value = canonical_value * scale)."""

    name: str
    scale: float = 1.0
    kind: Kind | None = None  # when the source types it differently from the canonical signal
    attributes: tuple[tuple[str, str], ...] = ()  # discriminating attributes (OTel hw.* names)


@dataclass(frozen=True, slots=True)
class Signal:
    name: str
    unit: str
    kind: Kind
    group: Group
    scope: Scope
    description: str
    dcgm: SourceName | None = None
    dcgm_aliases: tuple[SourceName, ...] = ()
    otel: SourceName | None = None
    # label carried by per-link / per-reason / per-process readings, e.g. "link"
    label_names: tuple[str, ...] = field(default=())

    @property
    def otlp_name(self) -> str:
        return f"stacklens.{self.name}"

    @property
    def prometheus_name(self) -> str:
        return f"stacklens_{self.name}"


_MIB = 1.0 / (1 << 20)
_MHZ = 1e-6
_US = 1e6  # seconds -> microseconds
_MJ = 1e3  # joules -> millijoules
_PCT = 100.0


def _s(
    name: str,
    unit: str,
    kind: Kind,
    group: Group,
    scope: Scope,
    description: str,
    dcgm: SourceName | None = None,
    otel: SourceName | None = None,
    labels: tuple[str, ...] = (),
    dcgm_aliases: tuple[SourceName, ...] = (),
) -> Signal:
    return Signal(name, unit, kind, group, scope, description, dcgm, dcgm_aliases, otel, labels)


# short names keep the catalog table below readable
G: Scope = "gpu"
PT, CL, ME, IC, CO, FA, PL, HO = (Group.POWER_THERMAL, Group.CLOCKS, Group.MEMORY, Group.INTERCONNECT, Group.COMPUTE,
                                  Group.FAULTS, Group.PLACEMENT, Group.HOST)

# Decoded clock-event ("throttle") reasons: NVML bit -> reason label.
CLOCK_EVENT_REASONS: Mapping[int, str] = {
    0x1: "gpu_idle",
    0x2: "applications_clocks",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal",
    0x40: "hw_thermal",
    0x80: "hw_power_brake",
    0x100: "display_clocks",
}


def decode_clock_event_reasons(mask: int) -> tuple[str, ...]:
    """Names of the reasons set in an NVML clocks-event bitmask, in bit order."""
    return tuple(name for bit, name in CLOCK_EVENT_REASONS.items() if mask & bit)


def clock_event_flags(mask: int) -> tuple[tuple[str, float], ...]:
    """Every named reason with 1.0 if the bitmask sets it, else 0.0: the exporters' expansion of the
    bitmask into ``clock_event_reason_active{reason}``."""
    return tuple((name, 1.0 if mask & bit else 0.0) for bit, name in CLOCK_EVENT_REASONS.items())


_CATALOG: tuple[Signal, ...] = (
    # power & thermal
    _s("power_w", "W", "gauge", PT, G, "Power draw.", SourceName("DCGM_FI_DEV_POWER_USAGE"),
       SourceName("hw.power", attributes=(("hw.type", "gpu"),))),
    _s("power_limit_w", "W", "gauge", PT, G, "Enforced power limit.",
       SourceName("DCGM_FI_DEV_POWER_MGMT_LIMIT"),
       dcgm_aliases=(SourceName("DCGM_FI_DEV_ENFORCED_POWER_LIMIT"),)),
    _s("energy_j", "J", "counter", PT, G, "Energy consumed since the driver loaded.",
       SourceName("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", _MJ),
       SourceName("hw.energy", attributes=(("hw.type", "gpu"),))),
    _s("gpu_temp_c", "Cel", "gauge", PT, G, "GPU die temperature.", SourceName("DCGM_FI_DEV_GPU_TEMP"),
       SourceName("hw.temperature", attributes=(("hw.type", "gpu"),))),
    _s("memory_temp_c", "Cel", "gauge", PT, G, "HBM temperature.", SourceName("DCGM_FI_DEV_MEMORY_TEMP")),
    # clocks and clock-event (throttle) reasons
    _s("sm_clock_hz", "Hz", "gauge", CL, G, "SM clock.", SourceName("DCGM_FI_DEV_SM_CLOCK", _MHZ)),
    _s("memory_clock_hz", "Hz", "gauge", CL, G, "Memory clock.", SourceName("DCGM_FI_DEV_MEM_CLOCK", _MHZ)),
    _s("sm_clock_max_hz", "Hz", "gauge", CL, G, "Maximum SM clock.",
       SourceName("DCGM_FI_DEV_MAX_SM_CLOCK", _MHZ)),
    _s("clock_event_reasons", "{bitmask}", "gauge", CL, G, "NVML clocks-event (throttle) reasons bitmask.",
       SourceName("DCGM_FI_DEV_CLOCKS_EVENT_REASONS"),
       dcgm_aliases=(SourceName("DCGM_FI_DEV_CLOCK_THROTTLE_REASONS"),)),
    _s("clock_event_reason_active", "1", "gauge", CL, "gpu_reason",
       "1 while the named clocks-event reason holds the clocks down, else 0.", labels=("reason",)),
    _s("power_cap_throttle_s", "s", "counter", CL, G, "Time clocks were held down by the power cap.",
       SourceName("DCGM_FI_DEV_POWER_VIOLATION", _US)),
    _s("thermal_throttle_s", "s", "counter", CL, G, "Time clocks were held down by thermal policy.",
       SourceName("DCGM_FI_DEV_THERMAL_VIOLATION", _US)),
    _s("sync_boost_throttle_s", "s", "counter", CL, G, "Time clocks were held down by sync boost.",
       SourceName("DCGM_FI_DEV_SYNC_BOOST_VIOLATION", _US)),
    _s("board_limit_throttle_s", "s", "counter", CL, G, "Time clocks were held down by the board limit.",
       SourceName("DCGM_FI_DEV_BOARD_LIMIT_VIOLATION", _US)),
    _s("low_util_throttle_s", "s", "counter", CL, G, "Time clocks were lowered for low utilisation.",
       SourceName("DCGM_FI_DEV_LOW_UTIL_VIOLATION", _US)),
    _s("reliability_throttle_s", "s", "counter", CL, G, "Time clocks were held down for reliability.",
       SourceName("DCGM_FI_DEV_RELIABILITY_VIOLATION", _US)),
    _s("sw_thermal_throttle_s", "s", "counter", CL, G, "Time in software thermal slowdown."),
    _s("hw_thermal_throttle_s", "s", "counter", CL, G, "Time in hardware thermal slowdown."),
    _s("hw_power_brake_throttle_s", "s", "counter", CL, G, "Time in hardware power-brake slowdown."),
    # memory
    _s("fb_used_bytes", "By", "gauge", ME, G, "Framebuffer memory used.",
       SourceName("DCGM_FI_DEV_FB_USED", _MIB),
       SourceName("hw.gpu.memory.usage")),
    _s("fb_free_bytes", "By", "gauge", ME, G, "Framebuffer memory free.", SourceName("DCGM_FI_DEV_FB_FREE", _MIB)),
    _s("fb_total_bytes", "By", "gauge", ME, G, "Framebuffer memory total.",
       SourceName("DCGM_FI_DEV_FB_TOTAL", _MIB), SourceName("hw.gpu.memory.limit")),
    _s("memory_busy_ratio", "1", "gauge", ME, G,
       "Share of the sample period the memory controller was busy (NVML memory utilisation).",
       SourceName("DCGM_FI_DEV_MEM_COPY_UTIL", _PCT), SourceName("hw.gpu.memory.utilization")),
    _s("dram_active_ratio", "1", "gauge", ME, G, "Ratio of cycles the HBM interface was active (profiling).",
       SourceName("DCGM_FI_PROF_DRAM_ACTIVE")),
    _s("ecc_sbe_volatile_total", "1", "counter", ME, G, "Corrected (single-bit) ECC errors since boot.",
       SourceName("DCGM_FI_DEV_ECC_SBE_VOL_TOTAL")),
    _s("ecc_dbe_volatile_total", "1", "counter", ME, G, "Uncorrected (double-bit) ECC errors since boot.",
       SourceName("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL")),
    _s("ecc_sbe_aggregate_total", "1", "counter", ME, G, "Corrected ECC errors over the GPU's life.",
       SourceName("DCGM_FI_DEV_ECC_SBE_AGG_TOTAL")),
    _s("ecc_dbe_aggregate_total", "1", "counter", ME, G, "Uncorrected ECC errors over the GPU's life.",
       SourceName("DCGM_FI_DEV_ECC_DBE_AGG_TOTAL")),
    _s("retired_pages_sbe", "1", "gauge", ME, G, "Pages retired for corrected errors.",
       SourceName("DCGM_FI_DEV_RETIRED_SBE")),
    _s("retired_pages_dbe", "1", "gauge", ME, G, "Pages retired for uncorrected errors.",
       SourceName("DCGM_FI_DEV_RETIRED_DBE")),
    _s("retired_pages_pending", "1", "gauge", ME, G, "1 when a page retirement awaits a reset.",
       SourceName("DCGM_FI_DEV_RETIRED_PENDING")),
    _s("remapped_rows_correctable", "1", "gauge", ME, G, "Rows remapped for corrected errors.",
       SourceName("DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS")),
    _s("remapped_rows_uncorrectable", "1", "gauge", ME, G, "Rows remapped for uncorrected errors.",
       SourceName("DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS")),
    _s("remapped_rows_pending", "1", "gauge", ME, G, "1 when a row remap awaits a reset.",
       SourceName("DCGM_FI_DEV_ROW_REMAP_PENDING")),
    _s("remapped_rows_failure", "1", "gauge", ME, G, "1 when a row remap failed.",
       SourceName("DCGM_FI_DEV_ROW_REMAP_FAILURE")),
    # interconnect
    _s("pcie_tx_bytes_per_s", "By/s", "gauge", IC, G, "PCIe bytes sent by the GPU per second.",
       SourceName("DCGM_FI_PROF_PCIE_TX_BYTES"),
       SourceName("hw.gpu.io", kind="counter", attributes=(("network.io.direction", "transmit"),))),
    _s("pcie_rx_bytes_per_s", "By/s", "gauge", IC, G, "PCIe bytes received by the GPU per second.",
       SourceName("DCGM_FI_PROF_PCIE_RX_BYTES"),
       SourceName("hw.gpu.io", kind="counter", attributes=(("network.io.direction", "receive"),))),
    _s("pcie_replay_total", "1", "counter", IC, G, "PCIe replays (link-level retransmissions).",
       SourceName("DCGM_FI_DEV_PCIE_REPLAY_COUNTER")),
    _s("pcie_link_gen", "1", "gauge", IC, G, "Current PCIe link generation.",
       SourceName("DCGM_FI_DEV_PCIE_LINK_GEN")),
    _s("pcie_link_width", "1", "gauge", IC, G, "Current PCIe link width (lanes).",
       SourceName("DCGM_FI_DEV_PCIE_LINK_WIDTH")),
    _s("pcie_link_gen_max", "1", "gauge", IC, G, "Maximum PCIe link generation.",
       SourceName("DCGM_FI_DEV_PCIE_MAX_LINK_GEN")),
    _s("pcie_link_width_max", "1", "gauge", IC, G, "Maximum PCIe link width (lanes).",
       SourceName("DCGM_FI_DEV_PCIE_MAX_LINK_WIDTH")),
    _s("nvlink_tx_bytes_per_s", "By/s", "gauge", IC, "gpu_link", "NVLink data bytes sent per second, per link.",
       labels=("link",)),
    _s("nvlink_rx_bytes_per_s", "By/s", "gauge", IC, "gpu_link",
       "NVLink data bytes received per second, per link.", labels=("link",)),
    _s("nvlink_tx_total_bytes_per_s", "By/s", "gauge", IC, G, "NVLink data bytes sent per second, all links.",
       SourceName("DCGM_FI_PROF_NVLINK_TX_BYTES")),
    _s("nvlink_rx_total_bytes_per_s", "By/s", "gauge", IC, G,
       "NVLink data bytes received per second, all links.", SourceName("DCGM_FI_PROF_NVLINK_RX_BYTES")),
    _s("nvlink_link_up", "1", "gauge", IC, "gpu_link", "1 when the NVLink is active.", labels=("link",)),
    _s("nvlink_crc_flit_errors_total", "1", "counter", IC, G, "NVLink CRC flit errors, all links.",
       SourceName("DCGM_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL")),
    _s("nvlink_crc_data_errors_total", "1", "counter", IC, G, "NVLink CRC data errors, all links.",
       SourceName("DCGM_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL")),
    _s("nvlink_replay_errors_total", "1", "counter", IC, G, "NVLink replay errors, all links.",
       SourceName("DCGM_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL")),
    _s("nvlink_recovery_errors_total", "1", "counter", IC, G, "NVLink recovery errors, all links.",
       SourceName("DCGM_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL")),
    # compute
    _s("gpu_util_ratio", "1", "gauge", CO, G, "Share of the sample period a kernel was running.",
       SourceName("DCGM_FI_DEV_GPU_UTIL", _PCT),
       SourceName("hw.gpu.utilization", attributes=(("hw.gpu.task", "general"),))),
    _s("sm_active_ratio", "1", "gauge", CO, G, "Ratio of cycles an SM had a warp resident (profiling).",
       SourceName("DCGM_FI_PROF_SM_ACTIVE")),
    _s("gr_engine_active_ratio", "1", "gauge", CO, G, "Ratio of time the graphics engine was active.",
       SourceName("DCGM_FI_PROF_GR_ENGINE_ACTIVE")),
    # faults
    _s("xid_last", "1", "gauge", FA, G, "Number of the last XID the GPU raised (DCGM semantics).",
       SourceName("DCGM_FI_DEV_XID_ERRORS")),
    _s("xid_events_total", "1", "counter", FA, G, "XID events seen by the agent, by XID number.",
       labels=("xid",)),
    _s("gpu_lost", "1", "gauge", FA, G, "1 once NVML reported the GPU lost (fallen off the bus)."),
    # placement
    _s("gpu_process_memory_bytes", "By", "gauge", PL, "gpu_process",
       "GPU memory held by a process, with its container and pod.",
       labels=("pid", "container_id", "pod", "namespace", "container")),
    # host (per node)
    _s("host_cpu_util_ratio", "1", "gauge", HO, "host", "Share of CPU time not idle, all CPUs."),
    _s("host_cpu_steal_ratio", "1", "gauge", HO, "host", "Share of CPU time stolen by the hypervisor."),
    _s("host_cpu_iowait_ratio", "1", "gauge", HO, "host", "Share of CPU time waiting for I/O."),
    _s("host_run_queue", "1", "gauge", HO, "host", "Runnable threads (procs_running)."),
    _s("host_load1", "1", "gauge", HO, "host", "One-minute load average."),
    _s("host_cpu_count", "1", "gauge", HO, "host", "Online CPUs."),
    _s("host_memory_used_bytes", "By", "gauge", HO, "host", "Memory used (total minus available)."),
    _s("host_memory_total_bytes", "By", "gauge", HO, "host", "Memory total."),
    _s("cgroup_cpu_throttled_s", "s", "counter", HO, "cgroup",
       "CFS throttled time of the cgroup of a process that holds a GPU.", labels=("cgroup", "container_id")),
    _s("cgroup_cpu_throttled_periods", "1", "counter", HO, "cgroup", "CFS periods the cgroup was throttled in.",
       labels=("cgroup", "container_id")),
    _s("cgroup_cpu_periods", "1", "counter", HO, "cgroup", "CFS enforcement periods of the cgroup.",
       labels=("cgroup", "container_id")),
)

SIGNALS: Mapping[str, Signal] = {s.name: s for s in _CATALOG}


def _index_dcgm() -> dict[str, tuple[Signal, SourceName]]:
    out: dict[str, tuple[Signal, SourceName]] = {}
    for s in _CATALOG:
        for src in (s.dcgm, *s.dcgm_aliases):
            if src is not None:
                out[src.name] = (s, src)
    return out


_BY_DCGM = _index_dcgm()
_BY_OTEL: dict[str, list[tuple[Signal, SourceName]]] = {}
for _sig in _CATALOG:
    if _sig.otel is not None:
        _BY_OTEL.setdefault(_sig.otel.name, []).append((_sig, _sig.otel))
_BY_OTLP = {s.otlp_name: s for s in _CATALOG}


@dataclass(frozen=True, slots=True)
class Resolved:
    """A source name resolved to a canonical signal: canonical = source_value * factor."""

    signal: Signal
    factor: float
    source: str


def resolve(name: str, attributes: Mapping[str, object] | None = None) -> Resolved | None:
    """Map a metric name from any accepted source to its canonical signal, or None if unknown.

    Accepts the agent's own OTLP names (``stacklens.power_w``), Prometheus-style ones
    (``stacklens_power_w``), DCGM field names and OpenTelemetry ``hw.*`` names (whose meaning depends
    on attributes such as ``hw.type``).
    """
    if name in _BY_OTLP:
        return Resolved(_BY_OTLP[name], 1.0, "stacklens")
    if name.startswith("stacklens_") and name[len("stacklens_"):] in SIGNALS:
        return Resolved(SIGNALS[name[len("stacklens_"):]], 1.0, "stacklens")
    if name in _BY_DCGM:
        sig, src = _BY_DCGM[name]
        return Resolved(sig, 1.0 / src.scale, "dcgm")
    attrs = attributes or {}
    for sig, src in _BY_OTEL.get(name, []):
        if all(str(attrs.get(k)) == v for k, v in src.attributes if k != "hw.type") and (
            attrs.get("hw.type", "gpu") == "gpu"
        ):
            return Resolved(sig, 1.0 / src.scale, "otel")
    return None



# ---------------------------------------------------------------------------------------------------
# Serving-engine signals (per replica): what vLLM and the OpenTelemetry GenAI server metrics report.
# The correlator stores them next to the GPU signals; they are the scheduling and KV-cache evidence.


@dataclass(frozen=True, slots=True)
class EngineSignal:
    name: str
    unit: str
    kind: Kind  # "gauge" or "counter"; histograms are stored as their _sum and _count counters
    description: str
    # accepted source names, current first; older names that a vLLM release renamed stay accepted
    sources: tuple[str, ...] = ()


_ENGINE_CATALOG: tuple[EngineSignal, ...] = (
    EngineSignal("engine_requests_running", "1", "gauge", "Requests in the running batch.",
                 ("vllm:num_requests_running",)),
    EngineSignal("engine_requests_waiting", "1", "gauge", "Requests waiting in the queue.",
                 ("vllm:num_requests_waiting",)),
    EngineSignal("engine_kv_cache_usage_ratio", "1", "gauge", "Share of the KV cache in use (0..1).",
                 ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")),
    EngineSignal("engine_preemptions_total", "1", "counter", "Requests preempted (KV cache exhausted).",
                 ("vllm:num_preemptions_total", "vllm:num_preemptions")),
    EngineSignal("engine_prompt_tokens_total", "1", "counter", "Prompt tokens processed.",
                 ("vllm:prompt_tokens_total", "vllm:prompt_tokens")),
    EngineSignal("engine_generation_tokens_total", "1", "counter", "Output tokens generated.",
                 ("vllm:generation_tokens_total", "vllm:generation_tokens")),
    EngineSignal("engine_ttft_seconds_sum", "s", "counter", "Sum of time to first token.",
                 ("vllm:time_to_first_token_seconds_sum", "gen_ai.server.time_to_first_token_sum")),
    EngineSignal("engine_ttft_seconds_count", "1", "counter", "Requests with a first token.",
                 ("vllm:time_to_first_token_seconds_count", "gen_ai.server.time_to_first_token_count")),
    EngineSignal("engine_tpot_seconds_sum", "s", "counter", "Sum of inter-token latency.",
                 ("vllm:inter_token_latency_seconds_sum", "vllm:time_per_output_token_seconds_sum",
                  "gen_ai.server.time_per_output_token_sum")),
    EngineSignal("engine_tpot_seconds_count", "1", "counter", "Inter-token intervals.",
                 ("vllm:inter_token_latency_seconds_count", "vllm:time_per_output_token_seconds_count",
                  "gen_ai.server.time_per_output_token_count")),
    EngineSignal("engine_e2e_seconds_sum", "s", "counter", "Sum of end-to-end request latency.",
                 ("vllm:e2e_request_latency_seconds_sum", "gen_ai.server.request.duration_sum")),
    EngineSignal("engine_e2e_seconds_count", "1", "counter", "Finished requests.",
                 ("vllm:e2e_request_latency_seconds_count", "gen_ai.server.request.duration_count")),
    EngineSignal("engine_queue_seconds_sum", "s", "counter", "Sum of time in the queue.",
                 ("vllm:request_queue_time_seconds_sum",)),
    EngineSignal("engine_queue_seconds_count", "1", "counter", "Requests that left the queue.",
                 ("vllm:request_queue_time_seconds_count",)),
)

ENGINE_SIGNALS: Mapping[str, EngineSignal] = {s.name: s for s in _ENGINE_CATALOG}
_ENGINE_BY_SOURCE: dict[str, EngineSignal] = {}
for _es in _ENGINE_CATALOG:
    _ENGINE_BY_SOURCE[_es.name] = _es
    _ENGINE_BY_SOURCE[f"stacklens.{_es.name}"] = _es
    for _src in _es.sources:
        _ENGINE_BY_SOURCE[_src] = _es
        # Prometheus receivers and older exporters write the colon as an underscore
        _ENGINE_BY_SOURCE[_src.replace(":", "_")] = _es


def source_names() -> frozenset[str]:
    """Every metric name that :func:`resolve` (without attributes) or :func:`resolve_engine` maps; any other
    name maps to nothing (the correlator's compiled decoder learns from this which names it may meet)."""
    return frozenset((*_BY_OTLP, *(f"stacklens_{n}" for n in SIGNALS), *_BY_DCGM, *_BY_OTEL, *_ENGINE_BY_SOURCE))


def resolve_engine(name: str) -> EngineSignal | None:
    """Map a serving-engine metric name (vLLM's, renamed ones included, or GenAI server metrics' _sum and
    _count) to its engine signal, or None."""
    return _ENGINE_BY_SOURCE.get(name)
