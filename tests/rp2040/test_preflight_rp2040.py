"""The core's generic checks know RP2040/RP2350 boards are the picoboot method's to check: no
"unknown chip" warning at upload, no Cortex-M vector-table warning for an image that opens
with its boot2 stage (the vector table follows at +0x100)."""

from __future__ import annotations

from octoprint_flasher import preflight
from tests.emulators.picoboot_device import klipper_like_rp2040
from tests.rp2040.conftest import Board, uf2_image


def test_an_rp2040_named_by_the_page_is_not_an_unknown_chip() -> None:
    image = uf2_image(klipper_like_rp2040(16 * 1024))
    report = preflight.check_offline(image, mcu_name="RP2040", method="picoboot")
    assert report.ok and report.warnings == [], report.warnings
    other = preflight.check_offline(image, mcu_name="ch32v307", method="picoboot")
    assert any("Unknown chip" in w for w in other.warnings), other.warnings


def test_a_klipper_uf2_passes_the_board_check_without_warnings(bootsel: Board) -> None:
    flasher = bootsel.flasher()
    try:
        info = flasher.identify()
        image = uf2_image(klipper_like_rp2040(16 * 1024))
        report = preflight.check(image, info, mcu="RP2040")
    finally:
        flasher.close()
    assert report.ok, report.errors
    assert report.warnings == [], report.warnings
