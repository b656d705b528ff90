"""Fixtures shared by every test package."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parent.parent
BUILD = REPO / "build"
REALTIME_LOCK = Path(
    os.environ.get("FLASHER_REALTIME_LOCK", "/tmp/octoprint-flasher-realtime.lock")
)


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
