"""Fleet overview: request latency by model against the SLOs, and every GPU's power, thermals, clocks with
their throttle reasons, memory, interconnect and XIDs; the correlator's findings as annotations."""

from __future__ import annotations

from dashboards.common import (
    GPU,
    REQ,
    SLO_TARGET,
    THROTTLE_REASONS,
    TPOT_SLO_S,
    TTFT_SLO_S,
    Board,
    Q,
    dashboard,
    quantile,
    stat_panel,
    timeline,
    ts,
)

UID = "stacklens-fleet"
TTFT = "stacklens_request_ttft_seconds"
TPOT = "stacklens_request_tpot_seconds"
_SLO_SEL = 'cluster=~"$cluster", model=~"$model"'  # the recorded SLO ratios keep cluster and model


def _attainment(metric: str, slo: str) -> str:
    return (f'sum by (model) (rate({metric}_bucket{{{REQ}, le="{slo}"}}[$__rate_interval])) / '
            f"sum by (model) (rate({metric}_count{{{REQ}}}[$__rate_interval]))")


def build() -> Board:
    b = Board(dashboard(UID, "stacklens / Fleet overview",
                        "Request latency by model and the state of every GPU that serves it.", ["fleet"]))
    ids = b.ids
    slo_steps = [(None, "red"), (0.95, "orange"), (SLO_TARGET, "green")]
    b.row("Latency and SLOs")
    b.add(
        ts(ids, "TTFT p50 / p99 by model", [
            Q("A", quantile(0.99, TTFT, REQ), "p99 {{model}}"),
            Q("B", quantile(0.5, TTFT, REQ), "p50 {{model}}")], "s",
           "Time to first token of the requests the correlator stored (its /metrics histograms)."),
        ts(ids, "TPOT p50 / p99 by model", [
            Q("A", quantile(0.99, TPOT, REQ), "p99 {{model}}"),
            Q("B", quantile(0.5, TPOT, REQ), "p50 {{model}}")], "s",
           "Time per output token: decode time / (output tokens - 1)."),
        stat_panel(ids, f"TTFT SLO attainment (<= {TTFT_SLO_S} s)", [
            Q("A", _attainment(TTFT, TTFT_SLO_S), "{{model}}")], "percentunit",
                   f"Share of requests with TTFT <= {TTFT_SLO_S} s; the objective is {SLO_TARGET:.0%}.",
                   thresholds=slo_steps),
        stat_panel(ids, f"TPOT SLO attainment (<= {TPOT_SLO_S} s)", [
            Q("A", _attainment(TPOT, TPOT_SLO_S), "{{model}}")], "percentunit",
                   f"Share of requests with TPOT <= {TPOT_SLO_S} s; the objective is {SLO_TARGET:.0%}.",
                   thresholds=slo_steps),
        ts(ids, "Error-budget burn rate (1 h)", [
            Q("A", f"stacklens:request_ttft_slo_errors:ratio_rate1h{{{_SLO_SEL}}} / {1 - SLO_TARGET:.2f}",
              "TTFT {{model}}"),
            Q("B", f"stacklens:request_tpot_slo_errors:ratio_rate1h{{{_SLO_SEL}}} / {1 - SLO_TARGET:.2f}",
              "TPOT {{model}}")], "x",
           "How fast the error budget burns (1 = exactly on budget; the page fires above 14.4 on 1 h and 5 m).",
           w=6, h=8),
        ts(ids, "Requests per second by model", [
            Q("A", f"sum by (model) (rate({TTFT}_count{{{REQ}}}[$__rate_interval]))", "{{model}}")], "reqps",
           w=6, h=8),
    )
    b.row("GPU power, thermals and clocks")
    b.add(
        ts(ids, "Power draw and limit", [
            Q("A", f"DCGM_FI_DEV_POWER_USAGE{{{GPU}}}", "{{Hostname}} GPU {{gpu}}"),
            Q("B", f"DCGM_FI_DEV_POWER_MGMT_LIMIT{{{GPU}}}", "limit {{Hostname}} GPU {{gpu}}")], "watt", w=8),
        ts(ids, "Temperature", [
            Q("A", f"DCGM_FI_DEV_GPU_TEMP{{{GPU}}}", "GPU {{Hostname}} {{gpu}}"),
            Q("B", f"DCGM_FI_DEV_MEMORY_TEMP{{{GPU}}}", "HBM {{Hostname}} {{gpu}}")], "celsius", w=8),
        ts(ids, "SM clock (held down while a throttle reason is active)", [
            Q("A", f"DCGM_FI_DEV_SM_CLOCK{{{GPU}}}", "{{Hostname}} GPU {{gpu}}"),
            Q("B", f"stacklens:gpu_sm_clock:ratio_max{{{GPU}}}", "share of max {{Hostname}} GPU {{gpu}}")],
           "rotmhz", "SM clock in MHz (as DCGM); right axis: the clock as a share of the GPU's maximum.",
           w=8, right_axis=[("B", "percentunit")]),
        timeline(ids, "Throttle reasons", [
            Q("A", f'max by (Hostname, gpu, reason) (stacklens_clock_event_reason_active{{{GPU}, '
                   f'reason=~"{THROTTLE_REASONS}"}})', "{{Hostname}} GPU {{gpu}} {{reason}}")],
                 "NVML clocks-event reasons, decoded from DCGM_FI_DEV_CLOCKS_EVENT_REASONS (1 = held down).",
                 w=24, h=8),
    )
    b.row("GPU memory, interconnect and faults")
    b.add(
        ts(ids, "Framebuffer memory used", [
            Q("A", f"DCGM_FI_DEV_FB_USED{{{GPU}}} / (DCGM_FI_DEV_FB_USED{{{GPU}}} + DCGM_FI_DEV_FB_FREE{{{GPU}}})",
              "{{Hostname}} GPU {{gpu}}")], "percentunit", w=8),
        ts(ids, "GPU and memory-controller utilisation", [
            Q("A", f"DCGM_FI_DEV_GPU_UTIL{{{GPU}}}", "SM {{Hostname}} GPU {{gpu}}"),
            Q("B", f"DCGM_FI_DEV_MEM_COPY_UTIL{{{GPU}}}", "memory {{Hostname}} GPU {{gpu}}")], "percent", w=8),
        ts(ids, "XID events", [
            Q("A", f"sum by (Hostname, gpu, xid) (increase(stacklens_xid_events_total{{{GPU}}}[$__rate_interval]))",
              "XID {{xid}} {{Hostname}} GPU {{gpu}}"),
            Q("B", f"DCGM_FI_DEV_XID_ERRORS{{{GPU}}}", "last XID {{Hostname}} GPU {{gpu}}")], "short",
           "XID events the agent saw in each interval, and the last XID number (dcgm-exporter's gauge).", w=8),
        ts(ids, "PCIe throughput", [
            Q("A", f"DCGM_FI_PROF_PCIE_RX_BYTES{{{GPU}}}", "RX {{Hostname}} GPU {{gpu}}"),
            Q("B", f"DCGM_FI_PROF_PCIE_TX_BYTES{{{GPU}}}", "TX {{Hostname}} GPU {{gpu}}")], "Bps", w=12),
        ts(ids, "NVLink throughput", [
            Q("A", f"DCGM_FI_PROF_NVLINK_RX_BYTES{{{GPU}}}", "RX {{Hostname}} GPU {{gpu}}"),
            Q("B", f"DCGM_FI_PROF_NVLINK_TX_BYTES{{{GPU}}}", "TX {{Hostname}} GPU {{gpu}}")], "Bps", w=12),
    )
    return b
