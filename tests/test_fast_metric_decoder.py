"""The compiled metric decoder (correlator/ingest/fast_metrics.py + _fastmetrics.c) against the reference,
``decode_metrics`` over the upb-parsed message: for every body either the fast path declines it (and the
reference path decides: rows or the same PayloadError), or it gives exactly the reference's rows, every
table and column, value types and float bits included. The agent's own payloads of a simulated fleet
(GPU, NVLink, clock reasons, XIDs, host and cgroup readings, placements, identity), the decoder fuzz tests'
wrong-typed messages, messages of every attribute shape the rules read, hand-made wire data, and truncated
or corrupted bodies. Hypothesis, derandomized; a few seconds."""

from __future__ import annotations

import os
import struct
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue, KeyValueList

from collector.signals import SIGNALS
from correlator.ingest import fast_metrics
from correlator.ingest.batch import ArrowRows, IngestBatch
from correlator.ingest.payload import PayloadError
from tests import otlp_wire
from tests.otlp_wire import assert_same_batch, dbl_any, f64, fleet_bodies, kv_bytes, ld, str_any, tag, varint
from tests.test_decoder_fuzz import CORPUS, METRIC_NAMES, POINT_KEYS, T0, metric_messages

if not fast_metrics.available():
    if os.environ.get("STACKLENS_REQUIRE_FASTSPANS") == "1":
        raise RuntimeError(f"the compiled metric decoder is not built (library: {fast_metrics.library_path()})")
    pytest.skip("the compiled metric decoder is not built or STACKLENS_PURE_PYTHON=1", allow_module_level=True)

