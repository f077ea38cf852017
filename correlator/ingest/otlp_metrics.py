"""OTLP metrics → normalised rows, through the one signal catalog.

Accepts, unchanged: the agent's ``stacklens.*`` metrics; DCGM exporter names as the OpenTelemetry
Collector's Prometheus receiver forwards them (metric name as is, labels ``gpu``/``UUID``/``Hostname``/
``pod``/``namespace``/``modelName``/``pci_bus_id`` as point attributes); the OpenTelemetry ``hw.*``
hardware names; vLLM's ``vllm:*`` metrics (current and renamed names) and the GenAI server metrics.
Anything else is counted as ignored.

The normalisation of one metric's points (:func:`add_points`) is shared with the Prometheus pull
(``prometheus_pull.py``), which hands it the same names and labels as sample attributes: a series
stored through either path becomes the same rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from collector.signals import SIGNALS, EngineSignal, Resolved, resolve, resolve_engine
from correlator.ingest.attributes import attributes_of
from correlator.ingest.batch import IngestBatch

_NO_RECORDED_VALUE = 1
# the store's column ranges: times are BIGINT nanoseconds, pids and GPU indexes INTEGER; a value outside
# them is garbage from the sender and must not fail the transaction it would share with other batches
INT64_MAX = (1 << 63) - 1
INT32_MAX = (1 << 31) - 1
# derived on the agent from clock_event_reasons, which is stored; the analysis decodes the bitmask
_SKIPPED = frozenset({"clock_event_reason_active", "gpu_lost_events"})
_OTEL_HW = frozenset(src for s in SIGNALS.values() if s.otel for src in (s.otel.name,))
_SUB_LABEL = {"gpu_link": "link", "gpu_reason": "reason"}

P = TypeVar("P")
# one point as the normaliser needs it: (attributes, time in UTC ns, value or None when missing)
Point = tuple[Mapping[str, object], int, float | None]

_RESOLVED: dict[str, Resolved | None] = {}


def _resolve_cached(name: str) -> Resolved | None:
    if name not in _RESOLVED:
        r = resolve(name)
        if r is None and name[:5].lower() == "dcgm_":
            r = resolve(name.upper())  # OpenTelemetry SDKs lower-case instrument names
        if len(_RESOLVED) < 10_000:
            _RESOLVED[name] = r
        return r
    return _RESOLVED[name]


def node_of(resource: Mapping[str, object], point: Mapping[str, object] | None = None) -> str:
    """The node a point belongs to: DCGM's Hostname label, then the resource's k8s.node.name / host.name."""
    if point:
        for key in ("Hostname", "hostname", "k8s.node.name", "host.name"):
            v = point.get(key)
            if v:
                return str(v)
    for key in ("k8s.node.name", "host.name", "Hostname", "hostname"):
        v = resource.get(key)
        if v:
            return str(v)
    return "unknown"


def _gpu_of(attrs: Mapping[str, object]) -> tuple[str | None, int | None]:
    uuid = attrs.get("gpu.uuid") or attrs.get("UUID") or attrs.get("uuid") or attrs.get("hw.id")
    return (str(uuid) if uuid else None), int32_or_none(attrs.get("gpu.index", attrs.get("gpu")))


def _value(p: Any) -> float | None:
    if p.flags & _NO_RECORDED_VALUE:
        return None
    which = p.WhichOneof("value")
    if which == "as_double":
        v = float(p.as_double)
        return None if math.isnan(v) else v  # NaN is how Prometheus marks staleness: missing
    if which == "as_int":
        return float(p.as_int)
    return None


def int32_or_none(v: object) -> int | None:
    """An integer attribute (pid, GPU index) as the store's INTEGER column takes it, else None."""
    if isinstance(v, float):
        if not v.is_integer():
            return None
        i = int(v)
    elif v is None or isinstance(v, (bool, list, dict)):
        return None
    else:
        try:
            i = int(str(v))
        except ValueError:
            return None
    return i if -INT32_MAX - 1 <= i <= INT32_MAX else None


def str_or_none(v: object) -> str | None:
    """A text attribute (pod, container, model) as a string column takes it; empty is missing."""
    if v is None or v == "":
        return None
    return v if isinstance(v, str) else str(v)


