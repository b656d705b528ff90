"""Prusa files: MULTILANG split and classification, headers, and every image-only refusal
(before any board is touched)."""

from __future__ import annotations

import struct

import pytest

from octoprint_flasher.errors import ImageError, PreflightError
from octoprint_flasher.flashers import avr109, prusa
from octoprint_flasher.image import prusa_hex
from octoprint_flasher.image.load import load_bytes
from octoprint_flasher.target import Target
from tests.prusa import samples


def kind(image: object) -> str:
    return str(image.extra["prusa"]["kind"])  # type: ignore[attr-defined]


def test_multilang_splits_into_firmware_and_catalogs_each_from_address_0() -> None:
    fw, langs = samples.firmware(70000), samples.languages(size=30000)
    image = load_bytes(samples.multilang(fw, langs), "MK3S_MULTILANG.hex")
    assert kind(image) == prusa_hex.MK3_MULTILANG
    assert image.read(0, len(fw)) == fw and image.end == len(fw)
    assert [(s.address, s.data) for s in image.external] == [(0, langs)]
    assert image.extra["prusa"]["languages"] == ["cs", "de", "es"]
    assert image.extra["prusa"]["signature"] == f"0x{samples.SIGNATURE:08X}"


def test_extended_addressing_is_reset_for_the_language_section() -> None:
    # the firmware crosses 64 KiB (an 04 record with 0001); the catalogs must not inherit it
    fw = samples.firmware(0x12000)
    image = load_bytes(samples.multilang(fw), "fw.hex")
    assert image.external[0].address == 0


def test_lowercase_eof_records_and_crlf_split_too() -> None:
    fw, langs = samples.firmware(), samples.languages()
    data = (samples.ihex(fw, crlf=True) + samples.ihex(langs, crlf=True)).replace(
        b":00000001FF", b":00000001ff"
    )
    assert kind(load_bytes(data, "fw.hex")) == prusa_hex.MK3_MULTILANG


@pytest.mark.parametrize(
    "device,expected",
    [("mm-control", prusa_hex.MMU), ("cw1", prusa_hex.CW1), ("cw1s", prusa_hex.CW1S)],
)
def test_device_headers_classify_controller_files(device: str, expected: str) -> None:
    image = load_bytes(samples.device_file(device, samples.mmu_app()), "x.hex")
    assert kind(image) == expected and not image.external


def test_headers_are_parsed_leniently() -> None:
    data = b";device=MM-Control\r\n; model_id = x\r\n\r\n" + samples.ihex(samples.mmu_app())
    image = load_bytes(data, "mmu.hex")
    assert kind(image) == prusa_hex.MMU
    assert image.extra["prusa"]["header"]["model_id"] == "x"


def test_an_english_build_is_plain_intel_hex() -> None:
    image = load_bytes(samples.ihex(samples.firmware()), "MK3S_ENGLISH.hex")
    assert not image.external and "prusa" not in image.extra
    assert any("no language catalogs" in w for w in prusa.check_image(image, Target("prusa")))


def test_fault_in_the_language_section_names_the_real_line() -> None:
    fw, langs = samples.firmware(), samples.languages()
    first = samples.ihex(fw)
    lines = samples.ihex(langs).split(b"\n")
    lines[3] = lines[3][:-2] + b"00"  # break a checksum
    with pytest.raises(ImageError) as err:
        load_bytes(first + b"\n".join(lines), "fw.hex")
    line = first.count(b"\n") + 4
    assert f"language section), line {line}" in err.value.message


def _with_catalog_bytes(edit: object) -> bytes:
    langs = bytearray(samples.languages())
    edit(langs)  # type: ignore[operator]
    return samples.multilang(langs=bytes(langs))


