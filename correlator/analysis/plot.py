"""``why --plot FILE.png``: the latency percentile and the top finding's evidence signals on one time
axis, the incident window shaded. Reads the database itself (the plot is a view, not the analysis)."""

from __future__ import annotations

from typing import Any

import duckdb


def plot_why(db: str, doc: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from correlator.analysis.timeparse import parse_time_ns

    b0 = parse_time_ns(doc["query"]["baseline"][0], 0)
    i0, i1 = (parse_time_ns(x, 0) for x in doc["query"]["window"])
    metric = doc["regression"]["metric"].split("_")[0]
    con = duckdb.connect(db, read_only=True)
    try:
        lat = con.execute(
            f"SELECT start_ns // 30000000000 * 30 AS t, quantile_cont({metric}_s, 0.99) FROM requests "
            "WHERE start_ns BETWEEN ? AND ? GROUP BY 1 ORDER BY 1", [b0, i1]).fetchall()
        top = doc["findings"][0] if doc["findings"] else None
        series: list[tuple[str, list[tuple[float, float]]]] = []
        if top and top["culprit"].get("gpu"):
            for ev in top["evidence"][:2]:
                rows = con.execute(
                    "SELECT time_ns // 10000000000 * 10, avg(value) FROM gpu_samples JOIN gpus USING (gpu_id) "
                    "JOIN signals s USING (signal_id) WHERE uuid = ? AND s.name = ? AND time_ns BETWEEN ? AND ? "
                    "GROUP BY 1 ORDER BY 1", [top["culprit"]["gpu"], ev["signal"], b0, i1]).fetchall()
                if rows:
                    series.append((str(ev["signal"]), rows))
    finally:
        con.close()
    fig, axes = plt.subplots(1 + len(series), 1, sharex=True, figsize=(10, 3 + 2 * len(series)), squeeze=False)
    t0 = b0 / 1e9
    ax = axes[0][0]
    ax.plot([t - t0 for t, _ in lat], [v for _, v in lat], color="C3")
    ax.set_ylabel(f"{metric.upper()} p99 (s)")
    ax.set_title(doc["verdict"][:140], fontsize=9)
    for k, (name, rows) in enumerate(series, 1):
        axes[k][0].plot([t - t0 for t, _ in rows], [v for _, v in rows], color=f"C{k}")
        axes[k][0].set_ylabel(name, fontsize=8)
    for row in axes:
        row[0].axvspan(i0 / 1e9 - t0, i1 / 1e9 - t0, color="0.85", zorder=0)
    axes[-1][0].set_xlabel("seconds since the baseline start")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
