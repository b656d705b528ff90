"""Prusa's 8-bit firmware files: MULTILANG hex files, ``; device = …`` headers, and what they
may be flashed onto.

A MK3-family MULTILANG hex is two complete Intel-HEX files back to back, each ending with its
own end-of-file record: the firmware from address 0, then the language catalogs, again from 0,
as addresses in the printer's external SPI flash (XFLASH). Stock avrdude flashes only the first
and leaves old catalogs in XFLASH whose signature no longer matches the new firmware: the
"choose a language, it copies, asks again, only English works" loop. So the catalogs are
checked here, before any board is touched, to belong to exactly this firmware build.

MMU2S/MMU3 and CW1/CW1S files start with ``; device = mm-control`` (``cw1``, ``cw1s``) and an
empty line; they go to an ATmega32U4 behind a Caterina (avr109) bootloader, never to the printer.
Layouts and rules: ``research/prusa.md`` §1.4, §2.4.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from typing import Any, Optional

from ..errors import ImageError, PreflightError
from .intel_hex import parse_hex, refuse_avr_extra_sections
from .model import FirmwareImage, Segment

#: classification of a Prusa file (FirmwareImage.extra["prusa"]["kind"])
MK3_MULTILANG = "mk3-multilang"
AVR_PRINTER = "avr-printer"  # one section, printer firmware (English-only MK3, MK2.5, …)
MMU = "mmu"
CW1 = "cw1"
CW1S = "cw1s"
CONTROLLER_KINDS = (MMU, CW1, CW1S)

#: the Einsy bootloader starts here; firmware must end below it
EINSY_BOOT_START = 0x3E000
#: Prusa's Caterina refuses pages at and above this address (the bootloader's 4 KB)
CATERINA_BOOT_START = 0x7000
#: XFLASH on the MK3 (W25X20CL / GD25Q20C): 256 KB; languages may use 0 … 0x2CFFF
XFLASH_SIZE = 0x40000
LANG_AREA_END = 0x2D000

CATALOG_MAGIC = 0x4BB45AA5
_CATALOG_HEAD = struct.Struct("<IHHHHI")  # magic, size, count, checksum, code, signature

DEVICE_NAMES = {
    "mm-control": MMU,
    "cw1": CW1,
    "cw1s": CW1S,
    "mk3": AVR_PRINTER,
    "mk2": AVR_PRINTER,
}
DEVICE_LABEL = {MMU: "MMU2S/MMU3", CW1: "CW1", CW1S: "CW1S"}
KIND_LABEL = {
    MK3_MULTILANG: "Prusa MK3/MK3S/MK3S+ MULTILANG firmware (firmware + language catalogs)",
    AVR_PRINTER: "Prusa 8-bit printer firmware (one section)",
    MMU: "Prusa MMU2S/MMU3 firmware",
    CW1: "Prusa CW1 firmware",
    CW1S: "Prusa CW1S firmware",
}

_EOF_RECORD = re.compile(rb"^\s*:00000001FF\s*$", re.IGNORECASE)
_HEADER_LINE = re.compile(rb"^\s*;\s*([A-Za-z0-9_.\-]+)\s*=\s*(.*?)\s*$")
_REBUILD = "Download the firmware file again from prusa3d.com and upload it unchanged."


@dataclass
class Catalog:
    """One language catalog's header (``lang-build.py`` layout)."""

    offset: int
    size: int
    count: int
    code: str
    signature: int


@dataclass
class PrusaFile:
    """What the file says about itself, before any board is involved."""

    kind: str
    header: dict[str, str] = field(default_factory=dict)
    firmware: list[Segment] = field(default_factory=list)
    languages: list[Segment] = field(default_factory=list)
    catalogs: list[Catalog] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def signature(self) -> Optional[int]:
        return self.catalogs[0].signature if self.catalogs else None

    def extra(self) -> dict[str, Any]:
        """What goes into ``FirmwareImage.extra["prusa"]`` (JSON-friendly)."""
        return {
            "kind": self.kind,
            "label": KIND_LABEL[self.kind],
            "device": self.header.get("device", ""),
            "header": dict(self.header),
            "languages": [c.code for c in self.catalogs],
            "signature": f"0x{self.signature:08X}" if self.signature is not None else "",
        }


