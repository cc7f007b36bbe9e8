# Quick start:  make serve   (gateway on its embedded defaults, port 50051)
#               make test    (installs what the tests need, then runs every check and test)
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: serve test gen bench

$(VENV)/.installed: pyproject.toml clients/python/pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	$(VENV)/bin/pip install --quiet -e clients/python
	touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --silent --no-audit --no-fund
	touch $@

clients/typescript/node_modules/.installed: clients/typescript/package.json clients/typescript/package-lock.json
	npm ci --prefix clients/typescript --silent --no-audit --no-fund
	touch $@

serve: $(VENV)/.installed
	$(VENV)/bin/feather-grpc serve

test: $(VENV)/.installed node_modules/.installed clients/typescript/node_modules/.installed
	scripts/test.sh

gen: $(VENV)/.installed node_modules/.installed clients/typescript/node_modules/.installed
	scripts/gen_proto.sh
	scripts/gen_clients.sh

bench: $(VENV)/.installed
	$(PY) bench/run.py
