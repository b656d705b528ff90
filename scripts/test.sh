#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what it needs (Debian packages, .venv),
# builds the simulated boards, then lint (ruff), types (mypy) and pytest.
# Any failure exits non-zero. Extra arguments go to pytest (e.g. -k dfu, -m "not realtime").
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/bootstrap.sh
PY=.venv/bin/python

echo "== building simulated boards (simavr harness, bootloaders, test firmware)"
$PY -c "from tests.emulators.simboard import build_all; build_all()"

echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .

echo "== mypy"
.venv/bin/mypy

echo "== pytest"
status=0
$PY -m pytest -q -ra --durations=15 "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure here" >&2
  exit 1
fi
exit "$status"
