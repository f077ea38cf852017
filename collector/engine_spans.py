"""Request spans exactly as vLLM (V1) writes them, through the real OpenTelemetry SDK.

The simulated serving engine uses this to emit one ``llm_request`` span per finished request; tests
use it to send what vLLM sends. Times are whatever clock the caller runs on (simulated time in the demo).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import SpanKind, Tracer

from collector.records import DerivedLatencies


@dataclass(frozen=True, slots=True)
class FinishedRequest(DerivedLatencies):
    """A plain :class:`RequestTiming`: what tests and benchmarks hand to :class:`VllmSpanEmitter`."""

    request_id: str
    arrival_ns: int
    end_ns: int
    queue_s: float
    prefill_s: float
    decode_s: float
    prompt_tokens: int
    output_tokens: int
    finish_reason: str = "stop"


class RequestTiming(Protocol):
    """What one finished request knows about itself (vLLM's RequestStateStats, in seconds)."""

    @property
    def request_id(self) -> str: ...
    @property
    def arrival_ns(self) -> int: ...
    @property
    def end_ns(self) -> int: ...
    @property
    def queue_s(self) -> float: ...
    @property
    def prefill_s(self) -> float: ...
    @property
    def decode_s(self) -> float: ...
    @property
    def ttft_s(self) -> float: ...
    @property
    def e2e_s(self) -> float: ...
    @property
    def prompt_tokens(self) -> int: ...
    @property
    def output_tokens(self) -> int: ...
    @property
    def finish_reason(self) -> str: ...


def vllm_v1_attributes(r: RequestTiming, max_tokens: int | None = None) -> dict[str, str | int | float | list[str]]:
    """The attribute keys and value types of vLLM V1's ``llm_request`` span (vllm/v1/engine/output_processor.py)."""
    attrs: dict[str, str | int | float | list[str]] = {
        "gen_ai.usage.prompt_tokens": r.prompt_tokens,
        "gen_ai.usage.completion_tokens": r.output_tokens,
        "gen_ai.request.id": r.request_id,
        "gen_ai.request.n": 1,
        "gen_ai.latency.time_in_queue": r.queue_s,
        "gen_ai.latency.time_to_first_token": r.ttft_s,
        "gen_ai.latency.e2e": r.e2e_s,
        "gen_ai.latency.time_in_model_prefill": r.prefill_s,
        "gen_ai.latency.time_in_model_decode": r.decode_s,
        "gen_ai.latency.time_in_model_inference": r.prefill_s + r.decode_s,
        "gen_ai.response.finish_reasons": [r.finish_reason],
    }
    if max_tokens is not None:
        attrs["gen_ai.request.max_tokens"] = max_tokens
    return attrs


def engine_resource(service: str, host: str, pid: int, model: str | None = None,
                    gpu_uuids: Sequence[str] | None = None, extra: dict[str, str] | None = None) -> Resource:
    """The resource of one engine process. vLLM's V1 spans carry no model name: it rides here."""
    attrs: dict[str, str | int] = {"service.name": service, "host.name": host, "process.pid": pid}
    if model:
        attrs["gen_ai.request.model"] = model
    if gpu_uuids:
        attrs["gpu.uuids"] = ",".join(gpu_uuids)
    attrs.update(extra or {})
    return Resource.create(attrs)


class VllmSpanEmitter:
    """One TracerProvider per engine process (its resource), spans exported by ``exporter``."""

    def __init__(self, resource: Resource, exporter: SpanExporter, max_queue_size: int = 65536,
                 schedule_delay_ms: int = 200, max_export_batch_size: int = 2048) -> None:
        self.provider = TracerProvider(resource=resource)
        self.provider.add_span_processor(BatchSpanProcessor(
            exporter, max_queue_size=max_queue_size, schedule_delay_millis=schedule_delay_ms,
            max_export_batch_size=max_export_batch_size))
        self.tracer: Tracer = self.provider.get_tracer("vllm.llm_engine")

    def emit(self, r: RequestTiming, max_tokens: int | None = None) -> None:
        span = self.tracer.start_span("llm_request", kind=SpanKind.SERVER, start_time=r.arrival_ns,
                                      attributes=vllm_v1_attributes(r, max_tokens))
        span.end(end_time=r.end_ns)

    def flush(self, timeout_ms: int = 30_000) -> bool:
        return self.provider.force_flush(timeout_ms)

    def shutdown(self) -> None:
        self.provider.shutdown()
