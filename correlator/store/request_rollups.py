"""Summaries of the requests for long windows (``request_minutes``, ``request_bins``), written by the store's
writer, read by ``why`` when a window spans more than :data:`LONG_WINDOW_NS`.

A 24-hour baseline at 1k requests/s is 86M requests: their exact percentiles per replica cost tens of
seconds and gigabytes of sort memory. What ``why`` needs of a long window is mergeable:

- ``request_minutes``: per minute and join key (service, model and the replica's key columns), the count
  of requests, of TTFTs and TPOTs, their sums, the output tokens, and the latest end (a replay "as of" a
  time uses only minutes whose requests had all ended by then). Counts, means and arrivals are exact.
- ``request_bins``: per hour and join key, how many TTFT, TPOT, queue, prefill-per-token and end-to-end
  values fell in each logarithmic bin, :data:`BINS_PER_E` bins per factor e: bin ``round(ln(x) * 100)``, so that a bin's
  centre ``exp(bin / 100)`` is within 0.5 % of every value in it, and zero a bin of its own. A window's
  percentile is read off the merged counts, interpolated between the bins' centres as ``quantile_cont``
  interpolates between values: within 0.5 % of the exact one.

The writer rolls an hour up once the newest request started :data:`GRACE_NS` after its end (a request is
written when it ends); requests that arrive later for a rolled-up hour make the writer summarise that hour
again in the same transaction. ``meta.request_minutes_until_ns`` says up to where both are complete.
Readers take whole minutes (whole hours for bins) before that mark from the summaries and summarise the
rest from ``requests`` on the fly with the same SQL, so an answer never depends on how far the roll-up has
got. Whether a window is read through bins depends only on its length, never on the roll-up.

End-to-end bins came later (``meta.request_bins_e2e``): a store whose hours were summarised without them
gets them for every summarised hour when it is next opened for writing (:func:`add_e2e_bins`); until then,
and in a store opened read-only, readers scan e2e exactly (:func:`has_e2e_bins`).
"""

from __future__ import annotations

import duckdb
import numpy as np

from correlator.store.rollups import HOUR_NS, MINUTE_NS

GRACE_NS = 10 * MINUTE_NS
LONG_WINDOW_NS = 3 * HOUR_NS  # a window longer than this has its percentiles read off the bins
WATERMARK_KEY = "request_minutes_until_ns"
BINS_PER_E = 100
ZERO_BIN = -32768  # a value of exactly 0 (a queue time, often); negatives and NaN are in no bin
KEYS = ("service", "model", "node_id", "pid", "container_id", "pod_uid", "pod", "gpu_uuids")
# the binned metrics, by their number in ``request_bins.metric``
PREFILL_PER_TOKEN = "prefill_s / CASE WHEN prompt_tokens < 1 THEN 1 ELSE prompt_tokens END"
METRICS: dict[str, int] = {"ttft_s": 0, "tpot_s": 1, "queue_s": 2, "prefill_per_token_s": 3, "e2e_s": 4}
_METRIC_SQL = ("ttft_s", "tpot_s", "queue_s", PREFILL_PER_TOKEN, "e2e_s")
E2E = METRICS["e2e_s"]
E2E_KEY = "request_bins_e2e"  # in meta once every summarised hour has its e2e bins

_KEY_DDL = ("service VARCHAR, model VARCHAR, node_id INTEGER NOT NULL, pid INTEGER, container_id VARCHAR, "
            "pod_uid VARCHAR, pod VARCHAR, gpu_uuids VARCHAR")
DDL = f"""
CREATE TABLE IF NOT EXISTS request_minutes (
    minute_ns BIGINT NOT NULL, {_KEY_DDL}, n INTEGER NOT NULL, n_ttft INTEGER NOT NULL, sum_ttft DOUBLE,
    n_tpot INTEGER NOT NULL, sum_tpot DOUBLE, output_tokens BIGINT, max_end_ns BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS request_bins (
    hour_ns BIGINT NOT NULL, {_KEY_DDL}, metric UTINYINT NOT NULL, bin SMALLINT NOT NULL, n INTEGER NOT NULL);
"""
TABLES = ("request_minutes", "request_bins")
_KEYS = ", ".join(KEYS)

# the mergeable aggregates of a set of requests, in ``request_minutes``' column order after its keys
SUMS = ("count(*)::INTEGER AS n, count(ttft_s)::INTEGER AS n_ttft, sum(ttft_s) AS sum_ttft, "
        "count(tpot_s)::INTEGER AS n_tpot, sum(tpot_s) AS sum_tpot, sum(output_tokens)::BIGINT AS output_tokens")
SCALARS = f"{SUMS}, max(end_ns) AS max_end_ns"


def bin_sql(x: str) -> str:
    """The bin of the SQL expression ``x`` (NULL for a negative value, NaN or NULL)."""
    return (f"CASE WHEN {x} > 0 AND {x} < 'inf'::DOUBLE THEN greatest(-32000, least(32000, round(ln({x}) * "
            f"{BINS_PER_E})))::SMALLINT WHEN {x} = 0 THEN ({ZERO_BIN})::SMALLINT END")


