#!/usr/bin/env bash
# Every check CI runs: lint, types, proto lint, generated code up to date, then the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PWD/node_modules/.bin:$PATH"

echo "== ruff";   ruff check . && ruff format --check .
echo "== mypy";   mypy feather_grpc sim tests   # the package, the provider simulators, the tests
# bench/'s scripts import each other as top-level modules (tests import them as bench.*): checked apart
MYPYPATH=bench mypy bench
echo "== floors"; lint-imports --no-logo   # the import-linter contracts in pyproject.toml
echo "== buf";    buf lint
echo "== stubs up to date"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
PYTHON=.venv/bin/python scripts/gen_proto.sh "$tmp"
diff -r --exclude=__pycache__ "$tmp/feather" feather_grpc/gen/feather \
  || { echo "generated stubs are stale: run scripts/gen_proto.sh and commit"; exit 1; }
echo "== pytest"; pytest "$@"
echo "== clients: mypy --strict, generated stubs and docs/api.md up to date"
(cd clients/python && mypy)
PYTHON=.venv/bin/python scripts/gen_clients.sh "$tmp/clients"
for p in clients/python/src/feather_client/gen clients/typescript/src/gen docs/api.md; do
  diff -r --exclude=__pycache__ "$tmp/clients/$p" "$p" || { echo "$p is stale: run scripts/gen_clients.sh and commit"; exit 1; }
done
echo "== typescript client: npm test (builds, then node --test against a live gateway)"
npm --prefix clients/typescript test
echo "== buf breaking: the contract against every version of proto/ since the last v* tag (see docs/compatibility.md)"
base=$(git describe --tags --abbrev=0 --match 'v*' 2>/dev/null || true)
[ "$(git rev-parse --is-shallow-repository)" = false ] || echo "warning: shallow clone, checking only the history it has"
for rev in $base $(git rev-list "${base:+$base..}HEAD" -- proto/); do
  buf breaking --against ".git#ref=$rev" || { echo "proto/ breaks the contract as of $rev"; exit 1; }
done
