"""Fixtures for the marlin-sd tests: emulated printers on ptys, 20x faster than real time."""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional

import pytest

from octoprint_flasher.flasher import FlashResult
from octoprint_flasher.flashers.marlin_sd import MarlinSdFlasher, open_flasher
from octoprint_flasher.image.model import FirmwareImage, image_from_bytes
from octoprint_flasher.target import Target
from tests.emulators.marlin_printer import MarlinPrinter

TIME_SCALE = 0.05
#: host timeouts for the scaled printer (its 500 ms half-packet drop is 25 ms here)
FAST: dict[str, Any] = {
    "ack_timeout": 0.15,
    "gcode_timeout": 2.0,
    "vanish_timeout": 2.0,
    "come_back_timeout": 10.0,
    "settle": 0.0,
}

MakePrinter = Callable[..., MarlinPrinter]


def as_bin(data: bytes, name: str = "firmware.bin") -> FirmwareImage:
    img = image_from_bytes(data, 0, filename=name)
    img.address_given = False
    return img


@pytest.fixture
def make_printer(tmp_path: Any) -> Iterator[MakePrinter]:
    printers: list[MarlinPrinter] = []

    def make(**kwargs: Any) -> MarlinPrinter:
        kwargs.setdefault("time_scale", TIME_SCALE)
        kwargs.setdefault("port_dir", str(tmp_path))
        printer = MarlinPrinter(**kwargs).start()
        printers.append(printer)
        return printer

    yield make
    for printer in printers:
        printer.stop()


def marlin_target(printer: MarlinPrinter, **options: Any) -> Target:
    opts = dict(FAST)
    opts.update(options)
    return Target(method="marlin-sd", port=printer.port, baud=printer.baud, options=opts)


class Run:
    """One flash as the job drives it: identify, check, flash, leave, close."""

    def __init__(self, target: Target) -> None:
        self.log: list[str] = []
        self.flasher: MarlinSdFlasher = open_flasher(target, self.log.append)
        self.warnings: list[str] = []
        self.result: Optional[FlashResult] = None

    def __call__(self, image: FirmwareImage) -> FlashResult:
        try:
            info = self.flasher.identify()
            self.warnings = self.flasher.check(image, info)
            self.result = self.flasher.flash(image)
            self.flasher.leave()
            return self.result
        finally:
            self.flasher.close()


def flash(printer: MarlinPrinter, data: bytes, **options: Any) -> Run:
    run = Run(marlin_target(printer, **options))
    run(as_bin(data))
    return run