FAST = settings(derandomize=True, deadline=None, database=None, max_examples=200,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def reference(raw: bytes) -> IngestBatch | PayloadError:
    return otlp_wire.reference("metrics", raw)


def check(raw: bytes) -> bool:
    """The fast path and the reference agree on ``raw``; True when the fast path took it."""
    return otlp_wire.check("metrics", fast_metrics.decode, raw)


# -- the agent's payloads -----------------------------------------------------------------------------
def test_agent_payloads_take_the_fast_path_with_the_same_rows() -> None:
    bodies = fleet_bodies()
    tables: dict[str, int] = {}
    for body in bodies:
        assert check(body)
        batch = fast_metrics.decode(body)
        assert batch is not None
        for name, rows in batch.tables().items():
            tables[name] = tables.get(name, 0) + len(rows)
    # every table the agent fills was compared, events (XIDs) and placements included
    assert tables["gpu_samples"] > 10_000 and tables["host_samples"] > 100
    assert tables["placements"] > 0 and tables["gpu_info"] > 0
    assert tables["requests"] == 0 and tables["engine_samples"] == 0
    subs = {s for body in bodies for s in (fast_metrics.decode(body) or IngestBatch()).gpu_samples.data["sub"]}
    assert {"48", "94"} & subs, "no XID counter in the fleet's payloads"


def test_rows_are_arrow_with_dictionary_strings() -> None:
    batch = fast_metrics.decode(fleet_bodies(seconds=2)[0])
    assert batch is not None
    g = batch.gpu_samples
    assert isinstance(g, ArrowRows) and g.table is not None
    assert str(g.table.schema.field("node").type) == "dictionary<values=string, indices=int32, ordered=0>"
    assert str(g.table.schema.field("gpu_index").type) == "int32"
    assert g.table.column("signal").chunk(0).dictionary.to_pylist() == sorted(
        set(g.table.column("signal").to_pylist()), key=g.table.column("signal").to_pylist().index)


def test_every_catalog_name_is_known_to_the_c() -> None:
    actions = fast_metrics.name_actions()
    for sig in SIGNALS.values():
        assert sig.otlp_name in actions and f"stacklens_{sig.name}" in actions
    assert actions["stacklens.gpu_info"][0] == fast_metrics.A_INFO
    assert actions["stacklens.nvlink_tx_bytes_per_s"][1] == 1  # link
    assert actions["stacklens.xid_events_total"][1] == 3  # xid
    assert actions["stacklens.clock_event_reason_active"][0] == fast_metrics.A_SKIP
    assert actions["stacklens.host_run_queue"][0] == fast_metrics.A_HOST
    assert actions["stacklens.gpu_process_memory_bytes"][0] == fast_metrics.A_PROCESS
    assert actions["vllm:num_requests_running"][0] == fast_metrics.A_DECLINE
    assert actions["DCGM_FI_DEV_POWER_USAGE"][:3] == (fast_metrics.A_DCGM, 0, "power_w")
    assert actions["DCGM_FI_DEV_SM_CLOCK"] == (fast_metrics.A_DCGM, 0, "sm_clock_hz", 1e6)
    assert actions["DCGM_FI_DEV_FB_USED"][3] == 2.0**20 and actions["DCGM_FI_DEV_GPU_UTIL"][3] == 0.01


# -- every attribute shape the rules read ---------------------------------------------------------------
def _any(kind: str, v: object) -> AnyValue:
    return AnyValue(**{kind: v})  # type: ignore[arg-type]


VALUES = (st.sampled_from(["GPU-1", "", "0", "007", "+5", "-3", " 5", "5 ", "1_0", "٣", "2147483648", "-2147483648",
                           "00000000000000000001", "x", "1.0", "node-a"]).map(lambda v: _any("string_value", v))
          | st.text(max_size=6).map(lambda v: _any("string_value", v))
          | st.sampled_from([0, 1, -1, 7, 2**31 - 1, 2**31, -(2**31), 2**63 - 1]).map(lambda v: _any("int_value", v))
          | st.sampled_from([0.0, -0.0, 1.0, 2.5, 3.0, float("nan"), float("inf"), 2.0**31, -(2.0**31)]).map(
              lambda v: _any("double_value", v))
          | st.booleans().map(lambda v: _any("bool_value", v))
          | st.sampled_from([b"", b"\x01", b"\x00\x12", b"\xab"]).map(lambda v: _any("bytes_value", v))
          | st.sampled_from([[], ["a"]]).map(lambda v: AnyValue(array_value=ArrayValue(
              values=[_any("string_value", x) for x in v])))
          | st.just(AnyValue(kvlist_value=KeyValueList())) | st.just(AnyValue()))
# the agent's names mostly, with each kind of row
AGENT_NAMES = ["stacklens.power_w", "stacklens.nvlink_rx_bytes_per_s", "stacklens.clock_event_reason_active",
               "stacklens.clock_event_reasons", "stacklens.xid_events_total", "stacklens.host_run_queue",
               "stacklens.cgroup_cpu_throttled_s", "stacklens.gpu_process_memory_bytes", "stacklens.gpu_info",
               "stacklens_sm_clock_hz", "stacklens.POWER_W", "no.such.metric", "dCgM_fi_dev_power_usage"]


def point_attrs(draw: st.DrawFn) -> list[KeyValue]:
    keys = st.sampled_from([*POINT_KEYS, "k8s.pod.uid", "k8s.namespace.name", "k8s.container.name"])
    return [KeyValue(key=k, value=v) for k, v in draw(st.lists(st.tuples(keys, VALUES), max_size=6))]


@st.composite
def agent_like_messages(draw: st.DrawFn) -> ExportMetricsServiceRequest:
    msg = ExportMetricsServiceRequest()
    for _ in range(draw(st.integers(1, 2))):
        rm = msg.resource_metrics.add()
        rm.resource.attributes.extend(point_attrs(draw))
        sm = rm.scope_metrics.add()
        for _ in range(draw(st.integers(1, 3))):
            m = sm.metrics.add(name=draw(st.sampled_from(AGENT_NAMES)))
            points = (m.sum if draw(st.booleans()) else m.gauge).data_points
            for _ in range(draw(st.integers(0, 3))):
                p = points.add(time_unix_nano=draw(st.sampled_from([T0, 0, 2**63 - 1, 2**63])),
                               flags=draw(st.sampled_from([0, 0, 1])))
                p.attributes.extend(point_attrs(draw))
                which = draw(st.sampled_from(["double", "int", "none"]))
                if which == "double":
                    p.as_double = draw(st.sampled_from([0.0, -0.0, 1.5, float("nan"), float("inf"), 1e300]))
                elif which == "int":
                    p.as_int = draw(st.sampled_from([0, -1, 2**53 + 1, 2**63 - 1, -(2**63)]))
    return msg


@settings(FAST, max_examples=400)
@given(msg=agent_like_messages())
def test_messages_of_every_attribute_shape(msg: ExportMetricsServiceRequest) -> None:
    check(msg.SerializeToString())


# -- dcgm-exporter's series as an OpenTelemetry Collector forwards them -------------------------------------
DCGM_NAMES = ["DCGM_FI_DEV_SM_CLOCK", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_POWER_USAGE",
              "dcgm_fi_dev_total_energy_consumption", "dcgm_fi_prof_pcie_rx_bytes", "DCGM_FI_DEV_XID_ERRORS",
              "Dcgm_Fi_Dev_Gpu_Temp", "DCGM_FI_DEV_NOPE", "stacklens.power_w", "stacklens.gpu_info"]
DCGM_KEYS = ["gpu", "UUID", "Hostname", "modelName", "pci_bus_id", "device", "pod", "namespace", "container",
             "gpu.uuid", "gpu.index", "host.name"]
DCGM_VALUES = (st.sampled_from(["GPU-a", "GPU-b", "", "0", "3", "-2", "x", "NVIDIA H100 80GB HBM3", "node-9",
                                "00000000:3B:00.0", "nvidia3", "vllm-0"]).map(lambda v: _any("string_value", v))
               | VALUES)


@st.composite
def dcgm_like_messages(draw: st.DrawFn) -> ExportMetricsServiceRequest:
    """Several GPUs' series in one or two resources (a scrape target each), labels of every shape the rules
    read: with and without a UUID, index, node label, identity labels and pod labels."""
    msg = ExportMetricsServiceRequest()
    for _ in range(draw(st.integers(1, 2))):
        rm = msg.resource_metrics.add()
        rm.resource.attributes.add(key="service.name", value=_any("string_value", "dcgm-exporter"))
        if draw(st.booleans()):
            rm.resource.attributes.add(key="host.name", value=_any("string_value", "node-r"))
        sm = rm.scope_metrics.add()
        for _ in range(draw(st.integers(1, 4))):
            m = sm.metrics.add(name=draw(st.sampled_from(DCGM_NAMES)))
            points = (m.sum if draw(st.booleans()) else m.gauge).data_points
            for _ in range(draw(st.integers(0, 4))):
                p = points.add(time_unix_nano=draw(st.sampled_from([T0, T0 + 10**9, 0, 2**63])),
                               flags=draw(st.sampled_from([0, 0, 0, 1])))
                keys = draw(st.lists(st.sampled_from(DCGM_KEYS), max_size=8))
                p.attributes.extend(KeyValue(key=k, value=draw(DCGM_VALUES)) for k in keys)
                which = draw(st.sampled_from(["double", "double", "int", "none"]))
                if which == "double":
                    p.as_double = draw(st.sampled_from([0.0, 1755.0, 87.5, 0.1, float("nan"), 1e300, -3.3]))
                elif which == "int":
                    p.as_int = draw(st.sampled_from([0, 1024, -1, 2**53 + 1, 2**63 - 1]))
    return msg


@settings(FAST, max_examples=600)
@given(msg=dcgm_like_messages())
def test_dcgm_series_of_every_label_shape(msg: ExportMetricsServiceRequest) -> None:
    check(msg.SerializeToString())


def _dcgm_export(gpus: int, seconds: int, pods: bool = True, uuid: bool = True) -> bytes:
    """One scrape of dcgm-exporter per second as the Collector's Prometheus receiver forwards it: a resource
    per scrape."""
    labels_of = [{"gpu": str(i), **({"UUID": f"GPU-{i:04d}"} if uuid else {}), "Hostname": "node-9",
                  "modelName": "NVIDIA H100 80GB HBM3", "pci_bus_id": f"00000000:{i:02X}:00.0",
                  "device": f"nvidia{i}", **({"pod": f"vllm-{i // 2}", "namespace": "serving", "container": "vllm"}
                                             if pods else {})} for i in range(gpus)]
    msg = ExportMetricsServiceRequest()
    for s in range(seconds):
        rm = msg.resource_metrics.add()
        rm.resource.attributes.add(key="service.name", value=_any("string_value", "dcgm-exporter"))
        sm = rm.scope_metrics.add()
        for name in ("DCGM_FI_DEV_SM_CLOCK", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_POWER_USAGE"):
            g = sm.metrics.add(name=name).gauge
            for i, labels in enumerate(labels_of):
                p = g.data_points.add(time_unix_nano=T0 + s * 10**9, as_double=100.0 * i + s + 0.5)
                p.attributes.extend(KeyValue(key=k, value=_any("string_value", v)) for k, v in labels.items())
    return msg.SerializeToString()


def test_dcgm_scrapes_take_the_fast_path_with_identity_and_placement_once_per_gpu_and_scrape() -> None:
    for pods in (True, False):
        for uuid in (True, False):
            body = _dcgm_export(4, 3, pods, uuid)
            assert check(body)
            batch = fast_metrics.decode(body)
            assert batch is not None
            assert len(batch.gpu_samples) == 4 * 4 * 3
            assert len(batch.gpu_info) == 4 * 3  # once per GPU in each resource (scrape), not per point
            assert len(batch.placements) == (4 * 3 if pods else 0)  # the same, not once per series
            names = set(batch.gpu_info.data["gpu_uuid"])
            assert names == ({f"GPU-{i:04d}" for i in range(4)} if uuid else {f"node-9/gpu{i}" for i in range(4)})
    batch = fast_metrics.decode(_dcgm_export(1, 1))
    assert batch is not None
    assert dict(zip(batch.gpu_samples.data["signal"], batch.gpu_samples.data["value"], strict=True)) == {
        "sm_clock_hz": 0.5e6, "fb_used_bytes": 0.5 * 2**20, "gpu_util_ratio": 0.005, "power_w": 0.5}


def test_common_attribute_shapes_take_the_fast_path() -> None:
    taken = 0
    for value in ("007", "+5", "-3", "", "x", "2147483648"):
        for key in ("gpu.index", "gpu", "process.pid", "pid"):
            msg = ExportMetricsServiceRequest()
            rm = msg.resource_metrics.add()
            rm.resource.attributes.add(key="host.name", value=_any("string_value", "n1"))
            for name in ("stacklens.power_w", "stacklens.gpu_process_memory_bytes", "stacklens.gpu_info"):
                p = rm.scope_metrics.add().metrics.add(name=name).gauge.data_points.add(time_unix_nano=T0, as_int=3)
                p.attributes.add(key="gpu.uuid", value=_any("string_value", "GPU-1"))
                p.attributes.add(key=key, value=_any("string_value", value))
            taken += check(msg.SerializeToString())
    assert taken == 24  # plain ASCII integers and non-integers alike, on every path


@settings(FAST, max_examples=300)
@given(msg=metric_messages())
def test_fuzz_messages_with_wrong_types(msg: ExportMetricsServiceRequest) -> None:
    check(msg.SerializeToString())


# -- wire data by hand --------------------------------------------------------------------------------
def _point(attrs: bytes = b"", value: bytes = tag(4, 1) + struct.pack("<d", 2.5), time_ns: int = T0) -> bytes:
    return attrs + f64(3, time_ns) + value


GPU = ld(7, kv_bytes("gpu.uuid", str_any(b"GPU-1")))


def wrap(metrics: list[bytes], resource: bytes = ld(1, kv_bytes("host.name", str_any(b"n1")))) -> bytes:
    sm = b"".join(ld(2, m) for m in metrics)
    return ld(1, (ld(1, resource) if resource is not None else b"") + ld(2, sm))


def gauge(name: bytes, *points: bytes) -> bytes:
    return ld(1, name) + ld(5, b"".join(ld(1, p) for p in points))


WIRE_CASES: dict[str, tuple[bytes, bool]] = {  # body, whether the fast path takes it
    "baseline": (wrap([gauge(b"stacklens.power_w", _point(GPU))]), True),
    "name after the data": (wrap([ld(5, ld(1, _point(GPU))) + ld(1, b"stacklens.power_w")]), True),
    "two names: the last wins": (wrap([ld(1, b"x") + ld(5, ld(1, _point(GPU))) + ld(1, b"stacklens.power_w")]), True),
    "two data fields": (wrap([gauge(b"stacklens.power_w", _point(GPU)) + ld(7, ld(1, _point(GPU)))]), False),
    "a sum with its temporality": (wrap([ld(1, b"stacklens.energy_mj") + ld(7, ld(1, _point(GPU))
                                                                            + tag(2, 0) + varint(2)
                                                                            + tag(3, 0) + varint(1))]), True),
    "a histogram": (wrap([ld(1, b"no.such") + ld(9, b"")]), False),
    "no data": (wrap([ld(1, b"stacklens.power_w")]), True),
    "an empty gauge": (wrap([ld(1, b"stacklens.power_w") + ld(5, b"")]), True),
    "as_double then as_int": (wrap([gauge(b"stacklens.power_w", _point(GPU, tag(4, 1) + struct.pack("<d", 1.5)
                                                                     + tag(6, 1) + struct.pack("<q", -7)))]), True),
    "flags past 32 bits": (wrap([gauge(b"stacklens.power_w", _point(GPU) + tag(8, 0) + varint(2**32 + 1))]), True),
    "flags with bit 0 but no value": (wrap([gauge(b"stacklens.power_w", GPU + f64(3, T0) + tag(8, 0) + varint(1))]),
                                      True),
    "exemplars": (wrap([gauge(b"stacklens.power_w", _point(GPU) + ld(5, b""))]), False),
    "an unknown scalar field": (wrap([gauge(b"stacklens.power_w", _point(GPU) + tag(99, 0) + varint(5))]), True),
    "an unknown message field": (wrap([gauge(b"stacklens.power_w", _point(GPU) + ld(99, b"x"))]), False),
    "time past int64": (wrap([gauge(b"stacklens.power_w", _point(GPU, time_ns=2**63))]), True),
    "the time twice": (wrap([gauge(b"stacklens.power_w", _point(GPU) + f64(3, T0 + 5))]), True),
    "a time of the wrong wire type": (wrap([gauge(b"stacklens.power_w", GPU + tag(3, 0) + varint(5))]), False),
    "a resource twice": (ld(1, ld(1, b"") + ld(1, b"") + ld(2, ld(2, gauge(b"stacklens.power_w", _point(GPU))))),
                         False),
    "the resource after the scopes": (ld(1, ld(2, ld(2, gauge(b"stacklens.power_w", _point(GPU))))
                                      + ld(1, ld(1, kv_bytes("host.name", str_any(b"late"))))), True),
    "no resource": (ld(1, ld(2, ld(2, gauge(b"stacklens.power_w", _point(GPU))))), True),
    "a float node on the resource, used": (wrap([gauge(b"stacklens.power_w", _point(GPU))],
                                               ld(1, kv_bytes("host.name", dbl_any(1.5)))), False),
    "a float node on the resource, not used": (wrap([gauge(b"stacklens.power_w", _point(
        GPU + ld(7, kv_bytes("Hostname", str_any(b"own")))))], ld(1, kv_bytes("host.name", dbl_any(1.5)))), True),
    "a bytes uuid": (wrap([gauge(b"stacklens.power_w", _point(ld(7, kv_bytes("gpu.uuid", ld(7, b"\x01\xff")))))]),
                     True),
    "a float uuid": (wrap([gauge(b"stacklens.power_w", _point(ld(7, kv_bytes("gpu.uuid", dbl_any(1.0)))))]), False),
    "an index only": (wrap([gauge(b"stacklens.power_w", _point(ld(7, kv_bytes("gpu.index", tag(3, 0) + varint(3)))))]),
                      True),
    "an index of long bytes": (wrap([gauge(b"stacklens.power_w", _point(
        ld(7, kv_bytes("gpu.index", ld(7, bytes(40) + b"\x12")))))]), False),
    "neither uuid nor index": (wrap([gauge(b"stacklens.power_w", _point())]), True),
    "a NUL in the uuid": (wrap([gauge(b"stacklens.power_w", _point(ld(7, kv_bytes("gpu.uuid", str_any(b"a\0b")))))]),
                          False),
    "bad UTF-8 in a name": (wrap([gauge(b"stacklens.\xff", _point(GPU))]), False),
    "an unknown name": (wrap([gauge(b"stacklens.nope", _point(GPU), _point(GPU))]), True),
    "an unknown DCGM name in lower case": (wrap([gauge(b"dcgm_fi_dev_nope", _point(GPU))]), True),
    "an unknown DCGM name": (wrap([gauge(b"DCGM_FI_DEV_ENC_UTIL", _point(GPU))]), True),
    "a DCGM name in lower case": (wrap([gauge(b"dcgm_fi_dev_sm_clock", _point(GPU))]), True),
    "a DCGM name in mixed case": (wrap([gauge(b"Dcgm_Fi_Dev_Power_Usage", _point(GPU))]), True),
    "a DCGM name beyond ASCII": (wrap([gauge("dcgm_fi_dev_power_usagé".encode(), _point(GPU))]), False),
    "a DCGM name of 300 bytes": (wrap([gauge(b"dcgm_" + b"x" * 295, _point(GPU))]), False),
    "an engine name": (wrap([gauge(b"vllm:num_requests_running", _point(GPU))]), False),
    "an hw name": (wrap([gauge(b"hw.gpu.utilization", _point(GPU))]), False),
    "a link label of an int": (wrap([gauge(b"stacklens.nvlink_tx_bytes_per_s", _point(
        GPU + ld(7, kv_bytes("link", tag(3, 0) + varint(4)))))]), True),
    "a link label of an empty string": (wrap([gauge(b"stacklens.nvlink_tx_bytes_per_s", _point(
        GPU + ld(7, kv_bytes("link", str_any(b"")))))]), True),
    "a later attribute of the same key": (wrap([gauge(b"stacklens.power_w", _point(
        GPU + ld(7, kv_bytes("gpu.uuid", str_any(b"GPU-2")))))]), True),
}


@pytest.mark.parametrize("case", sorted(WIRE_CASES))
def test_hand_made_wire_data(case: str) -> None:
    body, taken = WIRE_CASES[case]
    assert check(body) == taken


BASE = [body for body in fleet_bodies(seconds=2)[:2]] + [WIRE_CASES["baseline"][0]]


@settings(FAST, max_examples=1000)
@given(data=st.data(), which=st.integers(0, len(BASE) - 1))
def test_truncated_or_corrupted_bodies(data: st.DataObject, which: int) -> None:
    body = BASE[which]
    b = bytearray(body[:data.draw(st.integers(0, len(body)), label="cut")])
    for _ in range(data.draw(st.integers(0, 4), label="edits")):
        if b:
            b[data.draw(st.integers(0, len(b) - 1))] = data.draw(st.integers(0, 255))
    check(bytes(b))


@settings(FAST, max_examples=500)
@given(body=st.binary(max_size=300))
def test_random_bytes(body: bytes) -> None:
    check(body)


def test_corpus_bodies() -> None:
    for _signal, body in CORPUS:  # metrics and traces alike: a trace body is a bad metrics body
        check(body)
    assert METRIC_NAMES  # the fuzz tests' names are the catalog's


def test_threads_decode_at_once() -> None:
    """The C keeps no state between calls and runs without the GIL: the receivers decode in parallel."""
    bodies = fleet_bodies(seconds=3)[:8]
    want = [reference(b) for b in bodies]
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(fast_metrics.decode, bodies * 6))
    for g, w in zip(got, want * 6, strict=True):
        assert g is not None and isinstance(w, IngestBatch)
        assert_same_batch(g, w)


def test_a_dcgm_placement_is_repeated_only_when_time_node_or_pod_labels_change() -> None:
    """One placement for a GPU's points in a row that name the same pod on the same node at the same time;
    any of those changing makes a new one (the reference and the C alike)."""
    base = {"UUID": "GPU-a", "gpu": "0", "Hostname": "n1", "pod": "p", "namespace": "ns", "container": "c"}
    changes: list[tuple[int, dict[str, str]]] = [
        (T0, {}), (T0, {}),  # the same: one
        (T0 + 1, {}), (T0 + 1, {"pod": "q"}), (T0 + 1, {"pod": "q", "namespace": "other"}),
        (T0 + 1, {"pod": "q", "namespace": "other", "container": "d"}),
        (T0 + 1, {"pod": "q", "namespace": "other", "container": "d", "Hostname": "n2"}),
        (T0, {}),  # back to the first: the last one differs, so again
        (T0, {"UUID": "GPU-b"}), (T0, {}),  # another GPU between: GPU-a's last is still the same
    ]
    msg = ExportMetricsServiceRequest()
    rm = msg.resource_metrics.add()
    g = rm.scope_metrics.add().metrics.add(name="DCGM_FI_DEV_POWER_USAGE").gauge
    for t, change in changes:
        p = g.data_points.add(time_unix_nano=t, as_double=1.0)
        p.attributes.extend(KeyValue(key=k, value=_any("string_value", v)) for k, v in {**base, **change}.items())
    body = msg.SerializeToString()
    assert check(body)
    batch = fast_metrics.decode(body)
    assert batch is not None
    pl = batch.placements.data
    assert list(zip(pl["time_ns"], pl["node"], pl["gpu_uuid"], pl["pod"], pl["namespace"], pl["container"],
                    strict=True)) == [
        (T0, "n1", "GPU-a", "p", "ns", "c"), (T0 + 1, "n1", "GPU-a", "p", "ns", "c"),
        (T0 + 1, "n1", "GPU-a", "q", "ns", "c"), (T0 + 1, "n1", "GPU-a", "q", "other", "c"),
        (T0 + 1, "n1", "GPU-a", "q", "other", "d"), (T0 + 1, "n2", "GPU-a", "q", "other", "d"),
        (T0, "n1", "GPU-a", "p", "ns", "c"), (T0, "n1", "GPU-b", "p", "ns", "c")]


def _labels(**kv: str) -> bytes:
    return b"".join(ld(7, kv_bytes(k, str_any(v.encode()))) for k, v in kv.items())


def test_label_runs_parsed_once_give_the_rows_of_each_point() -> None:
    """dcgm-exporter's labels (a run of ~300 bytes) are parsed once and taken from a cache by later points with
    the same bytes; a run split by the value, a key repeated in the second run, a run of the same length with
    other bytes, and short runs (parsed each time) all give the reference's rows."""
    long_a = _labels(UUID="GPU-aaaa", gpu="0", Hostname="node-1", modelName="NVIDIA H100 80GB HBM3",
                     pci_bus_id="00000000:18:00.0", device="nvidia0", pod="vllm-0", namespace="serving",
                     container="vllm")
    long_b = long_a.replace(b"GPU-aaaa", b"GPU-bbbb").replace(b"vllm-0", b"vllm-9")  # same length, other bytes
    assert len(long_a) == len(long_b) >= 128
    tail = _labels(pod="moved", gpu="5")  # after the value: later attributes of the same key win
    points = [_point(long_a), _point(long_b), _point(long_a), _point(long_a, tag(4, 1) + struct.pack("<d", 1.0)
                                                                        + tail),
              _point(long_a), _point(long_b, tag(6, 1) + struct.pack("<q", 7) + tail), _point(GPU), _point(GPU)]
    body = wrap([gauge(b"DCGM_FI_DEV_POWER_USAGE", *points), gauge(b"DCGM_FI_DEV_SM_CLOCK", *points[::-1])])
    assert check(body)
    batch = fast_metrics.decode(body)
    assert batch is not None
    g = batch.gpu_samples.data
    assert g["gpu_uuid"][:6] == ["GPU-aaaa", "GPU-bbbb", "GPU-aaaa", "GPU-aaaa", "GPU-aaaa", "GPU-bbbb"]
    assert g["gpu_index"][:6] == [0, 0, 0, 5, 0, 5]
    assert "moved" in batch.placements.data["pod"]
    # a long run after a short one: the cached run adds its labels to those before it
    long_c = _labels(UUID="GPU-cccc", gpu="2", Hostname="node-1", modelName="NVIDIA H100 80GB HBM3",
                     pci_bus_id="00000000:38:00.0", device="nvidia2", pod="vllm-1", container="vllm")
    assert len(long_c) >= 128
    early = _labels(namespace="early") + f64(3, T0) + tag(4, 1) + struct.pack("<d", 3.0) + long_c
    body = wrap([gauge(b"DCGM_FI_DEV_POWER_USAGE", _point(long_c), early, early)])
    assert check(body)
    batch = fast_metrics.decode(body)
    assert batch is not None and batch.placements.data["namespace"] == [None, "early"]
