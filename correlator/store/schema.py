"""The DuckDB schema: one file holds everything the correlator knows.

Nodes and GPUs get small integer ids (joins on integers are ~1.5x faster than on text); signals get
ids too, assigned once and kept in ``signals`` so a stored id never changes meaning. Times are UTC
nanoseconds as the source stamped them (NVML's, the scrape's, the span's). A NULL value is a missing one.
"""

from __future__ import annotations

# 2: requests became a view over request_rows (binary ids, derivable latencies not stored); a store of
# schema 1 is migrated when opened for writing (Store), and is still read as it is when opened read-only
SCHEMA_VERSION = "2"

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
-- a request as stored: hex ids as 64-bit words (other ids as text), a latency that equals its derivation not stored
-- (its bit in derived, see DERIVED_LATENCIES); readers use the view requests, writers request_rows
CREATE TABLE IF NOT EXISTS request_rows (
    start_ns BIGINT NOT NULL, end_ns BIGINT NOT NULL, node_id INTEGER NOT NULL, service VARCHAR, model VARCHAR,
    engine VARCHAR, trace_hi UBIGINT, trace_lo UBIGINT, span_bin UBIGINT, request_hi UBIGINT, request_lo UBIGINT,
    request_form UTINYINT,
    trace_text VARCHAR, span_text VARCHAR, request_text VARCHAR, request_suffix VARCHAR,
    derived UTINYINT NOT NULL DEFAULT 0,
    ttft_s DOUBLE, tpot_s DOUBLE, e2e_s DOUBLE, queue_s DOUBLE, prefill_s DOUBLE, decode_s DOUBLE,
    inference_s DOUBLE, prompt_tokens INTEGER, output_tokens INTEGER, finish_reason VARCHAR,
    pid INTEGER, container_id VARCHAR, pod_uid VARCHAR, pod VARCHAR, namespace VARCHAR, gpu_uuids VARCHAR);
CREATE OR REPLACE VIEW requests AS SELECT
    start_ns, end_ns, node_id, service, model, engine,
    CASE WHEN trace_hi IS NULL THEN trace_text ELSE format('{:016x}{:016x}', trace_hi, trace_lo) END AS trace_id,
    CASE WHEN span_bin IS NULL THEN span_text ELSE format('{:016x}', span_bin) END AS span_id,
    CASE WHEN request_hi IS NULL THEN request_text ELSE concat(request_text, CASE WHEN request_form = 2
        THEN CAST(CAST(format('{:016x}{:016x}', request_hi, request_lo) AS UUID) AS VARCHAR)
        ELSE format('{:016x}{:016x}', request_hi, request_lo) END, request_suffix) END AS request_id,
    CASE WHEN derived & 1 = 0 THEN ttft_s ELSE queue_s + prefill_s END AS ttft_s,
    CASE WHEN derived & 2 = 0 THEN tpot_s WHEN output_tokens >= 2 THEN decode_s / (output_tokens - 1) END AS tpot_s,
    CASE WHEN derived & 4 = 0 THEN e2e_s WHEN start_ns > 0 AND end_ns >= start_ns THEN (end_ns - start_ns) / 1e9
        END AS e2e_s,
    queue_s, prefill_s, decode_s,
    CASE WHEN derived & 8 = 0 THEN inference_s ELSE prefill_s + decode_s END AS inference_s,
    prompt_tokens, output_tokens, finish_reason, pid, container_id, pod_uid, pod, namespace, gpu_uuids
FROM request_rows;
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
    "gpu_samples": "time_ns", "gpu_minutes": "minute_ns", "host_samples": "time_ns", "engine_samples": "time_ns",
    "placements": "time_ns", "host_minutes": "minute_ns", "engine_minutes": "minute_ns",
    "placement_minutes": "minute_ns", "gpu_hours": "hour_ns", "host_hours": "hour_ns", "engine_hours": "hour_ns",
    "request_rows": "start_ns", "request_minutes": "minute_ns", "request_bins": "hour_ns", "events": "time_ns",
    "findings": "created_ns",
}
# a stored table that is read (and exported) through a view of another name
READ_AS: dict[str, str] = {"request_rows": "requests"}

# The latencies a request row does not store when they equal, bit for bit, their derivation from the stored
# columns as the span decoder derives them: TTFT = queue + prefill, TPOT = decode / (output tokens - 1) (none
# below 2 tokens), e2e = (end_ns - start_ns) / 1e9 (none unless 0 < start <= end), inference = prefill +
# decode. Each has a bit in request_rows.derived; the view requests computes the derivation where it is set
# (Store._derive_latencies decides; tests/test_request_rows.py holds the two to each other).
DERIVED_LATENCIES: dict[str, int] = {"ttft_s": 1, "tpot_s": 2, "e2e_s": 4, "inference_s": 8}
