"""From a measured regression and the evidence to ranked findings.

Each hypothesis of the cause vocabulary (DESIGN.md) looks for its primary evidence on every GPU, node
or replica: the robust change of its signals between baseline and incident, whether the GPU stands out
from its peers, and whether the latency component the cause produces (TTFT for compute and transfers,
TPOT for memory-bound decode, queue time for scheduling) did go up on the replicas that GPU serves. A
cause is preferred over the symptoms it produces: KV pressure explains preemptions; a slow GPU explains
the queue that builds in front of it, so queueing needs the arrival rate to have gone up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from correlator.analysis.evidence import Evidence, Stat, pcie_capacity_bytes_per_s
from correlator.analysis.requests import Unit


@dataclass(frozen=True, slots=True)
class UnitLatency:
    """How one replica's requests changed between the windows."""

    unit: Unit
    n_base: int
    n_inc: int
    ttft_ratio: float
    tpot_ratio: float
    queue_base_s: float
    queue_inc_s: float
    prefill_ratio: float  # per prompt token
    arrival_ratio: float
    tokens_ratio: float  # output tokens per second
    excess_share: float  # share of the fleet's excess latency its requests carry
    arrival_step: tuple[float, float, int] | None = None  # arrivals/s before and after a step up, and when


@dataclass
class Candidate:
    cause: str
    subcause: str
    strength: float
    units: list[str]
    gpu_id: int | None
    node_id: int
    evidence: list[dict[str, object]]
    symptom: str  # "ttft", "tpot", "queue" or "any"
    description: str
    pid: int | None = None
    extra: dict[str, object] = field(default_factory=dict)
    since_ns: int | None = None  # when the cause began, where it began before the latency moved


_UNITS = {"power_w": "W", "power_limit_w": "W", "gpu_temp_c": "Cel", "memory_temp_c": "Cel", "sm_clock_hz": "Hz",
          "gpu_util_ratio": "1", "memory_busy_ratio": "1", "pcie_rx_bytes_per_s": "B/s",
          "pcie_tx_bytes_per_s": "B/s", "nvlink_tx_total_bytes_per_s": "B/s", "nvlink_rx_total_bytes_per_s": "B/s",
          "host_run_queue": "1", "host_cpu_steal_ratio": "1", "host_cpu_util_ratio": "1",
          "cgroup_throttled_ratio": "1", "engine_kv_cache_usage_ratio": "1", "engine_preemptions_per_s": "1/s",
          "pcie_link_width": "1", "pcie_link_gen": "1", "engine_requests_running": "1",
          "engine_requests_waiting": "1"}


def _ev(signal: str, st: Stat | None, unit: str | None = None) -> dict[str, object]:
    if st is None:
        return {"signal": signal, "unit": unit or _UNITS.get(signal, "1"), "baseline": None, "incident": None,
                "robust_z": None}
    return {"signal": signal, "unit": unit or _UNITS.get(signal, "1"), "baseline": _round(st.base_median),
            "incident": _round(st.inc_median), "robust_z": round(st.z(signal), 2)}


def _raw(signal: str, base: float | None, inc: float | None, unit: str = "1", z: float | None = None
         ) -> dict[str, object]:
    return {"signal": signal, "unit": unit, "baseline": _round(base), "incident": _round(inc),
            "robust_z": None if z is None else round(z, 2)}


def _round(v: float | None) -> float | None:
    if v is None or math.isnan(v):
        return None
    return float(f"{v:.4g}")


def _squash(z: float, at: float) -> float:
    """0 at z=0, 0.5 at z=at, toward 1 beyond."""
    return 1.0 - math.exp(-max(0.0, z) * math.log(2) / at)


def _widespread(ev: Evidence, signal: str, gpu_ids: list[int], threshold: float, sign: float = 1.0) -> float:
    """Share of GPUs whose ``signal`` moved past ``threshold`` z in the same direction (fleet-wide moves are
    load or drift, not a culprit)."""
    moved = sum(1 for g in gpu_ids if sign * ev.gpu.get(g, {}).get(signal, Stat(None, None, None)).z(signal)
                >= threshold)
    return moved / max(1, len(gpu_ids))


