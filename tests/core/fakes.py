"""A fake board for job and CLI tests: the Flasher ABC over an in-memory flash.

It behaves like a real flasher where the job can tell: it writes page by page, reports
Progress per stage, honours the cancel token between blocks and verifies by reading its
flash back. Fault switches make any step fail the way real boards do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from octoprint_flasher.errors import ConnectError, PreflightError, ProtocolError, VerifyError
from octoprint_flasher.flasher import (
    STAGE_ERASING,
    STAGE_READING,
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
from octoprint_flasher.target import Target


@dataclass
class FakeBoard:
    """The board's state, which outlives one flasher (like real hardware)."""

    chip: str = "ATmega1284P"
    flash_start: int = 0
    flash_size: int = 128 * 1024
    app_start: int = 0
    app_end: int = 127 * 1024
    page_size: int = 256
    bootloader: str = "optiboot"
    method: str = "stk500v1"
    flash: bytearray = field(default_factory=bytearray)
    in_bootloader: bool = False
    # found waiting in its bootloader (ROM DFU, Katapult without application): not entered by us
    found_in_bootloader: bool = False
    # fault switches
    fail_open: bool = False
    fail_identify: bool = False
    fail_check: bool = False
    fail_write_at_block: Optional[int] = None
    corrupt_block: Optional[int] = None  # verify will find it
    fail_leave: bool = False
    cancel_at_block: Optional[int] = None  # the user presses Cancel just before this block
    calls: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.flash:
            self.flash = bytearray(b"\xff" * self.flash_size)

    def info(self) -> TargetInfo:
        return TargetInfo(
            method=self.method,
            chip=self.chip,
            flash_start=self.flash_start,
            flash_size=self.flash_size,
            app_start=self.app_start,
            app_end=self.app_end,
            page_size=self.page_size,
            bootloader=self.bootloader,
        )

    def content(self, address: int, length: int) -> bytes:
        off = address - self.flash_start
        return bytes(self.flash[off : off + length])


class FakeFlasher(Flasher):
    method = "stk500v1"

    def __init__(self, board: FakeBoard, log: Optional[LogCallback] = None) -> None:
        super().__init__(log)
        self.board = board
        self.closed = False

    def identify(self) -> TargetInfo:
        self.board.calls.append("identify")
        self.entered_from_app = not (self.board.found_in_bootloader or self.board.in_bootloader)
        self.board.in_bootloader = True
        if self.board.fail_identify:
            raise ConnectError("No answer from the bootloader.", hint="Press reset.")
        self.log(f"signature of {self.board.chip}")
        return self.board.info()

    def check(self, image: FirmwareImage, target: TargetInfo) -> list[str]:
        self.board.calls.append("check")
        if self.board.fail_check:
            raise PreflightError("The flasher refuses this image.", hint="Use another image.")
        return ["fake flasher warning"]

    def flash(
        self,
        image: FirmwareImage,
        progress: ProgressCallback = no_progress,
        cancel: Optional[CancelToken] = None,
        quick: bool = False,
    ) -> FlashResult:
        self.board.calls.append("flash")
        b = self.board
        if not image.address_given:
            image = image.placed_at(b.app_start)
        blocks = list(image.blocks(b.page_size, base=b.flash_start))
        total = len(blocks) * b.page_size
        progress(Progress(STAGE_ERASING, 0, 1))
        progress(Progress(STAGE_ERASING, 1, 1))
        written = skipped = 0
        for i, (addr, data) in enumerate(blocks):
            if b.cancel_at_block == i and cancel is not None:
                cancel.cancel()
            if cancel is not None:
                cancel.check()
            if b.fail_write_at_block == i:
                raise ProtocolError(f"No reply to PROG_PAGE at 0x{addr:X}.", hint="Retry.")
            if quick and b.content(addr, len(data)) == data:
                skipped += 1
            else:
                stored = bytes(x ^ 0xFF for x in data) if b.corrupt_block == i else data
                off = addr - b.flash_start
                b.flash[off : off + len(data)] = stored
                written += 1
            progress(Progress(STAGE_WRITING, (i + 1) * b.page_size, total))
        for i, (addr, data) in enumerate(blocks):
            if cancel is not None:
                cancel.check()
            if b.content(addr, len(data)) != data:
                raise VerifyError(f"Verify failed at 0x{addr:X}.", hint="Flash again.")
            progress(Progress(STAGE_VERIFYING, (i + 1) * b.page_size, total))
        return FlashResult(
            bytes_written=written * b.page_size,
            bytes_verified=total,
            blocks_written=written,
            blocks_skipped=skipped,
        )

    def read(
        self, progress: ProgressCallback = no_progress, cancel: Optional[CancelToken] = None
    ) -> FirmwareImage:
        self.board.calls.append("read")
        b = self.board
        size = b.app_end - b.app_start
        progress(Progress(STAGE_READING, 0, size))
        data = b.content(b.app_start, size)
        progress(Progress(STAGE_READING, size, size))
        return FirmwareImage([Segment(b.app_start, data)], "backup", "bin")

    def leave(self) -> Optional[str]:
        self.board.calls.append("leave")
        if self.board.fail_leave:
            raise ProtocolError("LEAVE_PROGMODE got no reply.")
        self.board.in_bootloader = False
        return None

    def close(self) -> None:
        self.board.calls.append("close")
        self.closed = True


def opener_for(board: FakeBoard) -> Any:
    """An ``opener(target, log)`` that opens the fake board (or fails like a busy port)."""

    def open_flasher(target: Target, log: Optional[LogCallback] = None) -> Flasher:
        board.calls.append("open")
        if board.fail_open:
            raise ConnectError(f"{target.port} is busy.", hint="Disconnect OctoPrint.")
        return FakeFlasher(board, log)

    return open_flasher
