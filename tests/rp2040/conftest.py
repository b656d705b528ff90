"""Emulated RP2040 boards on their own pyusb backend, with a fast model clock."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import pytest

from octoprint_flasher.flasher import Progress
from octoprint_flasher.flashers.picoboot import PicobootFlasher
from octoprint_flasher.image import uf2
from octoprint_flasher.image.model import FirmwareImage, Segment
from octoprint_flasher.target import Target
from tests.emulators.picoboot_device import (
    RP2040,
    EmulatedRp2040,
    Faults,
    PicobootBackend,
    klipper_like_rp2040,
)

SCALE = 0.01  # every model second takes 10 ms


def uf2_image(data: bytes, address: int = 0x10000000, name: str = "klipper.uf2") -> FirmwareImage:
    from octoprint_flasher.image.load import load_bytes

    return load_bytes(uf2.write_uf2([Segment(address, data)]), name)


@dataclass
class Board:
    backend: PicobootBackend
    dev: EmulatedRp2040
    log: list[str] = field(default_factory=list)
    progress: list[Progress] = field(default_factory=list)

    def target(self, **kwargs: Any) -> Target:
        options = {
            "picoboot_time_scale": SCALE,
            "list_ports": self.dev.list_ports,
            "open_serial": self.dev.open_serial,
            **kwargs.pop("options", {}),
        }
        return Target(method="picoboot", usb_backend=self.backend, options=options, **kwargs)

    def flasher(self, **kwargs: Any) -> PicobootFlasher:
        return PicobootFlasher(self.target(**kwargs), self.log.append)

    def cmds(self, cmd_id: int) -> list[bytes]:
        return [args for c, _, args in self.dev.commands if c == cmd_id]


def make_board(faults: Optional[Faults] = None, **kwargs: Any) -> Board:
    kwargs.setdefault("chip", RP2040)
    dev = EmulatedRp2040(time_scale=SCALE, faults=faults, **kwargs)
    return Board(PicobootBackend([dev]), dev)


@pytest.fixture
def bootsel() -> Board:
    """A Pico waiting in BOOTSEL with an old Klipper in flash."""
    board = make_board()
    board.dev.load_flash(0x10000000, klipper_like_rp2040(40 * 1024, seed=2))
    return board


@pytest.fixture
def klipper() -> Board:
    """An SKR Pico running Klipper over USB."""
    board = make_board(mode="app")
    board.dev.load_flash(0x10000000, klipper_like_rp2040(40 * 1024, seed=2))
    return board
