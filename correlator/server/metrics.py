"""The correlator's ``/metrics``: request latency histograms built from the stored spans, the findings,
and the ingest counters.

``stacklens_request_ttft_seconds`` and ``stacklens_request_tpot_seconds`` are histograms by ``model``,
``node`` and ``gpu``, where ``gpu`` names the GPUs of the replica that served the request (their
indices, comma-separated under tensor parallelism, e.g. ``"0,1"``; a GPU's uuid where its index is
unknown; empty when the node's GPUs are unknown). A request counts once, so ``sum by (model)`` is
exact; a single GPU's requests are ``gpu=~"(.*,)?3(,.*)?"``.

The counts are those of every request in the database, computed at scrape time by one aggregate query
over ``requests`` (a few ms per 100k requests). The database only grows while ``serve`` runs and
outlives restarts, so the series are monotone counters across restarts too; a ``--retention`` prune
at start lowers them once, which Prometheus reads as a counter reset.

``stacklens_findings`` counts the stored findings by cause, sub-cause and culprit, and
``stacklens_finding_onset_seconds`` gives the start of the incident window of the newest of them (the
dashboards draw it as an annotation).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import duckdb
import polars as pl

from collector.export.prometheus import format_value, label_text
from correlator.analysis.requests import data_extent, resolve_units

# bucket upper bounds (seconds): sub-second TTFT resolved finely around the usual SLOs (0.2 s, 0.5 s, 1 s)
TTFT_BUCKETS: tuple[float, ...] = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0,
                                   5.0, 10.0)
# TPOT (time per output token after the first) lives between ~5 ms and a few hundred ms
TPOT_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
                                   0.3, 0.5, 1.0)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_KEY_COLUMNS = ("node_id", "node", "pid", "container_id", "pod_uid", "pod", "gpu_uuids")


@dataclass(slots=True)
class IngestCounters:
    """What the receivers and the store writer counted (rendered as the ``stacklens_ingest_*`` and
    ``stacklens_store_*`` counters)."""

    by_status: Mapping[int, int] = field(default_factory=dict)
    rows: int = 0
    transactions: int = 0
    failed_transactions: int = 0
    spooled_exports: int = 0
    rejected_exports: int = 0
    unspooled_exports: int = 0
    pending_rows: int = 0


@dataclass(slots=True)
class _Histogram:
    buckets: list[int]
    count: int = 0
    total: float = 0.0

    def add(self, buckets: Sequence[int], count: int, total: float) -> None:
        for i, n in enumerate(buckets):
            self.buckets[i] += n
        self.count += count
        self.total += total


def _aggregate_sql(column: str, bounds: Sequence[float], prefix: str) -> list[str]:
    finite = f"{column} IS NOT NULL AND isfinite({column})"
    cols = [f"count(*) FILTER (WHERE {finite} AND {column} <= {b!r}) AS {prefix}_{i}" for i, b in enumerate(bounds)]
    cols.append(f"count(*) FILTER (WHERE {finite}) AS {prefix}_count")
    cols.append(f"coalesce(sum({column}) FILTER (WHERE {finite}), 0) AS {prefix}_sum")
    return cols


def _gpulabel_text(cur: duckdb.DuckDBPyConnection, groups: pl.DataFrame) -> dict[tuple[object, ...], str]:
    """The ``gpu`` label of each replica key, resolved as the analysis resolves a request's GPUs."""
    keys = groups.select(_KEY_COLUMNS).unique()
    extent = data_extent(cur)
    if keys.is_empty() or extent is None:
        return {}
    joined, units = resolve_units(cur, keys, extent[0], extent[1])
    names: dict[int, str] = {}
    for gpu_id, index, uuid in cur.execute("SELECT gpu_id, gpu_index, uuid FROM gpus").fetchall():
        names[int(gpu_id)] = str(index) if index is not None else str(uuid)
    out: dict[tuple[object, ...], str] = {}
    for row in joined.iter_rows(named=True):
        unit = units.get(row["unit"]) if row["unit"] is not None else None
        out[tuple(row[c] for c in _KEY_COLUMNS)] = ",".join(names[g] for g in unit.gpu_ids) if unit else ""
    return out


def _request_histograms(cur: duckdb.DuckDBPyConnection) -> dict[str, dict[tuple[str, str, str], _Histogram]]:
    aggregates = [*_aggregate_sql("r.ttft_s", TTFT_BUCKETS, "ttft"), *_aggregate_sql("r.tpot_s", TPOT_BUCKETS, "tpot")]
    sql = (f"SELECT coalesce(r.model, '') AS model, {', '.join('r.' + c for c in _KEY_COLUMNS if c != 'node')}, "
           f"n.name AS node, {', '.join(aggregates)} "
           "FROM requests r JOIN nodes n USING (node_id) GROUP BY ALL")
    groups: pl.DataFrame = pl.from_arrow(cur.sql(sql).to_arrow_table())  # type: ignore[assignment]
    out: dict[str, dict[tuple[str, str, str], _Histogram]] = {"ttft": {}, "tpot": {}}
    if groups.is_empty():
        return out
    gpu_of = _gpulabel_text(cur, groups)
    bounds = {"ttft": TTFT_BUCKETS, "tpot": TPOT_BUCKETS}
    for row in groups.iter_rows(named=True):
        labels = (str(row["model"]), str(row["node"]), gpu_of.get(tuple(row[c] for c in _KEY_COLUMNS), ""))
        for metric, hists in out.items():
            n = len(bounds[metric])
            h = hists.setdefault(labels, _Histogram([0] * n))
            h.add([int(row[f"{metric}_{i}"]) for i in range(n)], int(row[f"{metric}_count"]),
                  float(row[f"{metric}_sum"]))
    return out


