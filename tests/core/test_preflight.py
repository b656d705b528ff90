"""Preflight: the refusals that protect a board, with and without the board present."""

from __future__ import annotations

import struct

import pytest

from octoprint_flasher import preflight
from octoprint_flasher.errors import ImageError, PreflightError
from octoprint_flasher.flasher import TargetInfo
from octoprint_flasher.image.model import FirmwareImage, Segment, image_from_bytes

M1284_OPTIBOOT = TargetInfo(
    method="stk500v1",
    chip="ATmega1284P",
    flash_start=0,
    flash_size=128 * 1024,
    app_start=0,
    app_end=127 * 1024,
    page_size=256,
    bootloader="optiboot",
)
F446_32K = TargetInfo(
    method="dfu",
    chip="STM32F446",
    flash_start=0x08000000,
    flash_size=512 * 1024,
    app_start=0x08008000,
    app_end=0x08080000,
    page_size=2048,
    bootloader="BTT 32 KiB bootloader",
)


def arm_app(address: int, size: int = 4096, reset: int | None = None) -> FirmwareImage:
    vector = struct.pack("<2I", 0x20020000, (reset if reset is not None else address + 0x201) | 1)
    return image_from_bytes(vector + bytes(size - 8), address, "klipper.bin")


def test_a_fitting_avr_image_passes_with_facts() -> None:
    report = preflight.check(image_from_bytes(bytes(1000), 0, "fw.hex", "hex"), M1284_OPTIBOOT)
    assert report.ok and report.errors == []
    assert report.facts["chip"] == "ATmega1284P"
    assert report.facts["application_area"] == "0x00000000-0x0001FBFF"
    assert report.facts["used_percent"] == pytest.approx(0.8, abs=0.1)


def test_wrong_chip_is_refused() -> None:
    report = preflight.check(image_from_bytes(bytes(100), 0), M1284_OPTIBOOT, mcu="atmega2560")
    assert not report.ok
    assert "for atmega2560, but the board reports ATmega1284P" in report.errors[0]["message"]
    with pytest.raises(PreflightError):
        preflight.raise_for(report)


def test_same_chip_in_another_spelling_passes() -> None:
    assert preflight.check(image_from_bytes(bytes(100), 0), M1284_OPTIBOOT, mcu="m1284p").ok


def test_image_too_big_for_the_chip() -> None:
    report = preflight.check(image_from_bytes(bytes(140 * 1024), 0), M1284_OPTIBOOT)
    assert not report.ok
    msg = report.errors[0]["message"]
    assert "Image too big: 143360 bytes, this chip has 131072 (128 KiB)" in msg


def test_image_over_the_bootloader_names_the_range_and_the_bootloader() -> None:
    report = preflight.check(image_from_bytes(bytes(127 * 1024 + 1), 0), M1284_OPTIBOOT)
    err = report.errors[0]
    assert err["kind"] == "preflight"
    assert "overlaps the bootloader area 0x0001FC00-0x0001FFFF (optiboot)" in err["message"]
    assert "only 130048 fit" in err["cause"]


def test_a_bootloader_file_is_recognised() -> None:
    optiboot_hex = image_from_bytes(bytes(600), 0x1FC00, "optiboot_atmega1284p.hex", "hex")
    report = preflight.check(optiboot_hex, M1284_OPTIBOOT)
    assert not report.ok and "looks like a bootloader file" in report.errors[0]["cause"]


def test_arm_image_built_without_bootloader_offset() -> None:
    report = preflight.check(arm_app(0x08000000), F446_32K)
    err = report.errors[0]
    assert (
        "starts at 0x08000000, inside the bootloader area 0x08000000-0x08007FFF" in err["message"]
    )
    assert "32 KiB bootloader offset" in err["cause"] and "0x08008000" in err["hint"]


def test_bootloader_erase_must_be_explicit() -> None:
    report = preflight.check(arm_app(0x08000000), F446_32K, allow_bootloader_erase=True)
    assert report.ok and any("bootloader will be overwritten" in w for w in report.warnings)


