"""``why``: from "TTFT/TPOT p99 got worse" to the cause, the culprit GPU and the evidence.

The facade over the analyzers: windows (change point) → requests joined with their GPUs → regression
per replica → hardware, host and engine evidence → candidate causes → ranked findings, in the JSON
shape of DESIGN.md (a stable contract).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import duckdb
import numpy as np
import polars as pl

from correlator.analysis.attribution import Candidate, UnitLatency, gpu_candidates, score, unit_candidates
from correlator.analysis.evidence import collect
from correlator.analysis.requests import WHY_COLUMNS, Unit, data_extent, load_requests, resolve_units
from correlator.analysis.timeparse import format_clock, format_ns, parse_duration_ns, parse_time_ns
from correlator.analysis.windows import detect_onset, detect_onsets, rate_step

REGRESSION_RATIO = 1.15
MIN_REQUESTS = 30
_MIN_SCORE = 0.3
_UNIT_ONSET_SCORE = 4.0  # a replica's median series is steadier than the fleet's p90: its step must be larger
_HOUR_NS = 3600 * 10**9


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


def resolve_windows(cur: duckdb.DuckDBPyConnection, q: WhyQuery
                    ) -> tuple[Windows, pl.DataFrame, dict[str, Unit]]:
    """The baseline and incident windows, and their requests joined with their replicas (``unit``)."""
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
        reqs = load_requests(cur, b0, i1, q.service, q.model, q.node, known, WHY_COLUMNS)
        reqs, units = resolve_units(cur, reqs, b0, i1)
        return Windows(b0, b1, i0, i1, False), reqs, units
    # no window given: look back 75 minutes from the last data for the step up of the latency, of the
    # fleet (its p90) or of one replica (its median: a fault on one replica of many barely moves the fleet)
    lookback0 = max(first, anchor - _HOUR_NS - parse_duration_ns("15m"))
    reqs = load_requests(cur, lookback0, anchor, q.service, q.model, q.node, known, WHY_COLUMNS)
    if reqs.is_empty():
        raise NoData("no requests match the filters")
    reqs, units = resolve_units(cur, reqs, lookback0, anchor)
    metrics = ["ttft_s", "tpot_s"] if q.metric == "auto" else [f"{q.metric}_s"]
    cps = [("fleet", cp) for cp in (detect_onset(reqs, m) for m in metrics) if cp is not None]
    if len(units) > 1:
        per_unit = {m: detect_onsets(reqs, m, "unit", q=0.5) for m in metrics}
        for key in units:
            cps += [(key, cp) for cp in (per_unit[m].get(key) for m in metrics) if cp is not None]
    cps = [(scope, cp) for scope, cp in cps
           if cp.score >= (3.0 if scope == "fleet" else _UNIT_ONSET_SCORE) and cp.after > cp.before * 1.05]
    if cps:
        best = max((cp for _, cp in cps), key=lambda c: c.score)
        i0 = best.onset_ns
        b0 = max(first, i0 - _HOUR_NS)
        return Windows(b0, i0, i0, anchor, True), reqs.filter(pl.col("start_ns") >= b0), units
    i0 = anchor - parse_duration_ns("15m")
    return Windows(max(first, i0 - _HOUR_NS), i0, i0, anchor, False), reqs, units


def _q(s: pl.Series, p: float) -> float | None:
    s = s.drop_nulls()
    return float(s.quantile(p, "linear")) if len(s) else None  # type: ignore[arg-type]


def _ratio(b: pl.Series, i: pl.Series, p: float) -> float | None:
    vb, vi = _q(b, p), _q(i, p)
    return vi / vb if vb and vi is not None else None


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


def detect_regression(base: pl.DataFrame, inc: pl.DataFrame, units: dict[str, Unit], metrics: list[str],
                      p: float, rows: UnitRows) -> Regression:
    """The fleet's percentile ratio; where that stays under REGRESSION_RATIO, each replica against its peers
    (a fault on one replica of many dilutes the fleet's percentile below any sane threshold)."""
    fleet = []
    for m in metrics:
        b, i = base[f"{m}_s"].drop_nulls(), inc[f"{m}_s"].drop_nulls()
        vb, vi = _q(b, p), _q(i, p)
        ratio = vi / vb if vb and vi is not None else None
        ok = ratio is not None and ratio >= REGRESSION_RATIO and len(b) >= MIN_REQUESTS and len(i) >= MIN_REQUESTS
        fleet.append(Regression(m, "fleet", vb, vi, ratio, ok, len(b), len(i)))
    detected = [r for r in fleet if r.detected]
    if detected:
        return max(detected, key=lambda r: r.ratio or 0.0)
    best: tuple[float, Regression] | None = None
    for m in metrics:
        col = f"{m}_s"
        per_unit: dict[str, tuple[float, float, int, int]] = {}
        for key in units:
            b = rows.base(key)[col].drop_nulls()
            i = rows.inc(key)[col].drop_nulls()
            r50, rp = _ratio(b, i, 0.5), _ratio(b, i, p)
            if len(b) >= MIN_REQUESTS and len(i) >= MIN_REQUESTS and r50 is not None and rp is not None:
                per_unit[key] = (r50, rp, len(b), len(i))
        if len(per_unit) < 2:
            continue
        for key, (r50, rp, nb, ni) in per_unit.items():
            peers = [v for k, v in per_unit.items() if k != key]
            peer50 = float(np.median([v[0] for v in peers]))
            peerp = float(np.median([v[1] for v in peers]))
            stand_out = max(r50 - peer50 if r50 >= _UNIT_P50[0] and r50 - peer50 >= _UNIT_P50[1] else 0.0,
                            rp - peerp if rp >= _UNIT_TAIL[0] and rp - peerp >= _UNIT_TAIL[1] else 0.0)
            if stand_out > 0 and (best is None or stand_out > best[0]):
                u_b = rows.base(key)[col]
                u_i = rows.inc(key)[col]
                best = (stand_out, Regression(m, key, _q(u_b, p), _q(u_i, p), rp, True, nb, ni))
    if best is not None:
        return best[1]
    return max(fleet, key=lambda r: r.ratio or 0.0)


def _by_unit(df: pl.DataFrame) -> dict[str, pl.DataFrame]:
    """The rows of each replica (in their order), split once: filtering per replica is O(replicas x rows)."""
    return {str(k[0]): part for k, part in df.partition_by("unit", as_dict=True, maintain_order=True).items()}


# what the per-replica analysis reads of a request
_UNIT_COLUMNS = ("unit", "start_ns", "ttft_s", "tpot_s", "queue_s", "prefill_s", "prompt_tokens", "output_tokens")


class UnitRows:
    """Each replica's requests, split once (only the columns the per-replica analysis reads), and its
    baseline and incident rows: the same rows, in the same order, as filtering the windows' requests by
    replica, for a fraction of the cost."""

    def __init__(self, reqs: pl.DataFrame, w: Windows) -> None:
        narrow = reqs.select(c for c in _UNIT_COLUMNS if c in reqs.columns)
        self.empty = narrow.clear()
        self._all = _by_unit(narrow)
        self._w = w
        self._base: dict[str, pl.DataFrame] = {}
        self._inc: dict[str, pl.DataFrame] = {}

    def all(self, key: str) -> pl.DataFrame:
        return self._all.get(key, self.empty)

    def base(self, key: str) -> pl.DataFrame:
        b = self._base.get(key)
        if b is None:
            b = self._base[key] = self.all(key).filter((pl.col("start_ns") >= self._w.b0)
                                                       & (pl.col("start_ns") < self._w.b1))
        return b

    def inc(self, key: str) -> pl.DataFrame:
        i = self._inc.get(key)
        if i is None:
            i = self._inc[key] = self.all(key).filter((pl.col("start_ns") >= self._w.i0)
                                                      & (pl.col("start_ns") <= self._w.i1))
        return i


def unit_latency(units: dict[str, Unit], w: Windows, metric: str, rows: UnitRows) -> dict[str, UnitLatency]:
    # the share of the regression a replica carries: the extra latency of its incident requests over its
    # own baseline mean (an exact decomposition of the fleet's extra total latency, negatives clipped)
    extra: dict[str, float] = {}
    for key in units:
        sb = rows.base(key)[metric].drop_nulls()
        si = rows.inc(key)[metric].drop_nulls()
        mb, mi = sb.mean(), si.mean()
        extra[key] = max(0.0, (float(mi) - float(mb)) * len(si)  # type: ignore[arg-type]
                         ) if mb is not None and mi is not None else 0.0
    total_extra = sum(extra.values()) or 1.0
    b_span = max(1e-9, (w.b1 - w.b0) / 1e9)
    i_span = max(1e-9, (w.i1 - w.i0) / 1e9)
    out: dict[str, UnitLatency] = {}
    for key, unit in units.items():
        b = rows.base(key)
        i = rows.inc(key)
        if len(i) == 0:
            continue

        def ratio(col: str, bb: pl.DataFrame = b, ii: pl.DataFrame = i) -> float:
            # the larger of the median's and the tail's change: a slower GPU moves the median, a queue the tail
            rs = [r for r in (_ratio(bb[col], ii[col], 0.5), _ratio(bb[col], ii[col], 0.99)) if r is not None]
            return max(rs) if rs else 1.0

        pf_b = b.select((pl.col("prefill_s") / pl.col("prompt_tokens").clip(lower_bound=1)).alias("v"))["v"]
        pf_i = i.select((pl.col("prefill_s") / pl.col("prompt_tokens").clip(lower_bound=1)).alias("v"))["v"]
        pfb, pfi = _q(pf_b, 0.5), _q(pf_i, 0.5)
        tok_b = float(b["output_tokens"].sum() or 0) / b_span
        tok_i = float(i["output_tokens"].sum() or 0) / i_span
        out[key] = UnitLatency(
            unit, len(b), len(i), ratio("ttft_s"), ratio("tpot_s"),
            _q(b["queue_s"], 0.9) or 0.0, _q(i["queue_s"], 0.9) or 0.0,
            pfi / pfb if pfb and pfi is not None else 1.0,
            (len(i) / i_span) / (len(b) / b_span) if len(b) else 1.0,
            tok_i / tok_b if tok_b else 1.0,
            extra[key] / total_extra, _arrival_step(rows.all(key), w))
    return out


def _arrival_step(ureqs: pl.DataFrame, w: Windows) -> tuple[float, float, int] | None:
    """A clear step up of one replica's arrival rate between the baseline's start and the incident's end."""
    cp = rate_step(ureqs["start_ns"].to_numpy(), w.b0, w.i1)
    if cp is None or cp.score < 4.0 or cp.before <= 0 or cp.after < 1.25 * cp.before:
        return None
    return cp.before, cp.after, cp.onset_ns


class RootCause:
    """The facade: ``RootCause(cursor).why(query)`` returns the DESIGN.md JSON document."""

    def __init__(self, cur: duckdb.DuckDBPyConnection) -> None:
        self.cur = cur

    def why(self, q: WhyQuery) -> dict[str, Any]:
        t_start = time.perf_counter()
        w, reqs, units = resolve_windows(self.cur, q)
        base = reqs.filter((pl.col("start_ns") >= w.b0) & (pl.col("start_ns") < w.b1))
        inc = reqs.filter((pl.col("start_ns") >= w.i0) & (pl.col("start_ns") <= w.i1))
        p = q.percentile
        pct = f"p{round(p * 100):d}"
        rows = UnitRows(reqs, w)
        reg = detect_regression(base, inc, units, ["ttft", "tpot"] if q.metric == "auto" else [q.metric], p, rows)
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
        lat = unit_latency(units, w, f"{metric}_s", rows)
        ev = collect(self.cur, w.b0, w.b1, w.i0, w.i1)
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
