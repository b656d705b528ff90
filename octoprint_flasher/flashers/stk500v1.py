"""Whole-flash algorithm for optiboot-class (STK500v1) bootloaders.

optiboot erases each page itself when PROG_PAGE arrives, so pages can be written in any order
and a write interrupted by a lost byte is simply redone after a reset. It has no checksum: a
garbled data byte is written silently, which is why every page is read back, and pages that
differ are written once more before a :class:`VerifyError` is raised.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

from ..flasher import CancelToken, LogCallback
from ..links.reset import ManualReset, ResetStrategy, arduino_reset
from ..links.serial_port import SerialLink
from ..protocols.stk500v1 import FIRST_SYNC_WAIT, Stk500v1
from ..target import Target
from .avr_base import AvrSerialFlasher, open_serial_flasher

DEFAULT_BAUD = 115200

#: optiboot major version from which UNIVERSAL 0x4D reaches flash above 128 KiB
EXTENDED_ADDRESS_MAJOR = 6


class Stk500v1Flasher(AvrSerialFlasher):
    method = "stk500v1"
    protocol_name = "STK500v1"
    bootloader_name = "optiboot (STK500v1)"
    #: 244 data bytes + LOAD_ADDRESS's and READ_PAGE's framing = 248 = 4 × 62 answer bytes:
    #: an FTDI chip sends every full 62-byte packet at once, so no read waits for its 16 ms
    #: latency timer. On other links the cost per byte is the same as whole pages.
    read_chunk = 244

    def __init__(
        self,
        link: SerialLink,
        *,
        resets: list[ResetStrategy],
        log: Optional[LogCallback] = None,
        mcu: Optional[str] = None,
        settle: float = 0.0,
        first_wait: float = FIRST_SYNC_WAIT,
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
        self.first_wait = first_wait
        self.version: tuple[int, int] = (0, 0)
        self.proto = self._new_proto()

    def _new_proto(self) -> Stk500v1:
        return Stk500v1(self.link.ser, timeout=self.timeout, page_timeout=self.page_timeout)

    # --- session --------------------------------------------------------------------------

    def _sync(self, strategy: ResetStrategy) -> bool:
        self.proto = self._new_proto()
        if isinstance(strategy, ManualReset):
            deadline = time.monotonic() + strategy.window
            while time.monotonic() < deadline:
                if self.proto.sync_once(FIRST_SYNC_WAIT):
                    return self._confirm()
            return False
        if self.settle:
            self.sleep(self.settle)
        # one GET_SYNC at a time: a second one queued behind the first in the AVR's 2-byte
        # FIFO would be read where optiboot expects 0x20 and throw it out of the bootloader
        if self.proto.sync_once(self.first_wait):
            return True
        if self.proto.sync_once(self.timeout):
            return self._confirm()
        return False

    def _confirm(self) -> bool:
        """After a retried GET_SYNC a late answer may still be on its way: drain, resync."""
        self.proto.wire.drain(0.02)
        return self.proto.sync_once(self.timeout)

    def _start_session(self) -> bytes:
        self.proto.forget_segment()
        self.version = self.proto.version()
        self.proto.enter_progmode()
        return self.proto.read_signature()

    def adopt(self, signature: bytes, version: tuple[int, int]) -> None:
        """Continue a session auto-detection already opened (saves one reset)."""
        self.proto = self._new_proto()
        self.version = version
        self.in_bootloader = True
        self._on_signature(signature)

    def _details(self) -> dict[str, Any]:
        return {"bootloader_version": f"{self.version[0]}.{self.version[1]}"}

    @property
    def _extended(self) -> bool:
        return (
            self.chip is not None
            and self.chip.flash_size > 128 * 1024
            and self.version[0] >= EXTENDED_ADDRESS_MAJOR
        )

    def _reach_limit(self) -> Optional[tuple[int, str]]:
        if self.chip is None or self.chip.flash_size <= 128 * 1024 or self._extended:
            return None
        major, minor = self.version
        return (
            128 * 1024,
            f"optiboot {major}.{minor} takes the upper address bit from bit 15 of the word "
            "address and ignores the extended-address command, so it only reaches the first "
            "128 KiB",
        )

    # --- pages ----------------------------------------------------------------------------

    def _read_page(self, address: int) -> bytes:
        assert self.chip is not None
        return self.proto.read_page(address, self.chip.page_size, extended=self._extended)

    def _read_span(self, address: int, length: int) -> bytes:
        return self.proto.read_page(address, length, extended=self._extended)

    def _write_run(
        self,
        pages: list[tuple[int, bytes]],
        progress: Callable[[int], None],
        cancel: Optional[CancelToken],
    ) -> list[tuple[int, bytes]]:
        for addr, data in pages:
            if cancel is not None:
                cancel.check()
            self._with_recovery(
                lambda a=addr, d=data: self.proto.write_page(a, d, extended=self._extended)  # type: ignore[misc]
            )
            progress(len(data))
        return pages


def open_flasher(target: Target, log: Optional[LogCallback] = None) -> Stk500v1Flasher:
    return open_serial_flasher(Stk500v1Flasher, target, log, DEFAULT_BAUD, arduino_reset())
