"""Firmware loading: every bad file is refused with a message that says what and where;
good files load byte for byte as the reference ``intelhex`` package reads them."""

from __future__ import annotations

import hashlib
import io
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from intelhex import IntelHex

from octoprint_flasher.errors import ImageError, PreflightError
from octoprint_flasher.image import load as loaders
from octoprint_flasher.image.model import FirmwareImage
from tests.data import make_bad_corpus as corpus

DATA = Path(__file__).resolve().parent.parent / "data"
BAD = DATA / "bad"

# file -> (key words the message must contain, extra loader kwargs)
BAD_FILES: dict[str, tuple[list[str], dict[str, int]]] = {
    "empty.hex": (["empty.hex", "empty"], {}),
    "blank_lines.hex": (["empty"], {}),
    "empty_bin.bin": (["empty"], {}),
    "only_eof.hex": (["no firmware data"], {}),
    "suffix_only.bin": (["no firmware data", "suffix"], {}),
    "bad_checksum.hex": (["line 3", "checksum", "0x00", "expected"], {}),
    "bad_character.hex": (["line 4", "bad character", "'G'"], {}),
    "truncated_record.hex": (["line 3", "16 data bytes", "carries 7"], {}),
    "odd_digit_count.hex": (["line 3", "odd number of hex digits"], {}),
    "record_longer_than_count.hex": (["line 3", "16 data bytes", "carries 17"], {}),
    "unknown_record_type.hex": (["line 2", "unknown record type 06"], {}),
    "no_colon.hex": (["line 3", "must start with ':'"], {}),
    "text_before_records.hex": (["line 1", "must start with ':'", "firmware v2.1"], {}),
    "missing_eof.hex": (["end-of-file record", ":00000001FF"], {}),
    "bad_extended_linear_length.hex": (["line 1", "extended linear", "expected 2"], {}),
    "bad_extended_segment_length.hex": (["line 1", "extended segment", "expected 2"], {}),
    "conflicting_overlap.hex": (["line 6", "0x20", "written twice", "different bytes"], {}),
    "far_apart_addresses.hex": (["0x8000000", "0x2000001F", "16 MiB"], {}),
    "past_4gib.hex": (["line 2", "4 GiB"], {}),
    "avr_with_eeprom.hex": ([".eeprom data at 0x810000"], {}),
    "binary_junk.hex": (["not one", "binary data"], {}),
    "nul_bytes.hex": (["binary data"], {}),
    "print.gcode": (["G-code, not firmware"], {}),
    "gcode_renamed.hex": (["G-code, not firmware"], {}),
    "gcode_renamed.bin": (["G-code, not firmware"], {}),
    "firmware.elf": (["ELF", "not a flashable image"], {}),
    "elf_renamed.hex": (["ELF"], {}),
    "firmware.uf2": (["UF2 for Microchip SAMD21", "not for an RP2040/RP2350"], {}),
    "notes.txt": (["unknown firmware file type .txt"], {}),
    "firmware": (["unknown firmware file type", "no extension"], {}),
    "firmware.zip": (["unknown firmware file type .zip"], {}),
    "bad_prefix.dfu": (["not a DfuSe file"], {}),
    "plain_dfu_named.dfu": (["plain DFU file", "no DfuSe prefix"], {}),
    "bad_crc.dfu": (["CRC"], {}),
    "damaged_payload.dfu": (["CRC"], {}),
    "no_suffix.dfu": (["suffix is missing", "UFD"], {}),
    "option_bytes_alt1.dfu": (["alternate setting 1", "Option Bytes"], {}),
    "bad_target_signature.dfu": (["offset 11", "'Target'"], {}),
    "version2.dfu": (["version 2"], {}),
    "overlapping_elements.dfu": (["0x08008020", "overlaps", "0x08008000"], {}),
    "truncated_element.dfu": (["offset 293", "ends inside", "4096-byte element"], {}),
    "bad_suffix_crc.bin": (["offset 128", "bad CRC"], {}),
    "oversized.bin": (["4097 bytes", "over the 4 KiB limit"], {"max_size": 4096}),
}

HINTS = {
    "firmware.elf": "upload the .hex or .bin",
    "firmware.uf2": "double-tap the board's reset button",
    "conflicting_overlap.hex": "application image alone",
    "option_bytes_alt1.dfu": "alt 0",
    "avr_with_eeprom.hex": "-R .eeprom",
}


def test_the_corpus_has_at_least_30_files_and_each_is_pinned() -> None:
    on_disk = {p.name for p in BAD.iterdir()}
    assert len(on_disk) >= 30
    assert on_disk == set(BAD_FILES)


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_file_is_refused_with_a_precise_message(name: str) -> None:
    words, kwargs = BAD_FILES[name]
    with pytest.raises(ImageError) as info:
        loaders.load(BAD / name, max_size=kwargs.get("max_size", loaders.DEFAULT_MAX_SIZE))
    err = info.value
    assert type(err) is ImageError  # not a PreflightError: nothing about the board yet
    for word in words:
        assert word.lower() in err.message.lower(), (word, err.message)
    assert name in err.message  # the file is named
    assert err.hint, "every refusal says what to do"
    if name in HINTS:
        assert HINTS[name].lower() in err.hint.lower()


def test_the_size_limit_applies_before_reading(tmp_path: Path) -> None:
    big = tmp_path / "huge.bin"
    with big.open("wb") as fh:
        fh.truncate(loaders.DEFAULT_MAX_SIZE + 1)
    with pytest.raises(ImageError, match="over the 16 MiB limit"):
        loaders.load(big)


def test_missing_file_is_an_image_error(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="not found"):
        loaders.load(tmp_path / "nope.hex")


