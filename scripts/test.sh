#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what it needs (Debian packages, .venv),
# builds the simulated boards, then lint (ruff), types (mypy) and pytest.
# Then the fast suite once more on Python 3.9 and 3.13 (see below).
# Any failure exits non-zero. Extra arguments go to pytest (e.g. -k dfu, -m "not realtime")
# and skip the other Pythons.
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
  status=1
fi

# The oldest and newest Python we claim (requires-python >= 3.9; OctoPrint 1.11 runs on
# 3.9..3.13): the fast suite again, each in its own venv (.venv39, .venv313) made by
# scripts/pyvenv.sh, which finds or installs that Python (pyenv) and FAILS when it cannot.
# Only on the plain CI run (no pytest arguments); FLASHER_EXTRA_PYTHONS="" turns it off.
FAST='not realtime and not e2e and not browser'
if [ $# -eq 0 ]; then
  for v in ${FLASHER_EXTRA_PYTHONS-3.9 3.13}; do
    echo "== fast suite on Python $v"
    if ! vpy=$(./scripts/pyvenv.sh "$v" | tail -n1); then
      echo "Python $v: no interpreter and no way to install one (see above)" >&2
      status=1
      continue
    fi
    started=$SECONDS
    rc=0
    "$vpy" -m pytest -q -ra -p no:cacheprovider -m "$FAST" || rc=$?
    [ "$rc" -eq 5 ] && rc=1
    echo "== Python $v: fast suite exit $rc in $((SECONDS - started)) s"
    [ "$rc" -eq 0 ] || status=1
  done
fi
exit "$status"
