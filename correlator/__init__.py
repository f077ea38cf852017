"""stacklens correlator: receives GPU telemetry and request spans, stores them in DuckDB, and
attributes latency regressions (ingest, store and analysis land with issues 3 and 5)."""
