"""Per-minute summaries of the GPU, host and engine series and of the placements, and per-hour
representatives of their gauges, written by the store's writer, read by ``why``'s evidence.

A 15-minute incident against a 1-hour baseline on 512 GPUs reads ~30M one-second samples; a 24-hour
baseline ~700M GPU samples, 130M engine samples, 40M host samples. What the attribution needs of them are
per-window statistics: medians and MADs of gauges, maxima, counter deltas, the share of samples with a
throttle reason or a link down, the share of placement snapshots a process is in. Each minute of each
series is summarised once, when the minute is complete (:data:`SUMMARIES`):

- ``gpu_minutes`` (per GPU, signal, sub), ``host_minutes`` (per node, signal, sub), ``engine_minutes``
  (per node, pid, signal): ``n`` (values present), ``lo``/``hi`` (min/max: counter deltas and window
  maxima are exact); GPU series also ``zeros`` (values equal to 0: links down), ``power_n``/``thermal_n``
  (clock-event masks with a power or thermal reason: throttle shares are exact); engine series ``t_lo``/
  ``t_hi`` (first and last sample time: a counter's rate over the window is exact);
- ``q``: for gauges (sub NULL), the minute's values at the quantiles (2j + 1)/16, j = 0..7: eight
  representatives of the minute's distribution. A window's median and MAD are taken over the union of its
  minutes' representatives: each minute stands for its own distribution, the window's quantiles are those
  of the mixture (a close approximation of the exact ones; measured in docs/evaluation.md);
- ``placement_minutes``: per minute and GPU, the placement snapshots (distinct times, ``all_pids``) and
  per pid the snapshots it is in: a process's share of a window's snapshots is exact.

A window of :data:`LONG_WINDOW_NS` or more (a 24-hour baseline: 11,520 representatives per series) takes
its gauges' median and MAD from hour blocks instead (``gpu_hours``, ``host_hours``, ``engine_hours``): a
block of the window's minutes within one clock hour is represented by ``r = max(1, round(16 k / 60))``
values (k: its minutes with representatives) at the quantiles (2j + 1)/(2r) of the union of those minutes'
representatives, so that every value stands for about 3.75 minutes and the union stays unweighted. Whole
hours are stored, the partial hours at a window's edges are made on the fly with the same SQL
(:func:`hour_select`). The approximation this adds is the mixture's quantiles taken once more, per hour:
on the 24-hour, 512-GPU benchmark store the baseline medians and MADs of the GPU gauges moved by at most
0.25 of a z unit (0.02 for power; the most for integer-valued temperatures), and ``why``'s findings were
unchanged; tests/test_evidence_rollups.py holds them within 5 % of a MAD of the minutes' union.

The writer rolls a minute up once the newest sample of its table is ``GRACE_NS`` past its end, and an hour
once its minutes are; samples that arrive later for a rolled-up minute (an agent's buffered export after an
outage) make the writer summarise that minute, and its hour, again, in the same transaction as their
insert. ``meta.<table>_until_ns`` says up to where each summary is complete. Readers take whole minutes
(hours) inside a window and before that mark from the summaries and summarise the rest (the window's
ragged edges, the newest minutes, a store that was never rolled up) from the samples on the fly with the
same SQL, so an answer never depends on how far the roll-up has got, only its speed does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import duckdb

from collector.signals import CLOCK_EVENT_REASONS, ENGINE_SIGNALS, SIGNALS

MINUTE_NS = 60 * 10**9
HOUR_NS = 60 * MINUTE_NS
GRACE_NS = MINUTE_NS
QUANTILES = tuple((2 * j + 1) / 16 for j in range(8))
HOUR_REPS = 16  # representatives of a whole hour (fewer, in proportion, for a part of one)
LONG_WINDOW_NS = 3 * HOUR_NS  # a window this long takes its gauges' median and MAD from hour blocks

DDL = """
CREATE TABLE IF NOT EXISTS gpu_minutes (
    minute_ns BIGINT NOT NULL, gpu_id INTEGER NOT NULL, signal_id SMALLINT NOT NULL, sub VARCHAR,
    n INTEGER NOT NULL, lo DOUBLE, hi DOUBLE, zeros INTEGER, power_n INTEGER, thermal_n INTEGER, q FLOAT[8]);