@dataclass(slots=True)
class Origin:
    """Where a group of points comes from: an OTLP resource, or a Prometheus scrape target made to look
    like one (``service.name`` = job). Holds what every point of the group shares."""

    resource: Mapping[str, object]
    service: str = ""
    model: object = None
    pid: int | None = None
    # GPUs whose identity (model, PCI bus id) from DCGM labels is already in the batch
    gpu_info_seen: set[str] = field(default_factory=set)
    # each GPU's last placement from DCGM labels (time, node, pod, namespace, container): a scrape names the same
    # pod on each of its ~20 series of a GPU, which is one placement, not 20
    dcgm_placed: dict[str, tuple[object, ...]] = field(default_factory=dict)
    node: str = ""  # the resource's node, for points that do not name their own

    @classmethod
    def of(cls, resource: Mapping[str, object]) -> Origin:
        model = resource.get("gen_ai.request.model") or resource.get("gen_ai.response.model") or resource.get("model")
        return cls(resource, str(resource.get("service.name") or ""), model,
                   int32_or_none(resource.get("process.pid")), node=node_of(resource))

    def node_of(self, point: Mapping[str, object]) -> str:
        """``node_of(resource, point)`` with the resource's part computed once."""
        v = point.get("Hostname") or point.get("hostname") or point.get("k8s.node.name") or point.get("host.name")
        return str(v) if v else self.node


def _unpack_otlp(p: Any) -> Point:
    return attributes_of(p.attributes), p.time_unix_nano, _value(p)


def add_points(out: IngestBatch, name: str, origin: Origin, points: Sequence[P],
               unpack: Callable[[P], Point]) -> None:
    """Normalise the points of one metric (gauge or counter values, or one histogram's ``_sum`` or
    ``_count``) named ``name`` in its source's naming into ``out``: engine samples, GPU samples, host
    samples, placements, or GPU identity. Unknown names are counted as ignored."""
    if name == "stacklens.gpu_info":
        for p in points:
            a, t, _ = unpack(p)
            uuid, idx = _gpu_of(a)
            if uuid and 0 <= t <= INT64_MAX:
                out.gpu_info.append(t, origin.node_of(a), uuid, idx, str_or_none(a.get("gpu.model")),
                                    str_or_none(a.get("gpu.pci_bus_id")), str_or_none(a.get("gpu.device")))
            else:
                out.ignored += 1
        return
    es = resolve_engine(name)
    if es is not None:
        _engine_points(out, es, origin, points, unpack)
        return
    resolved: Resolved | None = None if name in _OTEL_HW else _resolve_cached(name)
    if resolved is None and name not in _OTEL_HW:
        out.ignored += len(points)
        return
    gpu, host = out.gpu_samples.data, out.host_samples.data
    for p in points:
        a, t, v = unpack(p)
        r = resolved if resolved is not None else resolve(name, a)
        if r is None or r.signal.name in _SKIPPED or not 0 <= t <= INT64_MAX:
            out.ignored += 1
            continue
        sig = r.signal
        if r.source == "otel" and sig.otel is not None and sig.otel.kind == "counter" and sig.kind == "gauge":
            # hw.gpu.io is a byte counter; the canonical signal is a rate the source does not give
            out.ignored += 1
            continue
        if v is not None and r.factor != 1.0:
            v *= r.factor
        scope = sig.scope
        if scope in ("host", "cgroup"):
            host["time_ns"].append(t)
            host["node"].append(origin.node_of(a))
            host["signal"].append(sig.name)
            host["sub"].append(str(a.get("container_id") or a.get("cgroup") or "") or None)
            host["value"].append(v)
            continue
        if scope == "gpu_process":
            uuid, _ = _gpu_of(a)
            pid = int32_or_none(a.get("process.pid") or a.get("pid"))
            if uuid is None or pid is None:
                out.ignored += 1
                continue
            out.placements.append(
                t, origin.node_of(a), uuid, pid, str_or_none(a.get("container.id")), str_or_none(a.get("k8s.pod.uid")),
                str_or_none(a.get("k8s.pod.name") or a.get("pod")),
                str_or_none(a.get("k8s.namespace.name") or a.get("namespace")),
                str_or_none(a.get("k8s.container.name") or a.get("container")), v)
            continue
        uuid, idx = _gpu_of(a)
        if uuid is None and idx is None:
            out.ignored += 1
            continue
        node = origin.node_of(a)
        label = _SUB_LABEL.get(scope) or ("xid" if sig.name == "xid_events_total" else None)
        gpu["time_ns"].append(t)
        gpu["node"].append(node)
        gpu["gpu_uuid"].append(uuid)
        gpu["gpu_index"].append(idx)
        gpu["signal"].append(sig.name)
        gpu["sub"].append(str(a.get(label)) if label and a.get(label) is not None else None)
        gpu["value"].append(v)
        if r.source == "dcgm":
            _dcgm_labels(out, origin, a, t, node, uuid, idx)