def test_arm_image_on_avr_board_is_outside_flash() -> None:
    report = preflight.check(arm_app(0x08008000), M1284_OPTIBOOT)
    causes = [e["cause"] for e in report.errors]
    assert not report.ok and any("STM32 (ARM) image" in c for c in causes)


def test_reset_vector_below_the_image_means_wrong_offset() -> None:
    # linked for 0x08002000 (8 KiB), placed at 0x08008000
    report = preflight.check(arm_app(0x08008000, reset=0x08002101), F446_32K)
    assert not report.ok
    assert "reset vector points to 0x08002100" in report.errors[0]["message"]


def test_a_good_arm_app_at_the_right_offset_passes() -> None:
    assert preflight.check(arm_app(0x08008000), F446_32K).ok


def test_bin_without_address_is_checked_at_the_application_start() -> None:
    image = arm_app(0x08008000)
    unplaced = FirmwareImage(
        [Segment(0, image.to_bytes())], "klipper.bin", "bin", address_given=False
    )
    report = preflight.check(unplaced, F446_32K)
    assert report.ok and report.facts["placed_at"] == "0x08008000"


def test_empty_image_is_an_image_error() -> None:
    report = preflight.check(FirmwareImage([], "x.hex"), M1284_OPTIBOOT)
    assert not report.ok
    with pytest.raises(ImageError):
        preflight.raise_for(report)


# --- offline ---------------------------------------------------------------------------


def test_offline_avr_too_big_and_into_the_boot_section() -> None:
    assert not preflight.check_offline(image_from_bytes(bytes(33 * 1024), 0), "atmega328p").ok
    r = preflight.check_offline(image_from_bytes(bytes(32 * 1024 - 100), 0), "atmega328p")
    assert not r.ok and "smallest ATmega328P bootloader" in r.errors[0]["message"]


def test_offline_avr_warns_when_the_mega_bootloader_would_not_fit() -> None:
    r = preflight.check_offline(image_from_bytes(bytes(250 * 1024), 0), "atmega2560")
    assert r.ok
    assert any("stk500v2 (Arduino Mega)" in w for w in r.warnings)
    assert "optiboot (BIGBOOT)" in r.facts["fits_below"]


def test_offline_method_mismatch_both_ways() -> None:
    arm = arm_app(0x08008000)
    r = preflight.check_offline(arm, None, "stk500v2")
    assert not r.ok and "STM32 (ARM) address" in r.errors[0]["message"]
    avr = image_from_bytes(bytes(1000), 0, "marlin.hex", "hex")
    r = preflight.check_offline(avr, None, "dfu")
    assert not r.ok and "AVR application" in r.errors[0]["message"]


def test_offline_stm32_offsets() -> None:
    assert preflight.check_offline(arm_app(0x08008000), "stm32f446xx").warnings == []
    r = preflight.check_offline(arm_app(0x08000000), "stm32f446xx")
    assert r.ok and any("replaces any bootloader" in w for w in r.warnings)
    r = preflight.check_offline(arm_app(0x08003000), "stm32f446xx")
    assert any("usually use 32 KiB" in w for w in r.warnings)
    assert any("inside the erase sector 0x08000000-0x08003FFF" in w for w in r.warnings)
    r = preflight.check_offline(arm_app(0x08100000), "stm32f446xx")
    assert not r.ok and "outside the STM32F446's flash" in r.errors[0]["message"]


def test_offline_unknown_chip_is_a_warning_only() -> None:
    r = preflight.check_offline(image_from_bytes(bytes(10), 0), "esp32")
    assert r.ok and "Unknown chip 'esp32'" in r.warnings[0]


def test_report_to_dict_is_json_ready() -> None:
    import json

    r = preflight.check(image_from_bytes(bytes(10), 0), M1284_OPTIBOOT, mcu="atmega2560")
    doc = json.loads(json.dumps(r.to_dict()))
    assert doc["ok"] is False and set(doc["errors"][0]) == {"kind", "message", "cause", "hint"}