def looks_prusa(data: bytes) -> bool:
    """A header line before the first record, or records after an end-of-file record."""
    text = data[3:] if data.startswith(b"\xef\xbb\xbf") else data
    for line in text.split(b"\n"):
        s = line.strip()
        if not s:
            continue
        if s.startswith(b";"):
            return True
        break
    seen_eof = False
    for line in text.split(b"\n"):
        if seen_eof and line.strip().startswith(b":"):
            return True  # records after an end-of-file record: a second section
        seen_eof = seen_eof or bool(_EOF_RECORD.match(line))
    return False


def split_sections(data: bytes, name: str) -> tuple[dict[str, str], list[bytes]]:
    """The ``; key = value`` header and each section's text, split after every end-of-file
    record. Each section keeps its lines at their place in the file (earlier lines blank), so
    the HEX parser names the real line of a fault, and starts with fresh extended-address
    state because it is parsed on its own."""
    text = data[3:] if data.startswith(b"\xef\xbb\xbf") else data
    lines = text.split(b"\n")
    header: dict[str, str] = {}
    sections: list[bytes] = []
    current: list[bytes] = []
    in_header = True
    for lineno, line in enumerate(lines, start=1):
        stripped = line.strip(b" \t\r\x00")
        if in_header and (not stripped or stripped.startswith(b";")):
            m = _HEADER_LINE.match(stripped) if stripped else None
            if m:
                key = m.group(1).decode("ascii", "replace").lower()
                header[key] = m.group(2).decode("utf-8", "replace").strip().lower()
            elif stripped:
                pass  # a plain comment line before the records
            current.append(b"")
            continue
        in_header = False
        current.append(line)
        if _EOF_RECORD.match(line):
            sections.append(b"\n".join(current))
            current = [b""] * lineno
    rest = b"\n".join(current)
    if rest.strip(b" \t\r\n\x00"):
        sections.append(rest)  # no end-of-file record: the parser names the fault
    if not sections:
        raise ImageError(
            f"{name} has a Prusa header but no Intel HEX records.",
            cause="The file was cut short or is not a firmware file.",
            hint=_REBUILD,
        )
    return header, sections


def parse(data: bytes, name: str) -> PrusaFile:
    """Split, parse and classify; raises ImageError for anything malformed (checks that need
    to know the target are in :func:`check_for_printer` / :func:`check_for_controller`)."""
    header, sections = split_sections(data, name)
    device = header.get("device")
    notes: list[str] = []
    if device is not None and device not in DEVICE_NAMES:
        raise ImageError(
            f"{name} says '; device = {device}', a device this flasher does not know.",
            cause="The file is for another Prusa product (MINI/MK4/XL firmware is .bbf, not .hex).",
            hint="Use the .hex file for the MK3 family, MK2.5, MMU2S/MMU3 or CW1/CW1S.",
        )
    if len(sections) > 2:
        raise ImageError(
            f"{name} holds {len(sections)} Intel-HEX sections; a Prusa file has one or two.",
            cause="Several files were concatenated by mistake.",
            hint=_REBUILD,
        )
    parsed: list[list[Segment]] = []
    for i, text in enumerate(sections):
        label = name if len(sections) == 1 else f"{name} ({_SECTION_NAMES[i]})"
        segs, sec_notes = parse_hex(text, label)
        notes += [n for n in sec_notes if not n.startswith("Ignored content after")]
        parsed.append(segs)
    kind = DEVICE_NAMES.get(device or "", AVR_PRINTER)
    if len(parsed) == 2:
        if kind in CONTROLLER_KINDS:
            raise ImageError(
                f"{name} says it is {KIND_LABEL[kind]} but holds two sections like a MK3 "
                "MULTILANG file.",
                cause="The file was edited or concatenated by mistake.",
                hint=_REBUILD,
            )
        kind = MK3_MULTILANG
    pf = PrusaFile(kind, header, parsed[0], parsed[1] if len(parsed) > 1 else [], notes=notes)
    if not pf.firmware:
        raise ImageError(f"{name} contains no firmware data.", hint=_REBUILD)
    if kind == MK3_MULTILANG:
        pf.catalogs = check_catalogs(pf, name)
        pf.notes.append(
            f"MULTILANG: firmware plus {len(pf.catalogs)} language catalogs "
            f"({', '.join(c.code for c in pf.catalogs)}); both are written, the languages in "
            "a second pass through the firmware."
        )
    return pf


