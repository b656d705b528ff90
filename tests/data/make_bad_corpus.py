"""Generate the test firmware files: the bad corpus in ``bad/`` and the good samples.

Run ``python tests/data/make_bad_corpus.py``; the output is deterministic and committed, so
a reviewer can open each bad file and see exactly what is wrong with it. What the loader must
say about each bad file is pinned in ``tests/core/test_loaders.py``, not here.
"""

from __future__ import annotations

import random
import struct
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
BAD = HERE / "bad"


# --- writers (independent of the code under test) --------------------------------------


def hex_record(rtype: int, address: int, payload: bytes) -> str:
    raw = bytes([len(payload), (address >> 8) & 0xFF, address & 0xFF, rtype]) + payload
    return ":" + (raw + bytes([(-sum(raw)) & 0xFF])).hex().upper()


def hex_lines(
    data: bytes, address: int = 0, width: int = 16, segment_records: bool = False
) -> list[str]:
    """Data records like avr-objcopy (type 02 above 64 KiB) or arm objcopy (type 04)."""
    lines: list[str] = []
    upper = -1
    for off in range(0, len(data), width):
        addr = address + off
        chunk = data[off : off + width]
        if addr >> 16 != upper:
            upper = addr >> 16
            if segment_records:
                lines.append(hex_record(2, 0, ((upper << 16) >> 4).to_bytes(2, "big")))
            else:
                lines.append(hex_record(4, 0, upper.to_bytes(2, "big")))
        lines.append(hex_record(0, addr & 0xFFFF, chunk))
    return lines


EOF_RECORD = ":00000001FF"


def hex_text(lines: list[str]) -> bytes:
    return ("\n".join(lines) + "\n").encode()


def dfu_suffix(body: bytes, bcd_dfu: int = 0x011A, vid: int = 0x0483, pid: int = 0xDF11) -> bytes:
    head = body + struct.pack("<4H", 0xFFFF, pid, vid, bcd_dfu) + b"UFD" + bytes([16])
    return head + struct.pack("<I", zlib.crc32(head) ^ 0xFFFFFFFF)


def dfuse(
    elements: list[tuple[int, bytes]],
    alt: int = 0,
    target_name: bytes = b"ST...",
    version: int = 1,
    target_sig: bytes = b"Target",
) -> bytes:
    """A DfuSe container with one target, as dfuse-pack.py writes it."""
    elems = b"".join(struct.pack("<2I", a, len(d)) + d for a, d in elements)
    target = struct.pack("<6sBI255s2I", target_sig, alt, 1, target_name, len(elems), len(elements))
    body_len = 11 + len(target) + len(elems)
    prefix = struct.pack("<5sBIB", b"DfuSe", version, body_len + 16, 1)
    return dfu_suffix(prefix + target + elems)


