"""``why``: from "TTFT/TPOT p99 got worse" to the cause, the culprit GPU and the evidence.

The facade over the analyzers: windows (change point) → requests joined with their GPUs → regression
per replica → hardware, host and engine evidence → candidate causes → ranked findings, in the JSON
shape of DESIGN.md (a stable contract).
"""

from __future__ import annotations

import json
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import duckdb
import numpy as np

from correlator.analysis.attribution import Candidate, UnitLatency, gpu_candidates, score, unit_candidates
from correlator.analysis.evidence import Evidence, collect
from correlator.analysis.request_stats import EMPTY, RequestScope, WindowStat
from correlator.analysis.requests import Unit, data_extent
from correlator.analysis.timeparse import format_clock, format_ns, parse_duration_ns, parse_time_ns
from correlator.analysis.windows import ChangePoint, best_step, rate_step

REGRESSION_RATIO = 1.15
MIN_REQUESTS = 30
_MIN_SCORE = 0.3
_UNIT_ONSET_SCORE = 4.0  # a replica's median series is steadier than the fleet's p90: its step must be larger
_HOUR_NS = 3600 * 10**9
_BUCKET_NS = 30 * 10**9  # the latency series' and arrival counts' bucket
_MAX_ARRIVAL_BUCKETS = 300


class NoData(Exception):
    """The database has no requests (or none that match the filters)."""


@dataclass(frozen=True, slots=True)
class WhyQuery:
    since: str | None = None
    until: str | None = None
    baseline_since: str | None = None
    baseline_until: str | None = None
    service: str | None = None
    model: str | None = None
    node: str | None = None
    metric: str = "auto"  # "ttft", "tpot" or "auto" (whichever regressed more)
    percentile: float = 0.99
    as_of_ns: int | None = None  # answer with what was known then (the online detector's replay); None: now


@dataclass(frozen=True, slots=True)
class Windows:
    b0: int
    b1: int
    i0: int
    i1: int
    onset_detected: bool
    # the incident ends where the requests known end: those still in flight then are missing from its last
    # seconds (a span arrives when its request ends), so its arrival rate is compared with like (unit_latency)
    censored_end: bool = False


def resolve_windows(cur: duckdb.DuckDBPyConnection, q: WhyQuery) -> tuple[Windows, RequestScope]:
    """The baseline and incident windows, and the requests of both with their replicas."""
    extent = data_extent(cur, q.as_of_ns)
    if extent is None:
        raise NoData("no requests in the database yet: send spans to `stacklens serve` or run `stacklens import`")
    first, anchor = extent
    if q.as_of_ns is not None:
        anchor = q.as_of_ns
    known = q.as_of_ns
    if q.since:
        i0 = parse_time_ns(q.since, anchor)
        i1 = parse_time_ns(q.until, anchor) if q.until else anchor
        b1 = parse_time_ns(q.baseline_until, anchor) if q.baseline_until else i0
        b0 = parse_time_ns(q.baseline_since, anchor) if q.baseline_since else max(first, b1 - _HOUR_NS)
        return (Windows(b0, b1, i0, i1, False, i1 >= anchor),
                RequestScope(cur, b0, i1, q.service, q.model, q.node, known))
    # no window given: look back 75 minutes from the last data for the step up of the latency, of the
    # fleet (its p90) or of one replica (its median: a fault on one replica of many barely moves the fleet)
    lookback0 = max(first, anchor - _HOUR_NS - parse_duration_ns("15m"))
    scope = RequestScope(cur, lookback0, anchor, q.service, q.model, q.node, known)
    if scope.empty:
        raise NoData("no requests match the filters")
    metrics = ["ttft", "tpot"] if q.metric == "auto" else [q.metric]
    cps: list[tuple[str, ChangePoint]] = []
    for (ft, fx), per_unit in scope.bucket_series(metrics, _BUCKET_NS, fleet_q=0.9, unit_q=0.5).values():
        cp = best_step(ft, fx)
        if cp is not None:
            cps.append(("fleet", cp))
        if len(scope.units) > 1:
            # a replica's step counts from _UNIT_ONSET_SCORE on: one that cannot reach it is not scored in full
            cps += [(key, c) for key, (t, x) in per_unit.items()
                    if (c := best_step(t, x, min_score=_UNIT_ONSET_SCORE)) is not None]
    cps = [(where, cp) for where, cp in cps
           if cp.score >= (3.0 if where == "fleet" else _UNIT_ONSET_SCORE) and cp.after > cp.before * 1.05]
    if cps:
        best = max((cp for _, cp in cps), key=lambda c: c.score)
        i0 = best.onset_ns
        return Windows(max(first, i0 - _HOUR_NS), i0, i0, anchor, True, True), scope
    i0 = anchor - parse_duration_ns("15m")
    return Windows(max(first, i0 - _HOUR_NS), i0, i0, anchor, False, True), scope