CREATE TABLE IF NOT EXISTS host_minutes (
    minute_ns BIGINT NOT NULL, node_id INTEGER NOT NULL, signal_id SMALLINT NOT NULL, sub VARCHAR,
    n INTEGER NOT NULL, lo DOUBLE, hi DOUBLE, q FLOAT[8]);
CREATE TABLE IF NOT EXISTS engine_minutes (
    minute_ns BIGINT NOT NULL, node_id INTEGER NOT NULL, pid INTEGER, signal_id SMALLINT NOT NULL,
    n INTEGER NOT NULL, lo DOUBLE, hi DOUBLE, t_lo BIGINT, t_hi BIGINT, q FLOAT[8]);
CREATE TABLE IF NOT EXISTS placement_minutes (
    minute_ns BIGINT NOT NULL, gpu_id INTEGER NOT NULL, pid INTEGER, snaps INTEGER NOT NULL,
    all_pids BOOLEAN NOT NULL);
CREATE TABLE IF NOT EXISTS gpu_hours (
    hour_ns BIGINT NOT NULL, gpu_id INTEGER NOT NULL, signal_id SMALLINT NOT NULL, minutes INTEGER NOT NULL,
    hi DOUBLE, q FLOAT[]);
CREATE TABLE IF NOT EXISTS host_hours (
    hour_ns BIGINT NOT NULL, node_id INTEGER NOT NULL, signal_id SMALLINT NOT NULL, minutes INTEGER NOT NULL,
    hi DOUBLE, q FLOAT[]);
CREATE TABLE IF NOT EXISTS engine_hours (
    hour_ns BIGINT NOT NULL, node_id INTEGER NOT NULL, pid INTEGER, signal_id SMALLINT NOT NULL,
    minutes INTEGER NOT NULL, hi DOUBLE, q FLOAT[]);