def payload(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


# --- good samples -----------------------------------------------------------------------


def marlin_like(size: int = 116932) -> bytes:
    """An ATmega1284P-sized application: a jmp vector table then deterministic bytes."""
    vectors = b"".join(b"\x0c\x94" + struct.pack("<H", 0x46 + i) for i in range(35))
    return (vectors + payload(size, 1284))[:size]


def write_good() -> None:
    (HERE / "marlin_like_116932.hex").write_bytes(
        hex_text(hex_lines(marlin_like(), 0, segment_records=True) + [EOF_RECORD])
    )
    two = dfuse([(0x08008000, payload(3000, 1)), (0x08020000, payload(1000, 2))])
    (HERE / "two_elements.dfu").write_bytes(two)
    (HERE / "small_stm32.bin").write_bytes(
        struct.pack("<2I", 0x20001000, 0x08008101) + payload(2040, 3)
    )
    (HERE / "small_stm32_suffixed.bin").write_bytes(
        dfu_suffix(struct.pack("<2I", 0x20001000, 0x08008101) + payload(2040, 3), 0x0100)
    )


# --- bad corpus -------------------------------------------------------------------------


def write_bad() -> None:
    BAD.mkdir(exist_ok=True)
    for old in BAD.iterdir():
        old.unlink()
    good = hex_lines(payload(64, 7), 0)

    def put(name: str, data: bytes) -> None:
        (BAD / name).write_bytes(data)

    def with_line(index: int, line: str) -> bytes:
        lines = list(good) + [EOF_RECORD]
        lines[index] = line
        return hex_text(lines)

    put("empty.hex", b"")
    put("blank_lines.hex", b"\n\r\n  \n")
    put("only_eof.hex", hex_text([EOF_RECORD]))
    bad_sum = good[2][:-2] + "00"
    put("bad_checksum.hex", with_line(2, bad_sum))
    put("bad_character.hex", with_line(3, good[3][:9] + "G" + good[3][10:]))
    put("truncated_record.hex", with_line(2, good[2][:25]))
    put("odd_digit_count.hex", with_line(2, good[2] + "0"))
    put(
        "record_longer_than_count.hex",
        with_line(2, hex_record(0, 0x10, payload(16, 9))[:-2] + "AB00"),
    )
    put("unknown_record_type.hex", with_line(1, hex_record(6, 0, b"\x01\x02")))
    put("no_colon.hex", with_line(2, good[2][1:]))
    put("text_before_records.hex", hex_text(["firmware v2.1"] + good + [EOF_RECORD]))
    put("missing_eof.hex", hex_text(good))
    put(
        "bad_extended_linear_length.hex",
        hex_text([hex_record(4, 0, b"\x00\x00\x00")] + good[1:] + [EOF_RECORD]),
    )
    put(
        "bad_extended_segment_length.hex",
        hex_text([hex_record(2, 0, b"\x10")] + good[1:] + [EOF_RECORD]),
    )
    conflict = hex_record(0, 0x20, bytes(16))
    put("conflicting_overlap.hex", hex_text(good + [conflict, EOF_RECORD]))
    far = hex_lines(payload(32, 4), 0x08000000) + hex_lines(payload(32, 5), 0x20000000)
    put("far_apart_addresses.hex", hex_text(far + [EOF_RECORD]))
    put(
        "past_4gib.hex",
        hex_text(
            [hex_record(4, 0, b"\xff\xff"), hex_record(0, 0xFFF8, payload(16, 6)), EOF_RECORD]
        ),
    )
    eeprom = hex_lines(payload(64, 26), 0) + hex_lines(b"\x01\x02\x03\x04", 0x810000)
    put("avr_with_eeprom.hex", hex_text(eeprom + [EOF_RECORD]))
    put("binary_junk.hex", payload(600, 11))
    put("nul_bytes.hex", hex_text(good[:3]) + b"\x00" * 40 + hex_text(good[3:] + [EOF_RECORD]))
    gcode = (
        b";FLAVOR:Marlin\n;Generated with Cura\nG28 ; home\n"
        b"G1 X10 Y10 F3000\nM104 S200\nG1 E5\nM84\n"
    )
    put("print.gcode", gcode)
    put("gcode_renamed.hex", gcode)
    put("gcode_renamed.bin", b"N1 G28*18\nN2 M105*37\nG1 X1\nG1 Y2\n")
    put("firmware.elf", b"\x7fELF\x01\x01\x01" + bytes(9) + payload(200, 12))
    put("elf_renamed.hex", b"\x7fELF\x01\x01\x01" + bytes(9) + payload(200, 13))
    # a UF2 for a SAMD21 board (family id present): RP2040/RP2350 UF2s load, others are refused
    uf2 = struct.pack("<8I", 0x0A324655, 0x9E5D5157, 0x2000, 0x2000, 256, 0, 1, 0x68ED2B88)
    put("firmware.uf2", uf2 + bytes(476) + struct.pack("<I", 0x0AB16F30))
    put("notes.txt", b"This is a readme, not firmware.\n")
    put("firmware", payload(512, 14))
    put("firmware.zip", b"PK\x03\x04" + payload(100, 15))
    put("bad_prefix.dfu", b"DfuSX" + dfuse([(0x08000000, payload(64, 16))])[5:])
    put("plain_dfu_named.dfu", dfu_suffix(payload(256, 17), 0x0100))
    good_dfu = dfuse([(0x08008000, payload(256, 18))])
    put("bad_crc.dfu", good_dfu[:-1] + bytes([good_dfu[-1] ^ 0xFF]))
    put("damaged_payload.dfu", good_dfu[:300] + bytes([good_dfu[300] ^ 1]) + good_dfu[301:])
    put("no_suffix.dfu", good_dfu[:-16])
    put(
        "option_bytes_alt1.dfu",
        dfuse([(0x1FFFC000, payload(16, 19))], alt=1, target_name=b"Option Bytes"),
    )
    put("bad_target_signature.dfu", dfuse([(0x08000000, payload(64, 20))], target_sig=b"Tarjet"))
    put("version2.dfu", dfuse([(0x08000000, payload(64, 21))], version=2))
    put(
        "overlapping_elements.dfu",
        dfuse([(0x08008000, payload(64, 22)), (0x08008020, payload(64, 23))]),
    )
    # element header claims more bytes than the file holds (suffix recomputed so CRC is fine)
    body = good_dfu[:-16]
    off = 11 + 274
    broken = body[: off + 4] + struct.pack("<I", 4096) + body[off + 8 :]
    put("truncated_element.dfu", dfu_suffix(broken))
    put("empty_bin.bin", b"")
    put("suffix_only.bin", dfu_suffix(b"", 0x0100))
    suffixed = dfu_suffix(payload(128, 24), 0x0100)
    put("bad_suffix_crc.bin", suffixed[:-4] + b"\x00\x00\x00\x00")
    put("oversized.bin", payload(4096 + 1, 25))


if __name__ == "__main__":
    write_good()
    write_bad()
    print(f"wrote {len(list(BAD.iterdir()))} bad files to {BAD}")
