"""Stand-ins for OctoPrint's printer and for a board, small enough to read in one go.

``MemoryBoard`` is an ATmega1284P with a 1 KiB optiboot: 128 KiB flash, 256-byte pages, the
application below 0x1FC00. ``FakeFlasher`` implements the real ``Flasher`` interface over it
(write page by page, verify by reading back, honour cancel between pages) with fault switches.
``FakePrinter`` keeps OctoPrint's connection state machine and records what it was asked.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Optional

from octoprint_flasher.errors import ProtocolError
from octoprint_flasher.flasher import (
    STAGE_VERIFYING,
    STAGE_WRITING,
    CancelToken,
    Flasher,
    FlashResult,
    LogCallback,
    Progress,
    ProgressCallback,
    TargetInfo,
    no_progress,
)
from octoprint_flasher.image.model import FirmwareImage, Segment

FLASH_SIZE = 128 * 1024
APP_END = FLASH_SIZE - 1024
PAGE = 256


class MemoryBoard:
    """Flash contents plus the switches tests flip to make a flash go wrong or go slowly."""

    def __init__(self) -> None:
        self.flash = bytearray(b"\xff" * FLASH_SIZE)
        self.in_bootloader = False
        self.fail_at_page: Optional[int] = None
        self.page_delay = 0.0
        self.gate: Optional[threading.Event] = None  # a write waits for it when set
        self.writes = 0
        self.port_open = False  # the flasher holds the serial port


class FakeFlasher(Flasher):
    method = "stk500v1"

    def __init__(self, board: MemoryBoard, log: Optional[LogCallback] = None) -> None:
        super().__init__(log)
        self.board = board
        board.port_open = True

    def identify(self) -> TargetInfo:
        self.board.in_bootloader = True
        self.log("optiboot answered: signature 1E 97 05 (ATmega1284P)")
        return TargetInfo(
            method="stk500v1",
            chip="ATmega1284P",
            flash_start=0,
            flash_size=FLASH_SIZE,
            app_start=0,
            app_end=APP_END,
            page_size=PAGE,
            bootloader="optiboot",
        )

    def flash(
        self,
        image: FirmwareImage,
        progress: ProgressCallback = no_progress,
        cancel: Optional[CancelToken] = None,
        quick: bool = False,
    ) -> FlashResult:
        pages = list(image.blocks(PAGE))
        total = len(pages) * PAGE
        for index, (address, data) in enumerate(pages):
            if cancel is not None:
                cancel.check()
            if self.board.gate is not None:
                self.board.gate.wait(5)
            if self.board.page_delay:
                time.sleep(self.board.page_delay)
            if self.board.fail_at_page == index:
                raise ProtocolError(
                    f"No answer after writing the page at 0x{address:05X}.",
                    cause="The board stopped answering.",
                    hint="The board is in its bootloader: flash again.",
                )
            self.board.flash[address : address + PAGE] = data
            self.board.writes += 1
            progress(Progress(STAGE_WRITING, (index + 1) * PAGE, total))
        for index, (address, data) in enumerate(pages):
            if bytes(self.board.flash[address : address + PAGE]) != data:
                raise AssertionError("the fake board lost a page")
            progress(Progress(STAGE_VERIFYING, (index + 1) * PAGE, total))
        return FlashResult(total, total, len(pages))

    def read(
        self, progress: ProgressCallback = no_progress, cancel: Optional[CancelToken] = None
    ) -> FirmwareImage:
        progress(Progress("reading", APP_END, APP_END))
        return FirmwareImage([Segment(0, bytes(self.board.flash[:APP_END]))], "backup", "bin")

    def leave(self) -> Optional[str]:
        self.board.in_bootloader = False
        return None

    def close(self) -> None:
        self.board.port_open = False


class FakePrinter:
    """OctoPrint's printer as the host sees it: connection triple, state ids, commands."""

    def __init__(self) -> None:
        self.state = "OPERATIONAL"
        self.port: Optional[str] = "/dev/ttyUSB0"
        self.baudrate: Optional[int] = 115200
        self.profile: dict[str, Any] = {"id": "anet_a8", "name": "Anet A8", "model": "A8"}
        self.printing = False
        self.comes_back = True
        self.error = ""
        self.connects: list[dict[str, Any]] = []
        self.port_busy: Callable[[], bool] = lambda: False
        self.disconnects = 0
        self.sent: list[str] = []

    # connection
    def get_current_connection(self) -> tuple[Any, ...]:
        if self.state in ("CLOSED", "OFFLINE"):
            return ("Closed", None, None, None)
        return (self.get_state_string(), self.port, self.baudrate, dict(self.profile))

    def connect(
        self, port: Any = None, baudrate: Any = None, profile: Any = None, **kw: Any
    ) -> None:
        self.connects.append({"port": port, "baudrate": baudrate, "profile": profile})
        if self.port_busy():  # what OctoPrint does when another program holds the port
            self.state = "OPEN_SERIAL"
            self.error = f"Failed to connect: Port {port} is busy or does not exist"
        elif self.comes_back:
            self.state = "OPERATIONAL"
            self.port, self.baudrate = port, baudrate
        else:
            self.state = "ERROR"
            self.error = "No more candidates to test, and no working port/baudrate combination"

    def disconnect(self) -> None:
        self.disconnects += 1
        self.state = "CLOSED"

    # state
    def get_state_id(self) -> str:
        return self.state

    def get_state_string(self) -> str:
        return self.state.replace("_", " ").title()

    def get_error(self) -> str:
        return self.error

    def is_printing(self) -> bool:
        return self.printing

    def is_paused(self) -> bool:
        return False

    def is_operational(self) -> bool:
        return self.state == "OPERATIONAL"

    def commands(self, lines: list[str]) -> None:
        self.sent.extend(lines)
