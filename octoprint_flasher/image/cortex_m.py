"""Where a Cortex-M image belongs, read from its own vector table.

A raw ``.bin`` has no address, but an ARM Cortex-M application starts with its vector table:
the initial stack pointer, then the addresses of its handlers, all absolute. A build linked for
a bootloader offset therefore names that offset in every handler. This module finds the link
base among the offsets printer boards use, so a ``.bin`` can be placed (and a wrong explicit
address refused) before any board is touched.

The handlers only bound the base from above (it lies at or below the lowest handler); among the
candidate offsets below it, the highest one wins unless the image's own absolute pointers
(literal pools, function tables) point below it: code linked at B refers to addresses inside
[B, B + size), and never to the bootloader area below B.
"""

from __future__ import annotations

import bisect
import struct
from dataclasses import dataclass
from typing import Optional

from ..errors import ImageError
from .model import FirmwareImage

KIB = 1024
#: flash bases of Cortex-M parts on printer boards: STM32 (and its clones), then parts whose
#: flash starts at 0 (LPC176x, SAMD, ...)
FLASH_BASES = (0x08000000, 0x00000000)
#: application offsets of printer-board bootloaders: none, Katapult/STM32duino (8, 16 KiB),
#: Creality/BTT Marlin boards (28 KiB), Katapult F4 / BTT (32 KiB), MKS (48 KiB), Creality F401
#: (64 KiB), H7 (128 KiB)
APP_OFFSETS = (0, 8 * KIB, 16 * KIB, 28 * KIB, 32 * KIB, 48 * KIB, 64 * KIB, 128 * KIB)
#: SRAM regions an initial stack pointer may point into (F4 CCM, SRAM, H7 AXI/D2 SRAM)
SRAM = ((0x10000000, 0x10010000), (0x20000000, 0x20200000), (0x24000000, 0x24100000))
SRAM_H7_D2 = (0x30000000, 0x30050000)
#: absolute pointers below a candidate base that prove the image was linked lower (a few
#: words of data can look like pointers by chance; a real image refers to its code hundreds
#: of times)
POINTER_EVIDENCE = 8
#: the 16 system exception vectors; device interrupts follow
SYSTEM_VECTORS = 16


@dataclass(frozen=True)
class VectorTable:
    stack_pointer: int
    reset_handler: int  # as stored, Thumb bit set
    handlers: tuple[int, ...]  # every handler address in the table, Thumb bit cleared

    def describe(self) -> str:
        return f"initial SP 0x{self.stack_pointer:08X}, reset handler 0x{self.reset_handler:08X}"


def _in_sram(sp: int) -> bool:
    regions = (*SRAM, SRAM_H7_D2)
    return any(lo < sp <= hi for lo, hi in regions)


def read_vectors(data: bytes) -> Optional[VectorTable]:
    """The vector table at the start of ``data``, or None when it does not look like one."""
    if len(data) < 8:
        return None
    sp, reset = struct.unpack_from("<II", data, 0)
    if not _in_sram(sp) or sp % 4 or not reset & 1:
        return None
    handlers = [reset & ~1]
    limit = min(len(data) // 4, 256)
    for i in range(2, limit):
        (word,) = struct.unpack_from("<I", data, 4 * i)
        if word == 0:  # reserved slots and unused interrupts
            continue
        if not word & 1 or abs((word & ~1) - handlers[0]) > 0x01000000:
            if i < SYSTEM_VECTORS:
                continue  # a reserved system slot some startup files fill with data
            break  # the table has ended: code follows
        handlers.append(word & ~1)
    return VectorTable(sp, reset, tuple(handlers))


def link_base(data: bytes) -> Optional[int]:
    """The address ``data`` was linked for, or None when it is not a Cortex-M application image
    at one of the usual offsets."""
    table = read_vectors(data)
    if table is None:
        return None
    low, high = min(table.handlers), max(table.handlers)
    candidates = [
        base + offset
        for base in FLASH_BASES
        for offset in APP_OFFSETS
        if base + offset + 8 <= low and high < base + offset + len(data)
    ]
    if not candidates:
        return None
    if len(candidates) == 1:
        return candidates[0]
    words = sorted(w for (w,) in struct.iter_unpack("<I", data[: len(data) // 4 * 4]))
    lowest = min(candidates)

    def pointers_below(base: int) -> int:
        return bisect.bisect_left(words, base) - bisect.bisect_left(words, lowest)

    # the highest base below which the image refers to nothing of its own
    plausible = [c for c in candidates if pointers_below(c) < POINTER_EVIDENCE]
    return max(plausible)


def place(image: FirmwareImage, address: Optional[int] = None) -> FirmwareImage:
    """Give an address-less ``.bin`` the address its vector table was linked for, or ``address``
    when the user gave one; refuse an ``address`` that disagrees with the vector table.

    A self-placed image records its link base in ``extra["link_base"]``, so an address given
    later (the job's target) is checked against it the same way. Intel HEX and DfuSe files
    carry their own addresses and come back unchanged."""
    if not image.segments:
        return image
    base = image.extra.get("link_base")
    if image.address_given and base is None:
        return image
    data = image.segments[0].data
    if base is None:
        base = link_base(data)
    if base is None:
        return image.placed_at(address) if address is not None else image
    if address is not None and address != base:
        table = read_vectors(data)
        assert table is not None
        raise ImageError(
            f"{image.filename or 'This .bin'} was linked for 0x{base:08X}, but the address "
            f"0x{address:08X} was given.",
            cause=f"Its vector table ({table.describe()}) only works at 0x{base:08X}; written "
            f"at 0x{address:08X} the board would jump into the wrong code.",
            hint=f"Leave the address empty (the file places itself at 0x{base:08X}), or rebuild "
            f"the firmware for 0x{address:08X} (the bootloader offset in its configuration).",
        )
    if image.address_given:
        return image
    placed = image.placed_at(base)
    placed.extra["link_base"] = base
    placed.notes = [n for n in placed.notes if "does not say where it belongs" not in n]
    placed.notes.append(
        f"Placed at 0x{base:08X}, the address its vector table was linked for "
        f"(offset {(base & 0x00FFFFFF) // KIB} KiB from the flash start)."
    )
    return placed
