"""Per-minute summaries of the GPU series (``gpu_minutes``), written by the store's writer, read by ``why``.

A 15-minute incident against a 1-hour baseline on 512 GPUs reads ~30M one-second samples; a 24-hour
baseline ~700M. What the attribution needs of them are per-window statistics: medians and MADs of gauges,
maxima, counter deltas, the share of samples with a throttle reason or a link down. Each minute of each
series is summarised once, when the minute is complete:

- ``n`` (values present), ``lo``/``hi`` (min/max: counter deltas and window maxima are exact),
  ``zeros`` (values equal to 0: links down), ``power_n``/``thermal_n`` (clock-event masks with a power or
  thermal reason: throttle shares are exact);
- ``q``: for per-GPU gauges, the minute's values at the quantiles (2j + 1)/16, j = 0..7: eight
  representatives of the minute's distribution. A window's median and MAD are taken over the union of its
  minutes' representatives: each minute stands for its own distribution, the window's quantiles are those
  of the mixture (a close approximation of the exact ones; measured in docs/evaluation.md).

The writer rolls a minute up once the newest sample is ``GRACE_NS`` past its end; samples that arrive
later for a rolled-up minute (an agent's buffered export after an outage) make the writer summarise that
minute again, in the same transaction as their insert. ``meta.gpu_minutes_until_ns`` says up to where the
summaries are complete. Readers take whole minutes inside a window and before that mark from
``gpu_minutes`` and summarise the rest (the window's ragged edges, the newest minutes, a store that was
never rolled up) from ``gpu_samples`` on the fly with the same SQL, so an answer never depends on how far
the roll-up has got, only its speed does.
"""

from __future__ import annotations

import duckdb

from collector.signals import CLOCK_EVENT_REASONS, SIGNALS

MINUTE_NS = 60 * 10**9
GRACE_NS = MINUTE_NS
QUANTILES = tuple((2 * j + 1) / 16 for j in range(8))
WATERMARK_KEY = "gpu_minutes_until_ns"

DDL = """
CREATE TABLE IF NOT EXISTS gpu_minutes (
    minute_ns BIGINT NOT NULL, gpu_id INTEGER NOT NULL, signal_id SMALLINT NOT NULL, sub VARCHAR,
    n INTEGER NOT NULL, lo DOUBLE, hi DOUBLE, zeros INTEGER, power_n INTEGER, thermal_n INTEGER, q FLOAT[8]);
"""

_BIT = {name: bit for bit, name in CLOCK_EVENT_REASONS.items()}
THERMAL_MASK = _BIT["sw_thermal"] | _BIT["hw_thermal"] | _BIT["hw_slowdown"]
POWER_MASK = _BIT["sw_power_cap"] | _BIT["hw_power_brake"]
# signals summarised by their quantiles: the per-GPU gauges (a bitmask has no meaningful quantile)
QUANTILE_SIGNALS = tuple(sorted(s.name for s in SIGNALS.values()
                                if s.kind == "gauge" and s.scope == "gpu" and s.unit != "{bitmask}"))

_QS = "[" + ", ".join(repr(q) for q in QUANTILES) + "]"


def summary_columns(quantile_ids: list[int], reasons_id: int | None) -> str:
    """The aggregates of one minute of one series, in ``gpu_minutes``' column order after its keys (the
    writer's roll-up and the readers' on-the-fly summaries use this one definition). Ids are the store's
    own integers, never user text."""
    qids = ", ".join(str(int(i)) for i in quantile_ids) or "NULL"
    rid = str(int(reasons_id)) if reasons_id is not None else "NULL"
    mask = "(value::BIGINT & {m}) != 0"
    return (
        "count(value)::INTEGER AS n, min(value) AS lo, max(value) AS hi, "
        "count(*) FILTER (WHERE value = 0)::INTEGER AS zeros, "
        f"(count(*) FILTER (WHERE signal_id = {rid} AND {mask.format(m=POWER_MASK)}))::INTEGER AS power_n, "
        f"(count(*) FILTER (WHERE signal_id = {rid} AND {mask.format(m=THERMAL_MASK)}))::INTEGER AS thermal_n, "
        f"(quantile_cont(value, {_QS}) FILTER (WHERE sub IS NULL AND signal_id IN ({qids})))::FLOAT[8] AS q")


