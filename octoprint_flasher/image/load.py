"""Read any firmware file a user can upload into a :class:`FirmwareImage`.

Everything a user can upload passes through here first, so every way a file can be wrong
ends in an :class:`ImageError` that names the file, the line or offset, and what to do --
before any board is touched. The kind comes from the content, with the extension as a tie
breaker: a G-code or ELF file is recognised and refused with the right advice whatever it is
called. The formats themselves live in :mod:`.intel_hex`, :mod:`.raw_bin`, :mod:`.dfuse_file`
and :mod:`.uf2` (RP2040/RP2350 UF2 files; UF2s for other chips are refused there).
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
from pathlib import Path
from typing import Optional, Union

from ..errors import ImageError
from . import cortex_m, prusa_hex, uf2
from .dfuse_file import parse_dfuse
from .intel_hex import parse_hex, refuse_avr_extra_sections
from .model import REBUILD_HINT, FirmwareImage
from .raw_bin import check_address, load_bin

MIB = 1024 * 1024
DEFAULT_MAX_SIZE = 16 * MIB

HEX_EXTENSIONS = (".hex", ".ihex", ".ihx")
BIN_EXTENSIONS = (".bin",)
DFU_EXTENSIONS = (".dfu",)
UF2_EXTENSIONS = (".uf2",)
GCODE_EXTENSIONS = (".gcode", ".gco", ".g", ".gc", ".bgcode")

_UF2_MAGIC = b"UF2\n"
_UF2_MAGIC2 = 0x9E5D5157
_GCODE_LINE = re.compile(rb"^\s*(?:N\d+\s+)?[GMT]\d+(?:\.\d+)?(?:\s|;|\*|$)", re.IGNORECASE)


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
            hint=REBUILD_HINT,
        )
    sha = hashlib.sha256(data).hexdigest()
    kind = sniff(data, name)
    if kind == "hex" and prusa_hex.looks_prusa(data):
        image = prusa_hex.to_image(data, name, sha)
    elif kind == "hex":
        segments, notes = parse_hex(data, name)
        refuse_avr_extra_sections(segments, name)
        image = FirmwareImage(segments, name, "hex", sha, notes)
        if base_address is not None:
            image.notes.append("An Intel HEX file carries its own addresses; --address ignored.")
    elif kind == "uf2":
        image = uf2.to_image(data, name, sha)
        if base_address is not None:
            image.notes.append("A UF2 file carries its own addresses; --address ignored.")
    elif kind == "dfu":
        segments, notes = parse_dfuse(data, name)
        image = FirmwareImage(segments, name, "dfu", sha, notes)
        if base_address is not None:
            image.notes.append("A DfuSe file carries its own addresses; --address ignored.")
    else:
        image = cortex_m.place(load_bin(data, name, sha, None), base_address)
        if base_address is not None:
            check_address(name, base_address, image.size)
    if not image.segments:
        raise ImageError(
            f"{name} contains no firmware data.",
            cause="The file is well formed but holds no bytes to write.",
            hint=REBUILD_HINT,
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
    """``hex``, ``bin``, ``dfu`` or ``uf2``; raises ImageError for files that are not firmware."""
    ext = os.path.splitext(name)[1].lower()
    if data[:4] == b"\x7fELF":
        raise ImageError(
            f"{name} is an ELF file (the linker's output), not a flashable image.",
            cause="Build systems produce firmware.elf next to firmware.hex / firmware.bin.",
            hint="Upload the .hex or .bin built from it (e.g. .pio/build/<env>/firmware.hex, "
            "or klipper/out/klipper.bin).",
        )
    if data[:4] == _UF2_MAGIC and len(data) >= 8 and _u32(data, 4) == _UF2_MAGIC2:
        return "uf2"
    if ext in UF2_EXTENSIONS:
        raise ImageError(
            f"{name} is named like a UF2 file but does not start with a UF2 block.",
            cause="It is damaged, or another file was renamed to .uf2.",
            hint="Upload the .uf2 the firmware build produced (Klipper: out/klipper.uf2).",
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
        cause="Only Intel HEX (.hex), raw binary (.bin), DfuSe (.dfu) and UF2 (.uf2) files "
        "can be flashed.",
        hint="Upload the .hex, .bin, .dfu or .uf2 produced by the firmware build.",
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
