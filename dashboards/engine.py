"""Serving engine: vLLM's queue, batch, KV cache, preemptions, token throughput and its own latency
histograms, under the metric names of current vLLM and of the releases before the renames (``or``)."""

from __future__ import annotations

from dashboards.common import ENGINE, REQ, Board, Q, dashboard, quantile, ts

UID = "stacklens-engine"
_E = "{{Hostname}} {{model_name}}"


def _either(fn: str, new: str, old: str, by: str = "Hostname, model_name", agg: str = "sum") -> str:
    """``fn`` of a metric under its current or its older vLLM name, whichever the engine exports."""
    return f"{agg} by ({by}) ({fn.format(f'{new}{{{ENGINE}}}')} or {fn.format(f'{old}{{{ENGINE}}}')})"


def _engine_quantile(q: float, new: str, old: str) -> str:
    rate = "rate({}[$__rate_interval])"
    return f"histogram_quantile({q}, {_either(rate, new, old, 'le, model_name')})"


def build() -> Board:
    b = Board(dashboard(UID, "stacklens / Serving engine",
                        "vLLM's scheduler and KV cache next to the latency the correlator measures.", ["engine"]))
    ids = b.ids
    rate = "rate({}[$__rate_interval])"
    plain = "{}"
    b.row("Scheduler")
    b.add(
        ts(ids, "Requests waiting (queue)", [
            Q("A", f"sum by (Hostname, model_name) (vllm:num_requests_waiting{{{ENGINE}}})", _E)], "short",
           "vllm:num_requests_waiting: requests not yet scheduled.", w=8),
        ts(ids, "Requests running (batch)", [
            Q("A", f"sum by (Hostname, model_name) (vllm:num_requests_running{{{ENGINE}}})", _E)], "short", w=8),
        ts(ids, "KV cache usage", [
            Q("A", _either(plain, "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", agg="max"),
              _E)], "percentunit",
           "vllm:kv_cache_usage_perc (vllm:gpu_cache_usage_perc before the rename), 0..1.", w=8),
        ts(ids, "Preemptions per second", [
            Q("A", _either(rate, "vllm:num_preemptions_total", "vllm:num_preemptions"), _E)], "short",
           "Requests preempted because the KV cache ran out.", w=8),
        ts(ids, "Tokens per second", [
            Q("A", _either(rate, "vllm:prompt_tokens_total", "vllm:prompt_tokens"), "prompt " + _E),
            Q("B", _either(rate, "vllm:generation_tokens_total", "vllm:generation_tokens"), "generated " + _E)],
           "short", w=8),
        ts(ids, "Requests per second (correlator)", [
            Q("A", f"sum by (model) (rate(stacklens_request_ttft_seconds_count{{{REQ}}}[$__rate_interval]))",
              "{{model}}")], "reqps", w=8),
    )
    b.row("Latency: the engine's histograms and the correlator's")
    b.add(
        ts(ids, "TTFT p99", [
            Q("A", f"histogram_quantile(0.99, sum by (le, model_name) "
                   f"(rate(vllm:time_to_first_token_seconds_bucket{{{ENGINE}}}[$__rate_interval])))",
              "engine {{model_name}}"),
            Q("B", quantile(0.99, "stacklens_request_ttft_seconds", REQ), "correlator {{model}}")], "s", w=12),
        ts(ids, "TPOT / inter-token latency p99", [
            Q("A", _engine_quantile(0.99, "vllm:inter_token_latency_seconds_bucket",
                                    "vllm:time_per_output_token_seconds_bucket"), "engine {{model_name}}"),
            Q("B", quantile(0.99, "stacklens_request_tpot_seconds", REQ), "correlator {{model}}")], "s", w=12),
        ts(ids, "Queue time p99", [
            Q("A", f"histogram_quantile(0.99, sum by (le, model_name) "
                   f"(rate(vllm:request_queue_time_seconds_bucket{{{ENGINE}}}[$__rate_interval])))",
              "{{model_name}}")], "s", w=12),
        ts(ids, "End-to-end latency p99", [
            Q("A", f"histogram_quantile(0.99, sum by (le, model_name) "
                   f"(rate(vllm:e2e_request_latency_seconds_bucket{{{ENGINE}}}[$__rate_interval])))",
              "{{model_name}}")], "s", w=12),
    )
    return b
