# The front door: every target works on a fresh clone and sets up what it needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
GEN    := jobstream/v1 jobstream/bus/v1
PROTOS := proto/jobstream/v1/jobstream.proto proto/jobstream/bus/v1/bus.proto

.PHONY: venv proto proto-check lint test test-fast demo up bench clean

venv: $(VENV)/.installed
$(VENV)/.installed: requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

# Regenerates the committed protobuf/gRPC code; proto-check fails when the committed copy is stale.
proto: venv
	$(PY) -m jobstream.tools.protogen .
proto-check: venv
	$(PY) -m jobstream.tools.protogen --check .

lint: proto-check
	$(VENV)/bin/ruff check jobstream services tests
	$(VENV)/bin/ruff format --check jobstream services tests
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest -q

demo: venv
	$(PY) -m jobstream.cli.main demo

up: venv
	$(PY) -m jobstream.cli.main up $(ARGS)

bench: venv
	$(PY) -m bench $(ARGS)

clean:
	rm -rf $(VENV) .jobstream .mypy_cache .ruff_cache .pytest_cache
