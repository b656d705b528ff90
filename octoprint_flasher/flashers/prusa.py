"""Prusa MK3/MK3S/MK3S+ (Einsy RAMBo) and MK2.5 (miniRAMBo): firmware and language catalogs
in one job, on one port.

Pass 1 is the Mega stk500v2 flasher with Prusa's additions: the ``0x71`` command (answered
``00`` only by Prusa's bootloader, which then shows write/verify progress on the LCD), and the
Einsy USB chip's ';' defect (early 32U2 firmware inserts 0xFF after every 0x3B from the host).
No byte 0x3B is ever sent: page data containing ';' is written in two rounds (';' as 0x3F, then
0xFB where ';' belongs and 0xFF elsewhere: flash can only clear bits, 0x3F & 0xFB = 0x3B),
sequence numbers are chosen so neither they nor the checksum are 0x3B, and an address whose
LOAD_ADDRESS would carry 0x3B is reached from the page before it.

Each second round is one more PROGRAM_FLASH_ISP, so the bootloader's sequential erase pointer
runs one page ahead per round: pages after the last one written get erased. So a session that
uses rounds always runs to the end of the image (a quick re-flash or a re-write then writes
everything), and page 0 goes last in its own session only when it needs no second round.

Pass 2 (languages, ``research/prusa.md`` §1.6-1.7): after LEAVE the port stays open; the
firmware prints ``start``, we send the handshake at once, and its XFLASH handler writes the
catalogs. A 64 KB block is erased only when its first page is written, once per handler
session, so every touched block is written from its first page, and a block that must be
written again needs a new session (a reboot of the handler). Blocks already identical are
skipped. A failed pass 2 leaves the verified firmware running in English, and says so.
"""

from __future__ import annotations

import re
import time
from typing import Any, Callable, Optional

from ..errors import ConnectError, FlashError, PreflightError
from ..flasher import (
    STAGE_LEAVING,
    VERIFIED_READ_BACK,
    CancelToken,
    FlashResult,
    LogCallback,
    Progress,
    ProgressCallback,
    TargetInfo,
    no_progress,
)
from ..image import prusa_hex
from ..image.model import FirmwareImage, Segment
from ..links.reset import wiring_reset
from ..links.serial_port import modem_lines_work
from ..protocols.prusa_xflash import Xflash, XflashError
from ..protocols.stk500v2 import Stk500v2, Stk500v2Error, frame, load_address_body
from ..target import Target
from .avr_base import open_serial_flasher
from .stk500v2 import Stk500v2Flasher

SEMICOLON = 0x3B
CMD_SET_UPLOAD_SIZE_PRUSA3D = 0x71

STAGE_WRITING_LANGUAGES = "writing_languages"
STAGE_VERIFYING_LANGUAGES = "verifying_languages"
STAGE_READING_LANGUAGES = "reading_languages"

XFLASH_PAGE = 256
XFLASH_BLOCK = 0x10000
#: USB ids of boards whose USB chip may have the ';' defect (Einsy and miniRAMBo 32U2)
PRUSA_USB = {(0x2C99, 0x0001), (0x2C99, 0x0002), (0x27B1, 0x0001)}
#: a Raspberry Pi's GPIO UART (the Einsy's RPi header): no DTR, and the language handler
#: only listens on the USB UART
_GPIO_PORT = re.compile(r"/dev/(ttyAMA\d+|serial\d+|ttyS\d+)$")


class LanguagePassError(FlashError):
    """Pass 2 failed after pass 1 succeeded: the printer runs the new firmware in English."""

    kind = "languages"

    def __init__(self, message: str, cause: str, hint: str, firmware: FlashResult) -> None:
        super().__init__(
            "The firmware was written and verified (the printer works, in English); the "
            f"languages were NOT installed: {message}",
            cause,
            hint,
        )
        self.firmware = firmware


def _clean_address(address: int, page: int) -> int:
    """The nearest page at or below ``address`` whose LOAD_ADDRESS frame holds no 0x3B."""
    back = address - address % page
    while back and SEMICOLON in load_address_body(back):
        back -= page
    return back


def on_gpio_uart(port: Optional[str]) -> bool:
    return bool(port and _GPIO_PORT.match(port))


