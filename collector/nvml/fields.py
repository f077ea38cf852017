"""Which NVML field ids the agent reads in its batched call, and how each becomes a signal.

Field ids below 251 are stable across drivers. From 251 up NVIDIA renumbered between driver branches:
the header of driver 570 put power-smoothing fields at 251.., 575 and early 580 put the clock-event
reason time counters at 251-253, and from 580.82 on they moved to 269-271 (with power smoothing back
at 251..). Reading 251 on the wrong driver returns a power-smoothing setting dressed as a counter, so
these ids are chosen by the driver version reported by NVML, never assumed.
(Source: the field tables of the nvidia-ml-py releases 12.570.86, 12.575.51, 13.580.65, 13.580.82,
13.590.48 and 13.615.71.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# stable field ids (nvml.h)
FI_ECC_SBE_VOL_TOTAL = 3
FI_ECC_DBE_VOL_TOTAL = 4
FI_ECC_SBE_AGG_TOTAL = 5
FI_ECC_DBE_AGG_TOTAL = 6
FI_RETIRED_SBE = 29
FI_RETIRED_DBE = 30
FI_RETIRED_PENDING = 31
FI_NVLINK_CRC_FLIT_ERROR_TOTAL = 38
FI_NVLINK_CRC_DATA_ERROR_TOTAL = 45
FI_NVLINK_REPLAY_ERROR_TOTAL = 52
FI_NVLINK_RECOVERY_ERROR_TOTAL = 59
FI_PERF_POLICY_POWER = 74
FI_PERF_POLICY_THERMAL = 75
FI_PERF_POLICY_SYNC_BOOST = 76
FI_PERF_POLICY_BOARD_LIMIT = 77
FI_PERF_POLICY_LOW_UTILIZATION = 78
FI_PERF_POLICY_RELIABILITY = 79
FI_MEMORY_TEMP = 82
FI_TOTAL_ENERGY_CONSUMPTION = 83
FI_NVLINK_LINK_COUNT = 91
FI_PCIE_REPLAY_COUNTER = 94
FI_NVLINK_THROUGHPUT_DATA_TX = 138
FI_NVLINK_THROUGHPUT_DATA_RX = 139
FI_REMAPPED_COR = 142
FI_REMAPPED_UNC = 143
FI_REMAPPED_PENDING = 144
FI_REMAPPED_FAILURE = 145
FI_POWER_INSTANT = 186
FI_POWER_CURRENT_LIMIT = 190
FI_PCIE_COUNT_TX_BYTES = 197
FI_PCIE_COUNT_RX_BYTES = 198

Treatment = Literal["gauge", "counter", "rate"]


# fast: every cycle; medium: every medium interval (1 s; every cycle when the agent's interval is 1 s or
# longer); slow: every slow interval (10 s).
Tier = Literal["fast", "medium", "slow"]


@dataclass(frozen=True, slots=True)
class FieldSpec:
    field_id: int
    signal: str
    treatment: Treatment  # gauge: value as is; counter: cumulative, exported as is; rate: per-second delta
    scale: float = 1.0  # canonical = raw * scale
    per_link: bool = False  # read once per NVLink with scopeId = link
    # fast: every cycle, only what moves within a second (power, PCIe and NVLink byte counters); medium:
    # every second, what changes slowly or whose value over a second serves as well as over 100 ms
    # (limits, temperatures, error totals, throttle time counters); slow: every slow interval. On an
    # H100 with driver 580.159 most fields cost ~5 us to read, but total energy costs ~2.8 ms of CPU,
    # the HW thermal and power-brake time counters ~0.7 ms each, the thermal policy counter ~0.4 ms,
    # PCIe replays ~0.1 ms: counters whose value over ten seconds is as useful as over one go to the
    # slow tier.
    tier: Tier = "medium"


# PCIe TX/RX byte counters: 32-bit on the H100 (they wrap every 4.3 GB), see collector/nvml/pcie.py
PCIE_BYTE_FIELDS = (197, 198)


def parse_driver_version(text: str | None) -> tuple[int, ...]:
    """'580.82.07' -> (580, 82, 7); unparseable parts end the tuple."""
    out: list[int] = []
    for part in (text or "").strip().split("."):
        if not part.isdigit():
            break
        out.append(int(part))
    return tuple(out)


def throttle_time_field_ids(driver_version: str | None) -> dict[str, int]:
    """Field ids of the SW thermal, HW thermal and HW power-brake time counters for this driver."""
    version = parse_driver_version(driver_version)
    if not version or version < (575,):
        return {}
    base = 251 if version < (580, 82) else 269
    return {"sw_thermal_throttle_s": base, "hw_thermal_throttle_s": base + 1, "hw_power_brake_throttle_s": base + 2}


_NS = 1e-9

_STABLE: tuple[FieldSpec, ...] = (
    FieldSpec(FI_POWER_INSTANT, "power_w", "gauge", 1e-3, tier="fast"),
    FieldSpec(FI_POWER_CURRENT_LIMIT, "power_limit_w", "gauge", 1e-3),
    FieldSpec(FI_TOTAL_ENERGY_CONSUMPTION, "energy_j", "counter", 1e-3, tier="slow"),
    FieldSpec(FI_MEMORY_TEMP, "memory_temp_c", "gauge"),
    FieldSpec(FI_PCIE_REPLAY_COUNTER, "pcie_replay_total", "counter", tier="slow"),
    FieldSpec(FI_PCIE_COUNT_TX_BYTES, "pcie_tx_bytes_per_s", "rate", tier="fast"),
    FieldSpec(FI_PCIE_COUNT_RX_BYTES, "pcie_rx_bytes_per_s", "rate", tier="fast"),
    FieldSpec(FI_NVLINK_CRC_FLIT_ERROR_TOTAL, "nvlink_crc_flit_errors_total", "counter"),
    FieldSpec(FI_NVLINK_CRC_DATA_ERROR_TOTAL, "nvlink_crc_data_errors_total", "counter"),
    FieldSpec(FI_NVLINK_REPLAY_ERROR_TOTAL, "nvlink_replay_errors_total", "counter"),
    FieldSpec(FI_NVLINK_RECOVERY_ERROR_TOTAL, "nvlink_recovery_errors_total", "counter"),
    FieldSpec(FI_ECC_SBE_VOL_TOTAL, "ecc_sbe_volatile_total", "counter"),
    FieldSpec(FI_ECC_DBE_VOL_TOTAL, "ecc_dbe_volatile_total", "counter"),
    FieldSpec(FI_ECC_SBE_AGG_TOTAL, "ecc_sbe_aggregate_total", "counter"),
    FieldSpec(FI_ECC_DBE_AGG_TOTAL, "ecc_dbe_aggregate_total", "counter"),
    FieldSpec(FI_RETIRED_SBE, "retired_pages_sbe", "gauge"),
    FieldSpec(FI_RETIRED_DBE, "retired_pages_dbe", "gauge"),
    FieldSpec(FI_RETIRED_PENDING, "retired_pages_pending", "gauge"),
    FieldSpec(FI_REMAPPED_COR, "remapped_rows_correctable", "gauge"),
    FieldSpec(FI_REMAPPED_UNC, "remapped_rows_uncorrectable", "gauge"),
    FieldSpec(FI_REMAPPED_PENDING, "remapped_rows_pending", "gauge"),
    FieldSpec(FI_REMAPPED_FAILURE, "remapped_rows_failure", "gauge"),
    # perf-policy ("violation") counters: nanoseconds the clocks were held down, cumulative
    FieldSpec(FI_PERF_POLICY_POWER, "power_cap_throttle_s", "counter", _NS),
    FieldSpec(FI_PERF_POLICY_THERMAL, "thermal_throttle_s", "counter", _NS, tier="slow"),
    FieldSpec(FI_PERF_POLICY_SYNC_BOOST, "sync_boost_throttle_s", "counter", _NS),
    FieldSpec(FI_PERF_POLICY_BOARD_LIMIT, "board_limit_throttle_s", "counter", _NS),
    FieldSpec(FI_PERF_POLICY_LOW_UTILIZATION, "low_util_throttle_s", "counter", _NS),
    FieldSpec(FI_PERF_POLICY_RELIABILITY, "reliability_throttle_s", "counter", _NS),
    # per NVLink: cumulative KiB of data payload
    FieldSpec(FI_NVLINK_THROUGHPUT_DATA_TX, "nvlink_tx_bytes_per_s", "rate", 1024.0, per_link=True, tier="fast"),
    FieldSpec(FI_NVLINK_THROUGHPUT_DATA_RX, "nvlink_rx_bytes_per_s", "rate", 1024.0, per_link=True, tier="fast"),
)


def field_plan(driver_version: str | None) -> tuple[FieldSpec, ...]:
    """The fields to read on a device under this driver."""
    extra = tuple(
        FieldSpec(fid, signal, "counter", _NS, tier="medium" if signal == "sw_thermal_throttle_s" else "slow")
        for signal, fid in throttle_time_field_ids(driver_version).items()
    )
    return _STABLE + extra