def _render_histogram(lines: list[str], name: str, doc: str, bounds: Sequence[float],
                      hists: Mapping[tuple[str, str, str], _Histogram]) -> None:
    lines += [f"# HELP {name} {doc}", f"# TYPE {name} histogram"]
    for (model, node, gpu), h in sorted(hists.items()):
        base = label_text((("model", model), ("node", node), ("gpu", gpu)))
        for b, n in zip(bounds, h.buckets, strict=True):
            lines.append(f'{name}_bucket{{{base},le="{format_value(b)}"}} {n}')
        lines.append(f'{name}_bucket{{{base},le="+Inf"}} {h.count}')
        lines.append(f"{name}_sum{{{base}}} {format_value(h.total)}")
        lines.append(f"{name}_count{{{base}}} {h.count}")


def _render_findings(lines: list[str], cur: duckdb.DuckDBPyConnection) -> None:
    rows = cur.execute(
        "SELECT f.cause, coalesce(f.subcause, ''), coalesce(f.node, ''), "
        "coalesce(CAST(g.gpu_index AS VARCHAR), f.gpu_uuid, ''), coalesce(f.gpu_uuid, ''), count(*), "
        "max(coalesce(f.window_start_ns, f.created_ns)) "
        "FROM findings f LEFT JOIN gpus g ON g.uuid = f.gpu_uuid GROUP BY ALL ORDER BY ALL").fetchall()
    lines += ["# HELP stacklens_findings Findings stored by the correlator, by cause and culprit.",
              "# TYPE stacklens_findings gauge"]
    onsets: list[str] = []
    for cause, sub, node, gpu, uuid, n, onset_ns in rows:
        labels = label_text((("cause", cause), ("sub_cause", sub), ("node", node), ("gpu", gpu), ("UUID", uuid)))
        lines.append(f"stacklens_findings{{{labels}}} {int(n)}")
        onsets.append(f"stacklens_finding_onset_seconds{{{labels}}} {format_value(int(onset_ns) / 1e9)}")
    lines += ["# HELP stacklens_finding_onset_seconds Start of the incident window of the newest finding "
              "(Unix seconds).", "# TYPE stacklens_finding_onset_seconds gauge", *onsets]


def _render_ingest(lines: list[str], c: IngestCounters) -> None:
    lines += [
        "# HELP stacklens_ingest_requests_total OTLP export requests, by result.",
        "# TYPE stacklens_ingest_requests_total counter",
        *(f'stacklens_ingest_requests_total{{code="{code}"}} {n}' for code, n in sorted(c.by_status.items())),
        "# HELP stacklens_ingest_rows_total Rows committed to the store.",
        "# TYPE stacklens_ingest_rows_total counter",
        f"stacklens_ingest_rows_total {c.rows}",
        "# HELP stacklens_store_transactions_total Store commits (group commit: several exports each).",
        "# TYPE stacklens_store_transactions_total counter",
        f"stacklens_store_transactions_total {c.transactions}",
        "# HELP stacklens_store_failed_transactions_total Store commits that failed (exports answered 503).",
        "# TYPE stacklens_store_failed_transactions_total counter",
        f"stacklens_store_failed_transactions_total {c.failed_transactions}",
        "# HELP stacklens_store_spooled_exports_total Exports acknowledged once on the spool, committed later.",
        "# TYPE stacklens_store_spooled_exports_total counter",
        f"stacklens_store_spooled_exports_total {c.spooled_exports}",
        "# HELP stacklens_store_rejected_exports_total Acknowledged exports DuckDB refused even alone, kept in the "
        "spool's rejected/ folder (alert on any).",
        "# TYPE stacklens_store_rejected_exports_total counter",
        f"stacklens_store_rejected_exports_total {c.rejected_exports}",
        "# HELP stacklens_store_unspooled_exports_total Small exports acknowledged on their commits because the "
        "spool could not be written.",
        "# TYPE stacklens_store_unspooled_exports_total counter",
        f"stacklens_store_unspooled_exports_total {c.unspooled_exports}",
        "# HELP stacklens_store_pending_rows Rows queued for the store's writer, not yet committed.",
        "# TYPE stacklens_store_pending_rows gauge",
        f"stacklens_store_pending_rows {c.pending_rows}",
    ]


def render_metrics(cur: duckdb.DuckDBPyConnection, counters: IngestCounters | None = None) -> str:
    """The whole exposition (text format 0.0.4) from one reader cursor."""
    lines: list[str] = []
    hists = _request_histograms(cur)
    _render_histogram(lines, "stacklens_request_ttft_seconds",
                      "Time to first token of the stored requests, by model, node and the GPUs of their replica.",
                      TTFT_BUCKETS, hists["ttft"])
    _render_histogram(lines, "stacklens_request_tpot_seconds",
                      "Time per output token (decode time / (output tokens - 1)) of the stored requests.",
                      TPOT_BUCKETS, hists["tpot"])
    _render_findings(lines, cur)
    _render_ingest(lines, counters or IngestCounters())
    return "\n".join(lines) + "\n"