def binned(source: str, key: str = _KEYS, metrics: tuple[int, ...] = tuple(range(len(_METRIC_SQL)))) -> str:
    """SQL: (``key`` columns, metric, bin) of the latencies ``metrics`` (their numbers: every one, as the
    writer keeps them, or those a reader needs of a window's raw edge) of the rows of ``source`` (a FROM
    clause), one row per value that has a bin."""
    ms = sorted(set(metrics))
    bins = ", ".join(bin_sql(_METRIC_SQL[m]) for m in ms)
    return (f"SELECT * FROM (SELECT {key}, unnest([{', '.join(str(int(m)) for m in ms)}]) AS metric, "
            f"unnest([{bins}]) AS bin FROM {source}) WHERE bin IS NOT NULL")


def roll_up(cur: duckdb.DuckDBPyConnection, lo_ns: int, hi_ns: int) -> None:
    """(Re)write the summaries of the requests that started in [lo_ns, hi_ns) (whole hours)."""
    p = {"lo": lo_ns, "hi": hi_ns}
    for t, col in (("request_minutes", "minute_ns"), ("request_bins", "hour_ns")):
        cur.execute(f"DELETE FROM {t} WHERE {col} >= $lo AND {col} < $hi", p)
    src = "requests WHERE start_ns >= $lo AND start_ns < $hi"
    cur.execute(f"INSERT INTO request_minutes SELECT start_ns // {MINUTE_NS} * {MINUTE_NS} AS minute_ns, {_KEYS}, "
                f"{SCALARS} FROM {src} GROUP BY ALL", p)
    cur.execute(f"INSERT INTO request_bins SELECT hour_ns, {_KEYS}, metric, bin, count(*)::INTEGER FROM ("
                + binned(f"(SELECT start_ns // {HOUR_NS} * {HOUR_NS} AS hour_ns, * FROM {src})",
                         f"hour_ns, {_KEYS}") + ") GROUP BY ALL", p)


def has_e2e_bins(cur: duckdb.DuckDBPyConnection) -> bool:
    """Whether every summarised hour has its end-to-end bins (a store summarised before they were kept has
    them once opened for writing)."""
    return bool(cur.execute("SELECT 1 FROM meta WHERE key = ?", [E2E_KEY]).fetchall())


def add_e2e_bins(cur: duckdb.DuckDBPyConnection) -> None:
    """The end-to-end bins of every hour already summarised (one scan of its requests), and the mark that
    they are there; a store with nothing summarised yet just gets the mark. Runs in the caller's transaction."""
    until = watermark(cur)
    if until is not None:
        src = f"requests WHERE start_ns < {int(until)}"
        cur.execute(f"DELETE FROM request_bins WHERE metric = {E2E}")
        cur.execute(f"INSERT INTO request_bins SELECT hour_ns, {_KEYS}, metric, bin, count(*)::INTEGER FROM ("
                    + binned(f"(SELECT start_ns // {HOUR_NS} * {HOUR_NS} AS hour_ns, * FROM {src})",
                             f"hour_ns, {_KEYS}", (E2E,)) + ") GROUP BY ALL")
    cur.execute("INSERT INTO meta VALUES (?, '1')", [E2E_KEY])


def watermark(cur: duckdb.DuckDBPyConnection) -> int | None:
    """Requests that started before this time are summarised (None: none are)."""
    row = cur.execute("SELECT value FROM meta WHERE key = ?", [WATERMARK_KEY]).fetchall()
    return int(row[0][0]) if row else None


def summarised_until(cur: duckdb.DuckDBPyConnection, known_by_ns: int | None) -> int | None:
    """Up to where the summaries may stand for the requests: the watermark, and, for an answer as known at
    ``known_by_ns``, the first minute with a request that ended after it."""
    until = watermark(cur)
    if until is None or known_by_ns is None:
        return until
    row = cur.execute("SELECT min(minute_ns) FROM request_minutes WHERE max_end_ns > $k AND minute_ns < $u",
                      {"k": known_by_ns, "u": until}).fetchall()
    first_unknown = row[0][0] if row else None
    return until if first_unknown is None else min(until, int(first_unknown))


def quantiles_from_bins(group: np.ndarray, bins: np.ndarray, counts: np.ndarray, qs: list[float]
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Per group (rows sorted by group, then bin): the unique groups and their ``qs`` quantiles (groups x qs),
    interpolated between the centres of the bins holding the neighbouring ranks, as ``quantile_cont``
    interpolates between values."""
    if len(group) == 0:
        return group[:0], np.empty((0, len(qs)))
    starts = np.r_[0, np.flatnonzero(group[1:] != group[:-1]) + 1]
    ends = np.r_[starts[1:], len(group)]
    centre = np.where(bins == ZERO_BIN, 0.0, np.exp(bins.astype(np.float64) / BINS_PER_E))
    cum = np.cumsum(counts.astype(np.int64))
    base = np.r_[0, cum[:-1]][starts]  # values before each group
    total = cum[ends - 1] - base
    out = np.empty((len(starts), len(qs)))
    for j, q in enumerate(qs):
        r = q * (total - 1).astype(np.float64)
        lo = np.floor(r).astype(np.int64)
        hi = np.minimum(lo + 1, total - 1)
        # the row holding rank k of a group: the first whose cumulative count passes base + k
        i_lo = np.searchsorted(cum, base + lo, side="right")
        i_hi = np.searchsorted(cum, base + hi, side="right")
        v_lo, v_hi = centre[i_lo], centre[i_hi]
        out[:, j] = v_lo + (r - lo) * (v_hi - v_lo)
    return group[starts], out
