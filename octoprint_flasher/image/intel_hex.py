"""Intel HEX, parsed record by record.

Not ``intelhex.IntelHex.loadhex``: the loader must accept two records that write the *same*
bytes to one address (linkers emit them; ``loadhex`` refuses them), must name the exact line of
every fault, and must not spend a Python dict entry per byte on multi-megabyte images. The tests
check it byte for byte against ``intelhex`` on random and Marlin-sized files.
"""

from __future__ import annotations

from ..errors import ImageError
from .model import REBUILD_HINT, Segment

_HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")


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
            hint=REBUILD_HINT,
        )
    return _merge_chunks(chunks, name), notes


def _hex_record(line: bytes, name: str, lineno: int) -> tuple[int, int, bytes]:
    where = f"{name}, line {lineno}"
    if line[:1] != b":":
        shown = line[:20].decode("latin-1")
        raise ImageError(
            f"{where}: a record must start with ':' but the line starts with {shown!r}.",
            cause="The file is not pure Intel HEX (text was added or it is another format).",
            hint=REBUILD_HINT,
        )
    body = line[1:]
    for i, ch in enumerate(body):
        if ch not in _HEX_DIGITS:
            raise ImageError(
                f"{where}, column {i + 2}: bad character {chr(ch)!r} in a HEX record.",
                cause="The file was damaged (edited, or transferred as the wrong encoding).",
                hint=REBUILD_HINT,
            )
    if len(body) < 10:
        raise ImageError(
            f"{where}: truncated record ({len(body)} hex digits, a record has at least 10).",
            cause="The line was cut short; the file is damaged or incomplete.",
            hint=REBUILD_HINT,
        )
    if len(body) % 2:
        raise ImageError(
            f"{where}: odd number of hex digits ({len(body)}): a character is missing or extra.",
            cause="The file was damaged in transfer or edited by hand.",
            hint=REBUILD_HINT,
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
            hint=REBUILD_HINT,
        )
    if sum(raw) & 0xFF:
        expected = (-sum(raw[:-1])) & 0xFF
        raise ImageError(
            f"{where}: bad record checksum 0x{raw[-1]:02X} (expected 0x{expected:02X}).",
            cause="The file was damaged in transfer or edited by hand.",
            hint=REBUILD_HINT,
        )
    rtype = raw[3]
    if rtype > 5:
        raise ImageError(
            f"{where}: unknown record type {rtype:02X}.",
            cause="Intel HEX only has record types 00-05; the file is damaged or not Intel HEX.",
            hint=REBUILD_HINT,
        )
    return rtype, int.from_bytes(raw[1:3], "big"), raw[4:-1]


def _expect_len(payload: bytes, n: int, name: str, lineno: int, what: str) -> None:
    if len(payload) != n:
        raise ImageError(
            f"{name}, line {lineno}: {what} record with {len(payload)} data bytes, expected {n}.",
            cause="The file is damaged or not Intel HEX.",
            hint=REBUILD_HINT,
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
                hint=REBUILD_HINT,
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


def refuse_avr_extra_sections(segments: list[Segment], name: str) -> None:
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
