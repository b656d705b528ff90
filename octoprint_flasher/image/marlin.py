"""What a 32-bit printer firmware ``.bin`` says about itself, read before it goes to the SD card.

Marlin's M115 answer is one string literal in the image (``FIRMWARE_NAME:Marlin <version>
(<date> <time>)``); finding it before the upload is what lets the flasher confirm afterwards
that the board really runs the new build. Klipper builds are recognised by their embedded
dictionary. MKS Robin images are XOR-"encrypted" by Marlin's build between offsets 320 and
31040 with a published 32-byte key; the vector table stays readable, and so does the name once
the region is decrypted. Every image must start with a Cortex-M vector table (stack pointer
in SRAM, Thumb reset handler inside the image), which is what refuses a G-code file, an AVR
build or a random file before the printer is touched.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Optional

from .klipper import klipper_build

#: Marlin's ``encrypt_mks`` key (buildroot/share/PlatformIO/scripts, a 32-byte constant)
MKS_KEY = bytes(
    [
        0xA3, 0xBD, 0xAD, 0x0D, 0x41, 0x11, 0xBB, 0x8D, 0xDC, 0x80, 0x2D, 0xD0, 0xD2, 0xC4, 0x9B,
        0x1E, 0x26, 0xEB, 0xE3, 0x33, 0x4A, 0x15, 0xE4, 0x0A, 0xB3, 0xB1, 0x3C, 0x93, 0xBB, 0xAF,
        0xF7, 0x3E,
    ]
)  # fmt: skip
MKS_START = 320
MKS_END = 31040

#: flash bases of the Cortex-M parts 32-bit printer boards use (LPC176x at 0, STM32/GD32 at
#: 0x08000000) and the offsets their SD bootloaders leave below the application
FLASH_BASES = (0x00000000, 0x08000000)
APP_OFFSETS = (0x0, 0x2000, 0x3000, 0x4000, 0x5000, 0x7000, 0x8000, 0xA000, 0xC000, 0x10000,
               0x20000)  # fmt: skip

_NAME_TAG = b"FIRMWARE_NAME:"


@dataclass
class BinInfo:
    """The facts; ``kind`` is marlin, klipper or cortex-m (a firmware we cannot name)."""

    kind: str
    size: int
    stack_pointer: int = 0
    reset_handler: int = 0
    link_base: Optional[int] = None
    firmware_name: str = ""  # "Marlin 2.1.2.7 (Dec  6 2026 05:42:29)"
    encrypted_mks: bool = False
    klipper_mcu: str = ""
    klipper_version: str = ""
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        what = {
            "marlin": f"Marlin firmware ({self.firmware_name})" if self.firmware_name else "Marlin",
            "klipper": f"Klipper {self.klipper_version} for {self.klipper_mcu}".strip(),
            "cortex-m": "a Cortex-M firmware without a FIRMWARE_NAME",
        }[self.kind]
        if self.encrypted_mks:
            what += ", MKS-encrypted"
        if self.link_base is not None:
            what += f", linked at 0x{self.link_base:08X}"
        return what


def vector_table(data: bytes) -> Optional[tuple[int, int, int]]:
    """(stack pointer, reset handler, link base) when ``data`` starts with a Cortex-M vector
    table whose reset handler lies inside the image at one of the usual application offsets."""
    if len(data) < 64:
        return None
    sp, reset = struct.unpack_from("<2I", data)
    in_sram = (
        0x10000000 <= sp <= 0x10010000  # LPC176x local SRAM
        or 0x20000000 <= sp <= 0x20200000
        or 0x24000000 <= sp <= 0x24100000
    )
    if not in_sram or not reset & 1:
        return None
    handler = reset & ~1
    for flash in FLASH_BASES:
        for offset in sorted(APP_OFFSETS, reverse=True):
            base = flash + offset
            if base <= handler < base + len(data):
                return sp, reset, base
    return None


def mks_decrypt(data: bytes) -> bytes:
    """XOR is its own inverse: the same call encrypts and decrypts."""
    out = bytearray(data)
    for pos in range(MKS_START, min(MKS_END, len(out))):
        out[pos] ^= MKS_KEY[pos & 31]
    return bytes(out)


def looks_mks_encrypted(data: bytes) -> bool:
    """Plain code and data are full of 0x00 bytes; encrypted, each becomes the key byte of its
    position. So the region matches the key far more often than it holds zeros."""
    end = min(MKS_END, len(data))
    if end - MKS_START < 1024:
        return False
    region = data[MKS_START:end]
    key_hits = sum(1 for i, b in enumerate(region) if b == MKS_KEY[(MKS_START + i) & 31])
    zeros = region.count(0)
    return key_hits > 64 and key_hits > 4 * zeros


def find_firmware_name(data: bytes) -> str:
    """The comparable FIRMWARE_NAME (``Marlin <version> (<date> <time>)``), or ""."""
    pos = data.find(_NAME_TAG)
    while pos >= 0:
        tail = data[pos + len(_NAME_TAG) : pos + len(_NAME_TAG) + 160]
        end = tail.find(b")")
        nul = tail.find(b"\0")
        if end >= 0 and (nul < 0 or end < nul):
            text = tail[: end + 1].decode("ascii", "replace")
            if text.startswith("Marlin"):
                return text.strip()
        pos = data.find(_NAME_TAG, pos + 1)
    return ""


def describe_bin(data: bytes) -> Optional[BinInfo]:
    """The firmware facts of a ``.bin``, or None when it does not start with a Cortex-M
    vector table (not a firmware for a 32-bit printer board)."""
    vt = vector_table(data)
    if vt is None:
        return None
    sp, reset, base = vt
    info = BinInfo("cortex-m", len(data), sp, reset, base)
    plain = data
    if looks_mks_encrypted(data):
        info.encrypted_mks = True
        plain = mks_decrypt(data)
        info.notes.append(
            "MKS-encrypted image (Robin-family bootloaders decrypt it while flashing)."
        )
    build = klipper_build(plain)
    if build is not None:
        info.kind = "klipper"
        info.klipper_mcu = build.mcu
        info.klipper_version = build.version
        return info
    info.firmware_name = find_firmware_name(plain)
    if info.firmware_name or b"Marlin" in plain:
        info.kind = "marlin"
    return info
