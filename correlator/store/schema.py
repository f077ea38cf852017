"""The DuckDB schema: one file holds everything the correlator knows.

Nodes and GPUs get small integer ids (joins on integers are ~1.5x faster than on text); signals get
ids too, assigned once and kept in ``signals`` so a stored id never changes meaning. Times are UTC
nanoseconds as the source stamped them (NVML's, the scrape's, the span's). A NULL value is a missing one.
"""

from __future__ import annotations

SCHEMA_VERSION = "1"

DDL = """
CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR);
CREATE TABLE IF NOT EXISTS nodes (node_id INTEGER PRIMARY KEY, name VARCHAR NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS gpus (
    gpu_id INTEGER PRIMARY KEY, uuid VARCHAR NOT NULL UNIQUE, node_id INTEGER NOT NULL,
    gpu_index INTEGER, model VARCHAR, pci_bus_id VARCHAR, device VARCHAR);
CREATE TABLE IF NOT EXISTS signals (signal_id SMALLINT PRIMARY KEY, name VARCHAR NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS gpu_samples (
    time_ns BIGINT NOT NULL, gpu_id INTEGER NOT NULL, signal_id SMALLINT NOT NULL, sub VARCHAR, value DOUBLE);
CREATE TABLE IF NOT EXISTS host_samples (
    time_ns BIGINT NOT NULL, node_id INTEGER NOT NULL, signal_id SMALLINT NOT NULL, sub VARCHAR, value DOUBLE);
CREATE TABLE IF NOT EXISTS engine_samples (
    time_ns BIGINT NOT NULL, node_id INTEGER NOT NULL, service VARCHAR, model VARCHAR, pid INTEGER,
    signal_id SMALLINT NOT NULL, value DOUBLE);
CREATE TABLE IF NOT EXISTS placements (
    time_ns BIGINT NOT NULL, node_id INTEGER NOT NULL, gpu_id INTEGER NOT NULL, pid INTEGER,
    container_id VARCHAR, pod_uid VARCHAR, pod VARCHAR, namespace VARCHAR, container VARCHAR,
    used_memory_bytes DOUBLE);
CREATE TABLE IF NOT EXISTS requests (
    start_ns BIGINT NOT NULL, end_ns BIGINT NOT NULL, node_id INTEGER NOT NULL, service VARCHAR, model VARCHAR,
    engine VARCHAR, trace_id VARCHAR, span_id VARCHAR, request_id VARCHAR,
    ttft_s DOUBLE, tpot_s DOUBLE, e2e_s DOUBLE, queue_s DOUBLE, prefill_s DOUBLE, decode_s DOUBLE,
    inference_s DOUBLE, prompt_tokens INTEGER, output_tokens INTEGER, finish_reason VARCHAR,
    pid INTEGER, container_id VARCHAR, pod_uid VARCHAR, pod VARCHAR, namespace VARCHAR, gpu_uuids VARCHAR);
CREATE TABLE IF NOT EXISTS events (
    time_ns BIGINT NOT NULL, node_id INTEGER NOT NULL, gpu_id INTEGER, kind VARCHAR NOT NULL, code INTEGER,
    detail VARCHAR);
CREATE TABLE IF NOT EXISTS findings (
    created_ns BIGINT NOT NULL, metric VARCHAR, cause VARCHAR NOT NULL, subcause VARCHAR, node VARCHAR,
    gpu_uuid VARCHAR, window_start_ns BIGINT, window_end_ns BIGINT, score DOUBLE, explained_share DOUBLE,
    body VARCHAR);
"""

# tables that grow with time, and the column that says when a row happened (retention, export)
TIMED_TABLES: dict[str, str] = {
    "gpu_samples": "time_ns", "host_samples": "time_ns", "engine_samples": "time_ns", "placements": "time_ns",
    "requests": "start_ns", "events": "time_ns", "findings": "created_ns",
}
