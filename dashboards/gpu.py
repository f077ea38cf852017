"""GPU drill-down: one GPU's signals (choose node and GPU in the variables) and the latency of the requests
its replica served."""

from __future__ import annotations

from dashboards.common import (
    GPU,
    REQ,
    THROTTLE_REASONS,
    Board,
    Q,
    dashboard,
    prom_table,
    quantile,
    timeline,
    ts,
)

UID = "stacklens-gpu"
TTFT = "stacklens_request_ttft_seconds"
TPOT = "stacklens_request_tpot_seconds"
_G = "{{Hostname}} GPU {{gpu}}"


def build() -> Board:
    b = Board(dashboard(UID, "stacklens / GPU drill-down",
                        "One GPU: identity, power, thermals, clocks and throttling, memory, interconnect, faults, "
                        "the processes on it, and the latency of the requests it served.", ["gpu"]))
    ids = b.ids
    b.row("Identity and what runs on it")
    b.add(
        prom_table(ids, "GPU", [
            Q("A", f"max by (Hostname, gpu, UUID, modelName, pci_bus_id, driver_version) (stacklens_gpu_info{{{GPU}}})",
              instant=True)], w=12, h=5, hide=("Time", "Value")),
        prom_table(ids, "Processes and pods", [
            Q("A", f"max by (Hostname, gpu, pid, pod, namespace, container) "
                   f"(stacklens_gpu_process_memory_bytes{{{GPU}}})", instant=True)],
                   "GPU memory each process holds (bytes), with its container and pod.", w=12, h=5,
                   hide=("Time",)),
    )
    b.row("Latency of the requests it served")
    b.add(
        ts(ids, "TTFT p50 / p99", [
            Q("A", quantile(0.99, TTFT, REQ), "p99 {{model}}"),
            Q("B", quantile(0.5, TTFT, REQ), "p50 {{model}}")], "s",
           "Requests of every replica that includes this GPU (under tensor parallelism, its peers too).", w=8),
        ts(ids, "TPOT p50 / p99", [
            Q("A", quantile(0.99, TPOT, REQ), "p99 {{model}}"),
            Q("B", quantile(0.5, TPOT, REQ), "p50 {{model}}")], "s", w=8),
        ts(ids, "Requests per second", [
            Q("A", f"sum by (model, gpu) (rate({TTFT}_count{{{REQ}}}[$__rate_interval]))", "{{model}} on {{gpu}}")],
           "reqps", w=8),
    )
    b.row("Power, thermals, clocks")
    b.add(
        ts(ids, "Power draw and limit", [
            Q("A", f"DCGM_FI_DEV_POWER_USAGE{{{GPU}}}", f"power {_G}"),
            Q("B", f"DCGM_FI_DEV_POWER_MGMT_LIMIT{{{GPU}}}", f"limit {_G}")], "watt", w=8),
        ts(ids, "Energy", [
            Q("A", f"rate(DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{{{GPU}}}[$__rate_interval]) / 1000", _G)], "watt",
           "Average power from the energy counter (mJ).", w=8),
        ts(ids, "Temperature", [
            Q("A", f"DCGM_FI_DEV_GPU_TEMP{{{GPU}}}", f"GPU {_G}"),
            Q("B", f"DCGM_FI_DEV_MEMORY_TEMP{{{GPU}}}", f"HBM {_G}")], "celsius", w=8),
        ts(ids, "Clocks", [
            Q("A", f"DCGM_FI_DEV_SM_CLOCK{{{GPU}}}", f"SM {_G}"),
            Q("B", f"DCGM_FI_DEV_MEM_CLOCK{{{GPU}}}", f"memory {_G}"),
            Q("C", f"DCGM_FI_DEV_MAX_SM_CLOCK{{{GPU}}}", f"SM max {_G}")], "rotmhz", w=12),
        timeline(ids, "Throttle reasons", [
            Q("A", f'max by (Hostname, gpu, reason) (stacklens_clock_event_reason_active{{{GPU}, '
                   f'reason=~"{THROTTLE_REASONS}"}})', "{{reason}}")], w=12),
    )
    b.row("Memory and utilisation")
    b.add(
        ts(ids, "Framebuffer", [
            Q("A", f"DCGM_FI_DEV_FB_USED{{{GPU}}}", f"used {_G}"),
            Q("B", f"DCGM_FI_DEV_FB_FREE{{{GPU}}}", f"free {_G}")], "decmbytes", w=8),
        ts(ids, "Utilisation", [
            Q("A", f"DCGM_FI_DEV_GPU_UTIL{{{GPU}}}", f"SM busy {_G}"),
            Q("B", f"DCGM_FI_DEV_MEM_COPY_UTIL{{{GPU}}}", f"memory controller {_G}")], "percent", w=8),
        ts(ids, "ECC errors", [
            Q("A", f"DCGM_FI_DEV_ECC_SBE_VOL_TOTAL{{{GPU}}}", f"corrected {_G}"),
            Q("B", f"DCGM_FI_DEV_ECC_DBE_VOL_TOTAL{{{GPU}}}", f"uncorrected {_G}")], "short", w=8),
    )
    b.row("Interconnect and faults")
    b.add(
        ts(ids, "PCIe throughput", [
            Q("A", f"DCGM_FI_PROF_PCIE_RX_BYTES{{{GPU}}}", f"RX {_G}"),
            Q("B", f"DCGM_FI_PROF_PCIE_TX_BYTES{{{GPU}}}", f"TX {_G}")], "Bps", w=8),
        ts(ids, "PCIe link and replays", [
            Q("A", f"DCGM_FI_DEV_PCIE_LINK_GEN{{{GPU}}}", f"gen {_G}"),
            Q("B", f"DCGM_FI_DEV_PCIE_LINK_WIDTH{{{GPU}}}", f"width {_G}"),
            Q("C", f"increase(DCGM_FI_DEV_PCIE_REPLAY_COUNTER{{{GPU}}}[$__rate_interval])", f"replays {_G}")],
           "short", w=8),
        ts(ids, "NVLink throughput per link", [
            Q("A", f"sum by (Hostname, gpu, link) (stacklens_nvlink_rx_bytes_per_s{{{GPU}}} "
                   f"+ stacklens_nvlink_tx_bytes_per_s{{{GPU}}})", "link {{link}} " + _G)], "Bps", w=8),
        ts(ids, "XID events", [
            Q("A", f"sum by (Hostname, gpu, xid) (increase(stacklens_xid_events_total{{{GPU}}}[$__rate_interval]))",
              "XID {{xid}} " + _G),
            Q("B", f"DCGM_FI_DEV_XID_ERRORS{{{GPU}}}", f"last XID {_G}")], "short", w=12),
        ts(ids, "GPU lost", [Q("A", f"stacklens_gpu_lost{{{GPU}}}", _G)], "short",
           "1 once NVML reported the GPU fallen off the bus.", w=12),
    )
    return b
