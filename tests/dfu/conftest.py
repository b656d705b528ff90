"""Shared helpers for the DFU tests: an emulated board on its own pyusb backend."""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass, field
from typing import Any, Optional

import pytest

from octoprint_flasher.flasher import Progress
from octoprint_flasher.flashers.dfu import DfuFlasher
from octoprint_flasher.image.model import FirmwareImage, Segment
from octoprint_flasher.target import Target
from tests.emulators.dfu_device import MODELS, DfuBackend, EmulatedDfuDevice, Faults

SCALE = 0.01  # every model second takes 10 ms


def klipper_like(address: int, size: int, seed: int = 1) -> bytes:
    """Random bytes behind a vector table linked for ``address`` (like a Klipper build)."""
    rng = random.Random(seed)
    head = struct.pack("<II", 0x20001000, address + 0x201)
    return head + bytes(rng.randrange(256) for _ in range(size - len(head)))


def bin_image(data: bytes, name: str = "klipper.bin") -> FirmwareImage:
    """A raw .bin as the loader returns it without --address: placed by the flasher."""
    return FirmwareImage([Segment(0, data)], name, "bin", address_given=False)


def placed(data: bytes, address: int, name: str = "klipper.bin") -> FirmwareImage:
    return FirmwareImage([Segment(address, data)], name, "bin")


@dataclass
class Board:
    backend: DfuBackend
    dev: EmulatedDfuDevice
    log: list[str] = field(default_factory=list)
    progress: list[Progress] = field(default_factory=list)

    def target(self, **kwargs: Any) -> Target:
        options = {"dfu_time_scale": SCALE, **kwargs.pop("options", {})}
        return Target(method="dfu", usb_backend=self.backend, options=options, **kwargs)

    def flasher(self, **kwargs: Any) -> DfuFlasher:
        return DfuFlasher(self.target(**kwargs), self.log.append)

    def requests(self, b_request: int) -> list[tuple[int, int, int, int]]:
        return [r for r in self.dev.requests if r[1] == b_request and r[0] in (0x21, 0xA1)]


def make_board(
    model: str = "STM32F446",
    bootloader: int = 0,
    faults: Optional[Faults] = None,
    **kwargs: Any,
) -> Board:
    dev = EmulatedDfuDevice(MODELS[model], time_scale=SCALE, faults=faults, **kwargs)
    if bootloader:
        dev.install_bootloader(bootloader)
    return Board(DfuBackend([dev]), dev)


@pytest.fixture
def f446() -> Board:
    """An Octopus-like F446 with BTT's 32 KiB bootloader in place."""
    return make_board("STM32F446", bootloader=32 * 1024)


@pytest.fixture
def h723() -> Board:
    """An Octopus Pro H723 with a 128 KiB bootloader."""
    return make_board("STM32H723", bootloader=128 * 1024)
