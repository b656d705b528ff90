"""Synthetic Prusa files with the real layouts (``research/prusa.md`` §1.4, §2.4): MULTILANG
(two Intel-HEX files back to back, catalogs with lang-build.py's header and checksum), ENGLISH,
MMU/CW1 files with their ``; device = …`` header, and the MMU ISP image."""

from __future__ import annotations

import random
import struct
from typing import Optional

from octoprint_flasher.image.prusa_hex import CATALOG_MAGIC, catalog_checksum
from tests.emulators.prusa_einsy import make_prusa_app

SIGNATURE = 0x1F2E3D4C


def ihex(data: bytes, address: int = 0, width: int = 16, crlf: bool = False) -> bytes:
    """Intel HEX as avr-objcopy writes it: 04 records at each 64 KiB, one EOF record."""
    out: list[str] = []
    upper = -1
    for off in range(0, len(data), width):
        addr = address + off
        if addr >> 16 != upper:
            upper = addr >> 16
            out.append(_record(0, 4, upper.to_bytes(2, "big")))
        out.append(_record(addr & 0xFFFF, 0, data[off : off + width]))
    out.append(":00000001FF")
    nl = "\r\n" if crlf else "\n"
    return (nl.join(out) + nl).encode()


def _record(addr: int, rtype: int, payload: bytes) -> str:
    raw = bytes([len(payload), addr >> 8, addr & 0xFF, rtype]) + payload
    return ":" + (raw + bytes([(-sum(raw)) & 0xFF])).hex().upper()


def catalog(code: str, size: int, signature: int = SIGNATURE, seed: int = 0) -> bytes:
    """A language catalog: header, offset table and NUL-terminated strings, checksummed."""
    rnd = random.Random(seed or sum(code.encode()))
    count = max(1, (size - 16) // 24)  # 2-byte offset + 21 characters + NUL each
    strings = bytearray()
    offsets = []
    base = 16 + 2 * count
    for _ in range(count):
        offsets.append(base + len(strings))
        n = 21
        text = bytes(rnd.choice(b"abcdefghij klmnop;:.,%") for _ in range(n))
        strings += text + b"\0"
    body = b"".join(struct.pack("<H", o & 0xFFFF) for o in offsets) + bytes(strings)
    total = 16 + len(body)
    total += total % 2
    head = struct.pack(
        "<IHHHHI", CATALOG_MAGIC, total, count, 0, struct.unpack(">H", code.encode())[0], signature
    )
    blob = bytearray((head + body).ljust(total, b"\0"))
    struct.pack_into("<H", blob, 8, catalog_checksum(bytes(blob)))
    return bytes(blob)


def languages(
    codes: tuple[str, ...] = ("cs", "de", "es"), size: int = 4000, signature: int = SIGNATURE
) -> bytes:
    return b"".join(catalog(c, size, signature, seed=i + 1) for i, c in enumerate(codes))


def firmware(size: int = 6000, signature: Optional[int] = SIGNATURE, seed: int = 3) -> bytes:
    sig = struct.pack("<I", signature) if signature is not None else None
    return make_prusa_app(size, seed=seed, signature=sig)


def multilang(fw: Optional[bytes] = None, langs: Optional[bytes] = None, header: str = "") -> bytes:
    fw = firmware() if fw is None else fw
    langs = languages() if langs is None else langs
    return header.encode() + ihex(fw) + ihex(langs)


def device_file(device: str, data: bytes, address: int = 0) -> bytes:
    """An MMU/CW1 file: ``; device = …``, an empty line, then the HEX."""
    return f"; device = {device}\n\n".encode() + ihex(data, address)


def mmu_app(size: int = 20000, seed: int = 5) -> bytes:
    """A 32U4-like image: 43 JMP vectors, then code; version struct at 0xAC."""
    rnd = random.Random(seed)
    vectors = b"".join(
        b"\x0c\x94" + rnd.randrange(0x60, 0x3000).to_bytes(2, "little") for _ in range(43)
    )
    version = struct.pack("<BBHH", 3, 0, 3, 1234)
    body = bytes(rnd.randrange(256) for _ in range(size - len(vectors) - len(version)))
    return vectors + version + body
