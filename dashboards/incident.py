"""Incident / root cause: the correlator's verdict, ranked findings and evidence (its JSON API through the
Infinity datasource), and request latency drawn over the chosen GPU's evidence signals."""

from __future__ import annotations

from dashboards.common import (
    ENGINE,
    FINDINGS,
    GPU,
    NODE,
    REQ,
    THROTTLE_REASONS,
    TIME_RANGE_PARAMS,
    Board,
    Column,
    InfinityQuery,
    Q,
    dashboard,
    infinity_table,
    prom_table,
    quantile,
    ts,
)

UID = "stacklens-incident"
TTFT = "stacklens_request_ttft_seconds"
TPOT = "stacklens_request_tpot_seconds"

WHY_REGRESSION = InfinityQuery("A", "/api/v1/why", "", [
    Column("verdict", "Verdict"),
    Column("regression.metric", "Metric"),
    Column("regression.baseline_s", "Baseline (s)", "number"),
    Column("regression.incident_s", "Incident (s)", "number"),
    Column("regression.ratio", "Ratio", "number"),
    Column("query.window.0", "Incident from"),
    Column("query.window.1", "Incident to"),
], TIME_RANGE_PARAMS)

WHY_FINDINGS = InfinityQuery("A", "/api/v1/why", "findings", [
    Column("rank", "Rank", "number"),
    Column("cause", "Cause"),
    Column("subcause", "Sub-cause"),
    Column("culprit.node", "Node"),
    Column("culprit.gpu", "GPU"),
    Column("culprit.pod", "Pod"),
    Column("culprit.mapping", "Mapping"),
    Column("explained_share", "Share explained", "number"),
    Column("score", "Score", "number"),
    Column("window.0", "From"),
    Column("evidence", "Evidence"),
], TIME_RANGE_PARAMS)

WHY_EVIDENCE = InfinityQuery("A", "/api/v1/why", "findings[0].evidence", [
    Column("signal", "Signal"),
    Column("unit", "Unit"),
    Column("baseline", "Baseline", "number"),
    Column("incident", "Incident", "number"),
    Column("robust_z", "Robust z", "number"),
], TIME_RANGE_PARAMS)

STORED_FINDINGS = InfinityQuery("A", "/api/v1/findings", "", [
    Column("window.0", "From"),
    Column("cause", "Cause"),
    Column("subcause", "Sub-cause"),
    Column("culprit.node", "Node"),
    Column("culprit.gpu", "GPU"),
    Column("explained_share", "Share explained", "number"),
    Column("score", "Score", "number"),
])

INFINITY_QUERIES = (WHY_REGRESSION, WHY_FINDINGS, WHY_EVIDENCE, STORED_FINDINGS)
_LAT = "{{model}}"


