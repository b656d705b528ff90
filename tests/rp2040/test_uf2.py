"""UF2 files load into images for RP2040/RP2350 boards; everything else is refused by name."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from octoprint_flasher.errors import ImageError, PreflightError
from octoprint_flasher.image import rp2040, uf2
from octoprint_flasher.image.load import load, load_bytes
from octoprint_flasher.image.model import FirmwareImage, Segment
from tests.emulators.picoboot_device import klipper_like_rp2040, mpeg2_crc

KLIPPER = klipper_like_rp2040(20 * 1024)


def block(
    address: int,
    payload: bytes = b"\x11" * 256,
    number: int = 0,
    count: int = 1,
    flags: int = uf2.FLAG_FAMILY_ID_PRESENT,
    family: int = uf2.FAMILY_RP2040,
    magic0: int = uf2.MAGIC_START0,
    magic_end: int = uf2.MAGIC_END,
    size: int | None = None,
) -> bytes:
    """One UF2 block written field by field (independent of uf2.write_uf2)."""
    head = struct.pack(
        "<8I",
        magic0,
        uf2.MAGIC_START1,
        flags,
        address,
        len(payload) if size is None else size,
        number,
        count,
        family,
    )
    return head + payload.ljust(476, b"\0") + struct.pack("<I", magic_end)


def blocks(addresses: list[int], **kw: object) -> bytes:
    n = len(addresses)
    return b"".join(block(a, number=i, count=n, **kw) for i, a in enumerate(addresses))  # type: ignore[arg-type]


# --- round trip ---------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 2047), st.binary(min_size=1, max_size=700)),
        min_size=1,
        max_size=5,
    )
)
def test_write_then_load_gives_the_same_bytes(pieces: list[tuple[int, bytes]]) -> None:
    image: dict[int, int] = {}
    for page, data in pieces:
        base = rp2040.FLASH_BASE + page * 256
        for i, b in enumerate(data):
            image[base + i] = b
    segments = FirmwareImage([Segment(a, bytes([v])) for a, v in sorted(image.items())]).segments
    raw = uf2.write_uf2(segments, uf2.FAMILY_RP2040)
    loaded = load_bytes(raw, "klipper.uf2")
    assert loaded.kind == "uf2"
    assert uf2.family_of(loaded) == uf2.FAMILY_RP2040
    for address, value in image.items():
        assert loaded.read(address, 1) == bytes([value])
    # bytes the writer padded inside a block are 0x00, as elf2uf2 pads
    assert all(
        loaded.read(a, 1) == b"\0"
        for s in loaded.segments
        for a in range(s.address, s.end)
        if a not in image
    )


def test_klipper_uf2_loads_with_its_family_and_block_count(tmp_path: Path) -> None:
    path = tmp_path / "klipper.uf2"
    path.write_bytes(uf2.write_uf2([Segment(rp2040.FLASH_BASE, KLIPPER)]))
    image = load(path)
    assert (image.kind, image.start, image.to_bytes()) == ("uf2", 0x10000000, KLIPPER)
    assert image.extra["uf2"] == {"family": 0xE48BFF56, "family_name": "RP2040", "blocks": 80}
    assert rp2040.check_image(image, rp2040.RP2040) == []


def test_holes_make_separate_segments_and_are_noted() -> None:
    image = load_bytes(blocks([0x10000000, 0x10001000]), "a.uf2")
    assert [(s.address, len(s.data)) for s in image.segments] == [
        (0x10000000, 256),
        (0x10001000, 256),
    ]
    assert any("1 hole" in n for n in image.notes)


def test_identical_duplicate_blocks_are_ignored() -> None:
    raw = block(0x10000000, number=0, count=2) + block(0x10000000, number=1, count=2)
    image = load_bytes(raw, "dup.uf2")
    assert image.size == 256
    assert any("duplicate" in n for n in image.notes)


def test_not_main_flash_blocks_are_skipped() -> None:
    raw = block(0x10000000, number=0, count=2) + block(
        0x20000000, number=1, count=2, flags=uf2.FLAG_NOT_MAIN_FLASH | uf2.FLAG_FAMILY_ID_PRESENT
    )
    image = load_bytes(raw, "a.uf2")
    assert (image.start, image.end) == (0x10000000, 0x10000100)
    assert any("not main flash" in n for n in image.notes)


def test_the_rp2350_e10_workaround_block_is_dropped() -> None:
    e10 = block(uf2.E10_ADDRESS, b"\xef" * 256, family=uf2.FAMILY_ABSOLUTE)
    raw = e10 + blocks([0x10000000, 0x10000100], family=uf2.FAMILY_RP2350_ARM_S)
    image = load_bytes(raw, "pico2.uf2")
    assert uf2.family_of(image) == uf2.FAMILY_RP2350_ARM_S
    assert image.end == 0x10000200


# --- refusals, each pinned to its class and words -----------------------------------------
BAD: dict[str, tuple[bytes, type[ImageError], list[str]]] = {
    "truncated.uf2": (
        blocks([0x10000000, 0x10000100])[:700],
        ImageError,
        ["700 bytes", "512-byte"],
    ),
    "bad_magic.uf2": (
        block(0x10000000) + block(0x10000100, magic0=0x12345678),
        ImageError,
        ["block 1", "offset 512", "bad UF2 magic"],
    ),
    "bad_end_magic.uf2": (block(0x10000000, magic_end=0), ImageError, ["block 0", "bad UF2"]),
    "oversized_payload.uf2": (block(0x10000000, size=477), ImageError, ["477", "476"]),
    "missing_block.uf2": (
        block(0x10000000, number=0, count=3) + block(0x10000100, number=2, count=3),
        ImageError,
        ["incomplete", "1 of its 3", "block 1"],
    ),
    "conflicting.uf2": (
        block(0x10000000, number=0, count=2) + block(0x10000000, b"\x22" * 256, 1, 2),
        ImageError,
        ["different data", "0x10000000"],
    ),
    "samd51.uf2": (blocks([0x4000], family=0x55114460), ImageError, ["SAMD51"]),
    "nrf52840.uf2": (blocks([0x26000], family=0xADA52840), ImageError, ["nRF52840"]),
    "esp32s3.uf2": (blocks([0x0], family=0xC47E5767), ImageError, ["ESP32-S3", "0xc47e5767"]),
    "mystery.uf2": (blocks([0x0], family=0x12345678), ImageError, ["unknown chip family"]),
    "two_chips.uf2": (
        block(0x10000000, number=0, count=1)
        + block(0x10000000, number=0, count=1, family=uf2.FAMILY_RP2350_ARM_S),
        ImageError,
        ["several chip families", "RP2040", "RP2350"],
    ),
    "container.uf2": (blocks([0x0], flags=uf2.FLAG_FILE_CONTAINER), ImageError, ["file container"]),
    "only_comments.uf2": (
        blocks([0x0], flags=uf2.FLAG_NOT_MAIN_FLASH),
        ImageError,
        ["no main-flash blocks"],
    ),
    "renamed.uf2": (b"just text, not a UF2\n" * 30, ImageError, ["named like a UF2"]),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_uf2_files_are_refused_with_a_reason(name: str) -> None:
    data, cls, words = BAD[name]
    with pytest.raises(cls) as info:
        load_bytes(data, name)
    assert type(info.value) is cls
    for word in words:
        assert word in info.value.message, (word, info.value.message)
    assert info.value.hint


def test_an_esp32_uf2_says_to_use_esptool() -> None:
    with pytest.raises(ImageError) as info:
        load_bytes(blocks([0x0], family=0xC47E5767), "esp.uf2")
    assert "esptool" in info.value.hint


# --- RP2040 image checks (pure) ---------------------------------------------------------
def test_boot2_crc_matches_the_emulators_table_implementation() -> None:
    body = bytes(range(252))
    assert rp2040.boot2_crc(body) == mpeg2_crc(body)
    assert rp2040.boot2_crc(b"123456789") == 0x0376E6E7  # CRC-32/MPEG-2 check value


def test_a_bin_without_address_is_placed_at_the_flash_start() -> None:
    image = load_bytes(KLIPPER, "klipper.bin")
    assert rp2040.place(image).start == 0x10000000
    assert rp2040.check_image(image, rp2040.RP2040) == []


def test_a_bin_with_a_broken_boot2_is_refused() -> None:
    broken = bytearray(KLIPPER)
    broken[10] ^= 0xFF
    with pytest.raises(PreflightError) as info:
        rp2040.check_image(load_bytes(bytes(broken), "klipper.bin"), rp2040.RP2040)
    assert "without a valid boot2 stage" in info.value.message
    assert "Katapult" in info.value.cause


def test_a_katapult_offset_build_placed_at_its_address_only_warns() -> None:
    image = load_bytes(KLIPPER[256:], "klipper.bin", base_address=0x10004000)
    warnings = rp2040.check_image(image, rp2040.RP2040)
    assert "0x10004000" in warnings[0] and "Katapult" in warnings[0]


def test_a_rp2350_uf2_is_refused_on_an_rp2040() -> None:
    raw = uf2.write_uf2([Segment(0x10000000, KLIPPER)], uf2.FAMILY_RP2350_ARM_S)
    with pytest.raises(PreflightError) as info:
        rp2040.check_image(load_bytes(raw, "pico2.uf2"), rp2040.RP2040)
    assert "RP2350 Arm secure" in info.value.message and "RP2040" in info.value.message


def test_an_image_bigger_than_the_flash_is_refused() -> None:
    raw = uf2.write_uf2([Segment(0x10000000, KLIPPER), Segment(0x10200000, b"x" * 256)])
    with pytest.raises(PreflightError) as info:
        rp2040.check_image(load_bytes(raw, "big.uf2"), rp2040.RP2040)
    assert "outside the board's flash" in info.value.message


def test_no_vector_table_after_boot2_is_refused() -> None:
    data = rp2040.with_boot2_crc(b"\x00" * 252) + b"\xff" * 512
    with pytest.raises(PreflightError) as info:
        rp2040.check_image(load_bytes(data, "x.bin"), rp2040.RP2040)
    assert "no Cortex-M vector table" in info.value.message
