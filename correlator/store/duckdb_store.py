"""The DuckDB store and its single writer.

Durability rule: a batch is acknowledged (the HTTP/gRPC answer is sent) only after the transaction
that holds it has committed, so kill -9 at any moment loses nothing that was acknowledged and an
export the client will retry was never half-written. To keep commits few under load, the writer groups
every batch that arrives while it is busy or within ``linger_s`` into one transaction (group commit),
up to ``max_batch_rows``: one Arrow insert per table, never executemany.

Reads run on their own cursors while the writer writes (DuckDB's MVCC gives them a consistent view).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from collector.signals import CLOCK_EVENT_REASONS
from correlator.ingest.batch import IngestBatch, Rows
from correlator.store.schema import DDL, SCHEMA_VERSION, TIMED_TABLES

log = logging.getLogger("stacklens.store")

_ARROW_TYPES: dict[str, pa.DataType] = {
    "time_ns": pa.int64(), "start_ns": pa.int64(), "end_ns": pa.int64(), "value": pa.float64(),
    "gpu_index": pa.int32(), "pid": pa.int32(), "prompt_tokens": pa.int32(), "output_tokens": pa.int32(),
    "used_memory_bytes": pa.float64(),
    **{c: pa.float64() for c in ("ttft_s", "tpot_s", "e2e_s", "queue_s", "prefill_s", "decode_s", "inference_s")},
}
_REASON_IDLE = 0x1


class StoreError(Exception):
    pass


@dataclass(slots=True)
class WriterStats:
    batches: int = 0
    transactions: int = 0
    rows: int = 0
    failed_transactions: int = 0


def _arrow(rows: Rows) -> pa.Table:
    cols = {c: pa.array(rows.data[c], type=_ARROW_TYPES.get(c, pa.string())) for c in rows.columns}
    return pa.table(cols)


class Store:
    """One DuckDB file. ``submit`` hands a batch to the writer; its future resolves once committed."""

    def __init__(self, path: str | os.PathLike[str], *, read_only: bool = False, linger_s: float = 0.01,
                 max_batch_rows: int = 8192, max_wait_s: float = 1.0) -> None:
        self.path = str(path)
        self.read_only = read_only
        try:
            self._con = duckdb.connect(self.path, read_only=read_only)
        except duckdb.IOException as e:
            raise StoreError(f"cannot open {self.path}: {e}") from e
        if not read_only:
            self._con.execute(DDL)
            self._con.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", [SCHEMA_VERSION])
        self._linger_s = linger_s
        self._max_batch_rows = max_batch_rows
        self._max_wait_s = max_wait_s
        self._cond = threading.Condition()
        self._pending: list[tuple[IngestBatch, Future[None]]] = []
        self._closing = False
        self.stats = WriterStats()
        self._ids: dict[str, dict[str, int]] = {"nodes": {}, "gpus": {}, "signals": {}}
        self._last_mask: dict[int, int] = {}
        self._last_xid: dict[tuple[int, str], float] = {}
        self._thread: threading.Thread | None = None
        self._column_cache: dict[str, list[str]] = {}
        self._gpu_info: dict[str, tuple[object, ...]] = {}
        if not read_only:
            self._load_ids()
            self._thread = threading.Thread(target=self._run, name="stacklens-store-writer", daemon=True)
            self._thread.start()

    # -- reading ------------------------------------------------------------------------------
    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A cursor of its own for one reader thread."""
        return self._con.cursor()

    @contextmanager
    def reader(self) -> Iterator[duckdb.DuckDBPyConnection]:
        cur = self.cursor()
        try:
            yield cur
        finally:
            cur.close()

    # -- writing ------------------------------------------------------------------------------
    def submit(self, batch: IngestBatch) -> Future[None]:
        fut: Future[None] = Future()
        if self.read_only:
            fut.set_exception(StoreError("store is open read-only"))
            return fut
        if batch.row_count() == 0:
            fut.set_result(None)
            return fut
        with self._cond:
            if self._closing:
                fut.set_exception(StoreError("store is closing"))
                return fut
            self._pending.append((batch, fut))
            self._cond.notify()
        return fut

    def flush(self, timeout_s: float = 60.0) -> None:
        """Wait until everything submitted before this call is committed (or has failed)."""
        fut: Future[None] = Future()
        with self._cond:
            if self._thread is None or self._closing:
                return
            self._pending.append((IngestBatch(), fut))
            self._cond.notify()
        fut.result(timeout_s)

    def write(self, batch: IngestBatch, timeout_s: float = 30.0) -> None:
        """Submit and wait until committed (raises what the commit raised)."""
        self.submit(batch).result(timeout_s)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if not self._pending and self._closing:
                    return
                first_at = time.monotonic()
                # linger briefly so that concurrent exports share one commit
                while (not self._closing and sum(b.row_count() for b, _ in self._pending) < self._max_batch_rows
                       and time.monotonic() - first_at < self._linger_s):
                    self._cond.wait(self._linger_s)
                taken: list[tuple[IngestBatch, Future[None]]] = []
                rows = 0
                while self._pending and (rows < self._max_batch_rows or not taken):
                    b, f = self._pending.pop(0)
                    taken.append((b, f))
                    rows += b.row_count()
            self._commit(taken)

    def _commit(self, taken: list[tuple[IngestBatch, Future[None]]]) -> None:
        merged = IngestBatch()
        for b, _ in taken:
            merged.extend(b)
        ids_before = {k: dict(v) for k, v in self._ids.items()}
        mask_before, xid_before = dict(self._last_mask), dict(self._last_xid)
        info_before = dict(self._gpu_info)
        cur = self._con.cursor()
        try:
            cur.execute("BEGIN TRANSACTION")
            self._insert(cur, merged)
            cur.execute("COMMIT")
        except Exception as e:
            with contextlib.suppress(duckdb.Error):
                cur.execute("ROLLBACK")
            self._ids, self._last_mask, self._last_xid = ids_before, mask_before, xid_before
            self._gpu_info = info_before
            self.stats.failed_transactions += 1
            log.error("store: transaction of %d rows failed: %s", merged.row_count(), e)
            for _, f in taken:
                f.set_exception(StoreError(f"store write failed: {e}"))
            return
        finally:
            cur.close()
        self.stats.transactions += 1
        self.stats.batches += len(taken)
        self.stats.rows += merged.row_count()
        for _, f in taken:
            f.set_result(None)

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._con.close()

    # -- ids ------------------------------------------------------------------------------------
    def _load_ids(self) -> None:
        for name, nid in self._con.execute("SELECT name, node_id FROM nodes").fetchall():
            self._ids["nodes"][name] = nid
        for uuid, gid in self._con.execute("SELECT uuid, gpu_id FROM gpus").fetchall():
            self._ids["gpus"][uuid] = gid
        for name, sid in self._con.execute("SELECT name, signal_id FROM signals").fetchall():
            self._ids["signals"][name] = sid

    def _node_ids(self, cur: duckdb.DuckDBPyConnection, names: Sequence[str]) -> dict[str, int]:
        known = self._ids["nodes"]
        for n in names:
            if n not in known:
                known[n] = len(known) + 1
                cur.execute("INSERT INTO nodes VALUES (?, ?)", [known[n], n])
        return known

    def _signal_ids(self, cur: duckdb.DuckDBPyConnection, names: Sequence[str]) -> dict[str, int]:
        known = self._ids["signals"]
        for n in names:
            if n not in known:
                known[n] = len(known) + 1
                cur.execute("INSERT INTO signals VALUES (?, ?)", [known[n], n])
        return known

    def _gpu_ids(self, cur: duckdb.DuckDBPyConnection, keys: Sequence[tuple[str, str, int | None]]) -> dict[str, int]:
        known = self._ids["gpus"]
        for uuid, node, index in keys:
            if uuid not in known:
                known[uuid] = len(known) + 1
                nid = self._node_ids(cur, [node])[node]
                cur.execute("INSERT INTO gpus (gpu_id, uuid, node_id, gpu_index) VALUES (?, ?, ?, ?)",
                            [known[uuid], uuid, nid, index])
        return known

    @staticmethod
    def _map(column: pa.Array, mapping: dict[str, int], type_: pa.DataType) -> pa.Array:
        """Names → ids, vectorised: dictionary-encode and map only the distinct names."""
        enc = pc.dictionary_encode(column).combine_chunks() if isinstance(column, pa.ChunkedArray) \
            else pc.dictionary_encode(column)
        ids = pa.array([mapping[str(v)] for v in enc.dictionary.to_pylist()], type=type_)
        return pc.take(ids, enc.indices)

    # -- the insert of one transaction ----------------------------------------------------------
    def _insert(self, cur: duckdb.DuckDBPyConnection, b: IngestBatch) -> None:
        g = b.gpu_samples
        if len(g):
            # a GPU known only by its index (a DCGM series without UUID) is named after node and index
            uuids = [u if u else f"{n}/gpu{i}" for u, n, i in
                     zip(g.data["gpu_uuid"], g.data["node"], g.data["gpu_index"], strict=True)]
            g.data["gpu_uuid"] = list(uuids)
        gi = b.gpu_info
        keys: dict[str, tuple[str, str, int | None]] = {}
        for rows in (g, gi, b.placements):
            for u, n, i in zip(rows.data["gpu_uuid"], rows.data["node"],
                               rows.data.get("gpu_index", [None] * len(rows)), strict=True):
                if u not in keys:
                    keys[str(u)] = (str(u), str(n), i if isinstance(i, int) else None)
        nodes: set[str] = set()
        for rows in b.tables().values():
            if "node" in rows.data:
                nodes.update(str(x) for x in rows.data["node"])
        node_ids = self._node_ids(cur, sorted(nodes))
        gpu_ids = self._gpu_ids(cur, list(keys.values()))
        sig_names = set(g.data["signal"]) | set(b.host_samples.data["signal"]) | set(b.engine_samples.data["signal"])
        sig_ids = self._signal_ids(cur, sorted(str(s) for s in sig_names))

        if len(gi):
            # identity changes rarely: keep the latest per GPU and write only what differs from the cache
            latest: dict[str, tuple[object, ...]] = {}
            for _t, n, u, idx, model, bus, dev in zip(*(gi.data[c] for c in gi.columns), strict=True):
                latest[str(u)] = (node_ids[str(n)], idx, model, bus, dev)
            for u, info in latest.items():
                if self._gpu_info.get(u) == info:
                    continue
                cur.execute("UPDATE gpus SET node_id = ?, gpu_index = COALESCE(?, gpu_index), "
                            "model = COALESCE(?, model), pci_bus_id = COALESCE(?, pci_bus_id), "
                            "device = COALESCE(?, device) WHERE uuid = ?", [*info, u])
                self._gpu_info[u] = info
        if len(g):
            t = _arrow(g)
            view = pa.table({
                "time_ns": t["time_ns"], "gpu_id": self._map(t["gpu_uuid"], gpu_ids, pa.int32()),
                "signal_id": self._map(t["signal"], sig_ids, pa.int16()), "sub": t["sub"], "value": t["value"]})
            self._append(cur, "gpu_samples", view)
            self._derive_events(cur, view, sig_ids)
        h = b.host_samples
        if len(h):
            t = _arrow(h)
            self._append(cur, "host_samples", pa.table({
                "time_ns": t["time_ns"], "node_id": self._map(t["node"], node_ids, pa.int32()),
                "signal_id": self._map(t["signal"], sig_ids, pa.int16()), "sub": t["sub"], "value": t["value"]}))
        e = b.engine_samples
        if len(e):
            t = _arrow(e)
            self._append(cur, "engine_samples", pa.table({
                "time_ns": t["time_ns"], "node_id": self._map(t["node"], node_ids, pa.int32()),
                "service": t["service"], "model": t["model"], "pid": t["pid"],
                "signal_id": self._map(t["signal"], sig_ids, pa.int16()), "value": t["value"]}))
        p = b.placements
        if len(p):
            t = _arrow(p)
            cols: dict[str, Any] = {"time_ns": t["time_ns"], "node_id": self._map(t["node"], node_ids, pa.int32()),
                                    "gpu_id": self._map(t["gpu_uuid"], gpu_ids, pa.int32())}
            for c in ("pid", "container_id", "pod_uid", "pod", "namespace", "container", "used_memory_bytes"):
                cols[c] = t[c]
            self._append(cur, "placements", pa.table(cols))
        r = b.requests
        if len(r):
            t = _arrow(r)
            cols = {c: t[c] for c in r.columns if c != "node"}
            cols["node_id"] = self._map(t["node"], node_ids, pa.int32())
            table = pa.table(cols)
            cur.register("_batch_requests", table)
            try:
                names = ", ".join(c for c in self._columns(cur, "requests"))
                # a client that retries an export it did not see acknowledged sends the same spans again
                cur.execute(
                    f"INSERT INTO requests ({names}) SELECT {names} FROM _batch_requests b WHERE NOT EXISTS ("
                    "SELECT 1 FROM requests r WHERE r.start_ns BETWEEN (SELECT min(start_ns) FROM _batch_requests)"
                    " AND (SELECT max(start_ns) FROM _batch_requests) AND r.trace_id = b.trace_id"
                    " AND r.span_id = b.span_id)")
            finally:
                cur.unregister("_batch_requests")

    def _columns(self, cur: duckdb.DuckDBPyConnection, table: str) -> list[str]:
        cols = self._column_cache.get(table)
        if cols is None:
            cols = [r[0] for r in cur.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = ? ORDER BY ordinal_position",
                [table]).fetchall()]
            self._column_cache[table] = cols
        return cols

    def _append(self, cur: duckdb.DuckDBPyConnection, table: str, data: pa.Table) -> None:
        name = f"_batch_{table}"
        cur.register(name, data)
        try:
            cols = ", ".join(data.column_names)
            cur.execute(f"INSERT INTO {table} ({cols}) SELECT {cols} FROM {name}")
        finally:
            cur.unregister(name)

    def _derive_events(self, cur: duckdb.DuckDBPyConnection, view: pa.Table, sig_ids: dict[str, int]) -> None:
        """XIDs (from the agent's per-XID counters or DCGM's last-XID gauge) and throttle transitions
        (changes of the clock-event bitmask) become rows of ``events``."""
        wanted = {sig_ids[n] for n in ("clock_event_reasons", "xid_events_total", "xid_last") if n in sig_ids}
        if not wanted:
            return
        mask = pc.is_in(view["signal_id"], value_set=pa.array(sorted(wanted), type=pa.int16()))
        rows = view.filter(mask).sort_by([("time_ns", "ascending")]).to_pylist()
        if not rows:
            return
        by_id = {v: k for k, v in sig_ids.items()}
        gpu_nodes = dict(cur.execute("SELECT gpu_id, node_id FROM gpus").fetchall())
        events: list[tuple[int, int, int, str, int | None, str | None]] = []
        for row in rows:
            v = row["value"]
            if v is None:
                continue
            gid, t, name = row["gpu_id"], row["time_ns"], by_id[row["signal_id"]]
            node = gpu_nodes.get(gid, 0)
            if name == "clock_event_reasons":
                m = int(v) & ~_REASON_IDLE
                prev = self._last_mask.get(gid, 0)
                if m != prev:
                    added = [r for bit, r in CLOCK_EVENT_REASONS.items() if m & bit and not prev & bit]
                    events.append((t, node, gid, "throttle", m, ",".join(added) if added else "cleared"))
                self._last_mask[gid] = m
            else:
                key = (gid, str(row["sub"]) if name == "xid_events_total" else "last")
                prev_v = self._last_xid.get(key)
                self._last_xid[key] = v
                if name == "xid_events_total" and (prev_v is None or v > prev_v):
                    events.append((t, node, gid, "xid", int(row["sub"] or 0), None))
                elif name == "xid_last" and v not in (0, prev_v):
                    events.append((t, node, gid, "xid", int(v), None))
        if events:
            self._append(cur, "events", pa.table({
                "time_ns": pa.array([e[0] for e in events], pa.int64()),
                "node_id": pa.array([e[1] for e in events], pa.int32()),
                "gpu_id": pa.array([e[2] for e in events], pa.int32()),
                "kind": pa.array([e[3] for e in events], pa.string()),
                "code": pa.array([e[4] for e in events], pa.int32()),
                "detail": pa.array([e[5] for e in events], pa.string())}))

    # -- housekeeping ---------------------------------------------------------------------------
    def prune(self, older_than_ns: int) -> dict[str, int]:
        """Retention by age: delete rows older than ``older_than_ns`` from every timed table."""
        out: dict[str, int] = {}
        with self.reader() as cur:
            for table, col in TIMED_TABLES.items():
                n = cur.execute(f"SELECT count(*) FROM {table} WHERE {col} < ?", [older_than_ns]).fetchall()
                cur.execute(f"DELETE FROM {table} WHERE {col} < ?", [older_than_ns])
                out[table] = int(n[0][0]) if n else 0
        return out

    def export_parquet(self, directory: str | os.PathLike[str]) -> list[str]:
        """Hive-partitioned Parquet (``day=YYYY-MM-DD/node=NAME``) of every timed table, for archives and
        for engines beyond one machine. Node and GPU names are written out, not ids."""
        base = Path(directory)
        base.mkdir(parents=True, exist_ok=True)
        written: list[str] = []
        with self.reader() as cur:
            for table, col in TIMED_TABLES.items():
                if table == "findings":
                    continue
                cols = self._columns(cur, table)
                select = ", ".join(f"t.{c}" for c in cols)
                gpu_join = "LEFT JOIN gpus g ON g.gpu_id = t.gpu_id" if "gpu_id" in cols else ""
                gpu_col = ", g.uuid AS gpu_uuid" if gpu_join else ""
                sig_join = "LEFT JOIN signals s ON s.signal_id = t.signal_id" if "signal_id" in cols else ""
                sig_col = ", s.name AS signal" if sig_join else ""
                node_expr = "n.name" if "node_id" in cols else "'all'"
                node_join = "LEFT JOIN nodes n ON n.node_id = t.node_id" if "node_id" in cols else ""
                if "node_id" not in cols and "gpu_id" in cols:
                    node_join = "LEFT JOIN nodes n ON n.node_id = g.node_id"
                    node_expr = "n.name"
                target = base / table
                cur.execute(
                    f"COPY (SELECT {select}{gpu_col}{sig_col}, "
                    f"strftime(make_timestamp(t.{col} // 1000), '%Y-%m-%d') AS day, {node_expr} AS node "
                    f"FROM {table} t {gpu_join} {sig_join} {node_join}) TO '{_sql_path(target)}' "
                    "(FORMAT parquet, COMPRESSION zstd, PARTITION_BY (day, node), OVERWRITE_OR_IGNORE)")
                written.append(str(target))
        return written


def _sql_path(p: Path) -> str:
    """A path for a COPY statement (COPY takes no parameters); refuses quotes rather than escaping them."""
    s = str(p)
    if "'" in s:
        raise StoreError(f"path {s!r} contains a quote")
    return s