def build() -> Board:
    b = Board(dashboard(UID, "stacklens / Incident and root cause",
                        "Why did latency regress: the correlator's verdict, findings and evidence; pick the "
                        "culprit's node and GPU in the variables to overlay its signals on the latency.",
                        ["incident"]))
    ids = b.ids
    b.row("Verdict (stacklens why, over the dashboard's time range)")
    b.add(
        infinity_table(ids, "Regression and verdict", WHY_REGRESSION,
                       "GET /api/v1/why?since=...&until=...: the regression measured and the one-line verdict.",
                       h=5),
        infinity_table(ids, "Findings: cause, culprit, share explained", WHY_FINDINGS,
                       "Ranked causes; `Share explained` is the part of the regression the cause accounts for.",
                       w=14, h=9),
        infinity_table(ids, "Evidence of the top finding", WHY_EVIDENCE,
                       "Each signal's baseline and incident values and its robust z-score.", w=10, h=9),
        infinity_table(ids, "Stored findings (online detector)", STORED_FINDINGS,
                       "GET /api/v1/findings: the newest findings the correlator stored.", w=14, h=8),
        prom_table(ids, "Culprit GPUs (node and GPU index for the variables above)", [
            Q("A", f"sum by (cause, sub_cause, node, gpu, UUID) (stacklens_findings{{{FINDINGS}}})", instant=True)],
                   "Findings by culprit, from the correlator's /metrics; the GPU index is the `gpu` variable.",
                   w=10, h=8),
    )
    b.row("Latency over the chosen GPU's evidence")
    b.add(
        ts(ids, "TTFT p99 vs PCIe and NVLink", [
            Q("A", quantile(0.99, TTFT, REQ), _LAT),
            Q("B", f"DCGM_FI_PROF_PCIE_RX_BYTES{{{GPU}}}", "PCIe RX {{Hostname}} GPU {{gpu}}"),
            Q("C", f"DCGM_FI_PROF_PCIE_TX_BYTES{{{GPU}}}", "PCIe TX {{Hostname}} GPU {{gpu}}"),
            Q("D", f"DCGM_FI_PROF_NVLINK_RX_BYTES{{{GPU}}} + DCGM_FI_PROF_NVLINK_TX_BYTES{{{GPU}}}",
              "NVLink {{Hostname}} GPU {{gpu}}")], "s",
           "Interconnect: TTFT rises with transfers (offload, prefill); NVLink matters under tensor parallelism.",
           right_axis=[("B", "Bps"), ("C", "Bps"), ("D", "Bps")]),
        ts(ids, "TTFT p99 vs clocks, power and temperature", [
            Q("A", quantile(0.99, TTFT, REQ), _LAT),
            Q("B", f"stacklens:gpu_sm_clock:ratio_max{{{GPU}}}", "SM clock / max {{Hostname}} GPU {{gpu}}"),
            Q("C", f"DCGM_FI_DEV_POWER_USAGE{{{GPU}}} / DCGM_FI_DEV_POWER_MGMT_LIMIT{{{GPU}}}",
              "power / limit {{Hostname}} GPU {{gpu}}"),
            Q("D", f'max by (Hostname, gpu) (stacklens_clock_event_reason_active{{{GPU}, '
                   f'reason=~"{THROTTLE_REASONS}"}})', "throttled {{Hostname}} GPU {{gpu}}")], "s",
           "Thermal and power: prefill is compute-bound, so TTFT follows the SM clock when it is held down.",
           right_axis=[("B", "percentunit"), ("C", "percentunit"), ("D", "short")]),
        ts(ids, "TPOT p99 vs memory and KV cache", [
            Q("A", quantile(0.99, TPOT, REQ), _LAT),
            Q("B", f"DCGM_FI_DEV_MEM_COPY_UTIL{{{GPU}}} / 100", "memory controller {{Hostname}} GPU {{gpu}}"),
            Q("C", f"DCGM_FI_DEV_FB_USED{{{GPU}}} / (DCGM_FI_DEV_FB_USED{{{GPU}}} + DCGM_FI_DEV_FB_FREE{{{GPU}}})",
              "framebuffer {{Hostname}} GPU {{gpu}}"),
            Q("D", f"max by (Hostname, model_name) (vllm:kv_cache_usage_perc{{{ENGINE}}} "
                   f"or vllm:gpu_cache_usage_perc{{{ENGINE}}})", "KV cache {{Hostname}} {{model_name}}")], "s",
           "Memory: decode is memory-bound, so TPOT follows HBM contention and KV-cache pressure.",
           right_axis=[("B", "percentunit"), ("C", "percentunit"), ("D", "percentunit")]),
        ts(ids, "TTFT p99 vs queue and host", [
            Q("A", quantile(0.99, TTFT, REQ), _LAT),
            Q("B", f"sum by (Hostname, model_name) (vllm:num_requests_waiting{{{ENGINE}}})",
              "waiting {{Hostname}} {{model_name}}"),
            Q("C", f"stacklens_host_cpu_util_ratio{{{NODE}}}", "host CPU {{Hostname}}"),
            Q("D", f"stacklens_host_run_queue{{{NODE}}}", "run queue {{Hostname}}")], "s",
           "Scheduling: queueing shows in waiting requests; CPU contention in the host's run queue and CPU use.",
           right_axis=[("B", "short"), ("C", "percentunit"), ("D", "short")]),
        ts(ids, "Faults: XIDs, ECC, PCIe replays", [
            Q("A", f"sum by (Hostname, gpu, xid) (increase(stacklens_xid_events_total{{{GPU}}}[$__rate_interval]))",
              "XID {{xid}} {{Hostname}} GPU {{gpu}}"),
            Q("B", f"increase(DCGM_FI_DEV_ECC_DBE_VOL_TOTAL{{{GPU}}}[$__rate_interval])",
              "ECC uncorrected {{Hostname}} GPU {{gpu}}"),
            Q("C", f"increase(DCGM_FI_DEV_PCIE_REPLAY_COUNTER{{{GPU}}}[$__rate_interval])",
              "PCIe replays {{Hostname}} GPU {{gpu}}"),
            Q("D", f"DCGM_FI_DEV_PCIE_LINK_WIDTH{{{GPU}}} / DCGM_FI_DEV_PCIE_MAX_LINK_WIDTH{{{GPU}}}",
              "PCIe width / max {{Hostname}} GPU {{gpu}}")], "short",
           "Hardware faults: a failing GPU raises XIDs and ECC errors; a degraded link runs below its width.",
           w=24),
    )
    return b
