"""Fixtures for the Katapult tests: emulated boards on fresh virtual CAN channels and ptys."""

from __future__ import annotations

import uuid
from typing import Any, Callable, Iterator

import pytest

from octoprint_flasher.image.load import load_bytes
from octoprint_flasher.image.model import FirmwareImage
from octoprint_flasher.target import Target
from tests.emulators.katapult_node import EmulatedBoard, UsbWorld, virtual_bus_factory

#: the tests run the time model 20x faster than real time
TIME_SCALE = 0.05
FAST = {
    "command_timeout": 0.25,
    "block_timeout": 0.5,
    "tries": 3,
    "entry_timeout": 3.0,
    "confirm_seconds": 1.0,
}


def as_bin(data: bytes, name: str = "klipper.bin") -> FirmwareImage:
    """A raw .bin as an upload loads: placed at the address its vector table names."""
    return load_bytes(data, name)


@pytest.fixture
def world() -> UsbWorld:
    return UsbWorld()


@pytest.fixture
def make_board(world: UsbWorld) -> Iterator[Callable[..., EmulatedBoard]]:
    boards: list[EmulatedBoard] = []

    def make(**kwargs: Any) -> EmulatedBoard:
        kwargs.setdefault("channel", "kt-" + uuid.uuid4().hex[:8])
        kwargs.setdefault("time_scale", TIME_SCALE)
        kwargs.setdefault("world", world)
        board = EmulatedBoard(**kwargs)
        boards.append(board)
        return board

    yield make
    for board in boards:
        board.stop()


def can_target(board: EmulatedBoard, world: UsbWorld, **options: Any) -> Target:
    opts: dict[str, Any] = dict(FAST)
    opts.update(list_ports=world.list_ports, find_usb_can_bridge=world.find_bridge)
    opts.update(options)
    return Target(
        method="katapult",
        uuid=board.uuid_text,
        can_channel=board.channel,
        can_interface="virtual",
        can_bitrate=board.bus_bitrate,
        can_bus_factory=virtual_bus_factory(board.channel),
        options=opts,
    )


def serial_target(port: str, world: UsbWorld, **options: Any) -> Target:
    opts: dict[str, Any] = dict(FAST)
    opts.update(list_ports=world.list_ports)
    opts.update(options)
    return Target(method="katapult", port=port, baud=250000, options=opts)