def _delta(ev: Evidence, gid: int, signal: str) -> float | None:
    st = ev.gpu.get(gid, {}).get(signal)
    if st is None or st.base_median is None or st.inc_median is None:
        return None
    return st.inc_median - st.base_median


def peer_relative(ev: Evidence, gid: int, signal: str, peers: list[int]) -> float:
    """How much more ``signal`` moved on ``gid`` than on its peers (the other GPUs of its replica, which
    carry the same requests): a replica whose load went up moves all its GPUs alike; a foreign process or
    a failing part moves one."""
    own = _delta(ev, gid, signal)
    if own is None:
        return 0.0
    others = sorted(d for d in (_delta(ev, p, signal) for p in peers) if d is not None)
    return own - (others[len(others) // 2] if others else 0.0)


def gpu_candidates(ev: Evidence, units_of_gpu: dict[int, list[str]], engine_pids: set[int],
                   peers_of_gpu: dict[int, list[int]] | None = None, busier: set[int] | None = None
                   ) -> list[Candidate]:
    """``busier``: GPUs whose replica serves more requests than in the baseline (its own load explains its
    memory traffic)."""
    out: list[Candidate] = []
    all_gpus = sorted(ev.gpu_meta)
    peers_of_gpu = peers_of_gpu or {}
    busier = busier or set()
    for gid in all_gpus:
        st = ev.gpu.get(gid, {})
        nid = ev.gpu_meta[gid][2]
        units = units_of_gpu.get(gid, [])
        get = st.get
        clock = get("sm_clock_hz")

        # hardware_fault/xid: the GPU raised XIDs during the incident
        if gid in ev.xids:
            n, codes, _first = ev.xids[gid]
            out.append(Candidate("hardware_fault", "xid", 0.97, units, gid, nid,
                                 [_raw("xid_events", 0, n, "1"), _ev("sm_clock_hz", clock)], "any",
                                 f"XID {', '.join(map(str, codes)) or '?'} raised {n} times"))
        dbe = ev.gpu_counter_delta.get(gid, {}).get("ecc_dbe_volatile_total")
        if dbe and dbe[1] > 0 and dbe[0] == 0:
            out.append(Candidate("hardware_fault", "ecc", 0.9, units, gid, nid,
                                 [_raw("ecc_dbe_volatile_total", dbe[0], dbe[1])], "any",
                                 f"{int(dbe[1])} uncorrectable ECC errors"))
        width, gen = get("pcie_link_width"), get("pcie_link_gen")
        for s, name in ((width, "pcie_link_width"), (gen, "pcie_link_gen")):
            if s and s.base_median and s.inc_median is not None and s.inc_median < s.base_median - 0.5:
                out.append(Candidate("hardware_fault", "link_degraded", 0.85, units, gid, nid, [_ev(name, s)],
                                     "ttft", f"PCIe link down-trained ({name} {s.base_median:g} → {s.inc_median:g})"))

        # interconnect/nvlink: a link went down (traffic rerouted over the others), or link errors
        down_b, down_i = ev.links_down.get(gid, (0, 0))
        if down_i > down_b:
            tx = get("nvlink_tx_total_bytes_per_s")
            out.append(Candidate("interconnect", "nvlink", 0.93, units, gid, nid,
                                 [_raw("nvlink_links_down", down_b, down_i), _ev("nvlink_tx_total_bytes_per_s", tx)],
                                 "any", f"{down_i - down_b} NVLink link(s) down"))
        else:
            errs = ev.gpu_counter_delta.get(gid, {})
            crc = errs.get("nvlink_crc_flit_errors_total", (0.0, 0.0))
            if crc[1] > 10 * (crc[0] + 1):
                out.append(Candidate("interconnect", "nvlink", 0.7, units, gid, nid,
                                     [_raw("nvlink_crc_flit_errors", crc[0], crc[1])], "any",
                                     f"NVLink CRC errors ({int(crc[1])} in the incident)"))

        # interconnect/pcie: traffic near the link's capacity, well above its baseline
        cap = pcie_capacity_bytes_per_s(st)
        best_dir = max(("pcie_rx_bytes_per_s", "pcie_tx_bytes_per_s"),
                       key=lambda s: get(s).z(s) if get(s) else 0.0)  # type: ignore[union-attr]
        ps = get(best_dir)
        if ps is not None and ps.inc_median is not None:
            z = ps.z(best_dir)
            util = ps.inc_median / cap if cap else None
            if z >= 4 and (util is None or util >= 0.2) and _widespread(ev, best_dir, all_gpus, 4) < 0.75:
                strength = 0.55 + 0.4 * min(1.0, (util or 0.5))
                direction = "RX" if "rx" in best_dir else "TX"
                cap_txt = f" of {cap / 1e9:.1f} GB/s" if cap else ""
                out.append(Candidate("interconnect", "pcie", strength, units, gid, nid,
                                     [_ev(best_dir, ps), _raw("pcie_link_utilization", (ps.base_median or 0) / cap
                                                              if cap else None, util, "1")],
                                     "ttft", f"PCIe {direction} saturated ({ps.inc_median / 1e9:.1f} GB/s{cap_txt})"))

        # thermal_power: clocks held down by the power cap or by temperature
        shares = ev.throttle_share.get(gid, {"power": (0.0, 0.0), "thermal": (0.0, 0.0)})
        limit, power, temp = get("power_limit_w"), get("power_w"), get("gpu_temp_c")
        clock_drop = -(clock.z("sm_clock_hz")) if clock else 0.0
        p_b, p_i = shares["power"]
        limit_drop = -(limit.z("power_limit_w")) if limit else 0.0
        if (p_i - p_b >= 0.2 or limit_drop >= 4) and _widespread(ev, "power_limit_w", all_gpus, 4, -1) < 0.75:
            strength = 0.5 + 0.25 * min(1.0, max(0.0, p_i - p_b) / 0.5) + 0.2 * _squash(clock_drop, 3)
            text = "power cap"
            if limit and limit_drop >= 4 and limit.inc_median:
                text += f" lowered to {limit.inc_median:.0f} W"
            if clock and clock.inc_median:
                text += f", SM clock {clock.inc_median / 1e6:.0f} MHz"
            out.append(Candidate("thermal_power", "power_cap", strength, units, gid, nid,
                                 [_ev("power_limit_w", limit), _ev("power_w", power), _ev("sm_clock_hz", clock),
                                  _raw("power_cap_throttle_share", p_b, p_i)], "ttft", text))
        t_b, t_i = shares["thermal"]
        temp_up = temp.z("gpu_temp_c") if temp else 0.0
        if (t_i - t_b >= 0.2 or (temp_up >= 4 and clock_drop >= 3)) and \
                _widespread(ev, "gpu_temp_c", all_gpus, 4) < 0.75:
            strength = 0.5 + 0.25 * min(1.0, max(0.0, t_i - t_b) / 0.5) + 0.2 * _squash(clock_drop, 3)
            out.append(Candidate("thermal_power", "thermal_throttle", strength, units, gid, nid,
                                 [_ev("gpu_temp_c", temp), _ev("sm_clock_hz", clock),
                                  _raw("thermal_throttle_share", t_b, t_i)],
                                 "ttft", f"thermal throttling at {temp.inc_median:.0f} °C, SM clock "
                                         f"{(clock.inc_median or 0) / 1e6:.0f} MHz" if temp and clock
                                 else "thermal throttling"))

        # a process that is not a serving engine appeared on the GPU
        pids_b, pids_i = ev.gpu_pids.get(gid, (set(), set()))
        foreign = sorted(p for p in pids_i - pids_b if p not in engine_pids)
        busy, util_s = get("memory_busy_ratio"), get("gpu_util_ratio")
        busy_z = busy.z("memory_busy_ratio") if busy else 0.0
        util_z = util_s.z("gpu_util_ratio") if util_s else 0.0
        peers = peers_of_gpu.get(gid) or [g for g in all_gpus if g != gid and ev.gpu_meta[g][2] == nid]
        # what moved on this GPU beyond what its replica's own load moved on its peers
        rel_busy = peer_relative(ev, gid, "memory_busy_ratio", peers)
        rel_util = peer_relative(ev, gid, "gpu_util_ratio", peers)
        compute_bound = rel_util > rel_busy  # the intruder computes more than it reads memory
        # HBM contention is memory traffic the replica's own load does not explain: an intruder's, or more
        # on this GPU than on the partner that carries the same requests
        not_own_load = bool(foreign) or (rel_busy >= 0.1 and (gid in peers_of_gpu or gid not in busier))
        if busy_z >= 4 and not_own_load and _widespread(ev, "memory_busy_ratio", all_gpus, 4) < 0.75:
            strength = (0.45 + 0.3 * _squash(busy_z, 6) + (0.2 if foreign else 0.0)
                        - (0.25 if compute_bound and foreign else 0.0))
            out.append(Candidate("memory", "hbm_bandwidth", strength, units, gid, nid,
                                 [_ev("memory_busy_ratio", busy), _ev("gpu_util_ratio", util_s)]
                                 + ([_raw("foreign_processes", 0, len(foreign))] if foreign else []),
                                 "tpot", f"HBM bandwidth contention (memory busy {busy.inc_median:.0%})"
                                 if busy and busy.inc_median is not None else "HBM bandwidth contention",
                                 pid=foreign[0] if foreign else None))
        if foreign:
            # a foreign process whose effect does not show yet (or shows as memory traffic) is weak evidence
            strength = 0.45 + (0.45 if compute_bound and util_z >= 2 else 0.0)
            out.append(Candidate("scheduling", "noisy_neighbor", strength, units, gid, nid,
                                 [_raw("foreign_processes", 0, len(foreign)), _ev("gpu_util_ratio", util_s),
                                  _ev("memory_busy_ratio", busy)],
                                 "any", f"foreign process {foreign[0]} on the GPU", pid=foreign[0]))
    return out


def unit_candidates(ev: Evidence, lat: dict[str, UnitLatency]) -> list[Candidate]:
    out: list[Candidate] = []
    by_node: dict[int, list[str]] = {}
    incident_running_high = {k: st.inc_high for k, e in ev.engine.items()
                            if (st := e.get("engine_requests_running")) is not None and st.inc_high is not None}
    for key, ul in lat.items():
        by_node.setdefault(ul.unit.node_id, []).append(key)
        eng = ev.engine.get((ul.unit.node_id, ul.unit.pid)) or {}
        peers_high = sorted(v for k, v in incident_running_high.items() if k != (ul.unit.node_id, ul.unit.pid))
        peer_running_high = peers_high[len(peers_high) // 2] if peers_high else 0.0
        kv, pre = eng.get("engine_kv_cache_usage_ratio"), eng.get("engine_preemptions_per_s")
        kv_hot = kv is not None and kv.inc_median is not None and (
            (kv.inc_high or 0) >= 0.97 or (kv.inc_median >= 0.85 and kv.z("engine_kv_cache_usage_ratio") >= 3))
        pre_up = pre is not None and (pre.inc_median or 0) > (pre.base_median or 0) + 0.02
        if kv_hot or pre_up:
            strength = 0.55 + (0.2 if kv_hot else 0) + (0.2 if pre_up else 0)
            gid = ul.unit.gpu_ids[0] if ul.unit.gpu_ids else None
            out.append(Candidate("memory", "kv_cache_pressure", strength, [key], gid, ul.unit.node_id,
                                 [_ev("engine_kv_cache_usage_ratio", kv), _ev("engine_preemptions_per_s", pre)],
                                 "any", f"KV cache {'full' if kv_hot else 'under pressure'}"
                                        f"{', requests preempted' if pre_up else ''}", pid=ul.unit.pid))
        queue_up = ul.queue_inc_s > max(2.0 * ul.queue_base_s, ul.queue_base_s + 0.05)
        # arrivals: over the windows, or a step up found before the queue grew (a queue that builds up slowly
        # moves the latency minutes after the load, and by then the baseline holds the higher load too)
        arrival_ratio, since, rates = ul.arrival_ratio, None, (1.0, ul.arrival_ratio)
        if ul.arrival_step is not None:
            before, after, at = ul.arrival_step
            if before > 0 and after / before > arrival_ratio:
                arrival_ratio, since, rates = after / before, at, (before, after)
        running, waiting = eng.get("engine_requests_running"), eng.get("engine_requests_waiting")
        # a batch held at a ceiling below what the engine ran before, or below what its peers run, with
        # requests waiting and KV to spare: max_num_seqs (or the token budget) set too low
        ceiling = max(running.base_high or 0.0, peer_running_high) if running is not None else 0.0
        kv_free = kv is None or (kv.inc_high or 0.0) < 0.9
        capped = (running is not None and running.inc_high is not None and running.inc_median is not None
                  and ceiling > 0 and running.inc_high <= _HELD * ceiling
                  and running.inc_median >= 0.75 * running.inc_high and kv_free)
        # the batch at the very scrapes requests waited: an engine whose batch is full (max_num_seqs, the KV
        # cache) queues at its ceiling, at or above what it ran before; one that queues with a batch below what it
        # ran before without a queue, KV to spare, has had its ceiling lowered. Known at the scrape, where the
        # incident's gauge levels still hold the minute before the change (a 60 s window is mostly the old
        # batch for its first half minute). Batching only: an arrival burst queues at a full batch, whose slower
        # steps the queue's leading edge below already names
        queued = ev.engine_queued.get((ul.unit.node_id, ul.unit.pid))
        waited = (queued is not None and queued.n_inc > 0 and queued.waited_inc >= _QUEUED_SCRAPES
                  and queued.waited_inc / queued.n_inc >= 2.0 * queued.waited_base / max(1, queued.n_base))
        held_at = queued.waiting_at_batch if queued is not None and waited else None
        held = (held_at is not None and ceiling > 0 and held_at <= _HELD * ceiling and kv_free
                and (queued is None or queued.kv_while_waiting is None or queued.kv_while_waiting < 0.9))
        level = held_at if held and held_at is not None else (running.inc_high if running is not None else None)
        capped = capped or held
        # the queue as the engine reports it (its waiting gauge, every cycle) shows a minute or more before the
        # queue times of the requests that waited, which are known only once they end; the latency it makes then
        # shows in their TTFT first
        waiting_up = (waiting is not None and waiting.inc_high is not None
                      and waiting.inc_high >= max(1.0, 2.0 * (waiting.base_high or 0.0)))
        queue_symptom = "queue" if queue_up else "ttft"
        queue_up = queue_up or waiting_up
        if queue_up and arrival_ratio >= 1.25 and not capped:
            strength = 0.55 + 0.35 * min(1.0, (arrival_ratio - 1.0))
            out.append(Candidate("scheduling", "queueing", strength, [key], ul.unit.gpu_ids[0] if ul.unit.gpu_ids
                                 else None, ul.unit.node_id,
                                 [_raw("arrival_rate_per_s", rates[0], rates[1], "1/s"),
                                  _raw("queue_time_p90_s", ul.queue_base_s, ul.queue_inc_s, "s"),
                                  _ev("engine_requests_waiting", waiting), _ev("engine_requests_running", running)],
                                 queue_symptom, f"arrivals {arrival_ratio:.1f}x baseline, " + (
                                     f"queue time p90 {ul.queue_base_s:.2f}s → {ul.queue_inc_s:.2f}s"
                                     if queue_symptom == "queue" else
                                     f"up to {(waiting.inc_high if waiting else 0) or 0:.0f} requests waiting"),
                                 pid=ul.unit.pid, since_ns=since))
        elif (not capped and not kv_hot and arrival_ratio >= _LOAD_ARRIVALS and running is not None
              and running.base_high and running.base_median and running.inc_median is not None
              and running.inc_median >= max(_LOAD_BATCH * running.base_median, running.base_high)):
            # the queue's leading edge: more arrivals, and the engine already runs a batch well above anything
            # it ran in the baseline (the gauge moves at once; the queue and its queue time come a minute or two
            # later, when the batch reaches max_num_seqs, and requests' queue times only when they end). A
            # slower GPU grows the batch too (Little's law), but not the arrivals; the candidate is the same
            # cause and culprit as the queueing above, so the incident goes on when the queue forms
            strength = 0.5 + 0.35 * min(1.0, arrival_ratio - 1.0)
            out.append(Candidate("scheduling", "queueing", strength, [key], ul.unit.gpu_ids[0] if ul.unit.gpu_ids
                                 else None, ul.unit.node_id,
                                 [_raw("arrival_rate_per_s", rates[0], rates[1], "1/s"),
                                  _ev("engine_requests_running", running), _ev("engine_requests_waiting", waiting),
                                  _raw("queue_time_p90_s", ul.queue_base_s, ul.queue_inc_s, "s")],
                                 "any", f"arrivals {arrival_ratio:.1f}x baseline and the batch at "
                                        f"{running.inc_median:.0f} running requests (at most {running.base_high:.0f}"
                                        " in the baseline): a queue is forming", pid=ul.unit.pid, since_ns=since))
        elif (queue_up or held) and capped and arrival_ratio < 1.25 and running is not None:
            strength = 0.6 + 0.3 * min(1.0, (1.0 - (level or 0.0) / ceiling) / 0.3)
            out.append(Candidate("scheduling", "batching", strength, [key], ul.unit.gpu_ids[0] if ul.unit.gpu_ids
                                 else None, ul.unit.node_id,
                                 [_raw("engine_requests_running_max", ceiling, level),
                                  _ev("engine_requests_running", running), _ev("engine_requests_waiting", waiting),
                                  _raw("queue_time_p90_s", ul.queue_base_s, ul.queue_inc_s, "s"),
                                  _ev("engine_kv_cache_usage_ratio", kv)],
                                 queue_symptom, f"batch held at {level or 0:.0f} running requests (up to "
                                          f"{ceiling:.0f} before or on its peers) while requests queue and KV "
                                          "cache is free: "
                                          "max_num_seqs or the token budget too low", pid=ul.unit.pid))
    for nid, keys in by_node.items():
        host = ev.host.get(nid, {})
        scored = []
        for s in ("host_run_queue", "host_cpu_steal_ratio", "cgroup_throttled_ratio", "host_load1"):
            st = host.get(s)
            if st is not None:
                scored.append((st.z(s), s, st))
        if not scored:
            continue
        z, sig, st = max(scored, key=lambda x: x[0])
        if z >= 4:
            out.append(Candidate("scheduling", "cpu_contention", 0.5 + 0.4 * _squash(z, 8), keys, None, nid,
                                 [_ev(s, st_) for _, s, st_ in sorted(scored, key=lambda x: -x[0])[:3]], "any",
                                 f"host CPU contention ({sig.replace('_', ' ')} {st.base_median or 0:.2g} → "
                                 f"{st.inc_median or 0:.2g})"))
    return out


_SYMPTOM_RATIO = 1.08
# the queue's leading edge (unit_candidates): arrivals at least this much over the baseline, and the running batch's
# median this much over the baseline's median and above the baseline's 95th percentile
_LOAD_ARRIVALS = 1.35
_LOAD_BATCH = 1.25
# a batch at most this share of its ceiling (the baseline's 95th percentile of the running gauge, or its peers'), in
# the window or at the scrapes requests waited, is held under it: a margin of 15 % keeps a batch that queues at its
# own full size, a little under a high reached in a busier baseline minute, from reading as a lowered ceiling
_HELD = 0.85
# requests seen waiting at this many scrapes at least (and twice as often as in the baseline's last 15 minutes): a
# request that arrives between two scheduler steps (tens of ms) is caught waiting by a scrape now and then in any
# engine, a queue at scrape after scrape
_QUEUED_SCRAPES = 2


def score(c: Candidate, lat: dict[str, UnitLatency]) -> tuple[float, float]:
    """(score, explained share): the strength of the evidence, times whether the replicas it touches show the
    latency the cause produces, and the share of the regression their requests carry."""
    uls = [lat[u] for u in c.units if u in lat]
    if not uls:
        return c.strength * 0.3, 0.0
    share = min(1.0, sum(u.excess_share for u in uls))
    if c.symptom == "ttft":
        hit = max(u.ttft_ratio for u in uls) >= _SYMPTOM_RATIO
    elif c.symptom == "tpot":
        hit = max(u.tpot_ratio for u in uls) >= _SYMPTOM_RATIO
    elif c.symptom == "queue":
        hit = any(u.queue_inc_s > u.queue_base_s * 1.5 for u in uls)
    else:
        hit = max(max(u.ttft_ratio, u.tpot_ratio) for u in uls) >= _SYMPTOM_RATIO
    return c.strength * (1.0 if hit else 0.35) * (0.6 + 0.4 * min(1.0, share * 2)), share