def _ratio(b: float | None, i: float | None) -> float | None:
    return i / b if b and i is not None else None


@dataclass(frozen=True, slots=True)
class Regression:
    """How much a latency percentile went up, for the fleet or for one replica against its peers."""

    metric: str  # "ttft" or "tpot"
    scope: str  # "fleet" or a replica's key
    baseline_s: float | None
    incident_s: float | None
    ratio: float | None
    detected: bool
    n_base: int
    n_inc: int


# a replica stands out when its median or tail went up this much and this much more than its peers'
_UNIT_P50 = (1.07, 0.05)
_UNIT_TAIL = (1.12, 0.08)


@dataclass(frozen=True, slots=True)
class WindowStats:
    """The fleet's and each replica's requests in the baseline and the incident window."""

    fleet_base: WindowStat
    fleet_inc: WindowStat
    base: dict[str, WindowStat]
    inc: dict[str, WindowStat]

    @classmethod
    def of(cls, scope: RequestScope, w: Windows, p: float) -> WindowStats:
        fleet, per_unit = scope.window_stats({"base": (w.b0, w.b1, False), "inc": (w.i0, w.i1, True)}, p,
                                             edge_s=(w.i1 - w.i0) / 1e9 if w.censored_end and w.i1 > w.i0 else None)
        return cls(fleet.get("base", EMPTY), fleet.get("inc", EMPTY),
                   {k: v["base"] for k, v in per_unit.items() if "base" in v},
                   {k: v["inc"] for k, v in per_unit.items() if "inc" in v})

    def unit_base(self, key: str) -> WindowStat:
        return self.base.get(key, EMPTY)

    def unit_inc(self, key: str) -> WindowStat:
        return self.inc.get(key, EMPTY)


def detect_regression(st: WindowStats, units: dict[str, Unit], metrics: list[str], p: float) -> Regression:
    """The fleet's percentile ratio; where that stays under REGRESSION_RATIO, each replica against its peers
    (a fault on one replica of many dilutes the fleet's percentile below any sane threshold)."""
    fleet = []
    for m in metrics:
        nb, ni = st.fleet_base.count(m), st.fleet_inc.count(m)
        vb, vi = st.fleet_base.q(m, p), st.fleet_inc.q(m, p)
        ratio = _ratio(vb, vi)
        ok = ratio is not None and ratio >= REGRESSION_RATIO and nb >= MIN_REQUESTS and ni >= MIN_REQUESTS
        fleet.append(Regression(m, "fleet", vb, vi, ratio, ok, nb, ni))
    detected = [r for r in fleet if r.detected]
    if detected:
        return max(detected, key=lambda r: r.ratio or 0.0)
    best: tuple[float, Regression] | None = None
    for m in metrics:
        per_unit: dict[str, tuple[float, float, int, int]] = {}
        for key in units:
            b, i = st.unit_base(key), st.unit_inc(key)
            r50, rp = _ratio(b.q(m, 0.5), i.q(m, 0.5)), _ratio(b.q(m, p), i.q(m, p))
            if b.count(m) >= MIN_REQUESTS and i.count(m) >= MIN_REQUESTS and r50 is not None and rp is not None:
                per_unit[key] = (r50, rp, b.count(m), i.count(m))
        if len(per_unit) < 2:
            continue
        for key, (r50, rp, nb, ni) in per_unit.items():
            peers = [v for k, v in per_unit.items() if k != key]
            peer50 = float(np.median([v[0] for v in peers]))
            peerp = float(np.median([v[1] for v in peers]))
            stand_out = max(r50 - peer50 if r50 >= _UNIT_P50[0] and r50 - peer50 >= _UNIT_P50[1] else 0.0,
                            rp - peerp if rp >= _UNIT_TAIL[0] and rp - peerp >= _UNIT_TAIL[1] else 0.0)
            if stand_out > 0 and (best is None or stand_out > best[0]):
                best = (stand_out, Regression(m, key, st.unit_base(key).q(m, p), st.unit_inc(key).q(m, p), rp,
                                              True, nb, ni))
    if best is not None:
        return best[1]
    return max(fleet, key=lambda r: r.ratio or 0.0)