def _prusa_info(image: FirmwareImage) -> dict[str, Any]:
    extra = getattr(image, "extra", None) or {}
    info: dict[str, Any] = extra.get("prusa") or {}
    return info


def _external(image: FirmwareImage) -> list[Segment]:
    return list(getattr(image, "external", None) or [])


def check_image(image: FirmwareImage, target: Target) -> list[str]:
    """All the file alone can tell (no I/O): a printer file, below the Einsy bootloader, its
    catalogs belonging to its firmware (checked when loading), and whether pass 2 can run."""
    info = _prusa_info(image)
    kind = info.get("kind", prusa_hex.AVR_PRINTER)
    prusa_hex.check_for_printer(kind, image.filename or "the file", image.end)
    if target.mcu and target.mcu.lower().replace("atmega", "m") not in ("m2560",):
        raise PreflightError(
            f"Prusa MK3/MK2.5 boards carry an ATmega2560, not {target.mcu}.",
            hint="Leave the MCU empty for the printer, or choose the avr109 method for an "
            "MMU/CW1. Nothing was written.",
        )
    warnings: list[str] = []
    if kind == prusa_hex.MK3_MULTILANG:
        if on_gpio_uart(target.port):
            warnings.append(
                f"{target.port} is the Einsy's Raspberry Pi header: only the firmware can be "
                "written there (press the printer's reset knob when asked); the languages "
                "need the USB port."
            )
    elif image.external:
        raise PreflightError("Language data without a MULTILANG header.", hint="Re-download.")
    else:
        warnings.append(
            "This file has no language catalogs (an ENGLISH or MK2.5 build): only the firmware "
            "is written."
        )
    return warnings


class PrusaStk500v2(Stk500v2):
    """Frames whose sequence number and checksum are never 0x3B."""

    def send(self, body: bytes) -> int:
        while True:
            seq = self._next_seq()
            data = frame(seq, body)
            if seq != SEMICOLON and data[-1] != SEMICOLON:
                break
        self.wire.write(data)
        return seq


