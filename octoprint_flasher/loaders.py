"""Read firmware files (Intel HEX, raw .bin, DfuSe .dfu) into a :class:`FirmwareImage`.

Everything a user can upload passes through here first, so every way a file can be wrong
ends in an :class:`ImageError` that names the file, the line or offset, and what to do --
before any board is touched. The kind comes from the content, with the extension as a tie
breaker: a G-code, ELF or UF2 file is recognised and refused with the right advice whatever
it is called.

Intel HEX is parsed record by record here rather than with ``intelhex.IntelHex.loadhex``:
the loader must accept two records that write the *same* bytes to one address (linkers emit
them; ``loadhex`` refuses them), must name the exact line of every fault, and must not spend
a Python dict entry per byte on multi-megabyte images. The tests check it byte for byte
against ``intelhex`` on random and Marlin-sized files.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
import zlib
from pathlib import Path
from typing import Optional, Union

from .errors import ImageError
from .firmware import FirmwareImage, Segment

MIB = 1024 * 1024
DEFAULT_MAX_SIZE = 16 * MIB
#: A raw .bin carries no address; None means "the caller (the flasher) must place it".
DEFAULT_BIN_ADDRESS: Optional[int] = None

HEX_EXTENSIONS = (".hex", ".ihex", ".ihx")
BIN_EXTENSIONS = (".bin",)
DFU_EXTENSIONS = (".dfu",)
GCODE_EXTENSIONS = (".gcode", ".gco", ".g", ".gc", ".bgcode")

_HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")
_UF2_MAGIC = b"UF2\n"
_UF2_MAGIC2 = 0x9E5D5157
_DFUSE_PREFIX = struct.Struct("<5sBIB")
_DFUSE_TARGET = struct.Struct("<6sBI255s2I")
_DFUSE_ELEMENT = struct.Struct("<2I")
_GCODE_LINE = re.compile(rb"^\s*(?:N\d+\s+)?[GMT]\d+(?:\.\d+)?(?:\s|;|\*|$)", re.IGNORECASE)

_WHAT_TO_DO_BUILD = "Rebuild or download the firmware again and upload the .hex (or .bin) file."


def load(
    path: Union[str, Path],
    *,
    base_address: Optional[int] = None,
    max_size: int = DEFAULT_MAX_SIZE,
    filename: Optional[str] = None,
) -> FirmwareImage:
    """Load a firmware file from disk. ``filename`` overrides the name shown in messages
    (an upload's original name rather than a temporary path)."""
    p = Path(path)
    name = filename or p.name
    try:
        size = p.stat().st_size
    except FileNotFoundError:
        raise ImageError(
            f"{name}: file not found.", hint="Check the path and upload the file again."
        ) from None
    except OSError as exc:
        raise ImageError(
            f"{name}: cannot read the file: {exc.strerror}.",
            hint="Check the file's permissions and upload it again.",
        ) from exc
    check_size(name, size, max_size)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ImageError(
            f"{name}: cannot read the file: {exc.strerror}.",
            hint="Check the file's permissions and upload it again.",
        ) from exc
    return load_bytes(data, name, base_address=base_address, max_size=max_size)


def load_bytes(
    data: bytes,
    filename: str,
    *,
    base_address: Optional[int] = None,
    max_size: int = DEFAULT_MAX_SIZE,
) -> FirmwareImage:
    """Parse firmware from memory; ``filename`` picks the kind when content cannot."""
    name = os.path.basename(filename) or "firmware"
    check_size(name, len(data), max_size)
    if not data or not data.strip(b" \t\r\n\x00"):
        raise ImageError(
            f"{name} is empty.",
            cause="The upload or download was interrupted, or the build produced no output.",
            hint=_WHAT_TO_DO_BUILD,
        )
    sha = hashlib.sha256(data).hexdigest()
    kind = sniff(data, name)
    if kind == "hex":
        segments, notes = parse_hex(data, name)
        _refuse_avr_extra_sections(segments, name)
        image = FirmwareImage(segments, name, "hex", sha, notes)
        if base_address is not None:
            image.notes.append("An Intel HEX file carries its own addresses; --address ignored.")
    elif kind == "dfu":
        segments, notes = parse_dfuse(data, name)
        image = FirmwareImage(segments, name, "dfu", sha, notes)
        if base_address is not None:
            image.notes.append("A DfuSe file carries its own addresses; --address ignored.")
    else:
        image = _load_bin(data, name, sha, base_address)
    if not image.segments:
        raise ImageError(
            f"{name} contains no firmware data.",
            cause="The file is well formed but holds no bytes to write.",
            hint=_WHAT_TO_DO_BUILD,
        )
    if image.span > max_size:
        raise ImageError(
            f"{name} spans 0x{image.start:X}-0x{image.end - 1:X} ({image.span} bytes), more "
            f"than the {format_size(max_size)} limit.",
            cause="Some records lie far away from the others (e.g. RAM or option-byte data).",
            hint="Upload the application image only, built for the board's flash.",
        )
    return image


def check_size(name: str, size: int, max_size: int) -> None:
    if size > max_size:
        raise ImageError(
            f"{name} is {size} bytes, over the {format_size(max_size)} limit for firmware files.",
            cause="This is not a firmware image for a printer mainboard (they are under 2 MiB).",
            hint="Check that you picked the right file.",
        )


def format_size(n: int) -> str:
    """1024 -> "1 KiB", 16777216 -> "16 MiB", 1000 -> "1000 bytes"."""
    for unit, factor in (("MiB", MIB), ("KiB", 1024)):
        if n >= factor and n % factor == 0:
            return f"{n // factor} {unit}"
    return f"{n} bytes"


# --- kind detection --------------------------------------------------------------------


def sniff(data: bytes, name: str) -> str:
    """``hex``, ``bin`` or ``dfu``; raises ImageError for files that are not firmware."""
    ext = os.path.splitext(name)[1].lower()
    if data[:4] == b"\x7fELF":
        raise ImageError(
            f"{name} is an ELF file (the linker's output), not a flashable image.",
            cause="Build systems produce firmware.elf next to firmware.hex / firmware.bin.",
            hint="Upload the .hex or .bin built from it (e.g. .pio/build/<env>/firmware.hex, "
            "or klipper/out/klipper.bin).",
        )
    if data[:4] == _UF2_MAGIC and len(data) >= 8 and _u32(data, 4) == _UF2_MAGIC2:
        raise ImageError(
            f"{name} is a UF2 file, which this flasher does not support yet.",
            cause="UF2 is meant for boards that show up as a USB drive (RP2040, SAMD, some STM32).",
            hint="Put the board in its UF2 bootloader and copy the file to its USB drive, or "
            "build a .bin/.hex instead.",
        )
    if data[:5] == b"DfuSe":
        return "dfu"
    text_like = _looks_like_text(data)
    if text_like and _looks_like_gcode(data):
        raise ImageError(
            f"{name} is G-code, not firmware.",
            cause="G-code files are print jobs for the printer; firmware is a .hex, .bin or .dfu "
            "built for the mainboard.",
            hint="Print it from OctoPrint's file list; upload the firmware file here.",
        )
    if ext in GCODE_EXTENSIONS:
        raise ImageError(
            f"{name} has a G-code extension; G-code is a print job, not firmware.",
            hint="Upload a .hex, .bin or .dfu firmware file.",
        )
    if ext in DFU_EXTENSIONS:
        return "dfu"
    first = data.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    if ext in HEX_EXTENSIONS:
        if not text_like:
            raise ImageError(
                f"{name} is named like an Intel HEX file but is not one: it contains binary data.",
                cause="It is probably a raw binary (.bin) or another file renamed to .hex.",
                hint="Upload the real .hex from the build, or the .bin with its address.",
            )
        return "hex"
    if first == b":" and text_like:
        return "hex"
    if ext in BIN_EXTENSIONS:
        return "bin"
    raise ImageError(
        f"{name}: unknown firmware file type {ext or '(no extension)'}.",
        cause="Only Intel HEX (.hex), raw binary (.bin) and DfuSe (.dfu) files can be flashed.",
        hint="Upload the .hex, .bin or .dfu produced by the firmware build.",
    )


def _looks_like_text(data: bytes) -> bool:
    sample = data[:4096]
    if b"\x00" in sample:
        return False
    printable = sum(1 for b in sample if 32 <= b < 127 or b in (9, 10, 13))
    return printable >= 0.97 * len(sample)


def _looks_like_gcode(data: bytes) -> bool:
    lines = [ln for ln in data[:16384].splitlines()[:200] if ln.strip()]
    if not lines or lines[0].lstrip().startswith(b":"):
        return False
    codes = sum(1 for ln in lines if _GCODE_LINE.match(ln))
    comments = sum(1 for ln in lines if ln.lstrip().startswith(b";"))
    return codes >= 1 and codes + comments >= 0.6 * len(lines)


def _u32(data: bytes, offset: int) -> int:
    value: int = struct.unpack_from("<I", data, offset)[0]
    return value


# --- Intel HEX -------------------------------------------------------------------------


def parse_hex(data: bytes, name: str) -> tuple[list[Segment], list[str]]:
    """Records 00-05, extended segment (02) and linear (04) addresses. Returns the merged
    segments and notes; raises ImageError naming the line of the first fault."""
    notes: list[str] = []
    chunks: list[tuple[int, bytes, int]] = []  # (address, data, line)
    base = 0
    eof_line = 0
    text = data[3:] if data.startswith(b"\xef\xbb\xbf") else data
    lines = text.split(b"\n")
    for lineno, raw in enumerate(lines, start=1):
        line = raw.strip(b" \t\r\x00")
        if not line:
            continue
        if eof_line:
            notes.append(f"Ignored content after the end-of-file record on line {eof_line}.")
            break
        rtype, addr, payload = _hex_record(line, name, lineno)
        if rtype == 0:
            if payload:
                start = base + addr
                chunks.append((start, payload, lineno))
        elif rtype == 1:
            eof_line = lineno
        elif rtype == 2:
            _expect_len(payload, 2, name, lineno, "extended segment address")
            base = int.from_bytes(payload, "big") << 4
        elif rtype == 4:
            _expect_len(payload, 2, name, lineno, "extended linear address")
            base = int.from_bytes(payload, "big") << 16
        elif rtype in (3, 5):
            _expect_len(payload, 4, name, lineno, "start address")
            notes.append(f"Start address 0x{int.from_bytes(payload, 'big'):08X} (informational).")
    if not eof_line:
        raise ImageError(
            f"{name} ends without the end-of-file record (:00000001FF).",
            cause="The file was cut short: an interrupted download, upload or copy.",
            hint=_WHAT_TO_DO_BUILD,
        )
    return _merge_chunks(chunks, name), notes


def _hex_record(line: bytes, name: str, lineno: int) -> tuple[int, int, bytes]:
    where = f"{name}, line {lineno}"
    if line[:1] != b":":
        shown = line[:20].decode("latin-1")
        raise ImageError(
            f"{where}: a record must start with ':' but the line starts with {shown!r}.",
            cause="The file is not pure Intel HEX (text was added or it is another format).",
            hint=_WHAT_TO_DO_BUILD,
        )
    body = line[1:]
    for i, ch in enumerate(body):
        if ch not in _HEX_DIGITS:
            raise ImageError(
                f"{where}, column {i + 2}: bad character {chr(ch)!r} in a HEX record.",
                cause="The file was damaged (edited, or transferred as the wrong encoding).",
                hint=_WHAT_TO_DO_BUILD,
            )
    if len(body) < 10:
        raise ImageError(
            f"{where}: truncated record ({len(body)} hex digits, a record has at least 10).",
            cause="The line was cut short; the file is damaged or incomplete.",
            hint=_WHAT_TO_DO_BUILD,
        )
    if len(body) % 2:
        raise ImageError(
            f"{where}: odd number of hex digits ({len(body)}): a character is missing or extra.",
            cause="The file was damaged in transfer or edited by hand.",
            hint=_WHAT_TO_DO_BUILD,
        )
    raw = bytes.fromhex(body.decode("ascii"))
    count = raw[0]
    if len(raw) != count + 5:
        short = len(raw) < count + 5
        raise ImageError(
            f"{where}: the record says {count} data bytes but carries {len(raw) - 5}.",
            cause="The line was cut short; the file is damaged or incomplete."
            if short
            else "Extra characters were appended to the line; the file is damaged.",
            hint=_WHAT_TO_DO_BUILD,
        )
    if sum(raw) & 0xFF:
        expected = (-sum(raw[:-1])) & 0xFF
        raise ImageError(
            f"{where}: bad record checksum 0x{raw[-1]:02X} (expected 0x{expected:02X}).",
            cause="The file was damaged in transfer or edited by hand.",
            hint=_WHAT_TO_DO_BUILD,
        )
    rtype = raw[3]
    if rtype > 5:
        raise ImageError(
            f"{where}: unknown record type {rtype:02X}.",
            cause="Intel HEX only has record types 00-05; the file is damaged or not Intel HEX.",
            hint=_WHAT_TO_DO_BUILD,
        )
    return rtype, int.from_bytes(raw[1:3], "big"), raw[4:-1]


def _expect_len(payload: bytes, n: int, name: str, lineno: int, what: str) -> None:
    if len(payload) != n:
        raise ImageError(
            f"{name}, line {lineno}: {what} record with {len(payload)} data bytes, expected {n}.",
            cause="The file is damaged or not Intel HEX.",
            hint=_WHAT_TO_DO_BUILD,
        )


def _merge_chunks(chunks: list[tuple[int, bytes, int]], name: str) -> list[Segment]:
    """Join records into segments; overlapping records must agree byte for byte."""
    chunks.sort(key=lambda c: (c[0], c[2]))
    segs: list[tuple[int, bytearray, int]] = []  # start, data, line of last record
    for addr, payload, lineno in chunks:
        if addr + len(payload) > 1 << 32:
            raise ImageError(
                f"{name}, line {lineno}: data runs past the 4 GiB address space.",
                cause="The record's address is corrupt.",
                hint=_WHAT_TO_DO_BUILD,
            )
        if segs and addr <= segs[-1][0] + len(segs[-1][1]):
            start, buf, prev_line = segs[-1]
            end = start + len(buf)
            overlap = min(end - addr, len(payload))
            if overlap > 0:
                old = bytes(buf[addr - start : addr - start + overlap])
                new = payload[:overlap]
                if old != new:
                    i = next(k for k in range(overlap) if old[k] != new[k])
                    raise ImageError(
                        f"{name}, line {lineno}: address 0x{addr + i:X} is written twice with "
                        f"different bytes (0x{old[i]:02X} before, then 0x{new[i]:02X}).",
                        cause="Two images were merged into one file (e.g. a bootloader and an "
                        "application built for the same addresses).",
                        hint="Upload the application image alone.",
                    )
            buf.extend(payload[max(overlap, 0) :])
            segs[-1] = (start, buf, lineno)
        else:
            segs.append((addr, bytearray(payload), lineno))
    return [Segment(s, bytes(b)) for s, b, _ in segs]


# avr-objcopy puts other memories at these virtual addresses when not told to drop them
_AVR_SECTIONS = (
    (0x810000, 0x820000, ".eeprom"),
    (0x820000, 0x830000, ".fuse"),
    (0x830000, 0x840000, ".lock"),
    (0x840000, 0x850000, ".signature"),
)


def _refuse_avr_extra_sections(segments: list[Segment], name: str) -> None:
    """An AVR HEX with EEPROM/fuse data would read as an 8 MiB image; say what it really is."""
    if not segments or segments[0].address >= 0x40000:
        return
    for seg in segments:
        for lo, hi, section in _AVR_SECTIONS:
            if lo <= seg.address < hi:
                raise ImageError(
                    f"{name} contains {section} data at 0x{seg.address:X}, not only flash.",
                    cause="The HEX was exported from the ELF with the AVR's EEPROM/fuse "
                    "sections included.",
                    hint="Export the flash only: avr-objcopy -O ihex -R .eeprom -R .fuse "
                    "-R .lock -R .signature firmware.elf firmware.hex (Arduino/PlatformIO "
                    "builds already do this).",
                )


# --- raw binary and DFU suffix ---------------------------------------------------------


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
    crc = _u32(tail, 12)
    crc_ok = crc == (zlib.crc32(data[:-4]) ^ 0xFFFFFFFF)
    return bcd_device, pid, vid, bcd_dfu, length, crc_ok


def _load_bin(data: bytes, name: str, sha: str, base_address: Optional[int]) -> FirmwareImage:
    notes: list[str] = []
    suffix = dfu_suffix(data)
    if suffix is not None:
        _, pid, vid, bcd_dfu, length, crc_ok = suffix
        if not crc_ok:
            raise ImageError(
                f"{name}: the DFU suffix at offset {len(data) - 16} has a bad CRC.",
                cause="The file was damaged or modified after the suffix was added.",
                hint=_WHAT_TO_DO_BUILD,
            )
        if length < 16 or length > len(data):
            raise ImageError(
                f"{name}: the DFU suffix claims {length} bytes, which is impossible.",
                cause="The file is damaged.",
                hint=_WHAT_TO_DO_BUILD,
            )
        data = data[:-length]
        notes.append(
            f"Stripped a {length}-byte DFU suffix (bcdDFU {bcd_dfu:04X}, for USB "
            f"{vid:04x}:{pid:04x}); only the payload is written."
        )
    if not data:
        raise ImageError(
            f"{name} contains no firmware data (only a DFU suffix).", hint=_WHAT_TO_DO_BUILD
        )
    if base_address is None:
        base_address = DEFAULT_BIN_ADDRESS
    if base_address is None:
        notes.append(
            "A .bin file does not say where it belongs: it will be written at the board's "
            "application start unless you give an address."
        )
        return FirmwareImage([Segment(0, data)], name, "bin", sha, notes, address_given=False)
    if base_address < 0 or base_address + len(data) > 1 << 32:
        raise ImageError(
            f"{name}: address 0x{base_address:X} is outside the 32-bit address space.",
            hint="Give the application start address, e.g. 0x08008000.",
        )
    return FirmwareImage([Segment(base_address, data)], name, "bin", sha, notes)


# --- DfuSe -----------------------------------------------------------------------------


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
            hint=_WHAT_TO_DO_BUILD,
        )
    suffix = dfu_suffix(data)
    if suffix is None:
        raise ImageError(
            f"{name}: the DFU suffix is missing (no 'UFD' marker at offset {len(data) - 8}).",
            cause="The file was cut short or damaged.",
            hint=_WHAT_TO_DO_BUILD,
        )
    if not suffix[5]:
        raise ImageError(
            f"{name}: the DFU suffix CRC does not match the file contents.",
            cause="The file was damaged in transfer or modified.",
            hint=_WHAT_TO_DO_BUILD,
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
            hint=_WHAT_TO_DO_BUILD,
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
                hint=_WHAT_TO_DO_BUILD,
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
                        hint=_WHAT_TO_DO_BUILD,
                    )
            if payload:
                segments.append(Segment(address, payload))
    if pos != body_end:
        raise ImageError(
            f"{name}: {body_end - pos} unexpected bytes at offset {pos}, before the suffix.",
            cause="The file is damaged or was packed wrongly.",
            hint=_WHAT_TO_DO_BUILD,
        )
    return segments, notes


def _dfu_truncated(name: str, offset: int, what: str) -> ImageError:
    return ImageError(
        f"{name}, offset {offset}: the file ends inside {what}.",
        cause="The file was cut short (interrupted download or upload).",
        hint=_WHAT_TO_DO_BUILD,
    )
