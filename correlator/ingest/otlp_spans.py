"""OTLP spans → request rows. Accepts request spans unchanged from real engines:

- vLLM V1 ``llm_request``: ``gen_ai.latency.time_in_queue``, ``..time_to_first_token``, ``..e2e``,
  ``..time_in_model_prefill``, ``..time_in_model_decode``, ``..time_in_model_inference``,
  ``gen_ai.usage.prompt_tokens``/``completion_tokens``, ``gen_ai.request.id``,
  ``gen_ai.response.finish_reasons``; no model name (taken from the resource).
- vLLM V0 ``llm_request``: the same queue/TTFT/e2e keys, ``gen_ai.response.model``, and
  ``time_in_model_forward``/``..execute`` instead of prefill/decode; decode is e2e − TTFT there.
- OpenTelemetry GenAI spans: ``gen_ai.request.model``, ``gen_ai.usage.input_tokens``/``output_tokens``,
  ``gen_ai.response.id``, ``gen_ai.provider.name`` (or the older ``gen_ai.system``).

The decomposition is exact where the span allows: TTFT = queue + prefill; TPOT = decode / (output
tokens − 1), none for a request with one output token. Spans that are not requests are counted as ignored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from correlator.ingest.attributes import attributes_of
from correlator.ingest.batch import IngestBatch
from correlator.ingest.otlp_metrics import INT32_MAX, INT64_MAX, node_of

_LAT = "gen_ai.latency."
_INF = math.inf
_E2E, _QUEUE, _TTFT = _LAT + "e2e", _LAT + "time_in_queue", _LAT + "time_to_first_token"
_PREFILL, _DECODE, _INFERENCE = _LAT + "time_in_model_prefill", _LAT + "time_in_model_decode", \
    _LAT + "time_in_model_inference"


def _f(attrs: Mapping[str, object], *keys: str) -> float | None:
    for k in keys:
        v = attrs.get(k)
        if type(v) is float:  # the common case (vLLM's latencies): no conversion
            if 0.0 <= v < _INF:
                return v
            continue
        if v is not None and not isinstance(v, (bool, list, dict)):
            try:
                f = float(v)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                continue
            if math.isfinite(f) and f >= 0.0:
                return f
    return None


def _i(attrs: Mapping[str, object], *keys: str) -> int | None:
    """A count or pid: the store's INTEGER column; anything beyond it is not a real one."""
    for k in keys:
        v = attrs.get(k)
        if type(v) is int:  # the common case (token counts): no conversion
            if 0 <= v <= INT32_MAX:
                return v
            continue
        f = _f(attrs, k)
        if f is not None:
            return int(f) if f <= INT32_MAX else None
    return None


def _s(attrs: Mapping[str, object], *keys: str) -> str | None:
    for k in keys:
        v = attrs.get(k)
        if isinstance(v, list):
            v = ",".join(str(x) for x in v) if v else None
        if v not in (None, ""):
            return str(v)
    return None


def is_request_span(name: str, attrs: Mapping[str, object]) -> bool:
    if name == "llm_request":
        return True
    return any(k.startswith(_LAT) for k in attrs) or (
        "gen_ai.request.model" in attrs and ("gen_ai.usage.output_tokens" in attrs
                                            or "gen_ai.usage.completion_tokens" in attrs))


