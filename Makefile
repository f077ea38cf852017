# The README's two commands: `make demo` and `make test`. Both set everything up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck unit prometheus bench clean

# setup.py builds the compiled fast paths (correlator/ingest/_fast*.c; collector/nvml/_*.c, collector/export/_*.c) into the tree
$(STAMP): pyproject.toml setup.py $(wildcard correlator/ingest/_fast*.c correlator/ingest/*.h collector/nvml/_*.c collector/export/_*.c)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# The main job: a simulated 2-node x 4-GPU fleet with a PCIe fault, over OTLP into the correlator, to a verdict.
demo: $(STAMP)
	$(BIN)/stacklens demo

# Debian's Prometheus server, used by the tests that scrape the agent (needs root, as CI has).
prometheus:
	@command -v prometheus >/dev/null 2>&1 || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m dashboards.generate --check

typecheck: $(STAMP)
	$(BIN)/mypy --strict collector correlator dashboards tests benchmarks devtools

unit: $(STAMP)
	$(BIN)/pytest -q

test: prometheus lint typecheck unit

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run_all

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build *.egg-info correlator/ingest/_fastspans*.so
