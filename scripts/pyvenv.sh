#!/usr/bin/env bash
# Makes .venv<NN> (e.g. .venv39, .venv313) with Python X.Y and the plugin installed with its
# `test` extra, for running the fast suite on the oldest and newest Python we support.
# Usage: scripts/pyvenv.sh 3.9   -> prints the venv's python path on its last line.
# Finds the interpreter as pythonX.Y on PATH, else in pyenv (installing that version with pyenv
# when pyenv exists but lacks it). With neither it FAILS (exit 1): a claimed Python that
# cannot be tested is an error, not a skip.
set -euo pipefail
cd "$(dirname "$0")/.."

want=${1:?usage: scripts/pyvenv.sh X.Y}
venv=.venv${want//./}

find_python() {
  # (a pyenv shim is on PATH even where that version is not selected: it must really run)
  if "python$want" -c "import venv" >/dev/null 2>&1; then
    "python$want" -c "import sys; print(sys.executable)"
    return 0
  fi
  local root=${PYENV_ROOT:-$HOME/.pyenv}
  local pyenv=""
  if command -v pyenv >/dev/null 2>&1; then
    pyenv=$(command -v pyenv)
  elif [ -x "$root/bin/pyenv" ]; then
    pyenv=$root/bin/pyenv
  fi
  [ -n "$pyenv" ] || return 1
  local found
  found=$(PYENV_ROOT=$root "$pyenv" versions --bare 2>/dev/null | grep -E "^${want//./\\.}\.[0-9]+$" \
    | sort -t. -k3,3n | tail -n1 || true)
  if [ -z "$found" ]; then
    found=$(PYENV_ROOT=$root "$pyenv" install --list 2>/dev/null | tr -d ' ' \
      | grep -E "^${want//./\\.}\.[0-9]+$" | sort -t. -k3,3n | tail -n1 || true)
    [ -n "$found" ] || return 1
    # what pyenv needs to build CPython on Debian (never prompts: sudo -n fails instead)
    local deps=(build-essential libssl-dev zlib1g-dev libbz2-dev libreadline-dev libsqlite3-dev
      libncursesw5-dev xz-utils tk-dev libxml2-dev libxmlsec1-dev libffi-dev liblzma-dev)
    local missing=() p
    for p in "${deps[@]}"; do
      dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
      local sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo -n"
      echo "pyvenv: installing build dependencies for pyenv: ${missing[*]}" >&2
      DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends \
        "${missing[@]}" >&2 || return 1
    fi
    echo "pyvenv: installing Python $found with pyenv (a few minutes)" >&2
    PYENV_ROOT=$root "$pyenv" install --skip-existing "$found" >&2 || return 1
  fi
  echo "$root/versions/$found/bin/python"
}

if [ ! -x "$venv/bin/python" ]; then
  if ! py=$(find_python); then
    echo "pyvenv: no Python $want here (not on PATH as python$want, and no pyenv to install" \
      "it). Install pyenv (https://github.com/pyenv/pyenv) or python$want, then rerun." >&2
    exit 1
  fi
  echo "pyvenv: creating $venv with $("$py" --version)" >&2
  "$py" -m venv "$venv"
fi
stamp=$venv/.pyvenv-stamp
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  "$venv/bin/python" -m pip install -q --upgrade pip >&2
  # a non-editable install would shadow the tree's package; tests import from the tree
  "$venv/bin/python" -m pip install -q -e ".[test]" >&2
  touch "$stamp"
fi
echo "$venv/bin/python"