BAD = {
    "catalogs for another build": (
        lambda: samples.multilang(langs=samples.languages(signature=0x11112222)),
        "do not belong to the firmware",
    ),
    "mixed catalogs": (
        lambda: samples.multilang(
            langs=samples.catalog("cs", 4000) + samples.catalog("de", 4000, 0x99)
        ),
        "built for different firmware",
    ),
    "damaged catalog": (
        lambda: _with_catalog_bytes(lambda b: b.__setitem__(100, b[100] ^ 1)),
        "bad checksum",
    ),
    "not a catalog": (
        lambda: samples.multilang(langs=b"\x01\x02\x03\x04" * 100),
        "no language catalog",
    ),
    "truncated catalog": (
        lambda: samples.multilang(langs=samples.languages()[:5000]),
        "past the end",
    ),
    "three sections": (
        lambda: samples.multilang() + samples.ihex(b"\x00" * 16),
        "3 Intel-HEX sections",
    ),
    "two sections with an MMU header": (
        lambda: samples.multilang(header="; device = mm-control\n\n"),
        "holds two sections",
    ),
    "unknown device": (
        lambda: samples.device_file("mk4", samples.mmu_app()),
        "does not know",
    ),
    "language section not at 0": (
        lambda: samples.ihex(samples.firmware()) + samples.ihex(samples.languages(), 0x100),
        "starts at 0x100",
    ),
    "languages into the crash dump": (
        lambda: samples.multilang(langs=samples.languages(("cs", "de", "es", "fr"), 47000)),
        "past the 0x2D000",
    ),
    "header but no records": (lambda: b"; device = mm-control\n\n", "no Intel HEX records"),
    "cut after the firmware's EOF": (
        lambda: samples.ihex(samples.firmware()) + samples.ihex(samples.languages())[:-12],
        "end-of-file record",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_prusa_files_are_refused_with_the_reason(case: str) -> None:
    make, words = BAD[case]
    with pytest.raises(ImageError) as err:
        load_bytes(make(), "bad.hex")
    assert words in err.value.message


def test_catalog_checksum_matches_lang_build_rule() -> None:
    blob = bytearray(samples.catalog("de", 300))
    # Σ byte×256 at even offsets + byte at odd ones, checksum field as 0
    expect = sum((b << 8) if i % 2 == 0 else b for i, b in enumerate(blob) if i not in (8, 9))
    assert struct.unpack_from("<H", blob, 8)[0] == expect & 0xFFFF


# --- what may go where -------------------------------------------------------------------


def test_mmu_file_is_never_offered_to_the_printer() -> None:
    image = load_bytes(samples.device_file("mm-control", samples.mmu_app()), "MMU.hex")
    with pytest.raises(PreflightError, match="not printer firmware"):
        prusa.check_image(image, Target("prusa", port="/dev/ttyACM0"))


def test_printer_file_is_never_offered_to_the_mmu() -> None:
    image = load_bytes(samples.multilang(), "MK3S.hex")
    with pytest.raises(PreflightError, match="not for an MMU"):
        avr109.check_image(image, Target("avr109", port="/dev/ttyACM1"))


def test_mmu_bootloader_isp_image_is_refused_by_name() -> None:
    isp = samples.mmu_app(0x7000) + bytes(range(256)) * 16
    image = load_bytes(samples.device_file("mm-control", isp), "MMU2S_MMU3_BOOTLOADER_3.0.3.hex")
    with pytest.raises(PreflightError) as err:
        avr109.check_image(image, Target("avr109"))
    assert "ISP image" in err.value.message and "MMU2S_MMU3_FW" in err.value.hint


def test_cw1_file_on_an_mmu_usb_id_is_refused() -> None:
    image = load_bytes(samples.device_file("cw1", samples.mmu_app()), "CW1.hex")
    with pytest.raises(PreflightError, match="MMU2S/MMU3"):
        avr109.check_image(image, Target("avr109", usb="2c99:0004"))


def test_firmware_reaching_the_einsy_bootloader_is_refused() -> None:
    image = load_bytes(samples.multilang(samples.firmware(0x3E100)), "big.hex")
    with pytest.raises(PreflightError, match="into the printer's bootloader"):
        prusa.check_image(image, Target("prusa"))


def test_raspberry_pi_header_warns_that_languages_need_usb() -> None:
    image = load_bytes(samples.multilang(), "MK3S.hex")
    warnings = prusa.check_image(image, Target("prusa", port="/dev/ttyAMA0"))
    assert any("languages need the USB port" in w for w in warnings)
