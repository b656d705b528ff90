"""Whole-flash algorithm for the Arduino Mega's stk500v2 bootloader.

That bootloader erases, on each PROGRAM_FLASH_ISP, the page at its own erase pointer (page 0 at
the start of a session, then the next one) instead of the page it is told to write. So within one
session pages must be written as a contiguous run starting at page 0: a page written out of order
lands in flash that was never erased (the AVR can only clear bits) and the page the pointer hits
is wiped. Consequences, each pinned in the tests:

* an image with holes, or one that starts above 0, is written as every page from 0 to its last
  page, holes filled with 0xFF (the bootloader would erase them anyway);
* a quick re-flash compares every page and then writes pages 0 up to the last changed one;
* writing again in the same session (a retry after verify) needs a new session: a reset;
* a PROGRAM_FLASH_ISP whose answer is lost may or may not have run, so nobody knows where the
  erase pointer is: the session ends, the board is reset and the run starts again at page 0;
* page 0 is written blank first and gets its content last, in a one-page session, so a flash
  that fails half-way leaves word 0 at 0xFFFF and the bootloader never starts the half-written
  application.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

from ..flasher import STAGE_READING, CancelToken, LogCallback, Progress, ProgressCallback
from ..image.model import FirmwareImage
from ..links.reset import ManualReset, ResetStrategy, wiring_reset
from ..links.serial_port import SerialLink, modem_lines_work
from ..protocols.stk500v2 import SIGN_ON_WAIT, Stk500v2, Stk500v2Error
from ..target import Target
from .avr_base import AvrSerialFlasher, open_serial_flasher

DEFAULT_BAUD = 115200


class Stk500v2Flasher(AvrSerialFlasher):
    method = "stk500v2"
    protocol_name = "STK500v2"
    bootloader_name = "stk500v2 (Arduino Mega)"
    rewrite_touches_others = True
    #: bytes per READ_FLASH_ISP: even (the bootloader reads words), answer body 283 of its
    #: 285-byte buffer. Fewer frames than whole pages, and behind an FTDI chip the answer's
    #: last partial 62-byte packet (41 bytes) waits less of the 16 ms latency timer.
    read_chunk = 280

    def __init__(
        self,
        link: SerialLink,
        *,
        resets: list[ResetStrategy],
        log: Optional[LogCallback] = None,
        mcu: Optional[str] = None,
        settle: float = 0.0,
        timeout: float = 0.3,
        page_timeout: float = 0.5,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__(
            link,
            resets=resets,
            log=log,
            mcu=mcu,
            settle=settle,
            timeout=timeout,
            page_timeout=page_timeout,
            sleep=sleep,
        )
        self.programmer = ""
        self.proto = self._new_proto()
        #: PROGRAM_FLASH_ISP commands answered in this session (the erase pointer's lower bound)
        self.programmed = 0
        self._address: Optional[int] = None

    def _new_proto(self) -> Stk500v2:
        return Stk500v2(
            self.link.ser, timeout=self.timeout, page_timeout=self.page_timeout, retries=3
        )

    # --- session --------------------------------------------------------------------------

    def _sync(self, strategy: ResetStrategy) -> bool:
        self.proto = self._new_proto()
        if isinstance(strategy, ManualReset):
            deadline = time.monotonic() + strategy.window
            while time.monotonic() < deadline:
                if self._sign_on(SIGN_ON_WAIT):
                    return True
            return False
        if self.settle:
            self.sleep(self.settle)
        for _ in range(3):
            if self._sign_on(SIGN_ON_WAIT):
                return True
        return False

    def _sign_on(self, wait: float) -> bool:
        name = self.proto.sign_on(wait)
        if name is None:
            return False
        self.programmer = name
        return True

    def _start_session(self) -> bytes:
        self.programmed = 0
        self._address = None
        self.proto.enter_progmode()
        return self.proto.read_signature()

    def adopt(self, signature: bytes, programmer: str) -> None:
        """Continue a session auto-detection already opened (saves one reset)."""
        self.proto = self._new_proto()
        self.programmer = programmer
        self.programmed = 0
        self._address = None
        self.in_bootloader = True
        self._on_signature(signature)

    def _details(self) -> dict[str, Any]:
        return {"programmer": self.programmer}

    def _reach_limit(self) -> Optional[tuple[int, str]]:
        return None

    # --- planning: contiguous from page 0 --------------------------------------------------

    def _pages(self, image: FirmwareImage) -> list[tuple[int, bytes]]:
        assert self.chip is not None
        size = self.chip.page_size
        last = -(-image.end // size) * size
        return [(a, image.read(a, size)) for a in range(0, last, size)]

    def _plan(
        self,
        image: FirmwareImage,
        quick: bool,
        progress: ProgressCallback,
        cancel: Optional[CancelToken],
    ) -> tuple[list[tuple[int, bytes]], int]:
        pages = self._pages(image)
        if not quick:
            return pages, 0
        total = sum(len(d) for _, d in pages)
        last_changed = -1
        done = 0
        for i, (addr, data) in enumerate(pages):
            if cancel is not None:
                cancel.check()
            if self._with_recovery(lambda a=addr: self._read_page(a)) != data:  # type: ignore[misc]
                last_changed = i
            done += len(data)
            progress(Progress(STAGE_READING, done, total))
        todo = pages[: last_changed + 1]
        return todo, len(pages) - len(todo)

    def _rewrite_plan(
        self, bad: list[tuple[int, bytes, bytes]], written: list[tuple[int, bytes]]
    ) -> list[tuple[int, bytes]]:
        last_bad = max(a for a, _, _ in bad)
        return [(a, d) for a, d in written if a <= last_bad]

    # --- pages ----------------------------------------------------------------------------

    def _read_page(self, address: int) -> bytes:
        assert self.chip is not None
        return self._read_span(address, self.chip.page_size)

    def _read_span(self, address: int, length: int) -> bytes:
        last: Optional[Stk500v2Error] = None
        for _ in range(self.retries + 1):
            try:
                if self._address != address:
                    self.proto.load_address(address)
                    self._address = address
                data = self.proto.read_flash(length)
                self._address = address + length
                return data
            except Stk500v2Error as exc:
                # the bootloader's address is unknown now: load it again before the retry
                self._address = None
                last = exc
                if not exc.silent:
                    break
        assert last is not None
        raise last

    def _write_run(
        self,
        pages: list[tuple[int, bytes]],
        progress: Callable[[int], None],
        cancel: Optional[CancelToken],
    ) -> list[tuple[int, bytes]]:
        """Write ``pages`` (a run from page 0). Page 0 goes in as 0xFF first and gets its real
        content in a second, one-page session at the end: until then flash word 0 reads
        0xFFFF, and this bootloader never starts an application whose word 0 is 0xFFFF, so
        a flash that fails half-way leaves the board waiting in its bootloader."""
        if not pages:
            return []
        addr0, data0 = pages[0]
        blank = b"\xff" * len(data0)
        last_page_0 = data0 != blank and self._can_reset()
        first = [(addr0, blank), *pages[1:]] if last_page_0 else pages
        written = self._session_with_retries(first, progress, cancel)
        if last_page_0:
            self.log("STK500v2: writing page 0 last, in its own session")
            self._session_with_retries([(addr0, data0)], lambda n: None, cancel)
            written = [(addr0, data0), *written[1:]]
        return written

    def _can_reset(self) -> bool:
        return self.link.can_reopen or modem_lines_work(self.link.ser)

    def _session_with_retries(
        self,
        pages: list[tuple[int, bytes]],
        progress: Callable[[int], None],
        cancel: Optional[CancelToken],
    ) -> list[tuple[int, bytes]]:
        while True:
            if self.programmed or not self.in_bootloader:
                # the erase pointer has moved on: only a reset brings it back to page 0
                self.log("STK500v2: starting a new session to write from page 0")
                self.in_bootloader = False
                self.enter(first=False)
            try:
                return self._write_session(pages, progress, cancel)
            except Stk500v2Error as exc:
                self.recover(exc)

    def _write_session(
        self,
        pages: list[tuple[int, bytes]],
        progress: Callable[[int], None],
        cancel: Optional[CancelToken],
    ) -> list[tuple[int, bytes]]:
        """One session's run from page 0, one PROGRAM_FLASH_ISP and its answer at a time.

        Nothing is sent before the whole answer is in: the bootloader waits for each answer
        character to leave (TXC) and only then listens again, so no earlier moment is safe for
        more than the UART's 3 characters. A missing or bad answer ends the session: the
        caller resets and starts again at page 0 (after a lost answer nobody knows where the
        erase pointer is, and a reset in the middle puts it back to page 0)."""
        assert pages[0][0] == 0, "stk500v2 runs start at page 0"
        written: list[tuple[int, bytes]] = []
        if self._address != 0:
            self.proto.load_address(0)
            self._address = 0
        for addr, data in pages:
            if cancel is not None:
                cancel.check()
            self._program_page(addr, data)
            written.append((addr, data))
            progress(len(data))
        return written

    def _program_page(self, addr: int, data: bytes) -> None:
        """One PROGRAM_FLASH_ISP at the bootloader's current address, and its whole answer."""
        self._address = None  # unknown until the answer is in
        seq = self.proto.send_program(data)
        if not self.proto.answer_started(self.page_timeout):
            raise Stk500v2Error(f"No answer to PROGRAM_FLASH_ISP at 0x{addr:05X}.", silent=True)
        self.proto.finish_program(seq)
        self.programmed += 1
        self._address = addr + len(data)


def open_flasher(target: Target, log: Optional[LogCallback] = None) -> Stk500v2Flasher:
    return open_serial_flasher(Stk500v2Flasher, target, log, DEFAULT_BAUD, wiring_reset())
