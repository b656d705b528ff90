"""What the two AVR serial flashers (STK500v1 and STK500v2) share.

Entering the bootloader through a chain of reset strategies, naming the chip from its signature,
finding where the bootloader starts, the pre-write safety checks, and the write → verify →
rewrite-once → report loop. The protocol subclasses supply the few page operations that differ.
"""

from __future__ import annotations

import abc
import time
from typing import Any, Callable, Optional, TypeVar

from .. import chips
from ..errors import ConnectError, FlashError, PreflightError, ProtocolError, VerifyError
from ..flasher import (
    STAGE_ENTERING,
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
from ..image.model import FirmwareImage, Segment
from ..links.reset import DtrPulse, NoModemLines, OpenedReset, Prompt, ResetStrategy, reset_chain
from ..links.serial_port import SerialLink
from ..target import Target
from .avr_chip import Chip, chip_for_signature
from .avr_detect import explain_silence

#: recoveries (reset + resync) one flash may use before giving up
MAX_RECOVERIES = 8


class SilentBootloader(ConnectError):
    """No bootloader answered within its window after any reset we could do."""


class AvrSerialFlasher(Flasher, abc.ABC):
    """Template for a serial AVR bootloader session."""

    #: every session starts with our reset of the running board, and an AVR bootloader with
    #: no application simply starts again: leaving after a refusal is always safe
    entered_from_app = True

    protocol_name = ""
    bootloader_name = ""
    #: whether writing some pages again can disturb others (then all are verified again)
    rewrite_touches_others = False
    #: bytes per read command when reading runs of pages (None: one page)
    read_chunk: Optional[int] = None
    #: the protocol object (Stk500v1 / Stk500v2), made anew by each subclass per session
    proto: Any

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
        retries: int = 3,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__(log)
        self.link = link
        self.resets = resets
        self.mcu = mcu
        self.settle = settle
        #: per-command and per-page answer timeouts of the protocol object
        self.timeout = timeout
        self.page_timeout = page_timeout
        self.retries = retries
        self.sleep = sleep
        self.chip: Optional[Chip] = None
        self.info: Optional[TargetInfo] = None
        self.in_bootloader = False
        self.recoveries = 0
        #: which reset strategy worked last: recoveries start with it
        self._good_reset: Optional[ResetStrategy] = None

    # --- protocol hooks -------------------------------------------------------------------

    @abc.abstractmethod
    def _sync(self, strategy: ResetStrategy) -> bool:
        """After ``strategy`` reset the board: get the bootloader's attention (bounded by its
        window). Return False when it stayed silent."""

    @abc.abstractmethod
    def _start_session(self) -> bytes:
        """Enter programming mode after a sync; return the 3 signature bytes."""

    @abc.abstractmethod
    def _read_page(self, address: int) -> bytes:
        """One page at a page-aligned address."""

    @abc.abstractmethod
    def _write_run(
        self,
        pages: list[tuple[int, bytes]],
        progress: Callable[[int], None],
        cancel: Optional[CancelToken],
    ) -> list[tuple[int, bytes]]:
        """Write these pages (ascending) with per-command recovery; return what was written
        (a protocol may have to write more than asked)."""

    def _leave(self) -> None:
        """Leave programming mode so the application starts (both protocols have the command)."""
        self.proto.leave_progmode()

    @abc.abstractmethod
    def _reach_limit(self) -> Optional[tuple[int, str]]:
        """Highest address + 1 this bootloader can write, with the reason, if below flash."""

    # --- entering -------------------------------------------------------------------------

    def enter(self, first: bool = True) -> None:
        """Reset into the bootloader and start a programming session."""
        self.link.open()
        order = list(self.resets)
        if self._good_reset is not None and not first:
            order.remove(self._good_reset)
            order.insert(0, self._good_reset)
        tried: list[str] = []
        for strategy in order:
            if not first and isinstance(strategy, OpenedReset):
                continue  # only the open that started this flasher was a reset
            try:
                strategy(self.link)
            except NoModemLines:
                continue
            tried.append(strategy.describe)
            self.log(f"{self.protocol_name}: {strategy.describe}, waiting for the bootloader")
            if self._sync(strategy):
                self._good_reset = strategy
                signature = self._start_session()
                self.in_bootloader = True
                self._on_signature(signature)
                return
        raise self._silence_error(tried)

    def _silence_error(self, tried: list[str]) -> FlashError:
        return explain_silence(self, tried) or SilentBootloader(
            f"No {self.bootloader_name} bootloader answered on {self.link.port} at "
            f"{self.link.baud} baud (tried: {'; '.join(tried) or 'nothing'}).",
            cause="Wrong baud rate or protocol for this board, a board without auto-reset, or "
            "another program on the port.",
            hint="Let the flasher detect the board (method 'auto'); if the board has no "
            "auto-reset, press its reset button when asked.",
        )

    def _on_signature(self, signature: bytes) -> None:
        chip = chip_for_signature(signature)
        if self.chip is not None and chip.signature != self.chip.signature:
            raise ProtocolError(
                f"The chip's signature changed between sessions ({self.chip.name} → {chip.name}).",
                cause="The serial line garbles bytes or a different board was plugged in.",
                hint="Check the cable and the port, then flash again.",
            )
        self.chip = chip

    def recover(self, why: Exception) -> None:
        """Reset into the bootloader again after a lost command; bounded per flash."""
        self.recoveries += 1
        self.in_bootloader = False
        if self.recoveries > MAX_RECOVERIES:
            raise self._gave_up(why, f"{MAX_RECOVERIES} resets in this flash") from why
        self.log(f"{self.protocol_name}: {getattr(why, 'message', why)} — resetting and resuming")
        self.enter(first=False)

    # --- identify and check ---------------------------------------------------------------

    def identify(self) -> TargetInfo:
        if self.info is not None and self.in_bootloader:
            return self.info
        if not self.in_bootloader:
            self.enter()
        chip = self.chip
        assert chip is not None
        boot_start, how = self._table_boot_start(chip)
        self.info = TargetInfo(
            method=self.method,
            chip=chip.name,
            flash_start=0,
            flash_size=chip.flash_size,
            app_start=0,
            app_end=boot_start,
            page_size=chip.page_size,
            bootloader=self.bootloader_name,
            details={
                "signature": chip.signature.hex(),
                "port": self.link.port,
                "baud": self.link.baud,
                "bootloader_start": boot_start,
                "bootloader_found_by": how,
                **self._details(),
            },
        )
        self.log(f"{self.protocol_name}: {self.info.describe()}")
        return self.info

    def _details(self) -> dict[str, Any]:
        return {}

    def _table_boot_start(self, chip: Chip) -> tuple[int, str]:
        """The smallest bootloader this protocol has on this chip (from :mod:`chips`): an
        image reaching past it certainly overlaps the bootloader. Whether a smaller image
        fits is decided by :meth:`check`, which reads the flash only when it matters."""
        sizes = [b.size for b in chips.bootloaders_for(chip.name) if b.protocol == self.method]
        return chip.flash_size - (min(sizes) if sizes else chip.boot_sizes[0]), "table"

    def _find_boot_start(self, chip: Chip) -> tuple[int, str]:
        """Where the bootloader's code begins: the lowest BOOTSZ candidate (one page read
        each) whose first page is programmed. A bootloader's code always starts at its
        section start; old application code reaching a lower candidate can make the answer
        too low (a refusal that is safe), never too high."""
        found: Optional[int] = None
        for size in chip.boot_sizes:
            start = chip.flash_size - size
            page = self._with_recovery(lambda s=start: self._read_page(s))  # type: ignore[misc]
            if page != b"\xff" * len(page):
                found = start
        if found is not None:
            return found, "read"
        # nothing programmed at any candidate: assume the largest known bootloader
        sizes = [b.size for b in chips.bootloaders_for(chip.name) if b.protocol == self.method]
        size = max(sizes) if sizes else chip.boot_sizes[-1]
        return chip.flash_size - size, "table (flash top reads empty)"

    def _locate_bootloader(self, target: TargetInfo) -> None:
        """Replace the table's bootloader start by the one read from the flash."""
        assert self.chip is not None
        start, how = self._find_boot_start(self.chip)
        target.app_end = start
        target.details["bootloader_start"] = start
        target.details["bootloader_found_by"] = how
        self.log(f"{self.protocol_name}: bootloader starts at 0x{start:05X} ({how})")

    def check(self, image: FirmwareImage, target: TargetInfo) -> list[str]:
        warnings: list[str] = []
        if self.mcu and not chips.same_chip(self.mcu, target.chip):
            raise PreflightError(
                f"This board is an {target.chip} (signature {target.details.get('signature')}), "
                f"but the firmware was built for {self.mcu}.",
                cause="The firmware file is for another board, or the wrong board is connected.",
                hint=f"Build or download the firmware for the {target.chip}, or connect the "
                f"board the firmware is for. Nothing was written.",
            )
        if not image.segments:
            raise PreflightError("The firmware image is empty.", hint="Pick another file.")
        if (
            self.chip is not None
            and self.in_bootloader
            and image.end > self.chip.flash_size - max(self.chip.boot_sizes)
            and target.details.get("bootloader_found_by") == "table"
        ):
            # the image reaches where a bootloader may start: find out where this one does
            self._locate_bootloader(target)
        if image.start < 0 or image.end > target.flash_size:
            raise PreflightError(
                f"The image spans 0x{image.start:05X}-0x{image.end - 1:05X}, outside the "
                f"{target.chip}'s {target.flash_size // 1024} KiB of flash.",
                cause="The firmware was built for a larger chip.",
                hint=f"Build the firmware for the {target.chip}. Nothing was written.",
            )
        if image.end > target.app_end:
            over = image.end - target.app_end
            raise PreflightError(
                f"The image ends at 0x{image.end - 1:05X}, {over} bytes into the bootloader, "
                f"which starts at 0x{target.app_end:05X} on this {target.chip}.",
                cause="The firmware is too large for the space the bootloader leaves "
                f"({target.app_end} bytes), or it was built for a board without a bootloader.",
                hint="Disable features to make the firmware smaller, or build it for this "
                "board's bootloader size. Nothing was written.",
            )
        limit = self._reach_limit()
        if limit is not None and image.end > limit[0]:
            raise PreflightError(
                f"The image reaches 0x{image.end - 1:05X}, beyond what this bootloader can "
                f"address (0x{limit[0]:05X}): {limit[1]}.",
                cause=limit[1],
                hint="Install a newer optiboot (v6 or later, e.g. MegaCore/MightyCore) or the "
                "stk500v2 bootloader with an ISP programmer, or make the firmware smaller. "
                "Nothing was written.",
            )
        if image.start % target.page_size:
            warnings.append(
                f"The image starts at 0x{image.start:05X}, inside a page; the rest of that "
                "page is written as 0xFF."
            )
        return warnings

    # --- flash, verify, read --------------------------------------------------------------

    def _pages(self, image: FirmwareImage) -> list[tuple[int, bytes]]:
        assert self.chip is not None
        return list(image.blocks(self.chip.page_size))

    def _with_recovery(self, op: Callable[[], Any]) -> Any:
        for attempt in range(self.retries + 1):
            try:
                return op()
            except ProtocolError as exc:
                if attempt == self.retries:
                    raise self._gave_up(exc, f"{self.retries} resets") from exc
                self.recover(exc)
        raise AssertionError("unreachable")  # pragma: no cover

    def _gave_up(self, why: Exception, after: str) -> ProtocolError:
        return ProtocolError(
            f"Gave up after {after}: {getattr(why, 'message', why)}",
            cause="The serial line loses or garbles bytes again and again (bad cable, "
            "electrical noise from the printer's motors or heaters, wrong baud rate).",
            hint="The bootloader is still on the chip and starts on every reset: use a short, "
            "shielded USB cable, switch the printer's power supply off (USB powers the chip) "
            "and flash again. Until then the board may not run its firmware.",
        )

    def _plan(
        self,
        image: FirmwareImage,
        quick: bool,
        progress: ProgressCallback,
        cancel: Optional[CancelToken],
    ) -> tuple[list[tuple[int, bytes]], int]:
        """Pages to write, and how many image pages were skipped as already identical."""
        pages = self._pages(image)
        if not quick:
            return pages, 0
        current = self._read_pages([a for a, _ in pages], STAGE_READING, progress, cancel)
        todo = [(a, d) for a, d in pages if current[a] != d]
        return todo, len(pages) - len(todo)

    def flash(
        self,
        image: FirmwareImage,
        progress: ProgressCallback = no_progress,
        cancel: Optional[CancelToken] = None,
        quick: bool = False,
    ) -> FlashResult:
        started = time.monotonic()
        if not self.in_bootloader:
            progress(Progress(STAGE_ENTERING, 0, 1))
            self.enter()
        info = self.info or self.identify()
        self.check(image, info)
        todo, skipped = self._plan(image, quick, progress, cancel)
        written = self._write_and_verify(todo, progress, cancel)
        self.log(
            f"{self.protocol_name}: wrote and verified {len(written)} pages"
            + (f", {skipped} already identical" if skipped else "")
        )
        nbytes = sum(len(d) for _, d in written)
        return FlashResult(
            bytes_written=nbytes,
            bytes_verified=nbytes,
            blocks_written=len(written),
            blocks_skipped=skipped,
            seconds=time.monotonic() - started,
        )

    def _write_and_verify(
        self,
        todo: list[tuple[int, bytes]],
        progress: ProgressCallback,
        cancel: Optional[CancelToken],
    ) -> list[tuple[int, bytes]]:
        if not todo:
            return []
        written = self._write_pages(todo, progress, cancel)
        bad = self._verify(written, progress, cancel)
        if bad:
            # one more write of what differs: a byte garbled on the way in is written
            # silently by optiboot (STK500v1 has no checksum)
            addr = bad[0][0]
            self.log(
                f"{self.protocol_name}: verify found {len(bad)} differing pages from "
                f"0x{addr:05X}; writing them again"
            )
            again = self._write_pages(self._rewrite_plan(bad, written), progress, cancel)
            if self.rewrite_touches_others:
                again = sorted(dict([*written, *again]).items())
            still = self._verify(again, progress, cancel)
            if still:
                raise self._verify_error(still[0])
        return written

    def _rewrite_plan(
        self, bad: list[tuple[int, bytes, bytes]], written: list[tuple[int, bytes]]
    ) -> list[tuple[int, bytes]]:
        return [(a, d) for a, d, _ in bad]

    def _write_pages(
        self,
        pages: list[tuple[int, bytes]],
        progress: ProgressCallback,
        cancel: Optional[CancelToken],
    ) -> list[tuple[int, bytes]]:
        total = sum(len(d) for _, d in pages)
        state = {"done": 0}

        def step(n: int) -> None:
            # a session restarted from page 0 writes some pages twice: never show over 100 %
            state["done"] = min(total, state["done"] + n)
            progress(Progress(STAGE_WRITING, state["done"], total))

        progress(Progress(STAGE_WRITING, 0, total))
        return self._write_run(pages, step, cancel)

    def _verify(
        self,
        pages: list[tuple[int, bytes]],
        progress: ProgressCallback,
        cancel: Optional[CancelToken],
    ) -> list[tuple[int, bytes, bytes]]:
        found = self._read_pages([a for a, _ in pages], STAGE_VERIFYING, progress, cancel)
        return [(a, d, found[a]) for a, d in pages if found[a] != d]

    def _read_pages(
        self,
        addresses: list[int],
        stage: str,
        progress: ProgressCallback,
        cancel: Optional[CancelToken],
    ) -> dict[int, bytes]:
        """Read these pages, contiguous ones as one run in :attr:`read_chunk` pieces."""
        assert self.chip is not None
        size = self.chip.page_size
        total = len(addresses) * size
        state = {"done": 0}
        progress(Progress(stage, 0, total))

        def step(n: int) -> None:
            state["done"] += n
            progress(Progress(stage, state["done"], total))

        out: dict[int, bytes] = {}
        runs: list[list[int]] = []
        for a in sorted(addresses):
            if runs and runs[-1][-1] + size == a:
                runs[-1].append(a)
            else:
                runs.append([a])
        for run in runs:
            data = self._read_run(run[0], len(run) * size, step, cancel)
            for i, a in enumerate(run):
                out[a] = data[i * size : (i + 1) * size]
        return out

    def _read_run(
        self,
        start: int,
        length: int,
        step: Callable[[int], None],
        cancel: Optional[CancelToken],
    ) -> bytes:
        assert self.chip is not None
        chunk = self.read_chunk or self.chip.page_size
        data = bytearray()
        addr = start
        end = start + length
        while addr < end:
            if cancel is not None:
                cancel.check()
            # never across a 64 KiB boundary: optiboot's read address is 16 bits wide
            n = min(chunk, end - addr, 0x10000 - (addr & 0xFFFF))
            data += self._with_recovery(lambda a=addr, k=n: self._read_span(a, k))  # type: ignore[misc]
            step(n)
            addr += n
        return bytes(data)

    def _read_span(self, address: int, length: int) -> bytes:
        """``length`` bytes from ``address``; protocols that read any length override this."""
        assert self.chip is not None and length == self.chip.page_size
        return self._read_page(address)

    def _verify_error(self, bad: tuple[int, bytes, bytes]) -> VerifyError:
        addr, want, got = bad
        i = next(i for i in range(len(want)) if i >= len(got) or want[i] != got[i])
        found = f"0x{got[i]:02X}" if i < len(got) else "nothing"
        return VerifyError(
            f"Verify failed at 0x{addr + i:05X}: expected 0x{want[i]:02X}, found {found} "
            "(after writing the page twice).",
            cause="The flash did not take the data: worn-out flash, a lock bit protecting "
            "this area, or a bootloader that writes somewhere else than it is told.",
            hint="The board stays in its bootloader; flash again. If it fails at the same "
            "address, the chip or its bootloader needs an ISP programmer.",
        )

    def read(
        self, progress: ProgressCallback = no_progress, cancel: Optional[CancelToken] = None
    ) -> FirmwareImage:
        info = self.identify()
        assert self.chip is not None
        if info.details.get("bootloader_found_by") == "table":
            self._locate_bootloader(info)  # a backup must stop where the bootloader starts
        size = self.chip.page_size
        pages = self._read_pages(
            list(range(info.app_start, info.app_end, size)), STAGE_READING, progress, cancel
        )
        chunks = [pages[a] for a in sorted(pages)]
        data = b"".join(chunks).rstrip(b"\xff")
        data += b"\xff" * (-len(data) % 2)
        segs = [Segment(info.app_start, data)] if data else []
        return FirmwareImage(segs, filename=f"{info.chip}-backup.hex", kind="hex")

    def leave(self) -> Optional[str]:
        if self.in_bootloader:
            self._leave()
            self.in_bootloader = False
        return None

    def close(self) -> None:
        self.link.close()


def prompt_or_none(target_options: dict[str, Any]) -> Optional[Prompt]:
    prompt = target_options.get("prompt")
    return prompt if callable(prompt) else None


def link_for(target: Target, default_baud: int) -> SerialLink:
    if not target.port:
        raise ConnectError(
            "No serial port given for the AVR bootloader.",
            hint="Pass --port (for example /dev/ttyUSB0), or pick the printer's port.",
        )
    return SerialLink(
        target.port,
        target.baud or default_baud,
        factory=target.options.get("serial_factory"),
    )


_F = TypeVar("_F", bound=AvrSerialFlasher)


def open_serial_flasher(
    cls: Callable[..., _F],
    target: Target,
    log: Optional[LogCallback],
    default_baud: int,
    reset: DtrPulse,
) -> _F:
    """Open the target's port (opening is the first reset) and build a flasher on it; the
    reset strategy is the bootloader's own pulse, then the user's button if a prompt exists."""
    link = link_for(target, default_baud)
    link.open()
    opts = target.options
    return cls(
        link,
        resets=reset_chain(reset, prompt_or_none(opts)),
        log=log,
        mcu=target.mcu,
        settle=float(opts.get("settle", 0.0)),
    )
