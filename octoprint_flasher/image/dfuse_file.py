"""ST DfuSe ``.dfu`` containers (UM0391) and the 16-byte DFU suffix that plain files may carry."""

from __future__ import annotations

import struct
import zlib
from typing import Optional

from ..errors import ImageError
from .model import REBUILD_HINT, Segment

_DFUSE_PREFIX = struct.Struct("<5sBIB")
_DFUSE_TARGET = struct.Struct("<6sBI255s2I")
_DFUSE_ELEMENT = struct.Struct("<2I")


def dfu_suffix(data: bytes) -> Optional[tuple[int, int, int, int, int, bool]]:
    """``(bcdDevice, idProduct, idVendor, bcdDFU, length, crc_ok)`` when the file ends
    in a DFU suffix ("UFD" marker), else None."""
    if len(data) < 16:
        return None
    tail = data[-16:]
    if tail[8:11] != b"UFD":
        return None
    bcd_device, pid, vid, bcd_dfu = struct.unpack_from("<4H", tail, 0)
    length = tail[11]
    crc = struct.unpack_from("<I", tail, 12)[0]
    crc_ok = crc == (zlib.crc32(data[:-4]) ^ 0xFFFFFFFF)
    return bcd_device, pid, vid, bcd_dfu, length, crc_ok


def parse_dfuse(data: bytes, name: str) -> tuple[list[Segment], list[str]]:
    """A DfuSe container (UM0391): prefix, targets, elements, suffix with CRC. Only alt 0
    (internal flash) is accepted; option bytes and OTP alternates are refused."""
    notes: list[str] = []
    if data[:5] != b"DfuSe":
        if len(data) >= 16 and (s := dfu_suffix(data)) is not None and s[3] == 0x0100 and s[5]:
            raise ImageError(
                f"{name} is a plain DFU file (no DfuSe prefix), which carries no address.",
                cause="It was made for dfu-util with a -s address.",
                hint="Rename it to .bin and give the address (e.g. --address 0x08008000).",
            )
        raise ImageError(
            f"{name}: not a DfuSe file (the first bytes are not 'DfuSe').",
            cause="The file is damaged, or it is another format named .dfu.",
            hint=REBUILD_HINT,
        )
    suffix = dfu_suffix(data)
    if suffix is None:
        raise ImageError(
            f"{name}: the DFU suffix is missing (no 'UFD' marker at offset {len(data) - 8}).",
            cause="The file was cut short or damaged.",
            hint=REBUILD_HINT,
        )
    if not suffix[5]:
        raise ImageError(
            f"{name}: the DFU suffix CRC does not match the file contents.",
            cause="The file was damaged in transfer or modified.",
            hint=REBUILD_HINT,
        )
    if suffix[3] != 0x011A:
        notes.append(f"Unusual bcdDFU {suffix[3]:04X} in the suffix (DfuSe files use 011A).")
    body_end = len(data) - suffix[4]
    if len(data) < _DFUSE_PREFIX.size + 16:
        raise _dfu_truncated(name, len(data), "the DfuSe prefix")
    _sig, version, _size, n_targets = _DFUSE_PREFIX.unpack_from(data, 0)
    if version != 1:
        raise ImageError(
            f"{name}: DfuSe version {version} is not supported (only version 1 exists).",
            cause="The file is damaged or not a DfuSe file.",
            hint=REBUILD_HINT,
        )
    pos = _DFUSE_PREFIX.size
    segments: list[Segment] = []
    for t in range(n_targets):
        if pos + _DFUSE_TARGET.size > body_end:
            raise _dfu_truncated(name, pos, f"target {t}")
        sig, alt, named, raw_name, _tsize, n_elements = _DFUSE_TARGET.unpack_from(data, pos)
        if sig != b"Target":
            raise ImageError(
                f"{name}, offset {pos}: expected a 'Target' header, found {sig!r}.",
                cause="The file is damaged.",
                hint=REBUILD_HINT,
            )
        tname = raw_name.split(b"\x00", 1)[0].decode("latin-1") if named else ""
        if alt != 0:
            label = f" ({tname})" if tname else ""
            raise ImageError(
                f"{name}: contains data for DFU alternate setting {alt}{label}, not internal "
                "flash.",
                cause="Alternates other than 0 are option bytes / OTP memory; writing them can "
                "lock or brick the chip.",
                hint="Use a .dfu with the application only (alt 0), or the .bin/.hex.",
            )
        pos += _DFUSE_TARGET.size
        for e in range(n_elements):
            if pos + _DFUSE_ELEMENT.size > body_end:
                raise _dfu_truncated(name, pos, f"element {e} of target {t}")
            address, size = _DFUSE_ELEMENT.unpack_from(data, pos)
            pos += _DFUSE_ELEMENT.size
            if pos + size > body_end:
                raise _dfu_truncated(name, pos, f"the {size}-byte element {e} at 0x{address:08X}")
            payload = data[pos : pos + size]
            pos += size
            for seg in segments:
                if address < seg.end and seg.address < address + size:
                    raise ImageError(
                        f"{name}, offset {pos - size}: element at 0x{address:08X} overlaps "
                        f"another at 0x{seg.address:08X}.",
                        cause="The file is damaged or was packed wrongly.",
                        hint=REBUILD_HINT,
                    )
            if payload:
                segments.append(Segment(address, payload))
    if pos != body_end:
        raise ImageError(
            f"{name}: {body_end - pos} unexpected bytes at offset {pos}, before the suffix.",
            cause="The file is damaged or was packed wrongly.",
            hint=REBUILD_HINT,
        )
    return segments, notes


def _dfu_truncated(name: str, offset: int, what: str) -> ImageError:
    return ImageError(
        f"{name}, offset {offset}: the file ends inside {what}.",
        cause="The file was cut short (interrupted download or upload).",
        hint=REBUILD_HINT,
    )
