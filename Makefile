# Quick start:  make serve   (installs the runtime only, then the gateway on its embedded defaults, port 50051)
#               make test    (installs what the tests need, then runs every check and test)
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: serve test gen bench

# The runtime alone (`make serve`): the gateway and the Python client its CLI uses, both editable.
$(VENV)/.runtime: pyproject.toml clients/python/pyproject.toml
	@echo "== installing the gateway's runtime into $(VENV)/ (first run only, about 30 s; make test adds the dev tools)"
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e clients/python -e .
	touch $@

# The whole dev set on top (`make test`, `make gen`, `make bench`): test servers, linters, grpcurl, stub generators.
$(VENV)/.installed: $(VENV)/.runtime
	@echo "== installing the test and development tools into $(VENV)/ (PostgreSQL, Redis, mypy, grpcurl, ...)"
	$(VENV)/bin/pip install --quiet -e clients/python -e '.[dev]'
	touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --silent --no-audit --no-fund
	touch $@

clients/typescript/node_modules/.installed: clients/typescript/package.json clients/typescript/package-lock.json
	npm ci --prefix clients/typescript --silent --no-audit --no-fund
	touch $@

serve: $(VENV)/.runtime
	@echo "== serving with $(VENV)/bin/feather-grpc serve (Ctrl-C stops); the CLI: $(VENV)/bin/feather-grpc --help"
	$(VENV)/bin/feather-grpc serve

test: $(VENV)/.installed node_modules/.installed clients/typescript/node_modules/.installed
	scripts/test.sh

gen: $(VENV)/.installed node_modules/.installed clients/typescript/node_modules/.installed
	scripts/gen_proto.sh
	scripts/gen_clients.sh

bench: $(VENV)/.installed
	$(PY) bench/run.py
