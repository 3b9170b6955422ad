# The two commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck pytest bench clean compose-tool etcd-tool compose-test aiperf-test live-drop-test bench-test

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: pip then takes the CPU wheel on disk instead of a CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(VENV): $(STAMP)

# The embedded two-datacenter testbed on loopback, a workload through tritonclient, a report.
demo: $(STAMP)
	$(BIN)/prfaas up --demo

lint: $(STAMP)
	$(BIN)/ruff check trtllm_prfaas tests bench
	$(BIN)/ruff format --check trtllm_prfaas tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

# The deployment tests validate docker-compose files with `docker-compose config` (no engine
# needed). Install Debian's docker-compose when missing and we may (root); otherwise they skip.
compose-tool:
	@command -v docker-compose >/dev/null 2>&1 || docker compose version >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose) \
	    >/dev/null 2>&1; } || echo "docker-compose unavailable: compose validation tests will skip"

# Membership tests run a real etcd: Debian's etcd-server (3.4, v3 API). Install it when missing
# and we may (root); otherwise those tests skip and say why.
etcd-tool:
	@command -v etcd >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server) \
	    >/dev/null 2>&1; } || echo "etcd unavailable: membership tests will skip"

pytest: $(STAMP) compose-tool etcd-tool
	$(BIN)/pytest -q

test: lint typecheck pytest

# NVIDIA's aiperf against the OpenAI door of a prfaas up testbed (tests/router/test_aiperf.py).
# aiperf is heavy and pins its own dependencies: it gets a scratch venv, never .venv; opt-in, so
# `make test` does not pay its start-up.
AIPERF_VENV := .venv-aiperf
$(AIPERF_VENV)/bin/aiperf:
	test -x $(AIPERF_VENV)/bin/python || $(PYTHON) -m venv $(AIPERF_VENV)
	$(AIPERF_VENV)/bin/python -m pip install --quiet aiperf

aiperf-test: $(STAMP) $(AIPERF_VENV)/bin/aiperf
	PRFAAS_AIPERF=$(AIPERF_VENV)/bin/aiperf $(BIN)/pytest -q -rA tests/router/test_aiperf.py

# The CPU compose testbed run for real (tests/deploy/test_compose_run.py; `make test` skips it):
# images built without a registry (scripts/compose_images.sh: the debootstrapped base is cached),
# the testbed up, requests through tritonclient, then down. Needs root; starts dockerd when none
# runs and stops it after. CI runs it after `make test` (.ci/run).
compose-test: $(STAMP) compose-tool
	PRFAAS_COMPOSE_TEST=1 $(BIN)/pytest -q -s -p no:cacheprovider tests/deploy/test_compose_run.py

# The benchmarks' quick modes that take tens of seconds each (bench/prefix.py: four testbeds;
# bench/discovery.py: etcd and real processes); `make test` skips them, CI runs them (.ci/run).
bench-test: $(STAMP) etcd-tool
	PRFAAS_BENCH_TEST=1 $(BIN)/pytest -q -p no:cacheprovider tests/bench/test_prefix_bench.py tests/bench/test_discovery_bench.py

# The live link drop's quick mode on the namespace testbed (tests/bench/test_live_drop.py,
# ~4 min; `make test` skips it). Needs root. The full experiment: `python bench/live_drop.py --json`.
live-drop-test: $(STAMP)
	PRFAAS_LIVE_DROP_TEST=1 $(BIN)/pytest -q -p no:cacheprovider tests/bench/test_live_drop.py

bench: $(STAMP)
	$(BIN)/python bench/engine.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
