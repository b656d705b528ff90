"""What an RP2040/RP2350 image must look like to boot, judged from the image alone (no I/O).

The RP2040 boot ROM copies the first 256 bytes of flash (boot2, the flash chip's XIP setup)
into SRAM and runs them only if their last four bytes are the CRC-32 (polynomial 0x04C11DB7,
not reflected, initial value 0xFFFFFFFF, no final XOR) of the first 252. An image written at
0x10000000 without a valid boot2 leaves the board in BOOTSEL forever, so it is refused here.
After boot2 comes the Cortex-M0+ vector table. RP2350 images carry no boot2; instead the ROM
looks for an IMAGE_DEF block (picobin markers) in the first 4 KiB.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Optional

from ..errors import PreflightError
from . import uf2
from .model import FirmwareImage

FLASH_BASE = 0x10000000
XIP_WINDOW = 16 * 1024 * 1024
BOOT2_SIZE = 256
SECTOR = 4096
PAGE = 256
PICOBIN_START = 0xFFFFDED3
PICOBIN_END = 0xAB123579


@dataclass(frozen=True)
class RpChip:
    name: str
    usb_pid: int
    family: int
    default_flash: int  # the size on the boards this project knows (Pico, SKR Pico: 2 MiB)
    sram: tuple[int, int]


RP2040 = RpChip("RP2040", 0x0003, uf2.FAMILY_RP2040, 2 * 1024 * 1024, (0x20000000, 0x20042000))
RP2350 = RpChip(
    "RP2350", 0x000F, uf2.FAMILY_RP2350_ARM_S, 4 * 1024 * 1024, (0x20000000, 0x20082000)
)
CHIPS = {c.name.lower(): c for c in (RP2040, RP2350)}
#: families each chip's ROM accepts for a main-flash image
ACCEPTED = {
    "RP2040": (uf2.FAMILY_RP2040, uf2.FAMILY_ABSOLUTE),
    "RP2350": (
        uf2.FAMILY_RP2350_ARM_S,
        uf2.FAMILY_RP2350_ARM_NS,
        uf2.FAMILY_RP2350_RISCV,
        uf2.FAMILY_ABSOLUTE,
    ),
}


def find_chip(name: Optional[str]) -> Optional[RpChip]:
    return CHIPS.get((name or "").lower())


def boot2_crc(data: bytes) -> int:
    """CRC-32/MPEG-2 (MSB first, init 0xFFFFFFFF, no final XOR), as the RP2040 ROM checks."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) if crc & 0x80000000 else crc << 1
            crc &= 0xFFFFFFFF
    return crc


def boot2_ok(first_256: bytes) -> bool:
    if len(first_256) < BOOT2_SIZE:
        return False
    (stored,) = struct.unpack_from("<I", first_256, 252)
    return boot2_crc(first_256[:252]) == stored


def with_boot2_crc(boot2: bytes) -> bytes:
    """252 bytes of boot2 code plus their CRC (for tests and the demo's sample images)."""
    body = boot2[:252].ljust(252, b"\x00")
    return body + struct.pack("<I", boot2_crc(body))


def has_image_def(head: bytes) -> bool:
    """An RP2350 IMAGE_DEF block: the picobin start marker followed later by the end marker."""
    for i in range(0, len(head) - 3, 4):
        if struct.unpack_from("<I", head, i)[0] == PICOBIN_START:
            return struct.pack("<I", PICOBIN_END) in head[i:]
    return False


def place(image: FirmwareImage) -> FirmwareImage:
    """An address-less .bin for an RP chip starts at the flash base (with its boot2)."""
    return image if image.address_given else image.placed_at(FLASH_BASE)


def check_image(
    image: FirmwareImage, chip: Optional[RpChip], flash_size: Optional[int] = None
) -> list[str]:
    """Refuse what cannot boot or does not fit; return warnings. ``chip`` None means the
    board is not known yet (offline check): only what holds for both RP chips is judged."""
    name = image.filename or "The file"
    image = place(image)
    warnings: list[str] = []
    if not image.segments:
        raise PreflightError(f"{name} contains nothing to write.", hint=uf2.UF2_HINT)
    family = uf2.family_of(image)
    if chip is not None and family is not None and family not in ACCEPTED[chip.name]:
        raise PreflightError(
            f"{name} was built for {uf2.family_name(family)} (UF2 family 0x{family:08x}), "
            f"but this board is an {chip.name}.",
            cause="The firmware was built for another chip (e.g. a Pico 2 build for a Pico).",
            hint=f"Build for the {chip.name} (Klipper: make menuconfig, processor model "
            f"{chip.name.lower()}) and upload the new klipper.uf2.",
        )
    if family is None and image.kind == "uf2":
        warnings.append("The UF2 names no chip family; its contents are checked as they are.")
    limit = flash_size or (chip.default_flash if chip else XIP_WINDOW)
    if image.start < FLASH_BASE or image.end > FLASH_BASE + limit:
        where = f"0x{image.start:08X}-0x{image.end - 1:08X}"
        raise PreflightError(
            f"{name} covers {where}, outside the board's flash "
            f"(0x{FLASH_BASE:08X}-0x{FLASH_BASE + limit - 1:08X}).",
            cause="It was built for another chip, a larger flash, or to run from RAM, "
            "or the start address given is wrong.",
            hint="Build for this board (flash at 0x10000000) and upload its klipper.uf2.",
        )
    if image.start == FLASH_BASE and (chip is None or chip.name == "RP2040"):
        head = image.read(FLASH_BASE, BOOT2_SIZE + 8)
        if not boot2_ok(head):
            if chip is None and has_image_def(image.read(FLASH_BASE, SECTOR)):
                return warnings  # an RP2350 image: no boot2 by design
            raise PreflightError(
                f"{name} starts at 0x10000000 without a valid boot2 stage (the CRC in its "
                "first 256 bytes does not match).",
                cause="A build for a bootloader offset (Katapult at 0x10004000) or a damaged "
                "file: the ROM would refuse to start it and stay in BOOTSEL.",
                hint="Flash a 'no bootloader' build (klipper.uf2), or flash this one through "
                "Katapult, or give its real start address.",
            )
        sp, reset = struct.unpack_from("<II", head, BOOT2_SIZE)
        lo, hi = (chip or RP2040).sram
        if not (lo < sp <= hi and FLASH_BASE <= reset < FLASH_BASE + limit and reset & 1):
            raise PreflightError(
                f"{name} has a valid boot2 but no Cortex-M vector table after it "
                f"(initial SP 0x{sp:08X}, reset handler 0x{reset:08X}).",
                cause="The file is not a complete RP2040 firmware image.",
                hint=uf2.UF2_HINT,
            )
    if image.start == FLASH_BASE and chip is not None and chip.name == "RP2350":
        if not has_image_def(image.read(FLASH_BASE, SECTOR)):
            raise PreflightError(
                f"{name} has no RP2350 IMAGE_DEF block in its first 4 KiB.",
                cause="It is an RP2040 image or a damaged build; the RP2350 ROM will not start it.",
                hint="Build for the RP2350 and upload the new .uf2.",
            )
    if image.start > FLASH_BASE:
        warnings.append(
            f"The image starts at 0x{image.start:08X}, not at the flash start: whatever is "
            "below it (e.g. Katapult) stays and must start it."
        )
    return warnings