def decode_spans(request: Any, batch: IngestBatch | None = None) -> IngestBatch:
    """Normalise an ``ExportTraceServiceRequest`` message into ``batch`` (a new one if None)."""
    out = batch if batch is not None else IngestBatch()
    rows = out.requests.data
    c_start, c_end, c_node, c_service, c_model, c_engine = (rows[c] for c in (
        "start_ns", "end_ns", "node", "service", "model", "engine"))
    c_trace, c_span, c_req, c_ttft, c_tpot, c_e2e = (rows[c] for c in (
        "trace_id", "span_id", "request_id", "ttft_s", "tpot_s", "e2e_s"))
    c_queue, c_prefill, c_decode, c_inference, c_prompt, c_output = (rows[c] for c in (
        "queue_s", "prefill_s", "decode_s", "inference_s", "prompt_tokens", "output_tokens"))
    c_finish, c_pid, c_container, c_pod_uid, c_pod, c_ns, c_gpus = (rows[c] for c in (
        "finish_reason", "pid", "container_id", "pod_uid", "pod", "namespace", "gpu_uuids"))
    for rs in request.resource_spans:
        res = attributes_of(rs.resource.attributes)
        node = node_of(res)
        service = _s(res, "service.name")
        res_model = _s(res, "gen_ai.request.model", "gen_ai.response.model", "model", "vllm.model")
        # the process and its placement, once per resource: a span's own attributes win over them
        res_pid, res_container = _i(res, "process.pid"), _s(res, "container.id")
        res_pod_uid, res_pod = _s(res, "k8s.pod.uid"), _s(res, "k8s.pod.name")
        res_ns, res_gpus = _s(res, "k8s.namespace.name"), _s(res, "gpu.uuids")
        for ss in rs.scope_spans:
            for span in ss.spans:
                a = attributes_of(span.attributes)
                name = span.name
                if not is_request_span(name, a):
                    out.ignored += 1
                    continue
                start_ns, end_ns = span.start_time_unix_nano, span.end_time_unix_nano
                if start_ns > INT64_MAX or end_ns > INT64_MAX:
                    out.ignored += 1  # past the year 2262: not a time any clock gave
                    continue
                e2e = _f(a, _E2E)
                if e2e is None:
                    e2e = (end_ns - start_ns) / 1e9 if end_ns >= start_ns > 0 else None
                queue = _f(a, _QUEUE)
                ttft = _f(a, _TTFT, "gen_ai.server.time_to_first_token")
                prefill = _f(a, _PREFILL)
                decode = _f(a, _DECODE)
                inference = _f(a, _INFERENCE)
                if prefill is None and ttft is not None and queue is not None:
                    prefill = max(0.0, ttft - queue)
                if decode is None and ttft is not None and e2e is not None:
                    decode = max(0.0, e2e - ttft)
                if inference is None and prefill is not None and decode is not None:
                    inference = prefill + decode
                if ttft is None and queue is not None and prefill is not None:
                    ttft = queue + prefill
                output = _i(a, "gen_ai.usage.completion_tokens", "gen_ai.usage.output_tokens")
                if start_ns <= 0 and end_ns > 0 and e2e is not None and e2e * 1e9 < end_ns:
                    start_ns = end_ns - int(e2e * 1e9)
                c_start.append(start_ns)
                c_end.append(end_ns)
                c_node.append(node)
                c_service.append(service)
                c_model.append(_s(a, "gen_ai.response.model", "gen_ai.request.model") or res_model)
                c_engine.append("vllm" if name == "llm_request" else (
                    _s(a, "gen_ai.provider.name", "gen_ai.system") or service or "genai"))
                c_trace.append(span.trace_id.hex())
                c_span.append(span.span_id.hex())
                c_req.append(_s(a, "gen_ai.request.id", "gen_ai.response.id"))
                c_ttft.append(ttft)
                c_tpot.append(decode / (output - 1) if decode is not None and output is not None and output >= 2
                              else None)
                c_e2e.append(e2e)
                c_queue.append(queue)
                c_prefill.append(prefill)
                c_decode.append(decode)
                c_inference.append(inference)
                c_prompt.append(_i(a, "gen_ai.usage.prompt_tokens", "gen_ai.usage.input_tokens"))
                c_output.append(output)
                c_finish.append(_s(a, "gen_ai.response.finish_reasons", "gen_ai.response.finish_reason"))
                if "process.pid" in a or "container.id" in a or "k8s.pod.name" in a or "k8s.pod.uid" in a \
                        or "k8s.namespace.name" in a or "gpu.uuids" in a:
                    c_pid.append(_i(a, "process.pid") or res_pid)
                    c_container.append(_s(a, "container.id") or res_container)
                    c_pod_uid.append(_s(a, "k8s.pod.uid") or res_pod_uid)
                    c_pod.append(_s(a, "k8s.pod.name") or res_pod)
                    c_ns.append(_s(a, "k8s.namespace.name") or res_ns)
                    c_gpus.append(_s(a, "gpu.uuids") or res_gpus)
                else:
                    c_pid.append(res_pid)
                    c_container.append(res_container)
                    c_pod_uid.append(res_pod_uid)
                    c_pod.append(res_pod)
                    c_ns.append(res_ns)
                    c_gpus.append(res_gpus)
    return out