class PrusaFlasher(Stk500v2Flasher):
    method = "prusa"
    protocol_name = "Prusa stk500v2"
    bootloader_name = "stk500v2 (Prusa Einsy/miniRAMBo)"

    def __init__(self, link: Any, *, target: Target, **kw: Any) -> None:
        super().__init__(link, **kw)
        opts = target.options
        self.target = target
        #: Prusa's bootloader answered 0x71 (None: not asked yet)
        self.prusa_bootloader: Optional[bool] = None
        #: write pages with ';' in two rounds: None = find out whether the USB chip has the
        #: defect (one probe per session), True/False = forced by the caller
        forced = opts.get("semicolon_rounds")
        self.semicolon_rounds: Optional[bool] = None if forced is None else bool(forced)
        self._forced_rounds = forced is not None
        self.start_timeout = float(opts.get("start_timeout", 10.0))
        self.handshake_timeout = float(opts.get("handshake_timeout", 1.0))
        self.drain_quiet = float(opts.get("drain_quiet", 0.25))
        self.xflash_timeout = float(opts.get("xflash_timeout", 0.5))
        self.erase_timeout = float(opts.get("erase_timeout", 2.0))
        self.upload_size = 0x3E000
        self.rounds = 0
        self.entered_from_app = False
        self.last_confirmation = ""
        #: the sentence leave() returns after a flash (the printer seen starting, or not)
        self._back: Optional[str] = None

    def _new_proto(self) -> Stk500v2:
        return PrusaStk500v2(
            self.link.ser, timeout=self.timeout, page_timeout=self.page_timeout, retries=3
        )

    # --- session: the 0x71 probe --------------------------------------------------------------

    def _start_session(self) -> bytes:
        self.entered_from_app = True  # the DTR reset stopped whatever ran
        signature = super()._start_session()
        self._announce_size()
        if not self._forced_rounds and self.semicolon_rounds is None:
            self._probe_semicolon()
        return signature

    def _probe_semicolon(self) -> None:
        """GET_PARAMETER 0x3B: answered when ';' reaches the AVR intact; a USB chip with the
        defect inserts 0xFF, the checksum fails and the bootloader drops the frame (the
        extra byte lands inside the 2-byte body, so its buffer cannot overflow)."""
        try:
            self.proto.command(bytes([0x03, SEMICOLON]), resend=False)
            intact = True
        except Stk500v2Error as exc:
            if not exc.silent:
                intact = True  # refused, but the frame arrived intact
            else:
                intact = False
                self.proto.wire.drain(0.05)
        self.semicolon_rounds = not intact
        self.log(
            "Prusa: ';' reaches the board intact: pages are written in one round"
            if intact
            else "Prusa: this USB-serial chip mangles ';' (old Einsy 32U2 firmware): pages "
            "with ';' are written in two rounds"
        )

    def _announce_size(self) -> None:
        size = self.upload_size
        while SEMICOLON in size.to_bytes(3, "little"):
            size += 1  # only the LCD's percentage uses it
        try:
            self.proto.command(bytes([CMD_SET_UPLOAD_SIZE_PRUSA3D]) + size.to_bytes(3, "little"))
            found = True
        except Stk500v2Error as exc:
            if exc.silent:
                raise
            found = False
        if found != self.prusa_bootloader:
            self.log(
                "Prusa bootloader found (0x71 answered): the printer's LCD shows progress"
                if found
                else "This board's bootloader is not Prusa's (0x71 refused): the firmware can "
                "be written, but the printer cannot switch languages"
            )
        self.prusa_bootloader = found

    def _details(self) -> dict[str, Any]:
        return {**super()._details(), "prusa_bootloader": self.prusa_bootloader}

    def _table_boot_start(self, chip: Any) -> tuple[int, str]:
        # Prusa's (and the Mega's) stk500v2 bootloader: 8 KB at 0x3E000
        return prusa_hex.EINSY_BOOT_START, "Prusa Einsy/miniRAMBo bootloader, 8 KB"

    # --- pass 1: pages without a single 0x3B -------------------------------------------------

    def _needs_rounds(self, data: bytes) -> bool:
        return self.semicolon_rounds is not False and SEMICOLON in data

    def _plan(
        self,
        image: FirmwareImage,
        quick: bool,
        progress: ProgressCallback,
        cancel: Optional[CancelToken],
    ) -> tuple[list[tuple[int, bytes]], int]:
        todo, skipped = super()._plan(image, quick, progress, cancel)
        if skipped and any(self._needs_rounds(d) for _, d in todo):
            # a second round moves the erase pointer past the run: write to the end
            self.log("Prusa: pages with ';' need two rounds, so the whole image is written")
            return self._pages(image), 0
        return todo, skipped

    def _rewrite_plan(
        self, bad: list[tuple[int, bytes, bytes]], written: list[tuple[int, bytes]]
    ) -> list[tuple[int, bytes]]:
        if any(self._needs_rounds(d) for _, d in written):
            return list(written)
        return super()._rewrite_plan(bad, written)

    def _write_run(
        self,
        pages: list[tuple[int, bytes]],
        progress: Callable[[int], None],
        cancel: Optional[CancelToken],
    ) -> list[tuple[int, bytes]]:
        if pages and self._needs_rounds(pages[0][1]):
            # page 0 in its own session would need two programs, and the second erases page 1
            self.log("Prusa: page 0 holds ';', so it is written in the main session")
            return self._session_with_retries(pages, progress, cancel)
        return super()._write_run(pages, progress, cancel)

    def _program_page(self, addr: int, data: bytes) -> None:
        """A page holding ';' on a USB chip with the defect goes in two rounds: ';' first
        written as '?' (0x3F), then the same page again with 0xFB where ';' belongs and 0xFF
        elsewhere (flash programming only clears bits: 0x3F & 0xFB = 0x3B)."""
        if not self._needs_rounds(data):
            self._program(addr, data)
            return
        self._program(addr, bytes(0x3F if b == SEMICOLON else b for b in data))
        self._seek_for_program(addr)
        self._program(addr, bytes(0xFB if b == SEMICOLON else 0xFF for b in data))
        self.rounds += 1

    def _program(self, addr: int, data: bytes) -> None:
        if self._address != addr:
            self._seek_for_program(addr)
        super()._program_page(addr, data)

    def _seek_for_program(self, addr: int) -> None:
        """LOAD_ADDRESS ``addr``; when that frame would carry 0x3B, load the page before and
        program it with 0xFF (which changes no bit) so the address advances to ``addr``."""
        if SEMICOLON not in load_address_body(addr) or addr == 0:
            self.proto.load_address(addr)
            self._address = addr
            return
        size = self._page_size()
        back = _clean_address(addr, size)
        self.proto.load_address(back)
        self._address = back
        while back < addr:
            self._program(back, b"\xff" * size)
            back += size

    def _read_span(self, address: int, length: int) -> bytes:
        if self._address != address and SEMICOLON in load_address_body(address):
            # reach the address by reading from the nearest page before it that can be loaded
            back = _clean_address(address, self._page_size())
            super()._read_span(back, address - back)
        return super()._read_span(address, length)

    def _page_size(self) -> int:
        assert self.chip is not None
        return self.chip.page_size

    # --- the whole job -------------------------------------------------------------------------

    def check(self, image: FirmwareImage, target: TargetInfo) -> list[str]:
        warnings = check_image(image, self.target)
        warnings += super().check(image, target)
        if _external(image) and self.prusa_bootloader is False:
            warnings.append(
                "The bootloader is not Prusa's: the languages are skipped (the printer could "
                "not switch to them). The firmware works in English."
            )
        return warnings

    def flash(
        self,
        image: FirmwareImage,
        progress: ProgressCallback = no_progress,
        cancel: Optional[CancelToken] = None,
        quick: bool = False,
    ) -> FlashResult:
        started = time.monotonic()
        if self.in_bootloader and self.upload_size != image.end:
            self.upload_size = image.end
            self._announce_size()
        else:
            self.upload_size = image.end
        first = super().flash(image, progress, cancel, quick)
        pass1 = f"firmware: {first.bytes_verified} bytes written and read back" + (
            f" ({self.rounds} pages with ';' in two rounds)" if self.rounds else ""
        )
        self.log(f"Prusa: pass 1 done, {pass1}")
        progress(Progress(STAGE_LEAVING, 0, 1))
        self._leave()
        self.in_bootloader = False
        languages = _external(image)
        lang_note = ""
        written = skipped = 0
        if not languages:
            lang_note = "languages: none in this file"
            seen = self._wait_start(self.start_timeout, first, required=False)
            lang_note += "; " + seen
        elif self.prusa_bootloader is False:
            lang_note = "languages: skipped (not a Prusa bootloader, no language switching)"
        elif on_gpio_uart(self.link.port) or not (
            self.link.can_reopen or modem_lines_work(self.link.ser)
        ):
            lang_note = "languages: skipped (only possible over the printer's USB port)"
        else:
            written, skipped = self._pass2(languages, progress, cancel, first)
            nbytes = sum(len(s.data) for s in languages)
            lang_note = (
                f"languages: {nbytes} bytes of catalogs in the printer's XFLASH read back "
                f"and equal ({written} blocks written, {skipped} already identical)"
            )
        confirmation = f"Pass 1 {pass1}; pass 2 {lang_note}."
        self.last_confirmation = confirmation
        self.log(f"Prusa: {confirmation}")
        return FlashResult(
            bytes_written=first.bytes_written,
            bytes_verified=first.bytes_verified,
            blocks_written=first.blocks_written,
            blocks_skipped=first.blocks_skipped,
            seconds=time.monotonic() - started,
            verified_by=VERIFIED_READ_BACK,
            confirmation=confirmation,
        )

    def leave(self) -> Optional[str]:
        """After :meth:`flash` the printer already runs its firmware: say whether it was seen
        starting (once)."""
        if self.in_bootloader:
            self._leave()
            self.in_bootloader = False
        back, self._back = self._back, None
        return back

    # --- pass 2 ------------------------------------------------------------------------------

    def _wait_start(self, timeout: float, first: FlashResult, *, required: bool) -> str:
        x = Xflash(self.link.ser)
        try:
            x.wait_for_start(timeout)
            self._back = "The printer restarted with the new firmware (it printed 'start')."
            return "the printer restarted (it printed 'start')"
        except TimeoutError as exc:
            if required:
                raise self._no_start(exc.args[0] if exc.args else b"", first) from None
            return (
                f"the printer printed no 'start' within {timeout:.0f} s: if it stays on the "
                "splash screen, power-cycle it"
            )

    def _no_start(self, seen: bytes, first: FlashResult) -> LanguagePassError:
        return LanguagePassError(
            f"the printer did not print 'start' within {self.start_timeout:.0f} s after the "
            "firmware was written" + (f" (it sent {seen[-40:]!r})" if seen else "") + ".",
            cause="The firmware hangs at the splash screen (a known problem of 3.9.x), the "
            "board lost power, or something else holds the port.",
            hint="Power-cycle the printer; if it boots, flash the same file again to install "
            "the languages (the firmware part is then skipped quickly with quick re-flash).",
            firmware=first,
        )

    def _enter_handler(self, first: FlashResult) -> Xflash:
        x = Xflash(self.link.ser, timeout=self.xflash_timeout, erase_timeout=self.erase_timeout)
        try:
            x.wait_for_start(self.start_timeout)
        except TimeoutError as exc:
            raise self._no_start(exc.args[0] if exc.args else b"", first) from None
        if not x.enter(self.handshake_timeout, self.drain_quiet):
            raise LanguagePassError(
                "the firmware printed 'start' but did not confirm the language-flash "
                "handshake (w25x20cl_enter → w25x20cl_cfm).",
                cause="This firmware has no language-flash handler (before 3.3, or a board "
                "with the GD25Q20C flash chip under firmware older than 3.10), or another "
                "program wrote to the port during the short window after 'start'.",
                hint="Make sure nothing else uses the port and flash the same file again; "
                "on a printer that never confirms, the languages cannot be installed from "
                "here (English works).",
                firmware=first,
            )
        x.sync()
        sig = x.read_signature()
        if sig != b"\x1e\x98\x01":
            raise XflashError(f"The language handler reports signature {sig.hex(' ')}.")
        return x

    def _recover(self, x: Xflash, first: FlashResult) -> Xflash:
        """End a stuck handler session: bytes that are never 0x20 make it reject the end of
        whatever command it is in and reboot (no page is programmed), then enter again.

        The handler reboots on the second such byte (16 ms watchdog) and prints ``start`` while
        the rest may still be arriving, which spoils the next handshake: when it does, reset
        the board by reopening the port (DTR) and enter once more from a clean start."""
        self.log("Prusa: restarting the language handler")
        x.wire.write(b"\x00" * 300)
        try:
            return self._enter_handler(first)
        except LanguagePassError:
            if not self.link.can_reopen:
                raise
        self.log("Prusa: the handler did not come back cleanly; resetting the board")
        self.link.reopen()
        return self._enter_handler(first)

    def _pass2(
        self,
        languages: list[Segment],
        progress: ProgressCallback,
        cancel: Optional[CancelToken],
        first: FlashResult,
    ) -> tuple[int, int]:
        image = FirmwareImage(languages, kind="xflash")
        blocks: dict[int, list[tuple[int, bytes]]] = {}
        for addr, data in image.blocks(XFLASH_PAGE):
            blocks.setdefault(addr - addr % XFLASH_BLOCK, []).append((addr, data))
        for start, pages in blocks.items():
            if pages[0][0] != start:  # the block's first page triggers its erase
                pages.insert(0, (start, b"\xff" * XFLASH_PAGE))
        try:
            x = self._enter_handler(first)
            self.log("Prusa: language handler entered")
            try:
                todo = self._blocks_to_write(x, blocks, progress, cancel)
            except XflashError as exc:
                self.log(f"Prusa: {exc.message}")
                x = self._recover(x, first)
                todo = self._blocks_to_write(x, blocks, progress, cancel)
            tries = 0
            while True:
                try:
                    self._write_blocks(x, blocks, todo, progress, cancel)
                    bad = self._verify_blocks(x, blocks, todo, progress, cancel)
                except XflashError as exc:
                    tries += 1
                    if tries > 3:
                        raise
                    self.log(f"Prusa: {exc.message}")
                    x = self._recover(x, first)
                    continue
                if not bad:
                    break
                tries += 1
                if tries > 2:
                    raise LanguagePassError(
                        f"the language flash still differs at 0x{bad[0]:05X} after writing "
                        "its block again.",
                        cause="The printer's external flash chip does not take the data.",
                        hint="Flash again; if it keeps failing the XFLASH chip may be faulty.",
                        firmware=first,
                    )
                self.log(f"Prusa: {len(bad)} language blocks differ; writing them again")
                todo = bad
                x = self._recover(x, first)
            x.leave()
            self._wait_after_leave(x)
        except LanguagePassError:
            raise
        except FlashError as exc:
            raise LanguagePassError(
                exc.message, cause=exc.cause, hint=exc.hint or "Flash again.", firmware=first
            ) from exc
        return len(todo), len(blocks) - len(todo)

    def _wait_after_leave(self, x: Xflash) -> None:
        try:
            x.wait_for_start(self.start_timeout)
            self.log("Prusa: the printer restarted after the language pass")
            self._back = (
                "The printer restarted with the new firmware (it printed 'start'): choose a "
                "language on the printer; it restarts a few times while it copies it."
            )
        except TimeoutError:
            self.log("Prusa: no 'start' after the language pass (the catalogs are verified)")
            self._back = (
                "The printer printed no 'start' after the language pass (firmware and "
                "languages are verified): if it stays on the splash screen, power-cycle it."
            )

    def _blocks_to_write(
        self,
        x: Xflash,
        blocks: dict[int, list[tuple[int, bytes]]],
        progress: ProgressCallback,
        cancel: Optional[CancelToken],
    ) -> list[int]:
        """Blocks whose content differs. Reading stops at a block's first differing page;
        a new firmware's catalogs differ in the first page (their signature), so this costs
        about one page per block."""
        todo: list[int] = []
        total = sum(len(p) for p in blocks.values()) * XFLASH_PAGE
        done = 0
        for start, pages in blocks.items():
            for addr, data in pages:
                if cancel is not None:
                    cancel.check()
                same = x.read_page(addr, len(data)) == data
                done += len(data)
                progress(Progress(STAGE_READING_LANGUAGES, done, total))
                if not same:
                    todo.append(start)
                    break
        return todo

    def _write_blocks(
        self,
        x: Xflash,
        blocks: dict[int, list[tuple[int, bytes]]],
        todo: list[int],
        progress: ProgressCallback,
        cancel: Optional[CancelToken],
    ) -> None:
        total = sum(len(blocks[b]) for b in todo) * XFLASH_PAGE
        done = 0
        progress(Progress(STAGE_WRITING_LANGUAGES, 0, total))
        for start in todo:
            for addr, data in blocks[start]:
                if cancel is not None:
                    cancel.check()
                if self._needs_rounds(data):
                    x.program_page(addr, bytes(0x3F if b == SEMICOLON else b for b in data))
                    x.program_page(addr, bytes(0xFB if b == SEMICOLON else 0xFF for b in data))
                else:
                    x.program_page(addr, data)
                done += len(data)
                progress(Progress(STAGE_WRITING_LANGUAGES, done, total))

    def _verify_blocks(
        self,
        x: Xflash,
        blocks: dict[int, list[tuple[int, bytes]]],
        todo: list[int],
        progress: ProgressCallback,
        cancel: Optional[CancelToken],
    ) -> list[int]:
        total = sum(len(blocks[b]) for b in todo) * XFLASH_PAGE
        done = 0
        bad: list[int] = []
        for start in todo:
            for addr, data in blocks[start]:
                if cancel is not None:
                    cancel.check()
                got = x.read_page(addr, len(data))
                done += len(data)
                progress(Progress(STAGE_VERIFYING_LANGUAGES, done, total))
                if got != data:
                    bad.append(start)
                    break
        return bad


def open_flasher(target: Target, log: Optional[LogCallback] = None) -> PrusaFlasher:
    def build(link: Any, **kw: Any) -> PrusaFlasher:
        return PrusaFlasher(link, target=target, **kw)

    if on_gpio_uart(target.port) and not callable(target.options.get("prompt")):
        raise ConnectError(
            f"{target.port} is the Raspberry Pi header of the Einsy: it has no reset line.",
            cause="The bootloader only listens for a second after a reset, and this port "
            "cannot reset the printer.",
            hint="Flash over the printer's USB port (the languages need it anyway), or flash "
            "from the page, which asks you to press the printer's reset knob at the right "
            "moment.",
        )
    return open_serial_flasher(build, target, log, 115200, wiring_reset())
