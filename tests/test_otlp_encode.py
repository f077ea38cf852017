"""The hand-written OTLP encoder, checked by parsing its output with the official protobuf classes."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality, Metric

from collector.export.otlp_encode import OtlpMetricsEncoder, ResourceInfo, key_value, merge_requests
from collector.records import GpuIdentity, GpuSample, HostSample, NodeSnapshot, Placement, Reading, XidEvent

T0 = 1_767_225_600_000_000_000
GPU = GpuIdentity(3, "GPU-8c1e0000-0000-0000-0000-000000000003", "NVIDIA H100 80GB HBM3", "00000000:1B:00.0", 3)


def _metrics(payload: bytes) -> dict[str, Metric]:
    req = ExportMetricsServiceRequest.FromString(payload)
    assert len(req.resource_metrics) == 1
    return {m.name: m for m in req.resource_metrics[0].scope_metrics[0].metrics}


def _attrs(dp: object) -> dict[str, object]:
    out: dict[str, object] = {}
    for kv in dp.attributes:  # type: ignore[attr-defined]
        which = kv.value.WhichOneof("value")
        out[kv.key] = getattr(kv.value, which)
    return out


def _snapshot(readings: tuple[Reading, ...], **kw: object) -> NodeSnapshot:
    return NodeSnapshot("node-2", T0, (GpuSample(GPU, T0, readings),), **kw)  # type: ignore[arg-type]


def test_gauges_sums_units_timestamps_and_resource() -> None:
    enc = OtlpMetricsEncoder(ResourceInfo("node-2", "k8s-node-2"))
    snap = _snapshot((
        Reading("power_w", 412.5, T0 + 7),
        Reading("energy_j", 1234.5, T0 + 8),
        Reading("nvlink_tx_bytes_per_s", 2.5e9, T0 + 9, (("link", "4"),)),
    ), driver_version="580.82.07")
    payload = enc.encode(snap)
    req = ExportMetricsServiceRequest.FromString(payload)
    resource = {kv.key: kv.value.string_value for kv in req.resource_metrics[0].resource.attributes}
    assert resource["host.name"] == "node-2"
    assert resource["k8s.node.name"] == "k8s-node-2"
    assert resource["nvidia.driver.version"] == "580.82.07"
    m = _metrics(payload)
    power = m["stacklens.power_w"]
    assert power.unit == "W" and power.WhichOneof("data") == "gauge"
    dp = power.gauge.data_points[0]
    assert dp.as_double == 412.5 and dp.time_unix_nano == T0 + 7  # the source's own timestamp
    assert _attrs(dp) == {"gpu.uuid": GPU.uuid}
    energy = m["stacklens.energy_j"]
    assert energy.WhichOneof("data") == "sum" and energy.sum.is_monotonic
    assert energy.sum.aggregation_temporality == AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
    assert energy.sum.data_points[0].start_time_unix_nano == T0 + 8
    link = m["stacklens.nvlink_tx_bytes_per_s"].gauge.data_points[0]
    assert _attrs(link) == {"gpu.uuid": GPU.uuid, "link": "4"}
    info = _attrs(m["stacklens.gpu_info"].gauge.data_points[0])
    assert info == {"gpu.uuid": GPU.uuid, "gpu.index": 3, "gpu.model": GPU.name, "gpu.pci_bus_id": GPU.pci_bus_id,
                    "gpu.device": "nvidia3"}


def test_counter_start_time_is_kept_across_snapshots() -> None:
    enc = OtlpMetricsEncoder(ResourceInfo("n"))
    enc.encode(_snapshot((Reading("energy_j", 10.0, T0),)))
    later = _metrics(enc.encode(_snapshot((Reading("energy_j", 20.0, T0 + 10**9),))))
    dp = later["stacklens.energy_j"].sum.data_points[0]
    assert dp.start_time_unix_nano == T0 and dp.time_unix_nano == T0 + 10**9 and dp.as_double == 20.0


@pytest.mark.parametrize("missing", [None, math.nan])
def test_missing_value_is_flagged_not_zero(missing: float | None) -> None:
    m = _metrics(OtlpMetricsEncoder(ResourceInfo("n")).encode(_snapshot((Reading("memory_temp_c", missing, T0),))))
    dp = m["stacklens.memory_temp_c"].gauge.data_points[0]
    assert dp.flags & 1  # DATA_POINT_FLAGS_NO_RECORDED_VALUE_MASK
    assert dp.WhichOneof("value") is None


def test_clock_event_bitmask_is_expanded_into_named_flags() -> None:
    m = _metrics(OtlpMetricsEncoder(ResourceInfo("n")).encode(
        _snapshot((Reading("clock_event_reasons", float(0x4 | 0x40), T0),))))
    flags = {_attrs(dp)["reason"]: dp.as_double for dp in m["stacklens.clock_event_reason_active"].gauge.data_points}
    assert flags["sw_power_cap"] == 1.0 and flags["hw_thermal"] == 1.0
    assert flags["sw_thermal"] == 0.0 and flags["gpu_idle"] == 0.0
    assert len(flags) == 9


def test_host_placement_and_xid_events() -> None:
    snap = _snapshot(
        (Reading("power_w", 1.0, T0),),
        host=HostSample(T0, (Reading("host_run_queue", 7.0, T0),)),
        placements=(Placement(GPU.uuid, 3, 4120, T0, 2 << 30, "c" * 64, None, "vllm-0", "serving", "engine"),),
        events=(XidEvent(GPU.uuid, 3, 79, T0 + 5), XidEvent(GPU.uuid, 3, 79, T0 + 6)),
    )
    m = _metrics(OtlpMetricsEncoder(ResourceInfo("n")).encode(snap))
    assert _attrs(m["stacklens.host_run_queue"].gauge.data_points[0]) == {}
    proc = m["stacklens.gpu_process_memory_bytes"].gauge.data_points[0]
    assert proc.as_double == float(2 << 30)
    assert _attrs(proc) == {"gpu.uuid": GPU.uuid, "process.pid": "4120", "container.id": "c" * 64,
                            "k8s.pod.name": "vllm-0", "k8s.namespace.name": "serving", "k8s.container.name": "engine"}
    xids = m["stacklens.xid_last"].gauge.data_points
    assert [(dp.as_double, dp.time_unix_nano) for dp in xids] == [(79.0, T0 + 5), (79.0, T0 + 6)]
    counts = m["stacklens.xid_events_total"].sum.data_points
    assert [dp.as_double for dp in counts] == [1.0, 2.0]


def test_merged_requests_parse_as_one_request_with_all_resources() -> None:
    enc = OtlpMetricsEncoder(ResourceInfo("n"))
    a = enc.encode(_snapshot((Reading("power_w", 1.0, T0),)))
    b = enc.encode(_snapshot((Reading("power_w", 2.0, T0 + 1),)))
    req = ExportMetricsServiceRequest.FromString(merge_requests([a, b]))
    values = [m.gauge.data_points[0].as_double for rm in req.resource_metrics for m in rm.scope_metrics[0].metrics
              if m.name == "stacklens.power_w"]
    assert values == [1.0, 2.0]


@given(
    key=st.text(max_size=300),
    value=st.one_of(st.text(max_size=300), st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False),
                    st.booleans()),
)
def test_key_value_encoding_round_trips(key: str, value: str | int | float | bool) -> None:
    from opentelemetry.proto.common.v1.common_pb2 import KeyValue

    kv = KeyValue.FromString(key_value(key, value))
    assert kv.key == key
    which = kv.value.WhichOneof("value")
    assert which is not None
    decoded = getattr(kv.value, which)
    assert decoded == value and type(decoded) is type(value)


@given(values=st.lists(st.one_of(st.none(), st.floats(allow_nan=False, allow_infinity=True)), min_size=1,
                       max_size=20),
       times=st.integers(0, 2**64 - 1))
def test_points_round_trip(values: list[float | None], times: int) -> None:
    readings = tuple(Reading("gpu_temp_c", v, times, (("i", str(i)),)) for i, v in enumerate(values))
    m = _metrics(OtlpMetricsEncoder(ResourceInfo("n")).encode(_snapshot(readings)))
    dps = m["stacklens.gpu_temp_c"].gauge.data_points
    assert len(dps) == len(values)
    for dp, v in zip(dps, values, strict=True):
        assert dp.time_unix_nano == times
        if v is None:
            assert dp.flags == 1
        else:
            assert dp.as_double == v
