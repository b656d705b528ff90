"""UF2 files (microsoft/uf2): 512-byte blocks, each carrying up to 476 bytes for one address.

A UF2 is what the RP2040/RP2350 boot ROM's USB drive accepts and what Klipper, the Pico SDK
and CircuitPython build. Only main-flash blocks are kept (a "not main flash" block is a
comment or a file-container entry the ROM ignores too). The family id says which chip the
file was built for; files for chips we cannot flash through a UF2 path (SAMD, nRF, ESP32,
STM32 UF2 bootloaders) are refused here with the way those boards are flashed instead,
because the board check would come too late to say something useful.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Optional

from ..errors import ImageError
from .model import FirmwareImage, Segment

BLOCK_SIZE = 512
MAX_PAYLOAD = 476
MAGIC_START0 = 0x0A324655  # "UF2\n"
MAGIC_START1 = 0x9E5D5157
MAGIC_END = 0x0AB16F30

FLAG_NOT_MAIN_FLASH = 0x00000001
FLAG_FILE_CONTAINER = 0x00001000
FLAG_FAMILY_ID_PRESENT = 0x00002000
FLAG_MD5_PRESENT = 0x00004000
FLAG_EXTENSION_TAGS = 0x00008000

FAMILY_RP2040 = 0xE48BFF56
FAMILY_ABSOLUTE = 0xE48BFF57
FAMILY_DATA = 0xE48BFF58
FAMILY_RP2350_ARM_S = 0xE48BFF59
FAMILY_RP2350_RISCV = 0xE48BFF5A
FAMILY_RP2350_ARM_NS = 0xE48BFF5B

#: the families a PICOBOOT board can take, with their display names
RP_FAMILIES: dict[int, str] = {
    FAMILY_RP2040: "RP2040",
    FAMILY_ABSOLUTE: "absolute (any RP chip)",
    FAMILY_RP2350_ARM_S: "RP2350 Arm secure",
    FAMILY_RP2350_RISCV: "RP2350 RISC-V",
    FAMILY_RP2350_ARM_NS: "RP2350 Arm non-secure",
}

#: other chips' families (from microsoft/uf2 uf2families.json) and how those boards are flashed
_SAMD = "Double-tap the board's reset button: its drive appears; copy the file to it."
_NRF = "Double-tap reset to get the board's UF2 drive (Adafruit nRF52 bootloader); copy it there."
_ESP = (
    "ESP32 boards are flashed with esptool over their serial port; use the .bin the build "
    "produced next to this .uf2."
)
_STM = (
    "STM32 UF2 bootloaders (tinyuf2) show a drive: copy the file there. For the ST ROM "
    "bootloader use the .bin with the dfu method."
)
FOREIGN_FAMILIES: dict[int, tuple[str, str]] = {
    0x68ED2B88: ("Microchip SAMD21", _SAMD),
    0x55114460: ("Microchip SAMD51", _SAMD),
    0xADA52840: ("Nordic nRF52840", _NRF),
    0x1B57745F: ("Nordic nRF52", _NRF),
    0x1C5F21B0: ("Espressif ESP32", _ESP),
    0xBFDD4EEE: ("Espressif ESP32-S2", _ESP),
    0xC47E5767: ("Espressif ESP32-S3", _ESP),
    0xD42BA06C: ("Espressif ESP32-C3", _ESP),
    0x57755A57: ("ST STM32F4", _STM),
    0x5EE21072: ("ST STM32F1", _STM),
    0x6D0922FA: ("ST STM32F407", _STM),
    0x6DB66082: ("ST STM32H7", _STM),
    0x300F5633: ("ST STM32G0", _STM),
}

#: RP2350 erratum E10: the SDK puts one ABSOLUTE-family block at this address in front of an
#: RP2350 image (the ROM drops it); it is not part of the firmware
E10_ADDRESS = 0x10FFFF00

_BLOCK = struct.Struct("<8I476sI")
UF2_HINT = "Rebuild or download the firmware again and upload the .uf2 file (klipper.uf2)."


@dataclass
class Uf2File:
    """The main-flash content of a UF2 and what the loader noticed on the way."""

    segments: list[Segment]
    family: Optional[int]
    blocks: int
    notes: list[str] = field(default_factory=list)


def family_name(family: Optional[int]) -> str:
    if family is None:
        return "no family id"
    if family in RP_FAMILIES:
        return RP_FAMILIES[family]
    if family in FOREIGN_FAMILIES:
        return FOREIGN_FAMILIES[family][0]
    return f"unknown family 0x{family:08x}"


def is_uf2(data: bytes) -> bool:
    """The first block's two start magics (the end magic is checked per block when parsing)."""
    if len(data) < 8:
        return False
    m0, m1 = struct.unpack_from("<II", data, 0)
    return m0 == MAGIC_START0 and m1 == MAGIC_START1


