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
from correlator.ingest.otlp_metrics import node_of

_LAT = "gen_ai.latency."


def _f(attrs: Mapping[str, object], *keys: str) -> float | None:
    for k in keys:
        v = attrs.get(k)
        if v is not None and not isinstance(v, (bool, list, dict)):
            try:
                f = float(v)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                continue
            if not math.isnan(f) and f >= 0.0:
                return f
    return None


def _i(attrs: Mapping[str, object], *keys: str) -> int | None:
    f = _f(attrs, *keys)
    return int(f) if f is not None else None


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
    rows = out.requests
    for rs in request.resource_spans:
        res = attributes_of(rs.resource.attributes)
        node = node_of(res)
        service = _s(res, "service.name")
        res_model = _s(res, "gen_ai.request.model", "gen_ai.response.model", "model", "vllm.model")
        for ss in rs.scope_spans:
            for span in ss.spans:
                a = attributes_of(span.attributes)
                if not is_request_span(span.name, a):
                    out.ignored += 1
                    continue
                start_ns, end_ns = int(span.start_time_unix_nano), int(span.end_time_unix_nano)
                span_e2e = (end_ns - start_ns) / 1e9 if end_ns >= start_ns > 0 else None
                e2e = _f(a, _LAT + "e2e")
                if e2e is None:
                    e2e = span_e2e
                queue = _f(a, _LAT + "time_in_queue")
                ttft = _f(a, _LAT + "time_to_first_token", "gen_ai.server.time_to_first_token")
                prefill = _f(a, _LAT + "time_in_model_prefill")
                decode = _f(a, _LAT + "time_in_model_decode")
                inference = _f(a, _LAT + "time_in_model_inference")
                if prefill is None and ttft is not None and queue is not None:
                    prefill = max(0.0, ttft - queue)
                if decode is None and ttft is not None and e2e is not None:
                    decode = max(0.0, e2e - ttft)
                if inference is None and prefill is not None and decode is not None:
                    inference = prefill + decode
                if ttft is None and queue is not None and prefill is not None:
                    ttft = queue + prefill
                prompt = _i(a, "gen_ai.usage.prompt_tokens", "gen_ai.usage.input_tokens")
                output = _i(a, "gen_ai.usage.completion_tokens", "gen_ai.usage.output_tokens")
                tpot = decode / (output - 1) if decode is not None and output is not None and output >= 2 else None
                engine = "vllm" if span.name == "llm_request" else (
                    _s(a, "gen_ai.provider.name", "gen_ai.system") or service or "genai")
                if start_ns <= 0 and end_ns > 0 and e2e is not None:
                    start_ns = end_ns - int(e2e * 1e9)
                rows.append(
                    start_ns, end_ns, node, service,
                    _s(a, "gen_ai.response.model", "gen_ai.request.model") or res_model, engine,
                    bytes(span.trace_id).hex(), bytes(span.span_id).hex(),
                    _s(a, "gen_ai.request.id", "gen_ai.response.id"),
                    ttft, tpot, e2e, queue, prefill, decode, inference, prompt, output,
                    _s(a, "gen_ai.response.finish_reasons", "gen_ai.response.finish_reason"),
                    _i(a, "process.pid") or _i(res, "process.pid"),
                    _s(a, "container.id") or _s(res, "container.id"),
                    _s(a, "k8s.pod.uid") or _s(res, "k8s.pod.uid"),
                    _s(a, "k8s.pod.name") or _s(res, "k8s.pod.name"),
                    _s(a, "k8s.namespace.name") or _s(res, "k8s.namespace.name"),
                    _s(a, "gpu.uuids") or _s(res, "gpu.uuids"),
                )
    return out
