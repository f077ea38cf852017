"""Pure encoder: a :class:`~collector.records.NodeSnapshot` → OTLP ``ExportMetricsServiceRequest``
bytes. No I/O here; the transports in :mod:`collector.export.otlp_transport` send what this returns.

It writes the protobuf wire format directly, with each GPU's attribute bytes computed once: building
the same message through the protobuf classes costs several times more CPU per point, and the agent
has about one millisecond per cycle for everything. Tests parse the output with the official
``opentelemetry-proto`` classes.

Conventions: metric names are ``stacklens.<canonical name>`` with the catalog's unit; every GPU point
carries ``gpu.uuid`` (plus ``link``/``reason``/``xid``/process labels where the signal has them); the
GPU's other identity attributes travel once per cycle on ``stacklens.gpu_info``. A missing value is a
point with the OTLP flag ``NO_RECORDED_VALUE`` and no value, never a 0. Counters are cumulative
monotonic sums whose start time is when the agent first saw them.
"""

from __future__ import annotations

import importlib
import math
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from collector import __version__
from collector.native import pure_python
from collector.records import GpuIdentity, NodeSnapshot, Reading
from collector.signals import SIGNALS, Signal, clock_event_flags

_FLAG_NO_RECORDED_VALUE = 1
_CUMULATIVE = 2


