# Quick start: `make up` runs the dev stack, `make test` runs lint and the whole test suite.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PROTO   := proto/svidgate/signer/v1/signer.proto

.PHONY: install up test lint format proto docs bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

up: install
	$(BIN)/svidgate up

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	MYPY=$(BIN)/mypy .ci/typecheck

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint
	$(PY) -m pytest

# Regenerates the gRPC contract stubs; tests/signer/test_proto_fresh.py fails when they are stale.
proto: install
	$(PY) -m grpc_tools.protoc -Iproto --python_out=proto --pyi_out=proto --grpc_python_out=proto $(PROTO)

# Regenerates docs/schema/*.schema.json from the config models; tests/test_docs.py fails when
# they are stale.
docs: install
	$(PY) docs/generate.py

bench: install
	bench/run

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info