def _dcgm_labels(out: IngestBatch, origin: Origin, a: Mapping[str, object], t: int, node: str, uuid: str | None,
                 idx: int | None) -> None:
    """What dcgm-exporter's labels say besides the value: the GPU's identity (``modelName``,
    ``pci_bus_id``, ``device``) and the pod it serves (a placement without pid: DCGM does not know one; once for
    the series of a GPU that name the same pod at the same time in a row). A GPU without a UUID label is named
    after its node and index, as the store names its samples."""
    gpu = uuid if uuid is not None else f"{node}/gpu{idx}"
    if gpu not in origin.gpu_info_seen and (a.get("modelName") or a.get("pci_bus_id") or a.get("device")):
        origin.gpu_info_seen.add(gpu)
        out.gpu_info.append(t, node, gpu, idx, str_or_none(a.get("modelName")), str_or_none(a.get("pci_bus_id")),
                            str_or_none(a.get("device")))
    if a.get("pod") or a.get("container"):
        placed = (t, node, str_or_none(a.get("pod")), str_or_none(a.get("namespace")), str_or_none(a.get("container")))
        if origin.dcgm_placed.get(gpu) != placed:
            origin.dcgm_placed[gpu] = placed
            out.placements.append(t, node, gpu, 0, None, None, *placed[2:], None)


def _engine_points(out: IngestBatch, es: EngineSignal, origin: Origin, points: Sequence[P],
                   unpack: Callable[[P], Point]) -> None:
    engine = out.engine_samples.data
    for p in points:
        a, t, v = unpack(p)
        if not 0 <= t <= INT64_MAX:
            out.ignored += 1
            continue
        model = a.get("model_name") or a.get("gen_ai.request.model") or origin.model
        engine["time_ns"].append(t)
        engine["node"].append(origin.node_of(a))
        engine["service"].append(origin.service)
        engine["model"].append(str(model) if model else None)
        engine["pid"].append(int32_or_none(a.get("process.pid")) or origin.pid)
        engine["signal"].append(es.name)
        engine["value"].append(v)


def decode_metrics(request: Any, batch: IngestBatch | None = None) -> IngestBatch:
    """Normalise an ``ExportMetricsServiceRequest`` message into ``batch`` (a new one if None)."""
    out = batch if batch is not None else IngestBatch()
    for rm in request.resource_metrics:
        origin = Origin.of(attributes_of(rm.resource.attributes))
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                kind = m.WhichOneof("data")
                if kind == "gauge":
                    add_points(out, m.name, origin, m.gauge.data_points, _unpack_otlp)
                elif kind == "sum":
                    add_points(out, m.name, origin, m.sum.data_points, _unpack_otlp)
                elif kind in ("histogram", "summary"):
                    _histogram(out, m, kind, origin)
                else:
                    out.ignored += 1
    return out


def _unpack_sum(p: Any) -> Point:
    return attributes_of(p.attributes), p.time_unix_nano, float(p.sum)


def _unpack_count(p: Any) -> Point:
    return attributes_of(p.attributes), p.time_unix_nano, float(p.count)


def _histogram(out: IngestBatch, m: Any, kind: str, origin: Origin) -> None:
    """Engine latency histograms (vLLM's, GenAI server metrics) are kept as their _sum and _count, the
    same rows as the ``_sum`` and ``_count`` series Prometheus holds for them."""
    total, count = resolve_engine(f"{m.name}_sum"), resolve_engine(f"{m.name}_count")
    points = m.histogram.data_points if kind == "histogram" else m.summary.data_points
    if total is None or count is None:
        out.ignored += len(points)
        return
    _engine_points(out, total, origin, points, _unpack_sum)
    _engine_points(out, count, origin, points, _unpack_count)