"""

_BIT = {name: bit for bit, name in CLOCK_EVENT_REASONS.items()}
THERMAL_MASK = _BIT["sw_thermal"] | _BIT["hw_thermal"] | _BIT["hw_slowdown"]
POWER_MASK = _BIT["sw_power_cap"] | _BIT["hw_power_brake"]
# signals summarised by their quantiles: the gauges (a bitmask has no meaningful quantile)
QUANTILE_SIGNALS = tuple(sorted(s.name for s in SIGNALS.values()
                                if s.kind == "gauge" and s.scope == "gpu" and s.unit != "{bitmask}"))
HOST_QUANTILE_SIGNALS = tuple(sorted(s.name for s in SIGNALS.values() if s.kind == "gauge" and s.scope == "host"))
ENGINE_QUANTILE_SIGNALS = tuple(sorted(s.name for s in ENGINE_SIGNALS.values() if s.kind == "gauge"))


@dataclass(frozen=True, slots=True)
class Summary:
    """One summary table: what it summarises, per which key columns, over which step."""

    table: str
    source: str  # the table summarised (a sample table, or a minute table for an hour table)
    time: str  # the source's time column
    step_ns: int
    keys: tuple[str, ...]  # the series' columns, after the step's start
    scope: str  # the key a late re-roll is restricted to (the GPUs or nodes the late rows are of)
    grouping: str = ""  # GROUP BY clause other than of every key

    @property
    def start(self) -> str:
        return "minute_ns" if self.step_ns == MINUTE_NS else "hour_ns"

    @property
    def watermark_key(self) -> str:
        return f"{self.table}_until_ns"


SUMMARIES: dict[str, Summary] = {s.table: s for s in (
    Summary("gpu_minutes", "gpu_samples", "time_ns", MINUTE_NS, ("gpu_id", "signal_id", "sub"), "gpu_id"),
    Summary("host_minutes", "host_samples", "time_ns", MINUTE_NS, ("node_id", "signal_id", "sub"), "node_id"),
    Summary("engine_minutes", "engine_samples", "time_ns", MINUTE_NS, ("node_id", "pid", "signal_id"), "node_id"),
    Summary("placement_minutes", "placements", "time_ns", MINUTE_NS, ("gpu_id", "pid"), "gpu_id",
            "GROUP BY GROUPING SETS ((minute_ns, gpu_id), (minute_ns, gpu_id, pid))"),
    Summary("gpu_hours", "gpu_minutes", "minute_ns", HOUR_NS, ("gpu_id", "signal_id"), "gpu_id"),
    Summary("host_hours", "host_minutes", "minute_ns", HOUR_NS, ("node_id", "signal_id"), "node_id"),
    Summary("engine_hours", "engine_minutes", "minute_ns", HOUR_NS, ("node_id", "pid", "signal_id"), "node_id"),
)}
# the summaries of each sample table, in the order they are made (an hour table after its minutes)
CHAINS: dict[str, tuple[str, ...]] = {
    "gpu_samples": ("gpu_minutes", "gpu_hours"), "host_samples": ("host_minutes", "host_hours"),
    "engine_samples": ("engine_minutes", "engine_hours"), "placements": ("placement_minutes",)}
WATERMARK_KEY = SUMMARIES["gpu_minutes"].watermark_key  # the GPU minutes' (the first summary kept)
HOURS_OF = {"gpu_minutes": "gpu_hours", "host_minutes": "host_hours", "engine_minutes": "engine_hours"}
TABLES = tuple(SUMMARIES)

_QS = "[" + ", ".join(repr(q) for q in QUANTILES) + "]"


def _ids(sig: Mapping[str, int], names: tuple[str, ...]) -> str:
    return ", ".join(str(int(sig[n])) for n in names if n in sig) or "NULL"  # the store's integers


def _q(ids: str, sub: bool = True) -> str:
    cond = f"sub IS NULL AND signal_id IN ({ids})" if sub else f"signal_id IN ({ids})"
    return f"(quantile_cont(value, {_QS}) FILTER (WHERE {cond}))::FLOAT[8] AS q"


def summary_columns(quantile_ids: list[int], reasons_id: int | None) -> str:
    """The aggregates of one minute of one GPU series, in ``gpu_minutes``' column order after its keys."""
    qids = ", ".join(str(int(i)) for i in quantile_ids) or "NULL"
    rid = str(int(reasons_id)) if reasons_id is not None else "NULL"
    mask = "(value::BIGINT & {m}) != 0"
    return (
        "count(value)::INTEGER AS n, min(value) AS lo, max(value) AS hi, "
        "count(*) FILTER (WHERE value = 0)::INTEGER AS zeros, "
        f"(count(*) FILTER (WHERE signal_id = {rid} AND {mask.format(m=POWER_MASK)}))::INTEGER AS power_n, "
        f"(count(*) FILTER (WHERE signal_id = {rid} AND {mask.format(m=THERMAL_MASK)}))::INTEGER AS thermal_n, "
        f"{_q(qids)}")


def columns(table: str, sig: Mapping[str, int]) -> str:
    """The aggregates of one step of one series of ``table``, in its column order after its keys (the
    writer's roll-up and the readers' on-the-fly summaries use this one definition). ``sig``: the store's
    signal ids by name."""
    if table == "gpu_minutes":
        return summary_columns([sig[n] for n in QUANTILE_SIGNALS if n in sig], sig.get("clock_event_reasons"))
    if table == "host_minutes":
        return f"count(value)::INTEGER AS n, min(value) AS lo, max(value) AS hi, {_q(_ids(sig, HOST_QUANTILE_SIGNALS))}"
    if table == "engine_minutes":
        return ("count(value)::INTEGER AS n, min(value) AS lo, max(value) AS hi, min(time_ns) AS t_lo, "
                f"max(time_ns) AS t_hi, {_q(_ids(sig, ENGINE_QUANTILE_SIGNALS), sub=False)}")
    if table == "placement_minutes":
        return "count(DISTINCT time_ns)::INTEGER AS snaps, grouping(pid) = 1 AS all_pids"
    raise KeyError(table)