def test_an_ambiguous_chip_report_is_a_warning_not_a_refusal() -> None:
    info = TargetInfo(**{**F446_32K.__dict__, "chip": "STM32H7 (unknown variant)"})
    report = preflight.check(arm_app(0x08008000), info, mcu="stm32h723xx")
    assert report.ok and "cannot be confirmed" in report.warnings[0]
    info = TargetInfo(**{**F446_32K.__dict__, "chip": "STM32F407/F429"})
    assert preflight.check(arm_app(0x08008000), info, mcu="stm32f429xx").ok
    assert not preflight.check(arm_app(0x08008000), info, mcu="stm32f446xx").ok


def unplaced(image: FirmwareImage) -> FirmwareImage:
    return FirmwareImage([Segment(0, image.to_bytes())], "firmware.bin", "bin", address_given=False)


def test_a_bin_says_what_it_is_even_without_an_address() -> None:
    from tests.data.make_bad_corpus import marlin_like

    stm32_bin = unplaced(arm_app(0x08008000))
    avr_bin = FirmwareImage(
        [Segment(0, marlin_like(4096))], "marlin.bin", "bin", address_given=False
    )
    assert preflight.content_family(stm32_bin) == "stm32"
    assert preflight.content_family(avr_bin) == "avr"
    assert preflight.content_family(image_from_bytes(bytes(64), 0)) is None

    r = preflight.check_offline(stm32_bin, None, "stk500v1")
    assert not r.ok and "is an ARM Cortex-M (STM32) firmware" in r.errors[0]["message"]
    r = preflight.check_offline(avr_bin, "stm32f446xx")
    assert not r.ok and "is an AVR firmware; the STM32F446 is an STM32" in r.errors[0]["message"]
    r = preflight.check_offline(stm32_bin)
    assert r.ok and r.facts["content"] == "ARM Cortex-M (STM32)"
    # with a board: placed at the AVR's application start it would "fit", but it is refused
    r = preflight.check(stm32_bin, M1284_OPTIBOOT)
    assert not r.ok and "the board (ATmega1284P) is an AVR" in r.errors[0]["message"]
    assert preflight.check(unplaced(arm_app(0x08008000)), F446_32K).ok


def avr_app(vectors: int, size: int = 2048) -> FirmwareImage:
    """An image opening like avr-gcc output: one JMP per vector, then code."""
    table = b"".join(b"\x0c\x94" + struct.pack("<H", 0x100 + i) for i in range(vectors))
    body = b"\x11\x24\x1f\xbe" + bytes(size - len(table) - 4)  # eor r1,r1; out SREG,r1
    return image_from_bytes(table + body, 0, "marlin.hex", "hex")


def test_a_mega2560_build_is_refused_on_a_1284p_board_even_when_it_fits() -> None:
    report = preflight.check(avr_app(57), M1284_OPTIBOOT)
    assert not report.ok
    message = report.errors[0]["message"]
    assert "built for ATmega1280 / ATmega2560 (57 interrupt vectors)" in message
    assert "the board is an ATmega1284P (35)" in message


def test_an_image_built_for_the_boards_chip_passes_the_vector_check() -> None:
    report = preflight.check(avr_app(35), M1284_OPTIBOOT)
    assert report.ok and report.facts["avr_vectors"] == 35


def test_an_unknown_vector_count_decides_nothing() -> None:
    assert preflight.check(avr_app(3), M1284_OPTIBOOT).ok  # hand-made start-up code
    assert preflight.check(image_from_bytes(bytes(256), 0), M1284_OPTIBOOT).ok


def test_offline_vector_check_against_the_chosen_mcu() -> None:
    report = preflight.check_offline(avr_app(26), "atmega1284p")
    assert not report.ok
    message = report.errors[0]["message"]
    assert "built for ATmega328P / ATmega328 (26 interrupt vectors)" in message
    assert preflight.check_offline(avr_app(26), "atmega328p").ok
