"""Offline import (``stacklens import``): OTLP JSON lines, as the OpenTelemetry Collector's file exporter
writes them (one ``{"resourceSpans": ...}`` or ``{"resourceMetrics": ...}`` document per line), and
Parquet as ``Store.export_parquet`` writes it (``<table>/day=…/node=…/*.parquet``).

Each file is one transaction: a file with a bad line is refused whole, with the line number.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path

import duckdb

from correlator.ingest.batch import IngestBatch, Rows
from correlator.ingest.payload import PayloadError, Signal, decode_message, parse_message

_PARQUET_TABLES = ("gpu_samples", "host_samples", "engine_samples", "placements", "requests")


class ImportFileError(Exception):
    """A file that cannot be imported; nothing of it was stored."""


def expand(paths: list[str]) -> Iterator[Path]:
    for p in map(Path, paths):
        if p.is_dir():
            yield from sorted(x for x in p.rglob("*") if x.is_file() and x.suffix in (".parquet", ".jsonl", ".json",
                                                                                           ".gz"))
        elif p.exists():
            yield p
        else:
            raise ImportFileError(f"{p}: no such file or directory")


def read_otlp_jsonl(path: Path) -> IngestBatch:
    batch = IngestBatch()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.strip()
            if not line:
                continue
            signal: Signal = "traces" if b'"resourceSpans"' in line or b'"resource_spans"' in line else "metrics"
            try:
                batch.extend(decode_message(signal, parse_message(signal, line, "json")))
            except PayloadError as e:
                raise ImportFileError(f"{path}:{lineno}: {e.message}") from e
    return batch


def _table_of(path: Path) -> str:
    for part in reversed(path.parts):
        if part in _PARQUET_TABLES:
            return part
    raise ImportFileError(f"{path}: not under a directory named after a table ({', '.join(_PARQUET_TABLES)})")


def read_parquet(path: Path) -> IngestBatch:
    """One Parquet file of an export back into rows (names, not ids: the target store assigns its own)."""
    table = _table_of(path)
    con = duckdb.connect()
    try:
        rel = con.read_parquet(str(path), hive_partitioning=True)
        data = rel.to_arrow_table().to_pydict()
    except duckdb.Error as e:
        raise ImportFileError(f"{path}: not readable as Parquet: {e}") from e
    finally:
        con.close()
    batch = IngestBatch()
    target: Rows = getattr(batch, table)
    n = len(next(iter(data.values()), []))
    for col in target.columns:
        if col in data:
            target.data[col] = list(data[col])
        else:
            target.data[col] = [None] * n
    missing = [c for c in ("node",) if c in target.columns and c not in data]
    if missing:
        raise ImportFileError(f"{path}: missing columns {missing}")
    return batch
