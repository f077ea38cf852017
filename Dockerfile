# syntax=docker/dockerfile:1.7
# One image for both programs of stacklens:
#   docker run IMAGE stacklens serve --db /var/lib/stacklens/stacklens.duckdb ...   (the correlator)
#   docker run IMAGE stacklens-agent --otlp-endpoint http://correlator:4318 ...     (the node agent)
# The agent reads NVML through libnvidia-ml.so.1, which the NVIDIA container toolkit mounts into the
# container at run time (NVIDIA_DRIVER_CAPABILITIES=utility); without it the agent reports host signals only.

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# -- build: a wheel of the project and of every dependency -----------------------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
# a C compiler for the compiled fast paths (setup.py: correlator/ingest/_fast*.c, collector/nvml/_fastfields.c); the
# runtime stage installs the built wheel and needs none
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml setup.py README.md ./
COPY collector ./collector
COPY correlator ./correlator
RUN pip wheel --wheel-dir /wheels .

# -- runtime ----------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="stacklens" \
      org.opencontainers.image.description="Joins per-request LLM serving latency with per-GPU hardware state" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    STACKLENS_DB=/var/lib/stacklens/stacklens.duckdb \
    STACKLENS_HEALTHCHECK_URL=http://127.0.0.1:8686/healthz
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links /wheels stacklens \
 && groupadd --system --gid 10001 stacklens \
 && useradd --system --uid 10001 --gid stacklens --home-dir /var/lib/stacklens --shell /usr/sbin/nologin stacklens \
 && install -d -o stacklens -g stacklens -m 0750 /var/lib/stacklens

# A probe both programs can use without curl in the image: exit 0 when the URL answers 2xx.
# The correlator's /healthz is the default; an agent sets STACKLENS_HEALTHCHECK_URL to its /metrics.
COPY --chmod=0755 <<'PY' /usr/local/bin/stacklens-healthcheck
#!/usr/local/bin/python
import os, sys, urllib.request
url = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("STACKLENS_HEALTHCHECK_URL", "http://127.0.0.1:8686/healthz")
try:
    with urllib.request.urlopen(url, timeout=3) as r:
        sys.exit(0 if 200 <= r.status < 300 else 1)
except Exception as e:
    print(f"stacklens-healthcheck: {url}: {e}", file=sys.stderr)
    sys.exit(1)
PY

USER 10001:10001
WORKDIR /var/lib/stacklens
# OTLP gRPC, OTLP HTTP, the correlator's JSON API and /metrics (8686 by default; the stack uses 8080), agent /metrics
EXPOSE 4317 4318 8080 8686 9400
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 CMD ["stacklens-healthcheck"]
# No wrapper: the container's command names the program (stacklens ... or stacklens-agent ...); both handle
# SIGTERM themselves (the correlator flushes and closes DuckDB, the agent flushes its export queue).
CMD ["stacklens", "--help"]