def unit_latency(units: dict[str, Unit], w: Windows, metric: str, st: WindowStats, scope: RequestScope
                 ) -> dict[str, UnitLatency]:
    # the share of the regression a replica carries: the extra latency of its incident requests over its
    # own baseline mean (an exact decomposition of the fleet's extra total latency, negatives clipped)
    extra: dict[str, float] = {}
    for key in units:
        b, i = st.unit_base(key), st.unit_inc(key)
        mb, mi = b.mean(metric), i.mean(metric)
        extra[key] = max(0.0, (mi - mb) * i.count(metric)) if mb is not None and mi is not None else 0.0
    total_extra = sum(extra.values()) or 1.0
    b_span = max(1e-9, (w.b1 - w.b0) / 1e9)
    i_span = max(1e-9, (w.i1 - w.i0) / 1e9)
    # 30 s buckets, coarser over long windows (a day's baseline): the step search is quadratic in buckets
    bucket_ns = max(1, -(-(w.i1 - w.b0) // (_MAX_ARRIVAL_BUCKETS * _BUCKET_NS))) * _BUCKET_NS
    edges, arrivals = scope.arrival_counts(w.b0, w.i1, bucket_ns)
    out: dict[str, UnitLatency] = {}
    for key, unit in units.items():
        b, i = st.unit_base(key), st.unit_inc(key)
        if i.n == 0:
            continue

        def ratio(m: str, bb: WindowStat = b, ii: WindowStat = i) -> float:
            # the larger of the median's and the tail's change: a slower GPU moves the median, a queue the tail
            rs = [r for r in (_ratio(bb.q(m, 0.5), ii.q(m, 0.5)), _ratio(bb.q(m, 0.99), ii.q(m, 0.99)))
                  if r is not None]
            return max(rs) if rs else 1.0

        pfb, pfi = b.prefill_per_token_p50_s, i.prefill_per_token_p50_s
        tok_b = b.output_tokens / b_span
        tok_i = i.output_tokens / i_span
        # arrivals: an incident that ends at the edge of what is known misses the requests still in flight,
        # most of its last seconds' (a one-minute window of 10 s requests reads ~20 % low, more as a queue
        # grows): its rate is compared with the baseline's as a window of its length ending at the edge
        # would have seen the baseline's requests
        b_rate = (b.edge_visible_n if w.censored_end and b.edge_visible_n else b.n) / b_span
        out[key] = UnitLatency(
            unit, b.n, i.n, ratio("ttft"), ratio("tpot"), b.queue_p90_s or 0.0, i.queue_p90_s or 0.0,
            pfi / pfb if pfb and pfi is not None else 1.0,
            (i.n / i_span) / b_rate if b_rate > 0 else 1.0,
            tok_i / tok_b if tok_b else 1.0,
            extra[key] / total_extra, _arrival_step(edges, arrivals.get(key)))
    return out


def _arrival_step(edges: np.ndarray, counts: np.ndarray | None) -> tuple[float, float, int] | None:
    """A clear step up of one replica's arrival rate between the baseline's start and the incident's end."""
    if counts is None:
        counts = np.zeros(max(0, len(edges) - 1))
    cp = rate_step(edges, counts)
    if cp is None or cp.score < 4.0 or cp.before <= 0 or cp.after < 1.25 * cp.before:
        return None
    return cp.before, cp.after, cp.onset_ns


class RootCause:
    """The facade: ``RootCause(cursor).why(query)`` returns the DESIGN.md JSON document.

    ``speculative``: gather the hardware evidence on a second cursor while the requests are measured (a
    person waiting on ``why`` gets the answer sooner on a multi-core machine); the online detector, whose
    evaluations mostly find no regression, leaves it off rather than spend the CPU for nothing."""

    def __init__(self, cur: duckdb.DuckDBPyConnection, speculative: bool = True) -> None:
        self.cur = cur
        self.speculative = speculative

    def why(self, q: WhyQuery) -> dict[str, Any]:
        t_start = time.perf_counter()
        w, requests = resolve_windows(self.cur, q)
        p = q.percentile
        pct = f"p{round(p * 100):d}"
        if not self.speculative:
            return self._why(q, w, requests, p, pct, None, t_start)
        own = self.cur.cursor()
        pool = ThreadPoolExecutor(1, thread_name_prefix="why-evidence")
        try:
            return self._why(q, w, requests, p, pct, pool.submit(collect, own, w.b0, w.b1, w.i0, w.i1), t_start)
        finally:
            own.interrupt()  # no regression: the evidence is not needed, stop its query rather than wait for it
            pool.shutdown(wait=True, cancel_futures=True)
            own.close()

    def _why(self, q: WhyQuery, w: Windows, requests: RequestScope, p: float, pct: str,
             evidence: Future[Evidence] | None, t_start: float) -> dict[str, Any]:
        units = requests.units
        st = WindowStats.of(requests, w, p)
        reg = detect_regression(st, units, ["ttft", "tpot"] if q.metric == "auto" else [q.metric], p)
        metric, b_val, i_val, ratio, detected = reg.metric, reg.baseline_s, reg.incident_s, reg.ratio, reg.detected
        n_b, n_i = reg.n_base, reg.n_inc
        scope = units.get(reg.scope)
        doc: dict[str, Any] = {
            "query": {"service": q.service, "model": q.model, "metric": f"{metric}_{pct}",
                      "window": [format_ns(w.i0), format_ns(w.i1)], "baseline": [format_ns(w.b0), format_ns(w.b1)],
                      "onset_detected": w.onset_detected},
            "regression": {"metric": f"{metric}_{pct}", "baseline_s": _r(b_val), "incident_s": _r(i_val),
                           "ratio": _r(ratio), "detected": detected, "baseline_requests": n_b,
                           "incident_requests": n_i, "scope": "replica" if scope else "fleet",
                           "replica": ({"node": scope.node, "pid": scope.pid, "pod": scope.pod,
                                        "gpus": list(scope.gpu_ids)} if scope else None)},
            "findings": [],
        }
        label = metric.upper()
        if not detected:
            doc["verdict"] = (f"no regression: {label} {pct} {_fmt_s(i_val)} vs {_fmt_s(b_val)} in the baseline"
                              + (f" ({ratio:.2f}x)" if ratio else "") if b_val is not None and i_val is not None
                              else "no regression: not enough requests in one of the windows")
            doc["elapsed_s"] = round(time.perf_counter() - t_start, 3)
            return doc
        lat = unit_latency(units, w, metric, st, requests)
        ev = evidence.result() if evidence is not None else collect(self.cur, w.b0, w.b1, w.i0, w.i1)
        units_of_gpu: dict[int, list[str]] = {}
        for key, u in units.items():
            for g in u.gpu_ids:
                units_of_gpu.setdefault(g, []).append(key)
        engine_pids = {u.pid for u in units.values() if u.pid}
        peers_of_gpu = {g: [p for p in u.gpu_ids if p != g] for u in units.values() for g in u.gpu_ids
                        if len(u.gpu_ids) > 1}
        busier = {g for ul in lat.values() for g in ul.unit.gpu_ids
                  if ul.arrival_ratio >= 1.2 or ul.arrival_step is not None}
        cands = gpu_candidates(ev, units_of_gpu, engine_pids, peers_of_gpu, busier) + unit_candidates(ev, lat)
        scored = sorted(((score(c, lat), c) for c in cands), key=lambda x: (-x[0][0], -x[0][1]))
        findings: list[dict[str, Any]] = []
        seen: set[tuple[str, str, int | None, int]] = set()
        for (s, share), c in scored:
            if s < _MIN_SCORE:
                break
            fkey = (c.cause, c.subcause, c.gpu_id, c.node_id)
            if fkey in seen:
                continue
            seen.add(fkey)
            findings.append(self._finding(len(findings) + 1, c, s, share, ev, units, w))
            if len(findings) == 5:
                break
        if not findings:
            worst = max(lat.values(), key=lambda u: u.excess_share, default=None)
            findings.append({
                "rank": 1, "cause": "none", "subcause": None, "score": 0.0,
                "explained_share": 0.0,
                "culprit": self._culprit(worst.unit.gpu_ids[0] if worst and worst.unit.gpu_ids else None,
                                         worst.unit.node_id if worst else None, ev, units, worst.unit.key
                                         if worst else None, None),
                "window": [format_ns(w.i0), format_ns(w.i1)], "evidence": []})
        doc["findings"] = findings
        top = findings[0]
        where = top["culprit"]["node"] or "the fleet"
        if top["culprit"].get("gpu_index") is not None:
            where += f" GPU {top['culprit']['gpu_index']}"
        what = top.get("description") or "no signal the data holds explains it"
        doc["verdict"] = (f"{label} {pct} {ratio:.1f}x baseline ({_fmt_s(b_val)} → {_fmt_s(i_val)}) on {where}: "
                          f"{what} from {format_clock(w.i0)} UTC"
                          + (f", explaining {top['explained_share']:.0%} of the regression"
                             if top["cause"] != "none" else ""))
        doc["elapsed_s"] = round(time.perf_counter() - t_start, 3)
        return doc

    def _culprit(self, gpu_id: int | None, node_id: int | None, ev: Any, units: dict[str, Unit],
                 unit_key: str | None, pid: int | None) -> dict[str, Any]:
        uuid = idx = None
        if gpu_id is not None and gpu_id in ev.gpu_meta:
            uuid, idx, node_id, _ = ev.gpu_meta[gpu_id]
        unit = units.get(unit_key) if unit_key else None
        return {"node": ev.node_names.get(node_id) if node_id is not None else None, "gpu": uuid, "gpu_index": idx,
                "pod": unit.pod if unit else None, "pid": pid if pid is not None else (unit.pid if unit else None),
                "mapping": unit.mapping if unit else "inferred"}

    def _finding(self, rank: int, c: Candidate, s: float, share: float, ev: Any, units: dict[str, Unit],
                 w: Windows) -> dict[str, Any]:
        return {"rank": rank, "cause": c.cause, "subcause": c.subcause, "score": round(min(1.0, s), 3),
                "explained_share": round(share, 3),
                "culprit": self._culprit(c.gpu_id, c.node_id, ev, units, c.units[0] if c.units else None, c.pid),
                "window": [format_ns(c.since_ns if c.since_ns is not None else w.i0), format_ns(w.i1)],
                "evidence": c.evidence, "description": c.description}


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 4)


def _fmt_s(v: float | None) -> str:
    if v is None:
        return "?"
    return f"{v * 1000:.0f} ms" if v < 1 else f"{v:.2f} s"


def store_findings(cur: duckdb.DuckDBPyConnection, doc: dict[str, Any], now_ns: int | None = None) -> int:
    """Keep the findings of a ``why`` run in the ``findings`` table (bound parameters only)."""
    n = 0
    for f in doc.get("findings", []):
        win = doc["query"]["window"]
        cur.execute("INSERT INTO findings VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", [
            now_ns or time.time_ns(), doc["regression"]["metric"], f["cause"], f.get("subcause"),
            f["culprit"].get("node"), f["culprit"].get("gpu"), parse_time_ns(win[0], 0), parse_time_ns(win[1], 0),
            f.get("score"), f.get("explained_share"), json.dumps(f)])
        n += 1
    return n
