#!/usr/bin/env bash
# The whole suite on PostgreSQL + Redis, then again on the embedded SQLite path.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTEST=.venv/bin/pytest

run() {
  local label=$1; shift
  echo "== $label"
  "$@"
  local rc=$?
  # pytest's 5 means no test ran: that is a failure for us, never a silent pass.
  if [ $rc -eq 5 ]; then echo "$label: no tests ran" >&2; return 1; fi
  return $rc
}

.venv/bin/ruff check . || exit 1
.venv/bin/python scripts/check_imports.py || exit 1
.venv/bin/python scripts/check_sizes.py || exit 1
run "PostgreSQL + Redis" env HERALD_TEST_BACKEND=postgres $PYTEST "$@" || exit 1
run "SQLite (embedded defaults)" env HERALD_TEST_BACKEND=sqlite $PYTEST -m "not postgres_only" "$@" || exit 1
