# pacflow: `make demo` and `make test` bootstrap .venv on first use (idempotent).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test test-fast test-reliability lint proto clean-venv check-python system-deps

check-python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { \
	  echo "error: $(PYTHON) not found; pacflow needs Python 3.11 (Reverb has no wheels for newer Pythons)." >&2; \
	  echo "       install it (e.g. 'apt-get install python3.11 python3.11-venv' or pyenv), or run 'make PYTHON=/path/to/python3.11 ...'" >&2; \
	  exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' || { \
	  echo "error: $(PYTHON) is $$($(PYTHON) --version 2>&1), pacflow needs Python 3.11" >&2; exit 1; }

$(PY): | check-python
	$(PYTHON) -m venv $(VENV)

# torch first (the pinned CPU build), then everything else under the resolved constraints.
$(STAMP): pyproject.toml deploy/constraints.txt | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -c deploy/constraints.txt -e '.[test]'
	touch $(STAMP)

# Debian packages the tests need: OSMesa renders MuJoCo camera images on CPU (pixel configs);
# Chromium opens the run report in tests/integration/test_html_report.py (through playwright);
# Prometheus (prometheus, promtool) scrapes a run in tests/integration/test_prometheus.py.
APT_PACKAGES := libosmesa6 chromium prometheus
system-deps:
	@{ /sbin/ldconfig -p | grep -q libOSMesa && command -v chromium >/dev/null && \
	   command -v prometheus >/dev/null && command -v promtool >/dev/null; } || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -qq --no-install-recommends $(APT_PACKAGES) >/dev/null 2>&1 || \
	    { apt-get update -qq && apt-get install -y -qq --no-install-recommends $(APT_PACKAGES); }; \
	  else \
	    echo "error: OSMesa, Chromium or Prometheus is missing; run 'apt-get install $(APT_PACKAGES)' as root" >&2; exit 1; \
	  fi; }

demo: $(STAMP)
	$(VENV)/bin/pacflow run --config deploy/configs/cartpole.yaml

# Two workers: tests that start Ray clusters, benchmarks and whole-system runs stay on one, in
# order (tests/conftest.py SERIAL); the other tests run beside them on the other worker.
test: $(STAMP) system-deps
	$(PY) -m pytest -q -p no:cacheprovider -n 2 --dist loadscope --durations=25 tests

test-fast: $(STAMP) system-deps
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow" tests

# The scenarios of the reliability note (§6), in its order: tests/reliability/ and the tests
# that cover the rest with real servers and processes (mapped in test_scenarios.py's docstring).
RELIABILITY := tests/reliability tests/integration/test_async_run.py \
	tests/integration/test_server_restarts.py tests/replay/test_server_and_dataset.py \
	tests/learners/test_learner.py tests/replay/test_archive_schema.py \
	tests/replay/test_validation.py tests/integration/test_robot_cli.py \
	tests/actors/test_robot.py tests/policies/test_security.py \
	tests/policies/test_hostile_ids.py tests/policies/test_server.py tests/policies/test_limits.py
test-reliability: $(STAMP) system-deps
	$(PY) -m pytest -q -p no:cacheprovider $(RELIABILITY)

lint: $(STAMP)
	$(PY) -m pip install -q ruff
	$(VENV)/bin/ruff check .

proto: $(STAMP)
	$(PY) -m pip install -q grpcio-tools==1.62.3
	$(PY) -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. policies/proto/policy.proto

clean-venv:
	rm -rf $(VENV)
