#!/usr/bin/env bash
# Every check CI runs: lint, types, proto lint, generated code up to date, then the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PWD/node_modules/.bin:$PATH"

echo "== ruff";   ruff check . && ruff format --check .
echo "== mypy";   mypy feather_grpc
echo "== buf";    buf lint
echo "== stubs up to date"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
PYTHON=.venv/bin/python scripts/gen_proto.sh "$tmp"
diff -r --exclude=__pycache__ "$tmp/feather" feather_grpc/gen/feather \
  || { echo "generated stubs are stale: run scripts/gen_proto.sh and commit"; exit 1; }
echo "== pytest"; pytest "$@"