_SECTION_NAMES = ("firmware section", "language section")


def to_image(data: bytes, name: str, sha: str) -> FirmwareImage:
    """The loader's entry: the firmware as segments, the catalogs as ``external``."""
    pf = parse(data, name)
    refuse_avr_extra_sections(pf.firmware, name)
    return FirmwareImage(
        pf.firmware,
        name,
        "hex",
        sha,
        pf.notes,
        external=pf.languages,
        extra={"prusa": pf.extra()},
    )


def catalog_checksum(blob: bytes) -> int:
    """Σ byte × 256 at even offsets, × 1 at odd ones, mod 65536, with the checksum field
    (offset 8-9) counted as 0 (``lang-build.py``)."""
    total = 0
    for i, b in enumerate(blob):
        if i in (8, 9):
            continue
        total += b << 8 if i % 2 == 0 else b
    return total & 0xFFFF


def check_catalogs(pf: PrusaFile, name: str) -> list[Catalog]:
    """Walk the language section: magic, size, checksum of every catalog, one signature for
    all, and that signature inside the firmware: proof the two sections belong together."""
    lang = pf.languages
    if not lang:
        raise ImageError(
            f"{name}: the language section is empty.",
            cause="The MULTILANG file was built without catalogs or was damaged.",
            hint=_REBUILD,
        )
    start, end = lang[0].address, lang[-1].end
    if start != 0:
        raise ImageError(
            f"{name}: the language section starts at 0x{start:X}, not at 0.",
            cause="Catalogs always start at the beginning of the printer's language flash.",
            hint=_REBUILD,
        )
    if end > LANG_AREA_END:
        raise ImageError(
            f"{name}: the language section ends at 0x{end:X}, past the 0x{LANG_AREA_END:X} "
            "bytes the firmware reserves for languages.",
            cause="It would overwrite the MMU update area and the crash dump in the "
            "printer's flash.",
            hint=_REBUILD,
        )
    blob = _flat(lang, end)
    catalogs: list[Catalog] = []
    pos = 0
    while pos < end:
        if pos + _CATALOG_HEAD.size > end:
            break
        magic, size, count, ck, code, sig = _CATALOG_HEAD.unpack_from(blob, pos)
        if magic != CATALOG_MAGIC:
            if blob[pos:].strip(b"\xff\x00"):
                raise ImageError(
                    f"{name}: no language catalog at language offset 0x{pos:X} (magic "
                    f"0x{magic:08X}, expected 0x{CATALOG_MAGIC:08X}).",
                    cause="The language section is damaged or not made by Prusa's build.",
                    hint=_REBUILD,
                )
            break
        lang_code = struct.pack(">H", code).decode("ascii", "replace")
        if size < _CATALOG_HEAD.size or pos + size > end:
            raise ImageError(
                f"{name}: the '{lang_code}' catalog at 0x{pos:X} claims {size} bytes, past "
                "the end of the language section.",
                cause="The file was cut short or damaged.",
                hint=_REBUILD,
            )
        if catalog_checksum(blob[pos : pos + size]) != ck:
            raise ImageError(
                f"{name}: the '{lang_code}' catalog at 0x{pos:X} has a bad checksum.",
                cause="The language section is damaged.",
                hint=_REBUILD,
            )
        catalogs.append(Catalog(pos, size, count, lang_code, sig))
        pos += size
        # catalogs may be padded: the next one starts at the next magic within a page
        nxt = blob.find(struct.pack("<I", CATALOG_MAGIC), pos, min(end, pos + 256))
        if nxt < 0:
            if blob[pos:].strip(b"\xff\x00"):
                raise ImageError(
                    f"{name}: unexpected data after the '{lang_code}' catalog at 0x{pos:X}.",
                    cause="The language section is damaged.",
                    hint=_REBUILD,
                )
            break
        if blob[pos:nxt].strip(b"\xff\x00"):
            raise ImageError(
                f"{name}: unexpected data between catalogs at 0x{pos:X}.",
                cause="The language section is damaged.",
                hint=_REBUILD,
            )
        pos = nxt
    if not catalogs:
        raise ImageError(
            f"{name}: the language section holds no catalog.",
            cause="The section is damaged or not made by Prusa's build.",
            hint=_REBUILD,
        )
    sigs = {c.signature for c in catalogs}
    if len(sigs) != 1:
        listed = ", ".join(f"{c.code}=0x{c.signature:08X}" for c in catalogs)
        raise ImageError(
            f"{name}: the language catalogs were built for different firmware ({listed}).",
            cause="Catalogs from several builds were mixed into one file.",
            hint=_REBUILD,
        )
    sig = catalogs[0].signature
    needle = struct.pack("<I", sig)
    if not any(needle in s.data for s in pf.firmware):
        raise ImageError(
            f"{name}: the language catalogs (signature 0x{sig:08X}) do not belong to the "
            "firmware in the same file.",
            cause="The two sections come from different builds; the printer would reject "
            "every language and fall back to English.",
            hint=_REBUILD,
        )
    return catalogs


