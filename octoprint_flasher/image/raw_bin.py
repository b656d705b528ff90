"""Raw ``.bin`` images: bytes with no address, optionally ending in a DFU suffix."""

from __future__ import annotations

from typing import Optional

from ..errors import ImageError
from .dfuse_file import dfu_suffix
from .model import REBUILD_HINT, FirmwareImage, Segment

#: A raw .bin carries no address; None means "the caller (the flasher) must place it".
DEFAULT_BIN_ADDRESS: Optional[int] = None


def load_bin(data: bytes, name: str, sha: str, base_address: Optional[int]) -> FirmwareImage:
    notes: list[str] = []
    suffix = dfu_suffix(data)
    if suffix is not None:
        _, pid, vid, bcd_dfu, length, crc_ok = suffix
        if not crc_ok:
            raise ImageError(
                f"{name}: the DFU suffix at offset {len(data) - 16} has a bad CRC.",
                cause="The file was damaged or modified after the suffix was added.",
                hint=REBUILD_HINT,
            )
        if length < 16 or length > len(data):
            raise ImageError(
                f"{name}: the DFU suffix claims {length} bytes, which is impossible.",
                cause="The file is damaged.",
                hint=REBUILD_HINT,
            )
        data = data[:-length]
        notes.append(
            f"Stripped a {length}-byte DFU suffix (bcdDFU {bcd_dfu:04X}, for USB "
            f"{vid:04x}:{pid:04x}); only the payload is written."
        )
    if not data:
        raise ImageError(
            f"{name} contains no firmware data (only a DFU suffix).", hint=REBUILD_HINT
        )
    if base_address is None:
        base_address = DEFAULT_BIN_ADDRESS
    if base_address is None:
        notes.append(
            "A .bin file does not say where it belongs: it will be written at the board's "
            "application start unless you give an address."
        )
        return FirmwareImage([Segment(0, data)], name, "bin", sha, notes, address_given=False)
    check_address(name, base_address, len(data))
    return FirmwareImage([Segment(base_address, data)], name, "bin", sha, notes)


def check_address(name: str, address: int, size: int) -> None:
    """Refuse a load address that puts the image outside the 32-bit address space."""
    if address < 0 or address + size > 1 << 32:
        raise ImageError(
            f"{name}: address 0x{address:X} is outside the 32-bit address space.",
            hint="Give the application start address, e.g. 0x08008000.",
        )
