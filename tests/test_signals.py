"""The signal catalog: every source name resolves to the right canonical signal and unit factor."""

from __future__ import annotations

import pytest

from collector.signals import SIGNALS, decode_clock_event_reasons, resolve


@pytest.mark.parametrize(
    ("source", "attrs", "canonical", "factor"),
    [
        ("DCGM_FI_DEV_POWER_USAGE", None, "power_w", 1.0),
        ("DCGM_FI_DEV_SM_CLOCK", None, "sm_clock_hz", 1e6),  # MHz -> Hz
        ("DCGM_FI_DEV_FB_USED", None, "fb_used_bytes", float(1 << 20)),  # MiB -> bytes
        ("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", None, "energy_j", 1e-3),  # mJ -> J
        ("DCGM_FI_DEV_GPU_UTIL", None, "gpu_util_ratio", 0.01),  # % -> ratio
        ("DCGM_FI_DEV_POWER_VIOLATION", None, "power_cap_throttle_s", 1e-6),  # us -> s
        ("DCGM_FI_DEV_CLOCK_THROTTLE_REASONS", None, "clock_event_reasons", 1.0),  # the old name
        ("DCGM_FI_PROF_PCIE_RX_BYTES", None, "pcie_rx_bytes_per_s", 1.0),
        ("stacklens.pcie_rx_bytes_per_s", None, "pcie_rx_bytes_per_s", 1.0),
        ("stacklens_gpu_temp_c", None, "gpu_temp_c", 1.0),
        ("hw.power", {"hw.type": "gpu"}, "power_w", 1.0),
        ("hw.gpu.utilization", {"hw.gpu.task": "general"}, "gpu_util_ratio", 1.0),
    ],
)
def test_resolve_maps_source_names_with_unit_factors(source: str, attrs: dict[str, str] | None,
                                                     canonical: str, factor: float) -> None:
    resolved = resolve(source, attrs)
    assert resolved is not None
    assert resolved.signal.name == canonical
    assert resolved.factor == pytest.approx(factor)


def test_otel_names_need_their_discriminating_attributes() -> None:
    assert resolve("hw.power", {"hw.type": "cpu"}) is None
    assert resolve("hw.gpu.io", {"network.io.direction": "receive"}).signal.name == "pcie_rx_bytes_per_s"  # type: ignore[union-attr]
    assert resolve("hw.gpu.io", {"network.io.direction": "transmit"}).signal.name == "pcie_tx_bytes_per_s"  # type: ignore[union-attr]


def test_unknown_names_resolve_to_none() -> None:
    assert resolve("DCGM_FI_DEV_NO_SUCH_FIELD") is None
    assert resolve("stacklens_no_such_signal") is None


def test_catalog_units_are_canonical_and_names_carry_them() -> None:
    canonical_units = {"s", "By", "By/s", "W", "J", "Cel", "Hz", "1", "{bitmask}"}
    suffix_unit = {"_w": "W", "_j": "J", "_c": "Cel", "_hz": "Hz", "_bytes": "By", "_bytes_per_s": "By/s",
                   "_ratio": "1", "_s": "s"}
    for sig in SIGNALS.values():
        assert sig.unit in canonical_units, sig.name
        for suffix, unit in suffix_unit.items():
            if sig.name.endswith(suffix) and not (suffix == "_s" and sig.name.endswith("_per_s")):
                assert sig.unit == unit, f"{sig.name} ends in {suffix} but its unit is {sig.unit}"


def test_dcgm_names_are_unique() -> None:
    names = [s.dcgm.name for s in SIGNALS.values() if s.dcgm] + [a.name for s in SIGNALS.values()
                                                                  for a in s.dcgm_aliases]
    assert len(names) == len(set(names))


def test_decode_clock_event_reasons() -> None:
    assert decode_clock_event_reasons(0) == ()
    assert decode_clock_event_reasons(0x4 | 0x40) == ("sw_power_cap", "hw_thermal")
    assert decode_clock_event_reasons(0x1 | 0x20 | 0x80) == ("gpu_idle", "sw_thermal", "hw_power_brake")