@dataclass(frozen=True)
class _Block:
    index: int
    flags: int
    address: int
    payload: bytes
    number: int
    count: int
    family: Optional[int]


def _blocks(data: bytes, name: str) -> list[_Block]:
    if len(data) % BLOCK_SIZE:
        whole = len(data) // BLOCK_SIZE
        raise ImageError(
            f"{name}: {len(data)} bytes is not a whole number of 512-byte UF2 blocks "
            f"({whole} blocks and {len(data) % BLOCK_SIZE} bytes over).",
            cause="The download or copy was cut short (or something was appended).",
            hint=UF2_HINT,
        )
    out: list[_Block] = []
    for index in range(len(data) // BLOCK_SIZE):
        offset = index * BLOCK_SIZE
        m0, m1, flags, address, size, number, count, extra, payload, m_end = _BLOCK.unpack_from(
            data, offset
        )
        if m0 != MAGIC_START0 or m1 != MAGIC_START1 or m_end != MAGIC_END:
            raise ImageError(
                f"{name}: block {index} (offset {offset}) has bad UF2 magic numbers.",
                cause="The file is damaged, or other data was glued to a UF2.",
                hint=UF2_HINT,
            )
        if size > MAX_PAYLOAD:
            raise ImageError(
                f"{name}: block {index} claims {size} payload bytes; a UF2 block holds at "
                f"most {MAX_PAYLOAD}.",
                cause="The file is damaged or was written by a broken tool.",
                hint=UF2_HINT,
            )
        if flags & FLAG_FILE_CONTAINER:
            raise ImageError(
                f"{name} is a UF2 file container (it carries files, not a flash image).",
                cause="Some tools pack several files into one UF2 for a drive to unpack.",
                hint="Upload the firmware .uf2 the build produced (klipper.uf2).",
            )
        if number >= count:
            raise ImageError(
                f"{name}: block {index} says it is number {number} of {count}.",
                cause="The file is damaged.",
                hint=UF2_HINT,
            )
        family = extra if flags & FLAG_FAMILY_ID_PRESENT else None
        out.append(_Block(index, flags, address, payload[:size], number, count, family))
    return out


def parse_uf2(data: bytes, name: str) -> Uf2File:
    """Main-flash blocks as segments. Refuses damage, missing blocks, conflicting duplicates,
    several chips in one file and families of chips that are not flashed through UF2 here."""
    blocks = _blocks(data, name)
    if not blocks:
        raise ImageError(f"{name} is empty.", hint=UF2_HINT)
    notes: list[str] = []
    flash = [b for b in blocks if not b.flags & FLAG_NOT_MAIN_FLASH]
    skipped = len(blocks) - len(flash)
    if skipped:
        notes.append(f"{skipped} block(s) marked 'not main flash' skipped (the ROM skips them).")
    families = sorted({b.family for b in flash}, key=lambda f: -1 if f is None else f)
    foreign = [f for f in families if f is not None and f not in RP_FAMILIES]
    if foreign:
        fam = foreign[0]
        chip, todo = FOREIGN_FAMILIES.get(fam, ("", ""))
        if chip:
            raise ImageError(
                f"{name} is a UF2 for {chip} (family 0x{fam:08x}), not for an RP2040/RP2350.",
                cause="The firmware was built for another kind of board.",
                hint=todo,
            )
        raise ImageError(
            f"{name} is a UF2 for an unknown chip family 0x{fam:08x}.",
            cause="Only RP2040 and RP2350 UF2 files can be flashed here (families "
            + ", ".join(f"0x{f:08x}" for f in RP_FAMILIES)
            + ").",
            hint="Build the firmware for the board's RP2040/RP2350 (Klipper: make menuconfig, "
            "Raspberry Pi RP2040).",
        )
    e10 = [b for b in flash if b.family == FAMILY_ABSOLUTE and b.address == E10_ADDRESS]
    dropped_e10 = bool(e10) and len(families) > 1
    if dropped_e10:
        flash = [b for b in flash if b not in e10]
        families = sorted({b.family for b in flash}, key=lambda f: -1 if f is None else f)
        notes.append("Dropped the RP2350-E10 workaround block at 0x10FFFF00 (not firmware).")
    if len(families) > 1:
        raise ImageError(
            f"{name} holds images for several chip families ("
            + ", ".join(family_name(f) for f in families)
            + ").",
            cause="It is a combined UF2 for more than one chip.",
            hint="Upload the UF2 built for this board's chip only.",
        )
    family = families[0] if families else None
    if not flash:
        raise ImageError(
            f"{name} contains no main-flash blocks: nothing to write.",
            cause="Every block is marked 'not main flash'.",
            hint=UF2_HINT,
        )
    # the E10 block carries its own numbering (block 0 of 1)
    numbered = [b for b in blocks if b not in e10] if dropped_e10 else blocks
    counts = {b.count for b in numbered}
    if len(counts) > 1:
        raise ImageError(
            f"{name}: its blocks disagree on the total block count ({sorted(counts)}).",
            cause="Two UF2 files were concatenated, or the file is damaged.",
            hint="Upload a single UF2 built for this board.",
        )
    count = counts.pop()
    numbers = {b.number for b in numbered}
    missing = sorted(set(range(count)) - numbers)
    if missing:
        raise ImageError(
            f"{name} is incomplete: {len(missing)} of its {count} blocks are missing "
            f"(first missing: block {missing[0]}).",
            cause="The download or copy was cut short.",
            hint=UF2_HINT,
        )
    by_address: dict[int, bytes] = {}
    duplicates = 0
    for b in flash:
        if not b.payload:
            continue
        seen = by_address.get(b.address)
        if seen is not None:
            if seen != b.payload:
                raise ImageError(
                    f"{name}: two blocks write different data to 0x{b.address:08X}.",
                    cause="The file is damaged, or was assembled from two builds.",
                    hint=UF2_HINT,
                )
            duplicates += 1
            continue
        by_address[b.address] = b.payload
    if duplicates:
        notes.append(f"{duplicates} duplicate block(s) with identical data ignored.")
    segments: list[Segment] = []
    for address in sorted(by_address):
        payload = by_address[address]
        if segments and address < segments[-1].end:
            raise ImageError(
                f"{name}: the block at 0x{address:08X} overlaps the one before it "
                f"(which ends at 0x{segments[-1].end:08X}).",
                cause="The file is damaged.",
                hint=UF2_HINT,
            )
        if segments and address == segments[-1].end:
            last = segments.pop()
            segments.append(Segment(last.address, last.data + payload))
        else:
            segments.append(Segment(address, payload))
    if len(segments) > 1:
        notes.append(f"The image has {len(segments) - 1} hole(s) between its blocks.")
    if family is None:
        notes.append("The UF2 names no chip family; it is treated as a plain flash image.")
    return Uf2File(segments, family, len(blocks), notes)


def write_uf2(
    segments: list[Segment], family: Optional[int] = FAMILY_RP2040, payload: int = 256
) -> bytes:
    """UF2 blocks for ``segments`` as elf2uf2/picotool write them: ``payload``-byte blocks on
    ``payload``-aligned addresses, gaps inside a block padded with 0x00, family id set."""
    pages: dict[int, bytearray] = {}
    for seg in segments:
        for offset in range(len(seg.data)):
            address = seg.address + offset
            base = address - address % payload
            page = pages.setdefault(base, bytearray(payload))
            page[address - base] = seg.data[offset]
    chunks = [(a, bytes(pages[a])) for a in sorted(pages)]
    flags = FLAG_FAMILY_ID_PRESENT if family is not None else 0
    extra = family if family is not None else 0
    out = bytearray()
    for number, (address, data) in enumerate(chunks):
        out += _BLOCK.pack(
            MAGIC_START0,
            MAGIC_START1,
            flags,
            address,
            len(data),
            number,
            len(chunks),
            extra,
            data.ljust(MAX_PAYLOAD, b"\x00"),
            MAGIC_END,
        )
    return bytes(out)


def to_image(data: bytes, name: str, sha: str) -> FirmwareImage:
    """The loader's entry: a FirmwareImage of kind ``uf2`` with the family in ``extra``."""
    parsed = parse_uf2(data, name)
    image = FirmwareImage(parsed.segments, name, "uf2", sha, parsed.notes)
    image.extra["uf2"] = {
        "family": parsed.family,
        "family_name": family_name(parsed.family),
        "blocks": parsed.blocks,
    }
    return image


def family_of(image: FirmwareImage) -> Optional[int]:
    """The UF2 family id the loader recorded, None for other kinds or a family-less UF2."""
    extra = getattr(image, "extra", None) or {}
    family = extra.get("uf2", {}).get("family")
    return int(family) if family is not None else None
