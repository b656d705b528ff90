"""Fixtures for tests against simulated AVR boards running real bootloaders in simavr."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator, List

import pytest

from tests.emulators.simboard import SimBoard, build_test_firmware


@pytest.fixture
def simboard_factory(realtime_lock: None) -> Iterator[Callable[..., SimBoard]]:
    """``make(config, **SimBoard kwargs)`` starts a board; every board is stopped at teardown.

    Holds the machine-wide real-time lock for the whole test: a board needs a core to itself.
    """
    boards: List[SimBoard] = []

    def make(config: str, **kwargs: Any) -> SimBoard:
        board = SimBoard(config, **kwargs)
        board.start()
        boards.append(board)
        return board

    yield make
    for board in boards:
        board.stop()


@pytest.fixture(scope="session")
def testfw_hex() -> Callable[..., Path]:
    """``testfw_hex(mcu, name, size=None, baud=115200) -> Path`` of the test firmware's hex
    (built on demand, cached in build/avr/fw/)."""
    return build_test_firmware