# -- protobuf wire primitives -------------------------------------------------------------------
def _varint_slow(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


# lengths and tags are almost always below 2**14: look them up instead of looping
_SMALL_VARINTS = [_varint_slow(i) for i in range(1 << 14)]


def _varint(n: int) -> bytes:
    return _SMALL_VARINTS[n] if n < 16384 else _varint_slow(n)


def _ld(field: int, payload: bytes) -> bytes:
    """A length-delimited field."""
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _str(field: int, s: str) -> bytes:
    return _ld(field, s.encode())


_DOUBLE = struct.Struct("<d")
# NumberDataPoint tails: [start_time_unix_nano (2, fixed64)] time_unix_nano (3, fixed64) then
# as_double (4, double) or flags (8, varint)
_TIME_VALUE = struct.Struct("<BQBd")
_TIME = struct.Struct("<BQ")
_START = struct.Struct("<BQ")
_NO_VALUE = bytes([8 << 3 | 0, _FLAG_NO_RECORDED_VALUE])
_T_START, _T_TIME, _T_DOUBLE = 2 << 3 | 1, 3 << 3 | 1, 4 << 3 | 1
_DATA_POINT_TAG = bytes([1 << 3 | 2])  # data_points is field 1 of Gauge and of Sum
# a point's tail after its series head (which ends with the time's tag): time, then the value's tag and value
_TAIL_VALUE = struct.Struct("<QBd")
_TAIL_TIME = struct.Struct("<Q")


def _compiled_readings() -> Callable[..., object] | None:
    """``_otlp_points.readings`` (setup.py builds it next to this module): ``_readings_py`` in C: the same bytes
    for ~2.5x less CPU per request; None, and the Python loop, when it is not built or ``STACKLENS_PURE_PYTHON=1``."""
    if pure_python():
        return None
    try:
        module = importlib.import_module("collector.export._otlp_points")
    except ImportError:
        return None
    fn: Callable[..., object] = module.readings
    return fn


_COMPILED_READINGS = _compiled_readings()
_PACK_VALUE, _PACK_TIME = _TAIL_VALUE.pack, _TAIL_TIME.pack


def _series_heads(prefix: bytes) -> tuple[bytes, bytes]:
    """The bytes of a point of a series before its time, with a value and without one (missing): the
    ``data_points`` tag, the point's length, the series' fields (attributes, start time), the time tag."""
    with_value = len(prefix) + _TIME_VALUE.size
    missing = len(prefix) + _TIME.size + len(_NO_VALUE)
    return (_DATA_POINT_TAG + _varint(with_value) + prefix + bytes([_T_TIME]),
            _DATA_POINT_TAG + _varint(missing) + prefix + bytes([_T_TIME]))


def _any_value(v: str | int | float | bool) -> bytes:
    if isinstance(v, bool):
        return _varint(2 << 3) + _varint(int(v))
    if isinstance(v, int):
        return _varint(3 << 3) + _varint(v & 0xFFFFFFFFFFFFFFFF)
    if isinstance(v, float):
        return bytes([4 << 3 | 1]) + _DOUBLE.pack(v)
    return _str(1, v)


def key_value(key: str, value: str | int | float | bool) -> bytes:
    """An encoded ``KeyValue`` message (without its enclosing field tag)."""
    return _str(1, key) + _ld(2, _any_value(value))


def attributes(field: int, attrs: Iterable[tuple[str, str | int | float | bool]]) -> bytes:
    return b"".join(_ld(field, key_value(k, v)) for k, v in attrs)


def point(prefix: bytes, time_ns: int, value: float | None) -> bytes:
    """A ``data_points`` entry: tag, length and a ``NumberDataPoint`` whose fields before the time
    (attributes, start time) are ``prefix``. A None or NaN value is written as missing: the
    NO_RECORDED_VALUE flag and no value, never a 0."""
    if value is None or math.isnan(value):
        body = prefix + _TIME.pack(_T_TIME, time_ns) + _NO_VALUE
    else:
        body = prefix + _TIME_VALUE.pack(_T_TIME, time_ns, _T_DOUBLE, value)
    return _DATA_POINT_TAG + _varint(len(body)) + body


def number_point(attrs: bytes, time_ns: int, value: float | None, start_ns: int = 0) -> bytes:
    """A data point from pre-encoded field-7 KeyValues and, for a cumulative sum, its start time."""
    return point(attrs + _START.pack(_T_START, start_ns) if start_ns else attrs, time_ns, value)


_METRIC_HEADS: dict[str, bytes] = {}


def metric(sig: Signal, points: list[bytes], name: str | None = None) -> bytes:
    """An encoded ``Metric``: a gauge, or a cumulative monotonic sum for counters."""
    name = name or sig.otlp_name
    body = _METRIC_HEADS.get(name)
    if body is None:
        body = _METRIC_HEADS[name] = _str(1, name) + _str(2, sig.description) + _str(3, sig.unit)
    dps = b"".join(points)
    if sig.kind == "counter":
        return body + _ld(7, dps + _varint(2 << 3) + _varint(_CUMULATIVE) + _varint(3 << 3) + _varint(1))
    return body + _ld(5, dps)


# -- the encoder ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ResourceInfo:
    """Resource attributes of the node: ``host.name`` and, on Kubernetes, ``k8s.node.name``."""

    host_name: str
    k8s_node_name: str | None = None
    extra: tuple[tuple[str, str], ...] = ()

    def attributes(self, snapshot: NodeSnapshot) -> list[tuple[str, str | int | float | bool]]:
        attrs: list[tuple[str, str | int | float | bool]] = [
            ("service.name", "stacklens-agent"),
            ("service.version", __version__),
            ("host.name", self.host_name),
        ]
        if self.k8s_node_name:
            attrs.append(("k8s.node.name", self.k8s_node_name))
        attrs.append(("stacklens.gpu_status", snapshot.gpu_status))
        if snapshot.driver_version:
            attrs.append(("nvidia.driver.version", snapshot.driver_version))
        attrs.extend(self.extra)
        return attrs


_GPU_INFO = Signal("gpu_info", "1", "gauge", SIGNALS["gpu_lost"].group, "gpu",
                   "Identity of a GPU: always 1, its attributes carry index, model and PCI bus id.")


class OtlpMetricsEncoder:
    """Encodes snapshots; keeps the start times of counters and per-series attribute bytes."""

    def __init__(self, resource: ResourceInfo, *, compiled: bool = True) -> None:
        self._resource = resource
        # the compiled per-reading loop, if built (compiled=False: the Python one, which is its reference)
        self._compiled = _COMPILED_READINGS if compiled else None
        self._gpu_attrs: dict[str, bytes] = {}
        self._info_heads: dict[GpuIdentity, tuple[bytes, bytes]] = {}
        self._label_attrs: dict[tuple[str, tuple[tuple[str, str], ...]], bytes] = {}
        self._start_ns: dict[tuple[object, ...], int] = {}
        self._scope = _str(1, "stacklens.agent") + _str(2, __version__)
        self._xid_counts: dict[tuple[str, int], int] = {}
        # per series (GPU or "" for the host, signal, labels): the heads of its points, see _series_heads
        self._heads: dict[tuple[str, str, tuple[tuple[str, str], ...]], tuple[bytes, bytes]] = {}
        # per (GPU, clock-event bitmask): the decoded reason flags' points with their (equal) times left out,
        # so that joining these parts with the packed time gives all of them
        self._flag_parts: dict[tuple[str, int], list[bytes]] = {}

    def _gpu(self, gpu: GpuIdentity) -> bytes:
        enc = self._gpu_attrs.get(gpu.uuid)
        if enc is None:
            enc = attributes(7, [("gpu.uuid", gpu.uuid)])
            self._gpu_attrs[gpu.uuid] = enc
        return enc

    def _with_labels(self, base_key: str, base: bytes, labels: tuple[tuple[str, str], ...]) -> bytes:
        if not labels:
            return base
        key = (base_key, labels)
        enc = self._label_attrs.get(key)
        if enc is None:
            enc = base + attributes(7, labels)
            if len(self._label_attrs) < 100_000:  # bounded: pids and cgroups come and go
                self._label_attrs[key] = enc
        return enc

    def _start(self, key: tuple[object, ...], time_ns: int) -> int:
        return self._start_ns.setdefault(key, time_ns)

    def encode(self, snapshot: NodeSnapshot) -> bytes:
        """The serialized ``ExportMetricsServiceRequest`` for one snapshot."""
        return self.encode_batch([snapshot])

    def encode_batch(self, snapshots: Sequence[NodeSnapshot]) -> bytes:
        """One ``ExportMetricsServiceRequest`` for several snapshots (the cycles of one export interval):
        one ``Metric`` per signal holding the points of every cycle, each at its own time. Snapshots
        whose resource differs (the GPU status or driver changed) go in a ResourceMetrics of their own."""
        out: list[bytes] = []
        i = 0
        while i < len(snapshots):
            resource = self._resource.attributes(snapshots[i])
            j = i + 1
            while j < len(snapshots) and self._resource.attributes(snapshots[j]) == resource:
                j += 1
            by_signal: dict[str, list[bytes]] = {}
            for snapshot in snapshots[i:j]:
                self._collect(by_signal, snapshot)
            metrics = b"".join(
                _ld(2, metric(_GPU_INFO if name == "gpu_info" else SIGNALS[name], points,
                              "stacklens.gpu_info" if name == "gpu_info" else None))
                for name, points in by_signal.items()
            )
            scope_metrics = _ld(1, self._scope) + metrics
            resource_metrics = _ld(1, attributes(1, resource)) + _ld(2, scope_metrics)
            out.append(_ld(1, resource_metrics))
            i = j
        return b"".join(out)

    def _collect(self, by_signal: dict[str, list[bytes]], snapshot: NodeSnapshot) -> None:
        """Append the points of one snapshot, per signal."""
        for gpu_sample in snapshot.gpus:
            gpu = gpu_sample.gpu
            attrs = self._gpu(gpu)
            self._readings(by_signal, gpu.uuid, attrs, gpu_sample.readings)
            info = self._info_heads.get(gpu)
            if info is None:
                info = self._info_heads[gpu] = _series_heads(attrs + attributes(7, [
                    ("gpu.index", gpu.index), ("gpu.model", gpu.name), ("gpu.pci_bus_id", gpu.pci_bus_id),
                    ("gpu.device", gpu.device)]))
            by_signal.setdefault("gpu_info", []).append(info[0] + _TAIL_VALUE.pack(gpu_sample.time_ns, _T_DOUBLE, 1.0))
        if snapshot.host is not None:
            self._readings(by_signal, "", b"", snapshot.host.readings)
        for p in snapshot.placements or ():
            labels = tuple((k, v) for k, v in (
                ("process.pid", str(p.pid)), ("container.id", p.container_id), ("k8s.pod.uid", p.pod_uid),
                ("k8s.pod.name", p.pod), ("k8s.namespace.name", p.namespace),
                ("k8s.container.name", p.container)) if v)
            enc = self._with_labels(p.gpu_uuid, attributes(7, [("gpu.uuid", p.gpu_uuid)]), labels)
            value = float(p.used_memory_bytes) if p.used_memory_bytes is not None else None
            by_signal.setdefault("gpu_process_memory_bytes", []).append(number_point(enc, p.time_ns, value))
        for ev in snapshot.events:
            enc = attributes(7, [("gpu.uuid", ev.gpu_uuid)])
            by_signal.setdefault("xid_last", []).append(number_point(enc, ev.time_ns, float(ev.xid)))
            count = self._xid_counts[(ev.gpu_uuid, ev.xid)] = self._xid_counts.get((ev.gpu_uuid, ev.xid), 0) + 1
            xenc = enc + attributes(7, [("xid", str(ev.xid))])
            start = self._start(("xid", ev.gpu_uuid, ev.xid), ev.time_ns)
            by_signal.setdefault("xid_events_total", []).append(number_point(xenc, ev.time_ns, float(count), start))

    def _series(self, series: tuple[str, str, tuple[tuple[str, str], ...]], attrs: bytes,
                time_ns: int) -> tuple[bytes, bytes]:
        key, signal, labels = series
        prefix = self._with_labels(key, attrs, labels)
        if SIGNALS[signal].kind == "counter":
            prefix += _START.pack(_T_START, self._start(series, time_ns))
        heads = _series_heads(prefix)
        if len(self._heads) < 100_000:  # bounded: labels of processes and cgroups come and go
            self._heads[series] = heads
        return heads

    def _flags(self, key: str, attrs: bytes, mask: int) -> list[bytes]:
        parts = [b""]
        for name, flag in clock_event_flags(mask):
            head = _series_heads(self._with_labels(key, attrs, (("reason", name),)))[0]
            parts[-1] += head
            parts.append(struct.pack("<Bd", _T_DOUBLE, flag))
        if len(self._flag_parts) < 100_000:
            self._flag_parts[(key, mask)] = parts
        return parts

    def _readings(self, by_signal: dict[str, list[bytes]], key: str, attrs: bytes,
                  readings: Iterable[Reading]) -> None:
        compiled = self._compiled
        # NotImplemented: a cache is not a plain dict, nothing was done
        if compiled is None or compiled(self._heads, self._flag_parts, self._series, self._flags, _PACK_VALUE,
                                        _PACK_TIME, by_signal, key, attrs, readings) is NotImplemented:
            self._readings_py(by_signal, key, attrs, readings)

    def _readings_py(self, by_signal: dict[str, list[bytes]], key: str, attrs: bytes,
                     readings: Iterable[Reading]) -> None:
        # Everything of a point but its time and value is fixed per series: its attributes, and for a
        # counter its start time. Cached, a point costs one dict lookup, one pack and one concatenation.
        heads_of, pack_value, pack_time = self._heads.get, _TAIL_VALUE.pack, _TAIL_TIME.pack
        last_signal = ""
        points: list[bytes] = []
        for signal, value, time_ns, labels in readings:
            series = (key, signal, labels)
            heads = heads_of(series)
            if heads is None:
                heads = self._series(series, attrs, time_ns)
            if signal != last_signal:  # readings of one signal mostly come together (NVLink links)
                found = by_signal.get(signal)
                if found is None:
                    found = by_signal[signal] = []
                points, last_signal = found, signal
            if value is None or value != value:  # noqa: PLR0124 - missing (None or NaN): flagged, never a 0
                points.append(heads[1] + pack_time(time_ns) + _NO_VALUE)
                continue
            points.append(heads[0] + pack_value(time_ns, _T_DOUBLE, value))
            if signal == "clock_event_reasons":
                # decoded flags ride along with the bitmask, one point per named reason
                mask = int(value)
                parts = self._flag_parts.get((key, mask))
                if parts is None:
                    parts = self._flags(key, attrs, mask)
                by_signal.setdefault("clock_event_reason_active", []).append(pack_time(time_ns).join(parts))


def merge_requests(payloads: Iterator[bytes] | list[bytes]) -> bytes:
    """Concatenated serialized requests parse as one request holding all their resource metrics
    (protobuf appends repeated fields), so batching needs no re-encoding."""
    return b"".join(payloads)
