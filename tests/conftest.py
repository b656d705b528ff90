"""Fixtures shared by every test package."""

from __future__ import annotations

import fcntl
import os
import sys
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parent.parent
BUILD = REPO / "build"
REALTIME_LOCK = Path(
    os.environ.get("FLASHER_REALTIME_LOCK", "/tmp/octoprint-flasher-realtime.lock")
)

# Peers that cannot exist on the oldest Python we support: pypicoboot needs esptool >= 5.2,
# which needs Python >= 3.10 (scripts/test.sh runs the fast suite on 3.9 too). Everywhere
# else a missing peer is a failure, not a skip.
collect_ignore = ["rp2040/test_emulator_peer.py"] if sys.version_info < (3, 10) else []


@pytest.fixture
def realtime_lock() -> Iterator[None]:
    """Serialise tests that run a simulated board in real time: the machine has two cores and
    a simulated AVR needs one of them, so two at once would both fall behind real time."""
    REALTIME_LOCK.touch(exist_ok=True)
    with REALTIME_LOCK.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