def test_marlin_sized_hex_loads_like_intelhex_reads_it() -> None:
    path = DATA / "marlin_like_116932.hex"
    image = loaders.load(path)
    assert (image.kind, image.start, image.end, image.size) == ("hex", 0, 116932, 116932)
    assert image.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    ih = IntelHex(str(path))
    assert image.to_bytes() == ih.tobinstr(start=0, size=116932)
    assert image.to_bytes() == corpus.marlin_like()


def test_identical_overlapping_records_are_accepted() -> None:
    data = bytes(range(32))
    lines = corpus.hex_lines(data) + [corpus.hex_record(0, 8, data[8:24]), corpus.EOF_RECORD]
    image = loaders.load_bytes(corpus.hex_text(lines), "dup.hex")
    assert image.to_bytes() == data


def test_hex_with_holes_keeps_separate_segments_and_crlf_is_fine() -> None:
    lines = corpus.hex_lines(b"\x01" * 20, 0x100) + corpus.hex_lines(b"\x02" * 5, 0x400)
    text = "\r\n".join(lines + [corpus.EOF_RECORD]).encode() + b"\r\n"
    image = loaders.load_bytes(text, "holes.hex")
    assert [(s.address, len(s.data)) for s in image.segments] == [(0x100, 20), (0x400, 5)]
    assert image.read(0x110, 8) == b"\x01" * 4 + b"\xff" * 4


def test_hex_start_address_records_are_noted_not_written() -> None:
    lines = corpus.hex_lines(b"\xaa" * 4, 0x08000000)
    lines += [corpus.hex_record(5, 0, struct.pack(">I", 0x08000101)), corpus.EOF_RECORD]
    image = loaders.load_bytes(corpus.hex_text(lines), "arm.hex")
    assert image.segments[0].address == 0x08000000 and image.size == 4
    assert any("0x08000101" in n for n in image.notes)


def test_a_cortex_m_bin_places_itself_at_the_address_its_vector_table_names() -> None:
    image = loaders.load(DATA / "small_stm32.bin")  # reset handler 0x08008101
    assert image.kind == "bin" and image.address_given and image.start == 0x08008000
    assert image.extra["link_base"] == 0x08008000
    assert any("Placed at 0x08008000" in n for n in image.notes)
    assert image.to_bytes() == (DATA / "small_stm32.bin").read_bytes()


def test_a_bin_without_a_vector_table_waits_for_the_board_to_place_it() -> None:
    image = loaders.load_bytes(bytes(range(256)) * 8, "avr.bin")
    assert not image.address_given
    assert any("application start" in n for n in image.notes)
    placed = image.placed_at(0x08008000)
    assert placed.address_given and placed.start == 0x08008000


def test_an_explicit_address_that_agrees_with_the_vector_table_is_taken() -> None:
    image = loaders.load(DATA / "small_stm32.bin", base_address=0x08008000)
    assert image.address_given and image.start == 0x08008000 and image.size == 2048


def test_an_explicit_address_that_disagrees_with_the_vector_table_is_refused() -> None:
    with pytest.raises(ImageError) as err:
        loaders.load(DATA / "small_stm32.bin", base_address=0x08002000)
    assert "linked for 0x08008000, but the address 0x08002000 was given" in err.value.message


def test_plain_dfu_suffix_on_a_bin_is_stripped_and_noted() -> None:
    plain = (DATA / "small_stm32.bin").read_bytes()
    image = loaders.load(DATA / "small_stm32_suffixed.bin", base_address=0x08008000)
    assert image.to_bytes() == plain
    assert any("Stripped a 16-byte DFU suffix" in n for n in image.notes)
    # the hash is of the file as uploaded, suffix included
    raw = (DATA / "small_stm32_suffixed.bin").read_bytes()
    assert image.sha256 == hashlib.sha256(raw).hexdigest()


def test_dfuse_file_with_two_elements() -> None:
    image = loaders.load(DATA / "two_elements.dfu")
    assert image.kind == "dfu"
    assert [(s.address, len(s.data)) for s in image.segments] == [
        (0x08008000, 3000),
        (0x08020000, 1000),
    ]
    assert image.read(0x08008000, 3000) == corpus.payload(3000, 1)
    assert image.read(0x08020000, 1000) == corpus.payload(1000, 2)


def test_hex_content_wins_over_a_bin_extension() -> None:
    text = corpus.hex_text(corpus.hex_lines(b"\x55" * 8, 0x40) + [corpus.EOF_RECORD])
    image = loaders.load_bytes(text, "actually_hex.bin")
    assert image.kind == "hex" and image.start == 0x40


def test_image_errors_are_not_preflight_errors() -> None:
    assert not issubclass(ImageError, PreflightError)


segments_strategy = st.lists(
    st.tuples(st.integers(0, 0x3FFFF), st.binary(min_size=1, max_size=300)),
    min_size=1,
    max_size=6,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(segments=segments_strategy, base=st.sampled_from([0, 0x08000000, 0x1FFF0]))
def test_round_trip_through_intelhex(segments: list[tuple[int, bytes]], base: int) -> None:
    """Random segments written by intelhex (type 04 records past 64 KiB) read back equal."""
    ih = IntelHex()
    expected: dict[int, int] = {}
    for addr, data in segments:
        for i, b in enumerate(data):
            ih[base + addr + i] = b
            expected[base + addr + i] = b
    out = io.StringIO()
    ih.write_hex_file(out)
    image = loaders.load_bytes(out.getvalue().encode(), "random.hex")
    got = {s.address + i: b for s in image.segments for i, b in enumerate(s.data)}
    assert got == expected
    assert isinstance(image, FirmwareImage) and image.size == len(expected)
