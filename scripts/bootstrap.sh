#!/usr/bin/env bash
# Installs everything the demo and the tests need on a fresh Debian 12 machine:
# Debian packages (simavr, avr toolchain, avrdude, Arduino bootloader sources, Chromium, libusb)
# and a Python virtual environment in .venv with the plugin in editable mode.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

DEB_PACKAGES=(
  build-essential pkg-config python3-venv python3-dev
  simavr libsimavr-dev libsimavrparts1 libelf-dev
  gcc-avr avr-libc binutils-avr avrdude arduino-core-avr
  libusb-1.0-0 iproute2
  chromium fonts-dejavu-core
)
# node runs the page's JavaScript helpers in the tests; any node will do
command -v node >/dev/null 2>&1 || DEB_PACKAGES+=(nodejs)

missing=()
for p in "${DEB_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "bootstrap: installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv with $($PY --version)"
  $PY -m venv .venv
fi
stamp=.venv/.bootstrap-stamp
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[develop]"
  touch "$stamp"
fi