def _reps(values: str, r: str) -> str:
    """``r`` values at the quantiles (2j + 1)/(2r) of the sorted list ``values``, interpolated as
    ``quantile_cont`` interpolates."""
    pos = f"((2 * j + 1) / (2 * {r}) * (len({values}) - 1))"
    at = f"{values}[1 + floor({pos})::INTEGER]"
    nxt = f"{values}[least(2 + floor({pos})::INTEGER, len({values}))]"
    return f"list_transform(range({r}), lambda j: {at} + ({pos} - floor({pos})) * ({nxt} - {at}))::FLOAT[]"


def hour_select(source: str, keys: tuple[str, ...], where: str = "true", extra: str = "") -> str:
    """Hour blocks of per-minute rows ``source`` (columns ``minute_ns``, ``keys``, ``hi``, ``q``): per clock
    hour and series, the minutes with representatives, their maximum and the block's representatives (see
    the module's docstring). ``extra``: columns carried through (grouped by)."""
    k = ", ".join((*([extra] if extra else []), *keys))
    r = f"greatest(1, round({HOUR_REPS} * minutes / 60))::INTEGER"
    return (
        f"SELECT hour_ns, {k}, minutes, hi, {_reps('l', r)} AS q "
        f"FROM (SELECT minute_ns // {HOUR_NS} * {HOUR_NS} AS hour_ns, {k}, count(*)::INTEGER AS minutes, "
        f"max(hi) AS hi, list_sort(flatten(list(q))) AS l FROM {source} WHERE q IS NOT NULL AND ({where}) "
        f"GROUP BY ALL)")


def _select(s: Summary, sig: Mapping[str, int], where: str, extra: str = "") -> str:
    """The summaries of the source's rows that satisfy ``where``, one per step and series, in the summary
    table's column order (after ``extra``, a constant column, when given)."""
    if s.step_ns == HOUR_NS:
        return hour_select(s.source, s.keys, where)
    first = f"{extra}, " if extra else ""
    return (f"SELECT {first}{s.time} // {MINUTE_NS} * {MINUTE_NS} AS minute_ns, {', '.join(s.keys)}, "
            f"{columns(s.table, sig)} FROM {s.source} WHERE {where} {s.grouping or 'GROUP BY ALL'}")


def signal_ids(cur: duckdb.DuckDBPyConnection) -> dict[str, int]:
    """The store's signal ids by name: the ``sig`` every function here takes."""
    return {str(n): int(i) for n, i in cur.execute("SELECT name, signal_id FROM signals").fetchall()}


def roll_up(cur: duckdb.DuckDBPyConnection, table: str, lo_ns: int, hi_ns: int, sig: Mapping[str, int],
            scope_ids: list[int] | None = None, clear: Literal["range", "onward", "none"] = "range") -> int:
    """(Re)writes the summaries in ``table`` of the steps in [lo_ns, hi_ns) (of the GPUs or nodes
    ``scope_ids``, or all); both ends are step boundaries. ``clear``: the summaries deleted first, those of
    the range, every one from ``lo_ns`` on, or none (the caller knows there are none). Runs inside the
    caller's transaction. Returns the rows written."""
    s = SUMMARIES[table]
    scope = f" AND {s.scope} IN ({', '.join(str(int(g)) for g in scope_ids)})" if scope_ids else ""
    if clear == "range":
        cur.execute(f"DELETE FROM {table} WHERE {s.start} >= $lo AND {s.start} < $hi{scope}",
                    {"lo": lo_ns, "hi": hi_ns})
    elif clear == "onward":
        cur.execute(f"DELETE FROM {table} WHERE {s.start} >= $lo{scope}", {"lo": lo_ns})
    row = cur.execute(f"INSERT INTO {table} {_select(s, sig, f'{s.time} >= $lo AND {s.time} < $hi{scope}')}",
                      {"lo": lo_ns, "hi": hi_ns}).fetchall()
    return int(row[0][0]) if row else 0