def _flat(segments: list[Segment], end: int) -> bytes:
    out = bytearray(b"\xff" * end)
    for s in segments:
        out[s.address : s.end] = s.data
    return bytes(out)


# --- what may go where (no I/O) -----------------------------------------------------------


def isp_image_error(name: str, end: int) -> PreflightError:
    return PreflightError(
        f"{name} reaches 0x{end - 1:04X}, into the MMU/CW1 bootloader at 0x7000: this is the "
        "ISP image (firmware padded to 0x7000 plus the Caterina bootloader).",
        cause="Prusa's build makes two files; the …_BOOTLOADER_….hex is for an ISP programmer, "
        "and through the bootloader its top pages would be silently dropped.",
        hint="Use the firmware file (e.g. MMU2S_MMU3_FW<version>.hex). Nothing was written.",
    )


def check_for_printer(kind: str, name: str, end: int) -> None:
    """A printer (Einsy/miniRAMBo) target: refuse controller files and oversize firmware."""
    if kind in CONTROLLER_KINDS:
        raise PreflightError(
            f"{name} is {KIND_LABEL[kind]}, not printer firmware.",
            cause="MMU and CW1 files go to their own USB port (an ATmega32U4 with the "
            "Caterina bootloader), not to the printer's Einsy/miniRAMBo.",
            hint="Pick the MMU/CW1 device (method avr109), or the printer's MULTILANG or "
            "ENGLISH .hex for the printer. Nothing was written.",
        )
    if end > EINSY_BOOT_START:
        raise PreflightError(
            f"{name}: the firmware ends at 0x{end - 1:05X}, {end - EINSY_BOOT_START} bytes "
            f"into the printer's bootloader at 0x{EINSY_BOOT_START:05X}.",
            cause="It is a bootloader-included image or firmware for another board.",
            hint="Use the firmware .hex from prusa3d.com for this printer. Nothing was written.",
        )


def check_for_controller(kind: str, name: str, end: int, expected: Optional[str] = None) -> None:
    """An MMU/CW1 target: refuse printer files, ISP images and the other controller's file.
    ``expected``: the kind the USB id says the device is (None when unknown)."""
    if kind == MK3_MULTILANG or end > 0x8000:
        raise PreflightError(
            f"{name} is printer firmware ({KIND_LABEL.get(kind, kind)}), not for an MMU or CW1.",
            cause="The printer's firmware goes to the Einsy/miniRAMBo (method prusa).",
            hint="Pick the printer's port for this file, or the MMU/CW1 firmware for this "
            "device. Nothing was written.",
        )
    if end > CATERINA_BOOT_START:
        raise isp_image_error(name, end)
    if expected is not None and kind in CONTROLLER_KINDS and kind != expected:
        raise PreflightError(
            f"{name} is {KIND_LABEL[kind]}, but this device is a {DEVICE_LABEL[expected]}.",
            cause="The file is for the other Prusa controller.",
            hint="Download the firmware for this device. Nothing was written.",
        )
