"""Flashing STM32 boards through the ROM's USB DFU (DfuSe) bootloader.

The algorithm: find the 0483:df11 device (or the one the user named), recover it to dfuIDLE,
read its memory layout, place and check the image, erase exactly the sectors the image
touches (sector-aligned, never a mass erase unless asked), write in wTransferSize chunks,
read every byte back, and leave with the application's start address, confirming the device
went away. Quick mode reads the touched sectors first and rewrites only those that differ.
Protocol bytes live in :mod:`octoprint_flasher.protocols.dfuse`; USB lookup and USB error
advice in :mod:`octoprint_flasher.links.usb_device`.
"""

from __future__ import annotations

import struct
import time
from typing import Any, Callable, Optional

from .. import chips
from ..discovery import KIND_USB_DFU, Device
from ..errors import ConnectError, FlashError, PreflightError, ProtocolError, VerifyError
from ..flasher import (
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
from ..image.klipper import klipper_build
from ..image.model import FirmwareImage, Segment
from ..links import usb_device
from ..protocols import dfuse
from ..protocols.dfuse import DfuSession, DfuStatusError, MemoryLayout, Status, Timeouts
from ..target import Target

#: DfuSe needs whole flash words: 256-bit on H7 (ECC, never rewritable), 64-bit on G0.
PAD = 32
MAX_TRANSFER = 4096  # dfu-util's Linux clamp

#: Sector-erase seconds (typical, maximum) by sector size, from the datasheets: STM32F4 at
#: x32 parallelism (16/64/128 KiB), STM32H7 128 KiB sectors (about 1 s typical; the maximum
#: allows for x8 parallelism), STM32G0 2 KiB pages. Only used to recover from the H7 ROM that
#: stays in dfuDNBUSY after an erase.
SECTOR_ERASE_S: dict[int, tuple[float, float]] = {
    2 * 1024: (0.022, 0.040),
    16 * 1024: (0.25, 0.5),
    64 * 1024: (0.55, 1.1),
    128 * 1024: (1.0, 4.0),
}

RDP_HINT = (
    "Read-out protection can only be removed by the 'unprotect' option, which makes the chip "
    "erase ALL of its flash — including a vendor bootloader such as BTT's — and reset. After "
    "that, flash a build for address 0x08000000 (no bootloader), or put the vendor "
    "bootloader back first."
)


def _vector(head: bytes) -> tuple[int, int]:
    sp, reset = struct.unpack_from("<II", head.ljust(8, b"\xff"), 0)
    return sp, reset


def _plausible_vectors(head: bytes, flash_start: int, flash_end: int) -> bool:
    """A Cortex-M vector table: stack pointer in SRAM, Thumb reset handler inside flash."""
    sp, reset = _vector(head)
    return 0x20000000 <= sp <= 0x30000000 and flash_start <= reset < flash_end and bool(reset & 1)


def guess_chip(layout: MemoryLayout) -> tuple[str, Optional[chips.Stm32Chip]]:
    """Name the chip from its sector geometry (the ROM does not say which STM32 it is)."""
    geometry = tuple((s.count, s.sector_size) for s in layout.segments if s.start >= 0x08000000)
    # the F1 lines have no USB DFU in ROM, so they never answer as 0483:df11
    dfu_chips = [c for c in chips.STM32_CHIPS if not c.name.startswith("STM32F1")]
    exact = [c for c in dfu_chips if c.sectors == geometry and c.flash_start == layout.start]
    prefix = [c for c in dfu_chips if c.sectors[: len(geometry)] == geometry and c not in exact]
    group = exact + prefix
    if len(group) == 1:
        return group[0].name, group[0]
    if group:
        return "STM32" + "/".join(c.name.replace("STM32", "") for c in group), group[0]
    if geometry and all(size == 128 * 1024 for _, size in geometry):
        return "STM32H7 (unknown variant)", chips.find_stm32("stm32h723")
    return "STM32 (unknown)", None


class DfuFlasher(Flasher):
    method = "dfu"
    can_read = True

    def __init__(self, target: Target, log: Optional[LogCallback] = None) -> None:
        super().__init__(log)
        self.target = target
        scale = float(target.options.get("dfu_time_scale", 1.0))
        self.timeouts = Timeouts(scale=scale)
        self.backend: Any = None
        self.candidate: Optional[usb_device.DfuCandidate] = None
        self.session: Optional[DfuSession] = None
        self.layout: Optional[MemoryLayout] = None
        self.info: Optional[TargetInfo] = None
        self.chip: Optional[chips.Stm32Chip] = None
        self._jump: Optional[int] = None
        self._closed = False
        self._left = False
        self._placed: Optional[int] = None
        self.sleep: Callable[[float], None] = time.sleep

    # --- connection ---------------------------------------------------------------------
    def _connect(self) -> DfuSession:
        if self.session is not None:
            return self.session
        self.backend = usb_device.resolve_backend(self.target.usb_backend)
        found = usb_device.find_dfu(self.backend, self.target.usb, self.target.usb_path)
        found = [c for c in found if c.alts or c.error]
        if not found:
            raise usb_device.not_found_error(self.backend, self.target.usb, self.target.usb_path)
        if len(found) > 1:
            listing = ", ".join(f"{c.usb_id} at {c.path or '?'}" for c in found)
            raise ConnectError(
                f"{len(found)} DFU devices are connected ({listing}).",
                cause="More than one board is in DFU mode.",
                hint="Choose one with its USB path (--usb-path BUS-PORT), or unplug the others.",
            )
        cand = found[0]
        if cand.error is not None:
            raise cand.error
        self.candidate = cand
        try:
            cand.device.set_interface_altsetting(cand.interface, 0)
        except Exception as exc:
            raise usb_device.explain_usb_error(exc, "claiming the DFU interface") from exc
        fd = dfuse.parse_functional_descriptor(cand.functional or b"")
        size = fd.transfer_size if fd is not None else 2048
        if fd is None:
            self.log("dfu: no DFU functional descriptor; assuming wTransferSize 2048")
        size = max(min(size, MAX_TRANSFER), getattr(cand.device, "bMaxPacketSize0", 64) or 64)
        session = DfuSession(
            cand.device, cand.interface, size, self.timeouts, sleep=self.sleep, log=self.log
        )
        self.layout = dfuse.parse_layout(cand.alts[0].name)
        for note in self.layout.notes:
            self.log(f"dfu: layout: {note}")
        try:
            session.recover()
        except Exception as exc:
            raise self._explain(exc, "bringing the bootloader to idle") from exc
        self.session = session
        return session

    def _explain(self, exc: BaseException, what: str) -> FlashError:
        """Every failure becomes a FlashError that says the board is still recoverable."""
        if isinstance(exc, DfuStatusError):
            code = exc.status.status
            if code == Status.ERR_VENDOR:
                return PreflightError(
                    f"{exc.what} was refused: the chip's read-out protection (RDP) is active.",
                    cause="The flash is read-protected (set by a previous firmware or tool).",
                    hint=RDP_HINT,
                )
            if code in (Status.ERR_TARGET, Status.ERR_ADDRESS):
                return PreflightError(
                    f"{exc.what} was refused: the bootloader does not accept that address.",
                    cause="Wrong start address, or the image is larger than this chip's flash.",
                    hint="Check the application start address for this board (e.g. 0x08008000 "
                    "behind a 32 KiB bootloader) and that the firmware was built for this MCU.",
                )
            if code in (Status.ERR_PROG, Status.ERR_WRITE, Status.ERR_ERASE, Status.ERR_VERIFY):
                return ProtocolError(
                    f"{exc.what} failed: {dfuse.status_text(code)}.",
                    cause="The flash there was not erased, or the chip failed to program it.",
                    hint="The board stays in DFU mode: flash again with quick off (--full). "
                    "If it repeats, power-cycle it with BOOT0 held high.",
                )
            return exc
        if isinstance(exc, FlashError):
            return exc
        if dfuse.is_usb_error(exc) or type(exc).__name__ == "NoBackendError":
            return usb_device.explain_usb_error(exc, what)
        raise exc

    # --- identify -------------------------------------------------------------------------
    def identify(self) -> TargetInfo:
        if self.info is not None:
            return self.info
        self._connect()
        cand, layout = self.candidate, self.layout
        assert cand is not None and layout is not None
        name, self.chip = guess_chip(layout)
        app_start, found = self._application_start(layout)
        if self.target.address is not None:
            app_start = self.target.address
        self.log(f"dfu: {found}")
        assert self.session is not None
        self.info = TargetInfo(
            method="dfu",
            chip=name,
            flash_start=layout.start,
            flash_size=layout.size,
            app_start=app_start,
            app_end=layout.end,
            page_size=layout.smallest_sector,
            bootloader="STM32 ROM DFU",
            details={
                "usb_id": cand.usb_id,
                "usb_path": cand.path,
                "serial": cand.serial,
                "bcd_device": f"{cand.bcd_device:04x}",
                "transfer_size": self.session.transfer_size,
                "layout": layout.raw,
                "layout_notes": list(layout.notes),
                "alternates": [a.name for a in cand.alts],
                "found": found,
            },
        )
        self.log(f"dfu: {self.info.describe()} (layout {layout.raw!r})")
        return self.info

    def _application_start(self, layout: MemoryLayout) -> tuple[int, str]:
        """Where this board's application area starts, by what its flash holds (reading does
        not change what the board runs): behind a bootloader when one sits at the flash start,
        else the flash start itself. Unreadable flash counts as a bootloader (the safe side)."""
        if self.chip is None:
            return layout.start, "chip unknown: the application area is the whole flash"
        session = self.session
        assert session is not None
        usual = self.chip.default_app_address()
        try:
            head = session.read(layout.start, 8)
            if not _plausible_vectors(head, layout.start, layout.end):
                return layout.start, "no bootloader at the flash start (it is erased or blank)"
            _, reset = _vector(head)
            offsets = [o for o in self.chip.app_offsets if o]
            if (reset & ~1) >= layout.start + max(offsets, default=0):
                return layout.start, "an application linked for the flash start, no bootloader"
            for offset in offsets:
                base = layout.start + offset
                if base > reset and _plausible_vectors(session.read(base, 8), base, layout.end):
                    return base, (
                        f"a bootloader at 0x{layout.start:08X} and an application at 0x{base:08X}"
                    )
            if session.read(usual - 8, 8) == b"\xff" * 8 and reset < usual:
                return usual, (
                    f"a bootloader at 0x{layout.start:08X}, no application behind it at "
                    f"0x{usual:08X}"
                )
            return layout.start, "an application linked for the flash start, no bootloader"
        except Exception as exc:
            self.log(f"dfu: could not read the flash start ({exc}); assuming a bootloader")
            return usual, "flash start unreadable: assuming a bootloader"

    # --- image placement and checks -------------------------------------------------------
    def _default_start(self, image: FirmwareImage) -> int:
        """Where an address-less .bin goes: the user's address, else the board's application
        start. (A Cortex-M .bin has already placed itself by its vector table.)"""
        info = self.identify()
        return self.target.address if self.target.address is not None else info.app_start

    def prepare(self, image: FirmwareImage) -> FirmwareImage:
        """Place an address-less .bin and pad to whole flash words."""
        if not image.address_given:
            start = self._default_start(image)
            if self._placed != start:
                self._placed = start
                self.log(f"dfu: placing {image.filename or 'the .bin'} at 0x{start:08X}")
            image = image.placed_at(start)
        return image.padded(PAD, base=0)

    def check(self, image: FirmwareImage, target: TargetInfo) -> list[str]:
        """Refuse images outside writable flash or over a bootloader; read-only on the board."""
        image = self.prepare(image)
        layout = self.layout
        assert layout is not None
        warnings: list[str] = []
        for seg in image.segments:
            gaps = layout.uncovered(seg.address, seg.end)
            if gaps:
                lo, hi = gaps[0]
                raise PreflightError(
                    f"The image covers 0x{lo:08X}-0x{hi - 1:08X}, which is not writable flash "
                    f"on this chip ({layout.raw}).",
                    cause="Wrong start address, or firmware built for a larger chip.",
                    hint="Build the firmware for this MCU and give the right start address "
                    f"(usually 0x{target.app_start:08X} on this board).",
                )
        first = image.segments[0]
        if len(first.data) >= 8:
            _, reset = _vector(first.data[:8])
            if (
                layout.start <= reset < layout.end
                and reset & 1
                and not any(s.address <= reset < s.end for s in image.segments)
            ):
                linked = self._link_base(reset)
                warnings.append(
                    f"The image's reset vector (0x{reset:08X}) points outside the image: it was "
                    f"built for 0x{linked:08X}, not 0x{image.start:08X}. It will not start."
                )
        build = klipper_build(image.to_bytes())
        if build is not None and build.mcu and chips.chip_matches(build.mcu, target.chip) is False:
            raise PreflightError(
                f"This Klipper build is for {build.mcu}, but the board is {target.chip}.",
                cause="The wrong 'Processor model' was selected in make menuconfig, or this is "
                "another board's file.",
                hint=f"Rebuild Klipper for {target.chip}.",
            )
        sectors = self._sectors(image)
        risk = self._bootloader_risk(image, sectors)
        if risk:
            if not self.target.allow_bootloader_erase:
                raise PreflightError(
                    risk,
                    cause="The image starts below the application area the board's bootloader "
                    "leaves free (or the firmware was built for 'no bootloader').",
                    hint="Build the firmware for the bootloader offset (e.g. 0x08008000 on "
                    "Octopus F4, 0x08020000 on H7, 0x08002000 on G0) and flash it there. To "
                    "replace the bootloader on purpose, confirm bootloader erase.",
                )
            warnings.append("WARNING: " + risk + " Proceeding because you confirmed it.")
        for w in warnings:
            self.log("dfu: " + w)
        return warnings

    def _link_base(self, reset: int) -> int:
        if self.chip is None:
            return reset & ~0xFFF
        bases = [self.chip.flash_start + o for o in self.chip.app_offsets]
        return max((b for b in bases if b <= reset), default=self.chip.flash_start)

    def _bootloader_risk(self, image: FirmwareImage, sectors: list[tuple[int, int]]) -> str:
        """Describe the bootloader the erase would destroy, or '' when none is at risk.

        An existing bootloader is non-0xFF data below the image inside a sector the image
        erases, or a vector table at the flash start whose reset handler lies below the usual
        application start, with either another vector table at that application start or
        erased flash just below it (a no-bootloader build would run straight through).
        """
        session, layout = self.session, self.layout
        assert session is not None and layout is not None
        if not sectors:
            return ""
        first_start, _ = sectors[0]
        try:
            if self.target.options.get("mass_erase"):
                head = session.read(layout.start, 8)
                if image.start > layout.start and head != b"\xff" * 8:
                    return (
                        "A mass erase wipes the whole flash, including the bootloader at "
                        f"0x{layout.start:08X}, but the image starts at 0x{image.start:08X}."
                    )
            if image.start > first_start:
                below = session.read(first_start, image.start - first_start)
                if below.strip(b"\xff"):
                    return (
                        f"Erasing the sector at 0x{first_start:08X} would also erase "
                        f"0x{first_start:08X}-0x{image.start - 1:08X}, which holds data "
                        "(a bootloader)."
                    )
            if first_start != layout.start or self.chip is None:
                return ""
            head = session.read(layout.start, 8)
            if not _plausible_vectors(head, layout.start, layout.end):
                return ""
            _, reset = _vector(head)
            app = self.chip.default_app_address()
            if not reset < app:
                return ""
            app_head = session.read(app, 8)
            # a no-bootloader build runs straight through the usual application start
            before_app = session.read(app - 8, 8)
        except DfuStatusError as exc:
            if exc.status.status == Status.ERR_VENDOR and self.target.options.get("unprotect"):
                self.log("dfu: read-protected; unprotect was requested, so everything goes")
                return ""
            raise self._explain(exc, "checking for a bootloader") from exc
        except Exception as exc:
            raise self._explain(exc, "checking for a bootloader") from exc
        app_behind = _plausible_vectors(app_head, layout.start, layout.end)
        if not app_behind and before_app != b"\xff" * 8:
            return ""
        if app_behind or image.start == layout.start:
            size = app - layout.start
            return (
                f"The image starts at 0x{image.start:08X} and would erase the board's "
                f"bootloader (about {size // 1024} KiB at 0x{layout.start:08X}, reset handler "
                f"0x{reset:08X})."
            )
        return ""

    def _sectors(self, image: FirmwareImage) -> list[tuple[int, int]]:
        assert self.layout is not None
        seen: dict[int, int] = {}
        for seg in image.segments:
            for start, size in self.layout.sectors(seg.address, seg.end):
                seen[start] = size
        return sorted(seen.items())

    # --- flash ------------------------------------------------------------------------------
    def flash(
        self,
        image: FirmwareImage,
        progress: ProgressCallback = no_progress,
        cancel: Optional[CancelToken] = None,
        quick: bool = False,
    ) -> FlashResult:
        began = time.monotonic()
        info = self.identify()
        self.check(image, info)
        image = self.prepare(image)
        session = self.session
        assert session is not None
        cancel = cancel or CancelToken()
        quick = self._quick(quick)
        mass = bool(self.target.options.get("mass_erase"))
        sectors = self._sectors(image)
        self._jump = image.start
        try:
            if self.target.options.get("unprotect") and self._read_protected(image.start):
                session = self._unprotect()
            todo = sectors
            blank_runs: list[tuple[int, bytes]] = []
            same = 0
            if quick and not mass:
                todo, blank_runs, same = self._plan_quick(image, sectors, progress, cancel)
                self.log(
                    f"dfu: quick: of {len(sectors)} sectors {same} already hold the image, "
                    f"{len(sectors) - same - len(todo)} need no erase (the difference is blank "
                    f"flash), {len(todo)} are erased and rewritten"
                )
            if mass:
                self.log("dfu: mass erase requested: the whole flash, bootloader included")
                progress(Progress(STAGE_ERASING, 0, 1))
                session.mass_erase()
                progress(Progress(STAGE_ERASING, 1, 1))
            elif todo:
                total = sum(size for _, size in todo)
                done = 0
                progress(Progress(STAGE_ERASING, 0, total))
                for start, size in todo:
                    cancel.check()
                    self._erase_sector(session, start, size)
                    done += size
                    progress(Progress(STAGE_ERASING, done, total))
            runs = sorted(self._runs(image, todo) + blank_runs)
            total = sum(len(d) for _, d in runs)
            written = 0
            chunks = 0

            def wrote(n: int) -> None:
                nonlocal written
                written += n
                progress(Progress(STAGE_WRITING, written, total))
                cancel.check()

            progress(Progress(STAGE_WRITING, 0, total))
            for address, data in runs:
                chunks += session.write(address, data, wrote)
            verified = self._verify(runs, progress, cancel)
        except Exception as exc:
            explained = self._explain(exc, "flashing")
            if explained is exc:
                raise
            raise explained from exc
        if "stuck-dnbusy" in session.quirks_used:
            self.log("dfu: erase completion was inferred (H7 quirk) and confirmed by verify")
        return FlashResult(
            bytes_written=written,
            bytes_verified=verified,
            blocks_written=chunks,
            blocks_skipped=same if quick and not mass else 0,
            seconds=time.monotonic() - began,
        )

    def _erase_sector(self, session: DfuSession, start: int, size: int) -> None:
        """Erase one sector. On an STM32H7 (whose rev V ROM never reports an erase complete)
        or once that quirk was seen, recover as soon as the datasheet's typical erase time is
        over instead of at the deadline; the session then reads the sector back to confirm."""
        stuck_early = "stuck-dnbusy" in session.quirks_used or (
            self.chip is not None and self.chip.name.startswith("STM32H7")
        )
        typical, longest = SECTOR_ERASE_S.get(size, (None, None))
        if stuck_early and typical is not None:
            session.erase_sector(start, size, typical_s=typical, max_s=longest)
        else:
            session.erase_sector(start, size)

    def _runs(
        self, image: FirmwareImage, sectors: list[tuple[int, int]]
    ) -> list[tuple[int, bytes]]:
        """Image bytes inside ``sectors``, as contiguous runs (sector boundaries merged)."""
        runs: list[Segment] = []
        for start, size in sectors:
            for seg in image.segments:
                lo, hi = max(seg.address, start), min(seg.end, start + size)
                if lo < hi:
                    runs.append(Segment(lo, seg.data[lo - seg.address : hi - seg.address]))
        merged = FirmwareImage(runs).segments if runs else []
        return [(s.address, s.data) for s in merged]

    def _quick(self, asked: bool) -> bool:
        """Quick is this method's default: reading a sector over USB costs a fraction of
        erasing it. ``Target.quick = False`` (the CLI's ``--full``) forces a full erase and
        write of every touched sector; ``None`` means the default."""
        return bool(asked) or self.target.quick is not False

    def _plan_quick(
        self,
        image: FirmwareImage,
        sectors: list[tuple[int, int]],
        progress: ProgressCallback,
        cancel: CancelToken,
    ) -> tuple[list[tuple[int, int]], list[tuple[int, bytes]], int]:
        """Read the touched sectors and decide, per sector, against what a full flash would
        leave there (the image's bytes, 0xFF elsewhere): identical (nothing to do), different
        only where the flash is still blank (write just those flash words, no erase), or
        different (erase and rewrite the sector). A sector is read as its first 2 KiB, then
        the rest only if no erase is needed yet, so a new build costs one short read per
        sector.

        Returns (sectors to erase, runs to write without erasing, identical sector count).
        """
        session = self.session
        assert session is not None
        total = sum(size for _, size in sectors)
        done = 0
        erase: list[tuple[int, int]] = []
        runs: list[tuple[int, bytes]] = []
        same = 0
        progress(Progress(STAGE_READING, 0, total))
        for start, size in sectors:
            want = image.read(start, size, 0xFF)
            pos = 0
            piece = 2048
            needs_erase = False
            differs: list[int] = []  # offsets of PAD-sized words to program
            while pos < size and not needs_erase:
                cancel.check()
                n = min(piece, size - pos)
                have = session.read(start + pos, n)
                for w in range(pos, pos + n, PAD):
                    new, old = want[w : w + PAD], have[w - pos : w - pos + PAD]
                    if new == old:
                        continue
                    if old.count(0xFF) != len(old):
                        needs_erase = True
                        break
                    differs.append(w)
                pos += n
                piece = size  # the first piece showed no erase is needed: read the rest
                progress(Progress(STAGE_READING, done + pos, total))
            done += size
            if needs_erase:
                erase.append((start, size))
            elif differs:
                runs.extend(self._word_runs(start, want, differs))
            else:
                same += 1
        progress(Progress(STAGE_READING, total, total))
        return erase, runs, same

    @staticmethod
    def _word_runs(base: int, want: bytes, offsets: list[int]) -> list[tuple[int, bytes]]:
        """Contiguous runs of the PAD-sized words at ``offsets`` (sorted) of ``want``."""
        runs: list[tuple[int, bytes]] = []
        lo = hi = offsets[0]
        for w in offsets[1:] + [-1]:
            if w == hi + PAD:
                hi = w
                continue
            runs.append((base + lo, want[lo : hi + PAD]))
            lo = hi = w
        return runs

    def _verify(
        self, runs: list[tuple[int, bytes]], progress: ProgressCallback, cancel: CancelToken
    ) -> int:
        session = self.session
        assert session is not None
        total = sum(len(d) for _, d in runs)
        done = 0
        progress(Progress(STAGE_VERIFYING, 0, total))

        def read_some(n: int) -> None:
            nonlocal done
            done += n
            progress(Progress(STAGE_VERIFYING, done, total))
            cancel.check()

        for address, data in runs:
            back = session.read(address, len(data), read_some)
            if back != data:
                at = next(i for i in range(len(data)) if i >= len(back) or back[i] != data[i])
                got = back[at] if at < len(back) else None
                raise VerifyError(
                    f"Verify failed at 0x{address + at:08X}: wrote 0x{data[at]:02X}, read back "
                    + (f"0x{got:02X}." if got is not None else "nothing."),
                    cause="The flash was not erased before writing, or the chip failed to "
                    "program it.",
                    hint="The board stays in DFU mode: flash again with quick off (--full). If it "
                    "repeats, power-cycle the board with BOOT0 held high and try once more.",
                )
        return total

    def _read_protected(self, address: int) -> bool:
        """Whether reading is refused with errVENDOR: only then is unprotecting (which erases
        the whole chip) worth its price; otherwise the request is ignored with a note."""
        session = self.session
        assert session is not None
        try:
            session.read(address, 8)
        except DfuStatusError as exc:
            if exc.status.status == Status.ERR_VENDOR:
                return True
            raise
        self.log("dfu: the chip is not read-protected; 'unprotect' ignored, nothing mass-erased")
        return False

    def _unprotect(self) -> DfuSession:
        """Remove read-out protection (the chip mass-erases itself), then reconnect."""
        session = self.session
        assert session is not None
        self.log("dfu: removing read-out protection: the chip erases ALL its flash")
        session.read_unprotect()
        self._wait_gone()
        deadline = time.monotonic() + self.timeouts.seconds(30.0)
        self.session = None
        self.info = None
        while True:
            try:
                new = self._connect()
                self.identify()
                return new
            except ConnectError:
                if time.monotonic() > deadline:
                    raise
                self.sleep(self.timeouts.seconds(0.2))

    # --- read -------------------------------------------------------------------------------
    def read(
        self, progress: ProgressCallback = no_progress, cancel: Optional[CancelToken] = None
    ) -> FirmwareImage:
        """Back up the application area: from the app start to the end of flash, with the
        trailing erased (all-0xFF) transfer blocks dropped."""
        info = self.identify()
        session = self.session
        assert session is not None
        cancel = cancel or CancelToken()
        start, end = info.app_start, info.app_end
        total = end - start
        done = 0
        data = bytearray()
        progress(Progress(STAGE_READING, 0, total))
        step = session.transfer_size * 16
        try:
            while start + len(data) < end:
                cancel.check()
                n = min(step, end - start - len(data))
                data += session.read(start + len(data), n)
                done += n
                progress(Progress(STAGE_READING, done, total))
        except Exception as exc:
            explained = self._explain(exc, "reading the flash")
            if explained is exc:
                raise
            raise explained from exc
        size = session.transfer_size
        used = len(data.rstrip(b"\xff"))
        used = (used + size - 1) // size * size
        image = FirmwareImage(
            [Segment(start, bytes(data[:used]))] if used else [],
            filename=f"backup-{info.chip}-{start:08x}.bin",
            kind="bin",
        )
        if not used:
            image.notes.append("The application area is empty (all 0xFF).")
        return image

    # --- leave ------------------------------------------------------------------------------
    def leave(self) -> Optional[str]:
        """Start the application and make sure the ROM really let go of USB."""
        if self._left:
            return None
        session = self.session or self._connect()
        info = self.identify()
        self._left = True
        address = self._jump if self._jump is not None else info.app_start
        try:
            session.abort()
        except Exception as exc:
            self.log(f"dfu: abort before leaving failed ({exc}); leaving anyway")
        try:
            how = session.leave(address)
        except Exception as exc:
            raise self._explain(exc, "leaving the bootloader") from exc
        self.log(f"dfu: jump to 0x{address:08X}: {how}")
        self.session = None
        self._release()
        came_back, how = self._wait_gone()
        if came_back:
            raise ProtocolError(
                "The firmware was written and verified, but the board came back in DFU mode "
                "(0483:df11) instead of starting it.",
                cause="BOOT0 is still held high (jumper fitted), or the start address was wrong "
                f"(the jump went to 0x{address:08X}; e.g. a 0x08008000 build whose bootloader "
                "was erased).",
                hint="Remove the BOOT0 jumper and press reset. If it still shows 0483:df11, "
                "flash a firmware built for this board's bootloader offset.",
            )
        return how

    def _wait_gone(self) -> tuple[bool, str]:
        """Wait for the DFU device to vanish: (re-enumerated as DFU, what was seen)."""
        cand = self.candidate
        if cand is None or self.backend is None:
            return False, ""
        path = cand.path
        address = cand.device.address
        deadline = time.monotonic() + self.timeouts.seconds(self.timeouts.leave_gone_s)
        gone = False
        while time.monotonic() < deadline:
            devs = usb_device.list_devices(self.backend)
            here = [d for d in devs if not path or usb_device.usb_path(d) == path]
            dfu_here = [d for d in here if (d.idVendor, d.idProduct) == usb_device.ST_DFU]
            same = [d for d in dfu_here if d.address == address]
            if not gone and not same:
                gone = True
                self.log("dfu: the DFU device disconnected")
                deadline = time.monotonic() + self.timeouts.seconds(3.0)
                if dfu_here:
                    return True, ""
            elif gone and dfu_here:
                return True, ""
            elif gone and here:
                ids = ", ".join(f"{d.idVendor:04x}:{d.idProduct:04x}" for d in here)
                self.log(f"dfu: the board re-enumerated as {ids}: the application runs")
                return (
                    False,
                    f"The board left DFU mode and came back as USB {ids}: the new firmware runs.",
                )
            self.sleep(self.timeouts.seconds(0.01))
        if not gone:
            raise ConnectError(
                "The board did not leave DFU mode after the jump to the application.",
                cause="The ROM ignored the leave request.",
                hint="The firmware is written and verified: remove the BOOT0 jumper (if fitted) "
                "and press reset.",
            )
        return False, (
            "The board left DFU mode; it did not come back on USB within the wait (normal for "
            "a CAN or UART firmware)."
        )

    def _release(self) -> None:
        if self.candidate is None:
            return
        try:
            import usb.util

            usb.util.dispose_resources(self.candidate.device)
        except Exception as exc:  # the device is usually gone by now
            self.log(f"dfu: releasing the device: {exc}")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._release()
        self.session = None


def check_image(image: FirmwareImage, target: Target) -> list[str]:
    """What the file alone tells: a Klipper build names its MCU in its data dictionary, which
    must be the chip the user (or discovery) named. The layout checks need the board."""
    build = klipper_build(image.to_bytes()) if image.segments else None
    if build is None or not build.mcu or not target.mcu:
        return []
    if chips.chip_matches(build.mcu, target.mcu) is False:
        raise PreflightError(
            f"This Klipper build is for {build.mcu}, but the board is {target.mcu}.",
            cause="The wrong 'Processor model' was selected in make menuconfig, or this is "
            "another board's file.",
            hint=f"Rebuild Klipper for {target.mcu}. Nothing was written; the board stays in "
            "DFU mode.",
        )
    return []


def open_flasher(target: Target, log: Optional[LogCallback] = None) -> Flasher:
    """Registry entry point (see :mod:`octoprint_flasher.methods`). Connection happens on
    the first call that needs the device, so errors carry the right advice."""
    return DfuFlasher(target, log)


def discover(usb_backend: Any = None) -> list[Device]:
    """DFU devices for the device list, plus USB-CAN bridges (which cannot be seen as serial
    ports) with advice on how to get them into a bootloader."""
    backend = usb_device.resolve_backend(usb_backend)
    devices: list[Device] = []
    for cand in usb_device.find_dfu(backend):
        chip: Optional[str] = None
        details: dict[str, Any] = {"alternates": [a.name for a in cand.alts]}
        description = "STM32 ROM bootloader (USB DFU)"
        hint = ""
        row = chips.lookup_usb(cand.vid, cand.pid)
        if row is not None:
            description, hint = row.description, row.hint
        if cand.error is not None:
            hint = str(cand.error)
            details["error"] = cand.error.to_dict()
        elif cand.alts:
            try:
                layout = dfuse.parse_layout(cand.alts[0].name)
                chip, _ = guess_chip(layout)
                details["layout"] = layout.raw
                details["flash_size"] = layout.size
            except FlashError as exc:
                details["error"] = exc.to_dict()
        fd = dfuse.parse_functional_descriptor(cand.functional or b"")
        if fd is not None:
            details["transfer_size"] = fd.transfer_size
        if cand.serial:
            details["serial"] = cand.serial
        devices.append(
            Device(
                id=f"usb:{cand.path or cand.usb_id}",
                kind=KIND_USB_DFU,
                usb_path=cand.path or None,
                vid=cand.vid,
                pid=cand.pid,
                description=description + (f": {chip}" if chip else ""),
                method="dfu",
                chip=chip,
                hint=hint,
                details=details,
            )
        )
    for dev in usb_device.list_devices(backend):
        row = chips.lookup_usb(dev.idVendor, dev.idProduct)
        if row is None or row.kind != "can-bridge":
            continue
        path = usb_device.usb_path(dev)
        devices.append(
            Device(
                id=f"usb:{path or chips.format_usb_id(dev.idVendor, dev.idProduct)}",
                kind="usb",
                usb_path=path or None,
                vid=dev.idVendor,
                pid=dev.idProduct,
                description=row.description,
                method=row.method,
                hint=row.hint,
            )
        )
    return devices
