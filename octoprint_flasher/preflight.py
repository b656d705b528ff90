"""Checks that refuse an image before the board is touched.

Two entry points: :func:`check` once a bootloader has described the board (a
:class:`TargetInfo`), and :func:`check_offline` with no board at all, from the chip tables
(used by ``info``, on upload, and by the job before it disconnects the printer). Both collect
every problem into a :class:`PreflightReport` instead of stopping at the first, so a front end
can show the whole verdict; :func:`raise_for` turns a failed report into the exception.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Optional

from . import chips
from .errors import FlashError, ImageError, PreflightError
from .flasher import TargetInfo
from .image import rp2040
from .image.load import format_size
from .image.model import FirmwareImage

STM32_FLASH = 0x08000000
AVR_METHODS = ("stk500v1", "stk500v2")
ARM_METHODS = ("dfu", "katapult")


@dataclass
class PreflightReport:
    """The verdict: ``ok`` is False when any error was found; ``facts`` explain it."""

    ok: bool = True
    errors: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)
    exceptions: list[FlashError] = field(default_factory=list, repr=False, compare=False)

    def fail(self, error: FlashError) -> None:
        self.ok = False
        self.errors.append(error.to_dict())
        self.exceptions.append(error)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "errors": list(self.errors),
            "warnings": list(self.warnings),
            "facts": dict(self.facts),
        }


def raise_for(report: PreflightReport) -> None:
    """Raise the first error of a failed report (others are in the report's ``errors``)."""
    if report.ok:
        return
    if report.exceptions:
        raise report.exceptions[0]
    first = report.errors[0]
    raise PreflightError(first["message"], first.get("cause", ""), first.get("hint", ""))


def _empty(image: FirmwareImage) -> ImageError:
    return ImageError(
        f"{image.filename or 'The image'} contains no data to write.",
        hint="Upload the firmware file produced by the build.",
    )


def _rng(start: int, end: int) -> str:
    """An inclusive address range as users read it: 0x08000000-0x08007FFF."""
    width = 8 if end > 0xFFFF else 4
    return f"0x{start:0{width}X}-0x{max(end - 1, start):0{width}X}"


def _image_range(image: FirmwareImage) -> str:
    return _rng(image.start, image.end)


# --- what the bytes say ----------------------------------------------------------------


def content_family(image: FirmwareImage) -> Optional[str]:
    """ "stm32" when the image starts with a Cortex-M vector table pointing into STM32 flash,
    "avr" when it starts with AVR ``jmp`` vectors, else None. This is what catches a raw
    .bin (which has no address) for the wrong kind of board."""
    if not image.segments:
        return None
    head = image.read(image.start, 32)
    sp, reset = struct.unpack_from("<2I", head)
    sram = 0x20000000 <= sp <= 0x20200000 or 0x24000000 <= sp <= 0x24100000
    if sram and reset & 1 and STM32_FLASH <= (reset & ~1) < STM32_FLASH + 0x200000:
        return "stm32"
    if all(head[i] == 0x0C and head[i + 1] == 0x94 for i in range(0, 32, 4)):
        return "avr"
    return None


def _check_family(
    image: FirmwareImage, avr_board: bool, where: str, report: PreflightReport
) -> None:
    family = content_family(image)
    if family:
        report.facts["content"] = "AVR" if family == "avr" else "ARM Cortex-M (STM32)"
    if family == "stm32" and avr_board:
        report.fail(
            PreflightError(
                f"{image.filename or 'This image'} is an ARM Cortex-M (STM32) firmware; {where} "
                "is an AVR.",
                cause="It starts with an STM32 vector table (stack pointer 0x{:08X}, reset "
                "handler 0x{:08X}).".format(*struct.unpack("<2I", image.read(image.start, 8))),
                hint="Use the firmware built for this AVR board.",
            )
        )
    elif family == "avr" and not avr_board:
        report.fail(
            PreflightError(
                f"{image.filename or 'This image'} is an AVR firmware; {where} is an STM32.",
                cause="It starts with AVR jump vectors (0C 94 ...).",
                hint="Use the firmware built for this STM32 board.",
            )
        )


# --- with a board ----------------------------------------------------------------------


def check(
    image: FirmwareImage,
    target_info: TargetInfo,
    *,
    mcu: Optional[str] = None,
    allow_bootloader_erase: bool = False,
) -> PreflightReport:
    """Whether ``image`` may be written to the board ``target_info`` describes."""
    report = PreflightReport()
    t = target_info
    flash_end = t.flash_start + t.flash_size
    report.facts.update(
        chip=t.chip,
        method=t.method,
        bootloader=t.bootloader,
        flash=_rng(t.flash_start, flash_end),
        application_area=_rng(t.app_start, t.app_end),
    )
    if not image.segments or image.size == 0:
        report.fail(_empty(image))
        return report
    if not image.address_given:
        image = image.placed_at(t.app_start)
        report.facts["placed_at"] = f"0x{t.app_start:08X}"
        report.warnings.append(
            f"{image.filename or 'The .bin'} has no address: it will be written at the "
            f"application start 0x{t.app_start:08X}."
        )
    report.facts.update(image=_image_range(image), image_size=image.size)
    _check_family(image, t.flash_start < STM32_FLASH, f"the board ({t.chip})", report)
    app_size = t.app_end - t.app_start
    if app_size > 0:
        report.facts["used_percent"] = round(100.0 * image.span / app_size, 1)

    match = chips.chip_matches(mcu, t.chip) if mcu and t.chip else True
    if match is None:
        report.warnings.append(
            f"The board reports {t.chip!r}, which cannot be confirmed to be the {mcu}."
        )
    elif not match:
        report.fail(
            PreflightError(
                f"This firmware is for {mcu}, but the board reports {t.chip}.",
                cause="The wrong firmware file or the wrong board/port was chosen.",
                hint=f"Build or download the firmware for {t.chip}, or pick the right board.",
            )
        )

    if image.start < t.flash_start or image.end > flash_end:
        if image.span > t.flash_size or image.size > t.flash_size:
            report.fail(
                PreflightError(
                    f"Image too big: {image.span} bytes, this chip has {t.flash_size} "
                    f"({format_size(t.flash_size)}) of flash.",
                    cause=f"The firmware was built for a larger chip than the {t.chip}.",
                    hint="Build the firmware for this board's chip, or disable features.",
                )
            )
        else:
            report.fail(
                PreflightError(
                    f"The image ({_image_range(image)}) lies outside the {t.chip}'s flash "
                    f"({_rng(t.flash_start, flash_end)}).",
                    cause=_outside_cause(image, t),
                    hint="Use the firmware built for this board (and the right start address).",
                )
            )
        return report

    overlaps = image.start < t.app_start or image.end > t.app_end
    if overlaps:
        err = _bootloader_overlap(image, t)
        if allow_bootloader_erase:
            report.warnings.append(
                f"{err.message} Allowed by the explicit bootloader-erase option: the board's "
                "bootloader will be overwritten."
            )
        else:
            report.fail(err)
    elif image.span > app_size:
        report.fail(
            PreflightError(
                f"Image too big: {image.span} bytes, the application area holds {app_size}.",
                cause="The firmware does not fit next to the bootloader.",
                hint="Disable features in the firmware configuration to make it smaller.",
            )
        )
    if rp2040.find_chip(t.chip) is None:  # an RP2040 build opens with boot2: picoboot checks it
        _check_vector_table(image, t.flash_start, t.app_start, report, allow_bootloader_erase)
    board_chip = chips.find_chip(t.chip) if t.chip else None
    if isinstance(board_chip, chips.AvrChip):
        _check_avr_vectors(image, board_chip, "the board", report)
    return report


def _check_avr_vectors(
    image: FirmwareImage, chip: chips.AvrChip, whose: str, report: PreflightReport
) -> None:
    """Refuse an image whose interrupt vector table was built for another AVR part.

    avr-gcc's start-up code opens every application with one JMP per vector of the chip it was
    compiled for (26 on a 328P, 35 on a 1284P, 57 on a 2560), so a small Mega firmware is
    caught here even though it would fit. Counts that match no known part (hand-written
    start-up code, a first instruction that happens to be a JMP) decide nothing.
    """
    if not chip.vectors or not image.address_given or image.start != 0:
        return
    count = chips.avr_vector_count(image.read(0, 4 * 64))
    built_for = chips.avr_chips_with_vectors(count)
    report.facts["avr_vectors"] = count
    if not built_for or chip.name in built_for:
        return
    report.fail(
        PreflightError(
            f"This firmware was built for {' / '.join(built_for)} ({count} interrupt vectors), "
            f"but {whose} is an {chip.name} ({chip.vectors}).",
            cause="The wrong firmware file, or a firmware configured for another board "
            "(the MOTHERBOARD / board setting).",
            hint=f"Build or download the firmware for the {chip.name}, or pick the right board.",
        )
    )


def _outside_cause(image: FirmwareImage, t: TargetInfo) -> str:
    if image.start >= STM32_FLASH and t.flash_start < STM32_FLASH:
        return "The file is an STM32 (ARM) image; this board has an AVR."
    if image.start < STM32_FLASH <= t.flash_start:
        return "The file's addresses start near 0: it looks like an AVR image."
    return "The file was built for another chip or with another start address."


def _bootloader_overlap(image: FirmwareImage, t: TargetInfo) -> PreflightError:
    boot = t.bootloader or "the bootloader"
    if image.start < t.app_start:
        region = _rng(t.flash_start, t.app_start)
        offset = t.app_start - t.flash_start
        looks_like_bootloader = image.end <= t.app_start
        return PreflightError(
            f"The image starts at 0x{image.start:08X}, inside the bootloader area {region} "
            f"({boot}).",
            cause=f"The firmware was built without the {format_size(offset)} bootloader offset"
            + (
                ", or this is a bootloader file (e.g. katapult.bin), not an application."
                if looks_like_bootloader
                else "."
            ),
            hint=f"Build with the right bootloader offset ({format_size(offset)}, application "
            f"at 0x{t.app_start:08X}); to replace the bootloader itself, use DFU or a programmer.",
        )
    region = _rng(t.app_end, t.flash_start + t.flash_size)
    inside = image.start >= t.app_end
    return PreflightError(
        f"The image ({_image_range(image)}) overlaps the bootloader area {region} ({boot}).",
        cause="This looks like a bootloader file, not an application."
        if inside
        else f"The firmware is {image.span} bytes; only {t.app_end - t.app_start} fit below "
        "the bootloader.",
        hint="Upload the application firmware built for this board; make it smaller if it "
        "does not fit, or build with the right bootloader offset.",
    )


def _check_vector_table(
    image: FirmwareImage,
    flash_start: int,
    app_start: int,
    report: PreflightReport,
    allow_bootloader_erase: bool,
) -> None:
    """An ARM Cortex-M image starts with (initial SP, reset handler). A reset handler below
    the image start means it was linked for another offset (or is a bootloader build)."""
    if flash_start < STM32_FLASH or image.start != app_start or image.size < 8:
        return
    sp, reset = struct.unpack("<2I", image.read(image.start, 8))
    handler = reset & ~1
    if sp in (0, 0xFFFFFFFF) or reset in (0, 0xFFFFFFFF):
        report.warnings.append(
            f"The image does not start with a vector table (words 0x{sp:08X}, 0x{reset:08X})."
        )
        return
    if image.start <= handler < image.end:
        return
    if flash_start <= handler < image.start:
        msg = (
            f"The image's reset vector points to 0x{handler:08X}, below its start "
            f"0x{image.start:08X}: it was linked for another start address."
        )
        if allow_bootloader_erase:
            report.warnings.append(msg)
            return
        report.fail(
            PreflightError(
                msg,
                cause="The firmware was built with a different bootloader offset, or it is a "
                "bootloader (e.g. katapult.bin) rather than an application.",
                hint=f"Build the firmware for the application address 0x{image.start:08X}.",
            )
        )
    else:
        report.warnings.append(
            f"The image's reset vector 0x{handler:08X} lies outside the image "
            f"({_image_range(image)}); check the build's start address."
        )


# --- without a board -------------------------------------------------------------------

#: where program flash is on every chip this flasher supports (end exclusive)
FLASH_REGIONS = (
    (0x00000000, 0x00080000, "AVR, LPC176x or SAMD flash (up to 512 KiB from 0)"),
    (0x08000000, 0x08200000, "STM32 flash (0x08000000, up to 2 MiB)"),
    (0x10000000, 0x11000000, "RP2040/RP2350 flash (0x10000000, up to 16 MiB)"),
)


def _outside_any_flash(image: FirmwareImage) -> Optional[ImageError]:
    """Data at an address that is program flash on no supported chip (RAM, peripherals, option
    bytes): no board can take it, whatever the target."""
    if not image.address_given:
        return None
    for seg in image.segments:
        if any(lo <= seg.address and seg.end <= hi for lo, hi, _ in FLASH_REGIONS):
            continue
        return ImageError(
            f"{image.filename or 'The image'} has data at 0x{seg.address:08X}-"
            f"0x{seg.end - 1:08X}, which is program flash on no supported chip.",
            cause="The file holds RAM, peripheral, option-byte or external-memory data, or it was "
            "linked for a chip this flasher does not know. Program flash is: "
            + "; ".join(what for _, _, what in FLASH_REGIONS)
            + ".",
            hint="Upload the application firmware the build produced for the board's flash "
            "(e.g. klipper.bin, firmware.hex).",
        )
    return None


def check_offline(
    image: FirmwareImage, mcu_name: Optional[str] = None, method: Optional[str] = None
) -> PreflightReport:
    """What can be said with no board: fits the chip, clear of the usual bootloaders, the
    right kind of image for the method. Unknown chips get generic checks only."""
    report = PreflightReport()
    report.facts.update(
        filename=image.filename,
        kind=image.kind,
        image=_image_range(image) if image.address_given else "(no address)",
        image_size=image.size,
        sha256=image.sha256,
    )
    if not image.segments or image.size == 0:
        report.fail(_empty(image))
        return report
    outside = _outside_any_flash(image)
    if outside is not None:
        report.fail(outside)
        return report
    arm_like = image.address_given and image.start >= STM32_FLASH
    avr_like = image.address_given and image.end <= 256 * 1024
    if method in AVR_METHODS and arm_like:
        report.fail(
            PreflightError(
                f"This image lives at {_image_range(image)}, an STM32 (ARM) address; the "
                f"{method} method flashes AVR boards.",
                cause="An ARM firmware was chosen for an AVR board, or the wrong method.",
                hint="Use the dfu or katapult method for STM32 boards, or the AVR firmware.",
            )
        )
    if method in ARM_METHODS and image.kind == "hex" and avr_like and image.start < 0x1000:
        report.fail(
            PreflightError(
                f"This image starts at 0x{image.start:X}, where an AVR application lives; the "
                f"{method} method flashes STM32 boards from 0x08000000.",
                cause="An AVR (Marlin for ATmega) firmware was chosen for an STM32 board.",
                hint="Use the firmware built for the STM32 board, or the stk500 methods.",
            )
        )
    chip = chips.find_chip(mcu_name) if mcu_name else None
    if chip is not None:
        _check_family(image, isinstance(chip, chips.AvrChip), f"the {chip.name}", report)
    elif method in AVR_METHODS or method in ARM_METHODS:
        where = f"the {method} method's board"
        _check_family(image, method in AVR_METHODS, where, report)
    else:
        _check_family(image, False, "", PreflightReport(facts=report.facts))  # facts only
    if mcu_name and chip is None and rp2040.find_chip(mcu_name) is None:
        # RP2040/RP2350 images are checked by the picoboot method's own check_image
        report.warnings.append(f"Unknown chip {mcu_name!r}: only generic checks were done.")
    if isinstance(chip, chips.AvrChip):
        _offline_avr(image, chip, report)
    elif isinstance(chip, chips.Stm32Chip):
        _offline_stm32(image, chip, report)
    if image.kind == "bin" and not image.address_given:
        report.warnings.append(
            "A .bin has no address: it will be written at the board's application start."
        )
    return report


def _offline_avr(image: FirmwareImage, chip: chips.AvrChip, report: PreflightReport) -> None:
    report.facts.update(chip=chip.name, flash=_rng(0, chip.flash_size))
    if image.address_given and image.start >= STM32_FLASH:
        report.fail(
            PreflightError(
                f"This image lives at {_image_range(image)} (STM32 flash); the {chip.name} "
                "is an AVR.",
                cause="The firmware was built for an STM32 board.",
                hint=f"Use the firmware built for the {chip.name}.",
            )
        )
        return
    end = image.end if image.address_given else image.size
    smallest_boot = chip.boot_sizes[0]
    boots = [b for b in chips.AVR_BOOTLOADERS if chip.name in b.chips and b.protocol != "avr109"]
    if end > chip.flash_size:
        report.fail(
            PreflightError(
                f"Image too big: {end} bytes, the {chip.name} has {chip.flash_size} "
                f"({format_size(chip.flash_size)}).",
                cause="The firmware was built for a larger chip.",
                hint=f"Build the firmware for the {chip.name} or disable features.",
            )
        )
        return
    if end > chip.flash_size - smallest_boot:
        report.fail(
            PreflightError(
                f"The image ({end} bytes) runs into the top {format_size(smallest_boot)} of "
                f"flash, where even the smallest {chip.name} bootloader lives.",
                cause="It is too big to flash through a bootloader, or it is a bootloader file.",
                hint="Disable features to make the firmware smaller, or use an ISP programmer.",
            )
        )
        return
    fitting = [b.name for b in boots if end <= chip.flash_size - b.size]
    too_small = [b.name for b in boots if end > chip.flash_size - b.size]
    report.facts["fits_below"] = fitting
    if too_small:
        report.warnings.append(
            f"The image ({end} bytes) does not fit next to these {chip.name} bootloaders: "
            + ", ".join(too_small)
            + "."
        )
    if image.address_given and image.start != 0:
        report.warnings.append(
            f"The image starts at 0x{image.start:X}; an AVR application starts at 0."
        )
    _check_avr_vectors(image, chip, "the chip you chose", report)


def _offline_stm32(image: FirmwareImage, chip: chips.Stm32Chip, report: PreflightReport) -> None:
    flash_end = chip.flash_start + chip.flash_size
    report.facts.update(chip=chip.name, flash=_rng(chip.flash_start, flash_end))
    if not image.address_given:
        if image.size > chip.flash_size:
            report.fail(
                PreflightError(
                    f"Image too big: {image.size} bytes, the {chip.name} has at most "
                    f"{format_size(chip.flash_size)}.",
                    hint=f"Build the firmware for the {chip.name}.",
                )
            )
        return
    if image.start < chip.flash_start or image.end > flash_end:
        report.fail(
            PreflightError(
                f"The image ({_image_range(image)}) lies outside the {chip.name}'s flash "
                f"({_rng(chip.flash_start, flash_end)}).",
                cause="The firmware was built for another chip (an AVR image starts at 0).",
                hint=f"Use the firmware built for the {chip.name}.",
            )
        )
        return
    offset = image.start - chip.flash_start
    report.facts["application_offset"] = format_size(offset) if offset else "0 (no bootloader)"
    if offset == 0:
        report.warnings.append(
            f"The image starts at 0x{chip.flash_start:08X}: it replaces any bootloader on the "
            "board (fine for a 'no bootloader' build flashed through DFU)."
        )
    elif offset not in chip.app_offsets:
        usual = ", ".join(format_size(o) for o in chip.app_offsets if o)
        report.warnings.append(
            f"The image starts at 0x{image.start:08X} (offset {format_size(offset)}); "
            f"{chip.name} boards usually use {usual}."
        )
    sector = chip.sector_at(image.start)
    if sector and sector[0] != image.start:
        report.warnings.append(
            f"The image starts inside the erase sector {_rng(sector[0], sector[0] + sector[1])}; "
            "erasing it also erases what lies before the image in that sector."
        )