def set_meta(cur: duckdb.DuckDBPyConnection, key: str, value: str) -> None:
    """``meta[key] = value`` (a watermark): an UPDATE, ~4x cheaper than INSERT OR REPLACE on the key's index,
    and an INSERT the first time."""
    row = cur.execute("UPDATE meta SET value = ? WHERE key = ?", [value, key]).fetchone()
    if not row or not row[0]:
        cur.execute("INSERT INTO meta VALUES (?, ?)", [key, value])


def set_metas(cur: duckdb.DuckDBPyConnection, values: Mapping[str, str]) -> None:
    """``meta[key] = value`` for each of ``values`` in one UPDATE (each statement costs ~1 ms whatever it
    changes), and an INSERT of each key not there yet."""
    if len(values) <= 1:
        for key, value in values.items():
            set_meta(cur, key, value)
        return
    keys = list(values)
    cases = " ".join("WHEN ? THEN ?" for _ in keys)
    row = cur.execute(f"UPDATE meta SET value = CASE key {cases} END WHERE key IN ({', '.join('?' for _ in keys)})",
                      [*(x for k in keys for x in (k, values[k])), *keys]).fetchone()
    if row and row[0] == len(keys):
        return
    there = {str(r[0]) for r in cur.execute(f"SELECT key FROM meta WHERE key IN ({', '.join('?' for _ in keys)})",
                                            keys).fetchall()}
    for key in keys:
        if key not in there:
            cur.execute("INSERT INTO meta VALUES (?, ?)", [key, values[key]])


def watermark(cur: duckdb.DuckDBPyConnection, table: str = "gpu_minutes") -> int | None:
    """Steps before this time are summarised in ``table`` (None: nothing is)."""
    rows = cur.execute("SELECT value FROM meta WHERE key = ?", [SUMMARIES[table].watermark_key]).fetchall()
    return int(rows[0][0]) if rows and rows[0][0] is not None else None


def floor_to(t_ns: int, step_ns: int) -> int:
    return t_ns // step_ns * step_ns


