#!/usr/bin/env bash
# The demo: OctoPrint with the Firmware Updater, a simulated 3D printer (ATmega1284P running
# real optiboot in simavr on /tmp/ttyFLASHER0) and emulated STM32 DFU / Katapult CAN boards.
# Installs what it needs on a fresh Debian 12 machine first. Ctrl-C stops everything.
# Options go to demo/run_demo.py (--port 5000, --data demo-data, --check).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh
exec .venv/bin/python demo/run_demo.py "$@"
