"""OTLP metrics → normalised rows, through the one signal catalog.

Accepts, unchanged: the agent's ``stacklens.*`` metrics; DCGM exporter names as the OpenTelemetry
Collector's Prometheus receiver forwards them (metric name as is, labels ``gpu``/``UUID``/``Hostname``/
``pod``/``namespace`` as point attributes); the OpenTelemetry ``hw.*`` hardware names; vLLM's ``vllm:*``
metrics (current and renamed names) and the GenAI server metrics. Anything else is counted as ignored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from collector.signals import SIGNALS, Resolved, resolve, resolve_engine
from correlator.ingest.attributes import attributes_of
from correlator.ingest.batch import IngestBatch

_NO_RECORDED_VALUE = 1
# derived on the agent from clock_event_reasons, which is stored; the analysis decodes the bitmask
_SKIPPED = frozenset({"clock_event_reason_active", "gpu_lost_events"})
_OTEL_HW = frozenset(src for s in SIGNALS.values() if s.otel for src in (s.otel.name,))
_SUB_LABEL = {"gpu_link": "link", "gpu_reason": "reason"}


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
    index: Any = attrs.get("gpu.index", attrs.get("gpu"))
    try:
        idx = int(index) if index is not None and index != "" else None
    except (TypeError, ValueError):
        idx = None
    return (str(uuid) if uuid else None), idx


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


def _int_or_none(v: object) -> int | None:
    try:
        return int(str(v)) if v is not None and v != "" else None
    except ValueError:
        return None


def decode_metrics(request: Any, batch: IngestBatch | None = None) -> IngestBatch:
    """Normalise an ``ExportMetricsServiceRequest`` message into ``batch`` (a new one if None)."""
    out = batch if batch is not None else IngestBatch()
    gpu, host, engine = out.gpu_samples.data, out.host_samples.data, out.engine_samples.data
    for rm in request.resource_metrics:
        res = attributes_of(rm.resource.attributes)
        service = str(res.get("service.name") or "")
        res_model = res.get("gen_ai.request.model") or res.get("gen_ai.response.model") or res.get("model")
        res_pid = _int_or_none(res.get("process.pid"))
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                name = m.name
                kind = m.WhichOneof("data")
                if kind in ("gauge", "sum"):
                    points = m.gauge.data_points if kind == "gauge" else m.sum.data_points
                elif kind in ("histogram", "summary"):
                    _histogram(out, m, kind, service, res_model, res_pid, res)
                    continue
                else:
                    out.ignored += 1
                    continue
                if name == "stacklens.gpu_info":
                    for p in points:
                        a = attributes_of(p.attributes)
                        uuid, idx = _gpu_of(a)
                        if uuid:
                            out.gpu_info.append(p.time_unix_nano, node_of(res, a), uuid, idx, a.get("gpu.model"),
                                                a.get("gpu.pci_bus_id"), a.get("gpu.device"))
                    continue
                es = resolve_engine(name)
                if es is not None:
                    for p in points:
                        a = attributes_of(p.attributes)
                        model = a.get("model_name") or a.get("gen_ai.request.model") or res_model
                        engine["time_ns"].append(p.time_unix_nano)
                        engine["node"].append(node_of(res, a))
                        engine["service"].append(service)
                        engine["model"].append(str(model) if model else None)
                        engine["pid"].append(_int_or_none(a.get("process.pid")) or res_pid)
                        engine["signal"].append(es.name)
                        engine["value"].append(_value(p))
                    continue
                resolved: Resolved | None = None if name in _OTEL_HW else _resolve_cached(name)
                if resolved is None and name not in _OTEL_HW:
                    out.ignored += len(points)
                    continue
                for p in points:
                    a = attributes_of(p.attributes)
                    r = resolved if resolved is not None else resolve(name, a)
                    if r is None or r.signal.name in _SKIPPED:
                        out.ignored += 1
                        continue
                    sig = r.signal
                    if r.source == "otel" and sig.otel is not None and sig.otel.kind == "counter" \
                            and sig.kind == "gauge":
                        # hw.gpu.io is a byte counter; the canonical signal is a rate the source does not give
                        out.ignored += 1
                        continue
                    v = _value(p)
                    if v is not None and r.factor != 1.0:
                        v *= r.factor
                    scope = sig.scope
                    if scope in ("host", "cgroup"):
                        host["time_ns"].append(p.time_unix_nano)
                        host["node"].append(node_of(res, a))
                        host["signal"].append(sig.name)
                        host["sub"].append(str(a.get("container_id") or a.get("cgroup") or "") or None)
                        host["value"].append(v)
                        continue
                    if scope == "gpu_process":
                        uuid, _ = _gpu_of(a)
                        pid = _int_or_none(a.get("process.pid") or a.get("pid"))
                        if uuid is None or pid is None:
                            out.ignored += 1
                            continue
                        out.placements.append(
                            p.time_unix_nano, node_of(res, a), uuid, pid, a.get("container.id"), a.get("k8s.pod.uid"),
                            a.get("k8s.pod.name") or a.get("pod"), a.get("k8s.namespace.name") or a.get("namespace"),
                            a.get("k8s.container.name") or a.get("container"), v)
                        continue
                    uuid, idx = _gpu_of(a)
                    if uuid is None and idx is None:
                        out.ignored += 1
                        continue
                    label = _SUB_LABEL.get(scope) or ("xid" if sig.name == "xid_events_total" else None)
                    gpu["time_ns"].append(p.time_unix_nano)
                    gpu["node"].append(node_of(res, a))
                    gpu["gpu_uuid"].append(uuid)
                    gpu["gpu_index"].append(idx)
                    gpu["signal"].append(sig.name)
                    gpu["sub"].append(str(a.get(label)) if label and a.get(label) is not None else None)
                    gpu["value"].append(v)
                    if r.source == "dcgm" and (a.get("pod") or a.get("container")):
                        # dcgm-exporter's pod mapping is a placement fact too (no pid: it does not know one)
                        out.placements.append(p.time_unix_nano, node_of(res, a), uuid, 0, None, None, a.get("pod"),
                                              a.get("namespace"), a.get("container"), None)
    return out


def _histogram(out: IngestBatch, m: Any, kind: str, service: str, res_model: object, res_pid: int | None,
               res: Mapping[str, object]) -> None:
    """Engine latency histograms (vLLM's, GenAI server metrics) are kept as their _sum and _count."""
    total, count = resolve_engine(f"{m.name}_sum"), resolve_engine(f"{m.name}_count")
    points = m.histogram.data_points if kind == "histogram" else m.summary.data_points
    if total is None or count is None:
        out.ignored += len(points)
        return
    e = out.engine_samples
    for p in points:
        a = attributes_of(p.attributes)
        model = a.get("model_name") or a.get("gen_ai.request.model") or res_model
        node = node_of(res, a)
        pid = _int_or_none(a.get("process.pid")) or res_pid
        e.append(p.time_unix_nano, node, service, str(model) if model else None, pid, total.name, float(p.sum))
        e.append(p.time_unix_nano, node, service, str(model) if model else None, pid, count.name, float(p.count))