def ceil_to(t_ns: int, step_ns: int) -> int:
    return -(-t_ns // step_ns) * step_ns


def floor_minute(t_ns: int) -> int:
    return floor_to(t_ns, MINUTE_NS)


def split_window(lo_ns: int, hi_ns: int, until_ns: int | None, step_ns: int = MINUTE_NS
                 ) -> tuple[tuple[int, int] | None, list[tuple[int, int]]]:
    """[lo_ns, hi_ns) as the whole steps to read from a summary complete before ``until_ns`` (None: none) and
    the ranges to summarise on the fly (the GPU, host and engine summaries' and the requests')."""
    if until_ns is None:
        return None, [(lo_ns, hi_ns)] if hi_ns > lo_ns else []
    r0, r1 = ceil_to(lo_ns, step_ns), min(floor_to(hi_ns, step_ns), floor_to(until_ns, step_ns))
    if r1 <= r0:
        return None, [(lo_ns, hi_ns)] if hi_ns > lo_ns else []
    return (r0, r1), [(a, b) for a, b in ((lo_ns, r0), (r1, hi_ns)) if b > a]


def range_summaries(cur: duckdb.DuckDBPyConnection, table: str, ranges: list[tuple[int, int, int]],
                    sig: Mapping[str, int], where: str = "true", prefix: str = "") -> tuple[str, dict[str, object]]:
    """SQL of a relation ``(w, minute_ns, <keys>, <aggregates>)`` of minute table ``table``: one row per
    minute per series whose rows satisfy ``where`` (on key columns only) in each range ``(w, start, end)``
    (``w`` its window's index; [start, end), they may overlap), from the summaries where complete and from
    the samples elsewhere, with bound params (named after ``prefix`` and the table)."""
    s = SUMMARIES[table]
    until = watermark(cur, table)
    parts: list[str] = []
    params: dict[str, object] = {}
    for i, (w, lo, hi) in enumerate(ranges):
        p = f"{prefix}{table}{i}"
        rolled, raw = split_window(lo, hi, until)
        if rolled is not None:
            parts.append(f"SELECT {int(w)} AS w, * FROM {table} WHERE minute_ns >= ${p}a AND minute_ns < ${p}b "
                         f"AND ({where})")
            params.update({f"{p}a": rolled[0], f"{p}b": rolled[1]})
        for k, (a, b) in enumerate(raw):
            parts.append(_select(s, sig, f"time_ns >= ${p}_{k}a AND time_ns < ${p}_{k}b AND ({where})",
                                 extra=f"{int(w)} AS w"))
            params.update({f"{p}_{k}a": a, f"{p}_{k}b": b})
    if not parts:  # (from the samples: a store opened read-only may be older than the summary table)
        return _select(s, sig, "false", extra="NULL::INTEGER AS w"), {}
    return " UNION ALL ".join(f"({x})" for x in parts), params


def window_summaries(cur: duckdb.DuckDBPyConnection, table: str, windows: list[tuple[int, int]],
                     sig: Mapping[str, int], where: str = "true") -> tuple[str, dict[str, object]]:
    """:func:`range_summaries` of one range per window, ``w`` its index in ``windows``."""
    return range_summaries(cur, table, [(w, lo, hi) for w, (lo, hi) in enumerate(windows)], sig, where)


def gauge_blocks(cur: duckdb.DuckDBPyConnection, table: str, windows: list[tuple[int, int]],
                 sig: Mapping[str, int], where: str = "true") -> tuple[str, dict[str, object]]:
    """SQL of a relation ``(w, <keys of the hour table>, hi, q)`` whose ``q`` in each window are
    representatives of equal weight of the gauges (``sub`` NULL) of minute table ``table``: the minutes'
    own in a window shorter than :data:`LONG_WINDOW_NS`, hour blocks' in a longer one (whole hours from the
    hour table where complete, see the module's docstring). A series' median and MAD in a window are those
    of the union of its ``q``; the maximum of its ``hi`` is exact. ``where``: on the hour table's keys."""
    hs = SUMMARIES[HOURS_OF[table]]
    keys = ", ".join(hs.keys)
    # only a series without a sub has representatives
    mwhere = f"({where}) AND sub IS NULL" if "sub" in SUMMARIES[table].keys else where
    short = [(w, lo, hi) for w, (lo, hi) in enumerate(windows) if hi - lo < LONG_WINDOW_NS]
    src, params = range_summaries(cur, table, short, sig, mwhere)
    parts = [f"SELECT w, {keys}, hi, q::FLOAT[] AS q FROM ({src}) WHERE q IS NOT NULL"]
    until = watermark(cur, hs.table)
    for w, (lo, hi) in enumerate(windows):
        if hi - lo < LONG_WINDOW_NS:
            continue
        rolled, edges = split_window(lo, hi, until, HOUR_NS)
        if rolled is not None:
            p = f"{hs.table}{w}"
            parts.append(f"SELECT {w} AS w, {keys}, hi, q FROM {hs.table} WHERE hour_ns >= ${p}a AND hour_ns < ${p}b "
                         f"AND ({where})")
            params.update({f"{p}a": rolled[0], f"{p}b": rolled[1]})
        if edges:
            # the rest of the window (its partial hours, hours not yet summarised) in blocks of a clock hour
            esrc, ep = range_summaries(cur, table, [(w, a, b) for a, b in edges], sig, mwhere, prefix=f"e{w}")
            params.update(ep)
            parts.append(f"SELECT w, {keys}, hi, q FROM ({hour_select(f'({esrc})', hs.keys, extra='w')})")
    return " UNION ALL ".join(f"({x})" for x in parts), params
