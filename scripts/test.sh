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

FAST='not realtime and not e2e and not browser'
SLOW='realtime or e2e or browser'
# The oldest and newest Python we claim (requires-python >= 3.9; OctoPrint 1.11 runs on
# 3.9..3.13) get the fast suite again, each in its own venv (.venv39, .venv313) made by
# scripts/pyvenv.sh, which finds or installs that Python (pyenv) and FAILS when it cannot.
# FLASHER_EXTRA_PYTHONS="" turns them off.
EXTRA=${FLASHER_EXTRA_PYTHONS-3.9 3.13}
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT

# pytest's exit code, with "collected nothing" (5) counted as a failure
pytest_rc() {
  local rc=0
  "$@" || rc=$?
  if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: that is a failure here" >&2
    rc=1
  fi
  return "$rc"
}

status=0
if [ $# -gt 0 ]; then
  echo "== pytest $*"
  pytest_rc $PY -m pytest -q -ra --durations=15 "$@" || status=1
  exit "$status"
fi

# The extra venvs are made while the main suite runs (pip is mostly download and disk).
for v in $EXTRA; do
  ( rc=0; ./scripts/pyvenv.sh "$v" >"$logs/venv-$v.log" 2>&1 || rc=$?; echo "$rc" >"$logs/venv-$v.rc" ) &
done

# Two cores: the simulated boards run in real time on one (serialised on their lock, with the
# real OctoPrint and Chromium), the fast suite uses the other meanwhile.
echo "== pytest: simulated boards, real OctoPrint, browser ($SLOW) | the fast suite ($FAST)"
started=$SECONDS
( rc=0; pytest_rc $PY -m pytest -q -ra --durations=15 -m "$SLOW" >"$logs/slow.log" 2>&1 || rc=$?
  echo "$rc" >"$logs/slow.rc" ) &
slow_pid=$!
fast_rc=0
pytest_rc $PY -m pytest -q -ra --durations=10 -p no:cacheprovider -m "$FAST" || fast_rc=$?
wait "$slow_pid" || true
echo "== the fast suite: exit $fast_rc"
echo "== simulated boards, real OctoPrint, browser:"
cat "$logs/slow.log"
slow_rc=$(cat "$logs/slow.rc")
echo "== main suite: fast exit $fast_rc, real-time exit $slow_rc, $((SECONDS - started)) s"
[ "$fast_rc" -eq 0 ] && [ "$slow_rc" -eq 0 ] || status=1
wait  # the extra venvs

# The extra Pythons' fast suites side by side, one per core.
started=$SECONDS
pids=()
for v in $EXTRA; do
  cat "$logs/venv-$v.log"
  if [ "$(cat "$logs/venv-$v.rc")" != "0" ]; then
    echo "Python $v: no interpreter and no way to install one (see above)" >&2
    status=1
    continue
  fi
  vpy=$(tail -n1 "$logs/venv-$v.log")
  ( rc=0; pytest_rc "$vpy" -m pytest -q -ra -p no:cacheprovider -m "$FAST" \
      >"$logs/py-$v.log" 2>&1 || rc=$?; echo "$rc" >"$logs/py-$v.rc" ) &
  pids+=("$!")
done
for pid in "${pids[@]}"; do wait "$pid" || true; done
for v in $EXTRA; do
  [ -f "$logs/py-$v.rc" ] || continue
  echo "== fast suite on Python $v"
  cat "$logs/py-$v.log"
  rc=$(cat "$logs/py-$v.rc")
  echo "== Python $v: fast suite exit $rc"
  [ "$rc" -eq 0 ] || status=1
done
echo "== other Pythons: $((SECONDS - started)) s"
exit "$status"