def roll_up(cur: duckdb.DuckDBPyConnection, lo_ns: int, hi_ns: int, quantile_ids: list[int],
            reasons_id: int | None, gpu_ids: list[int] | None = None) -> int:
    """(Re)writes the summaries of the minutes in [lo_ns, hi_ns) (of ``gpu_ids``, or every GPU); both ends
    are minute boundaries. Runs inside the caller's transaction. Returns the rows written."""
    gpus = f" AND gpu_id IN ({', '.join(str(int(g)) for g in gpu_ids)})" if gpu_ids else ""
    cur.execute(f"DELETE FROM gpu_minutes WHERE minute_ns >= $lo AND minute_ns < $hi{gpus}", {"lo": lo_ns, "hi": hi_ns})
    row = cur.execute(
        f"INSERT INTO gpu_minutes SELECT time_ns // {MINUTE_NS} * {MINUTE_NS} AS minute_ns, gpu_id, signal_id, sub, "
        f"{summary_columns(quantile_ids, reasons_id)} FROM gpu_samples "
        f"WHERE time_ns >= $lo AND time_ns < $hi{gpus} GROUP BY ALL", {"lo": lo_ns, "hi": hi_ns}).fetchall()
    return int(row[0][0]) if row else 0


def watermark(cur: duckdb.DuckDBPyConnection) -> int | None:
    """Minutes before this time are summarised in ``gpu_minutes`` (None: nothing is)."""
    rows = cur.execute("SELECT value FROM meta WHERE key = ?", [WATERMARK_KEY]).fetchall()
    return int(rows[0][0]) if rows and rows[0][0] is not None else None


def floor_minute(t_ns: int) -> int:
    return t_ns // MINUTE_NS * MINUTE_NS


def ceil_minute(t_ns: int) -> int:
    return -(-t_ns // MINUTE_NS) * MINUTE_NS


def split_window(lo_ns: int, hi_ns: int, until_ns: int | None) -> tuple[tuple[int, int] | None, list[tuple[int, int]]]:
    """[lo_ns, hi_ns) as the whole minutes to read from ``gpu_minutes`` (None: none) and the ranges to
    summarise from ``gpu_samples``."""
    if until_ns is None:
        return None, [(lo_ns, hi_ns)] if hi_ns > lo_ns else []
    r0, r1 = ceil_minute(lo_ns), min(floor_minute(hi_ns), until_ns)
    if r1 <= r0:
        return None, [(lo_ns, hi_ns)] if hi_ns > lo_ns else []
    raw = [(a, b) for a, b in ((lo_ns, r0), (r1, hi_ns)) if b > a]
    return (r0, r1), raw


def window_summaries(until_ns: int | None, windows: list[tuple[int, int]], signal_ids: list[int],
                     quantile_ids: list[int], reasons_id: int | None, sub_is_null: bool = False
                     ) -> tuple[str, dict[str, object]]:
    """SQL of a relation ``(w, gpu_id, signal_id, sub, n, lo, hi, zeros, power_n, thermal_n, q)``: one row per
    minute per series of ``signal_ids`` in each window (``w`` its index; windows are [start, end) and may
    overlap), from ``gpu_minutes`` where complete and from ``gpu_samples`` elsewhere, with bound params."""
    ids = ", ".join(str(int(i)) for i in signal_ids)
    sub = " AND sub IS NULL" if sub_is_null else ""
    cols = "gpu_id, signal_id, sub, n, lo, hi, zeros, power_n, thermal_n, q"
    parts: list[str] = []
    params: dict[str, object] = {}
    for w, (lo, hi) in enumerate(windows):
        rolled, raw = split_window(lo, hi, until_ns)
        if rolled is not None:
            parts.append(f"SELECT {w} AS w, {cols} FROM gpu_minutes WHERE minute_ns >= $r{w}a AND minute_ns < $r{w}b "
                         f"AND signal_id IN ({ids}){sub}")
            params.update({f"r{w}a": rolled[0], f"r{w}b": rolled[1]})
        for k, (a, b) in enumerate(raw):
            parts.append(
                f"SELECT {w} AS w, gpu_id, signal_id, sub, {summary_columns(quantile_ids, reasons_id)} "
                f"FROM gpu_samples WHERE time_ns >= $x{w}_{k}a AND time_ns < $x{w}_{k}b AND signal_id IN ({ids}){sub} "
                f"GROUP BY time_ns // {MINUTE_NS}, gpu_id, signal_id, sub")
            params.update({f"x{w}_{k}a": a, f"x{w}_{k}b": b})
    if not parts:
        return (f"SELECT NULL::INTEGER AS w, {cols} FROM gpu_minutes WHERE false", {})
    return " UNION ALL ".join(parts), params
