"""Requests of a window, each joined with the GPUs that served it (the join key of DESIGN.md).

Order of evidence for a request's GPUs: an explicit ``gpu.uuids`` resource attribute; then the agent's
placement signal matched on (node, pid), (node, container id) or (node, pod) over the window; else every
GPU of the node, marked ``inferred``. Requests with the same key share one *unit* (a serving replica:
one engine process and its GPUs, several under tensor parallelism).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import duckdb
import polars as pl


@dataclass(frozen=True, slots=True)
class Unit:
    key: str
    node_id: int
    node: str
    pid: int | None
    gpu_ids: tuple[int, ...]
    mapping: str  # "explicit", "placement", "inferred"
    pod: str | None = None


def data_extent(cur: duckdb.DuckDBPyConnection, known_by_ns: int | None = None) -> tuple[int, int] | None:
    """First start and last end of the requests (known by ``known_by_ns``: a span arrives when it ends)."""
    rows = cur.execute("SELECT min(start_ns), max(end_ns) FROM requests WHERE end_ns <= $k",
                       {"k": known_by_ns if known_by_ns is not None else 2**63 - 1}).fetchall()
    row = rows[0] if rows else None
    if row is None or row[0] is None:
        return None
    return int(row[0]), int(row[1])


KEY_COLUMNS = ("node_id", "pid", "container_id", "pod_uid", "pod", "gpu_uuids")  # what identifies a replica


def resolve_units(cur: duckdb.DuckDBPyConnection, requests: pl.DataFrame, start_ns: int, end_ns: int,
                  slack_ns: int = 60 * 10**9) -> tuple[pl.DataFrame, dict[str, Unit]]:
    """Adds a ``unit`` column to ``requests``; returns it and the units by key."""
    if requests.is_empty():
        return requests.with_columns(pl.lit(None, pl.String).alias("unit")), {}
    n = len(requests)
    # a key column that is null on every request (no pods, no explicit GPUs) is left out of the unique and of
    # the join, which then runs on (node, pid) integers instead of six columns
    used = [c for c in KEY_COLUMNS if requests[c].null_count() < n]
    keys = requests.select(*used, "node").unique().with_columns(
        pl.lit(None, requests.schema[c]).alias(c) for c in KEY_COLUMNS if c not in used)
    mapping, units = unit_map(cur, keys, start_ns, end_ns, slack_ns)
    # join only the key columns (in the requests' order) and attach the unit: joining the whole frame would
    # copy every column of millions of rows
    unit = requests.select(used).join(mapping.select(*used, "unit"), on=used, how="left", nulls_equal=True,
                                      maintain_order="left")["unit"]
    return requests.with_columns(unit), units


def unit_map(cur: duckdb.DuckDBPyConnection, keys: pl.DataFrame, start_ns: int, end_ns: int,
             slack_ns: int = 60 * 10**9) -> tuple[pl.DataFrame, dict[str, Unit]]:
    """The replica of each distinct join key (``keys``: KEY_COLUMNS and ``node``, the node's name): the keys
    in a stable order with a ``unit`` column, and the units by key."""
    placements = cur.execute(
        "SELECT node_id, pid, container_id, pod_uid, pod, list(DISTINCT gpu_id ORDER BY gpu_id) "
        "FROM placements WHERE time_ns BETWEEN ? AND ? GROUP BY ALL",
        [start_ns - slack_ns, end_ns + slack_ns]).fetchall()
    by_pid: dict[tuple[int, int], set[int]] = {}
    by_container: dict[tuple[int, str], set[int]] = {}
    by_pod: dict[tuple[int, str], set[int]] = {}
    for node_id, pid, container_id, pod_uid, pod, gpus in placements:
        if pid:
            by_pid.setdefault((node_id, pid), set()).update(gpus)
        if container_id:
            by_container.setdefault((node_id, container_id), set()).update(gpus)
        for p in (pod_uid, pod):
            if p:
                by_pod.setdefault((node_id, p), set()).update(gpus)
    uuid_to_id = dict(cur.execute("SELECT uuid, gpu_id FROM gpus").fetchall())
    node_gpus: dict[int, list[int]] = {}
    for gid, nid in cur.execute("SELECT gpu_id, node_id FROM gpus ORDER BY gpu_id").fetchall():
        node_gpus.setdefault(nid, []).append(gid)

    # sorted keys: units (and the culprit pid of a node-wide finding) come out the same on every run
    keys = keys.select(*KEY_COLUMNS, "node").sort(list(KEY_COLUMNS), nulls_last=True)
    units: dict[str, Unit] = {}
    unit_keys: list[str] = []
    for row in keys.iter_rows(named=True):
        nid, pid = row["node_id"], row["pid"]
        found: tuple[int, ...] = ()
        how = "inferred"
        if row["gpu_uuids"]:
            found = tuple(sorted(uuid_to_id[u] for u in str(row["gpu_uuids"]).split(",") if u in uuid_to_id))
            how = "explicit"
        if not found:
            lookups: list[tuple[dict[Any, set[int]], object]] = [
                (by_pid, pid), (by_container, row["container_id"]), (by_pod, row["pod_uid"]), (by_pod, row["pod"])]
            for table, k in lookups:
                if k and (nid, k) in table:
                    found = tuple(sorted(table[(nid, k)]))
                    how = "placement"
                    break
        if not found:
            found = tuple(node_gpus.get(nid, ()))
            how = "inferred"
        key = f"{row['node']}/pid{pid}" if pid else f"{row['node']}/{row['pod'] or row['container_id'] or 'gpus'}"
        key = f"{key}/{'-'.join(map(str, found))}" if how == "inferred" else key
        units.setdefault(key, Unit(key, nid, row["node"], pid, found, how, row["pod"]))
        unit_keys.append(key)
    return keys.with_columns(pl.Series("unit", unit_keys, dtype=pl.String)), units
