"""Chip and USB-id tables: the lookups other modules rely on."""

from __future__ import annotations

import pytest

from octoprint_flasher import chips


@pytest.mark.parametrize(
    "name, expected",
    [
        ("m1284p", "ATmega1284P"),
        ("atmega1284p", "ATmega1284P"),
        ("ATmega1284P", "ATmega1284P"),
        ("m2560", "ATmega2560"),
        ("atmega328p", "ATmega328P"),
        ("atmega32u4", "ATmega32U4"),
        ("stm32f446xx", "STM32F446"),
        ("STM32F446RET6", "STM32F446"),
        ("stm32g0b1xx", "STM32G0B1"),
        ("stm32h723xx", "STM32H723"),
        ("STM32H743VIT6", "STM32H743"),
        ("stm32f103xe", "STM32F103xE"),
        ("STM32F103RCT6", "STM32F103xE"),
        ("stm32f103c8t6", "STM32F103"),
        ("stm32f407xx", "STM32F407"),
        ("stm32f429xx", "STM32F429"),
    ],
)
def test_names_in_every_common_spelling(name: str, expected: str) -> None:
    chip = chips.find_chip(name)
    assert chip is not None and chip.name == expected


def test_unknown_names() -> None:
    assert chips.find_chip("esp32") is None and chips.find_chip(None) is None


def test_avr_signatures_and_sizes() -> None:
    m1284 = chips.avr_by_signature(bytes([0x1E, 0x97, 0x05]))
    assert m1284 is not None and m1284.flash_size == 131072 and m1284.page_size == 256
    assert m1284.boot_sizes == (1024, 2048, 4096, 8192)
    m2560 = chips.avr_by_signature(b"\x1e\x98\x01")
    assert m2560 is not None and m2560.name == "ATmega2560"
    assert chips.avr_by_signature(b"\x1e\x95\x0f").name == "ATmega328P"  # type: ignore[union-attr]
    assert chips.avr_by_signature(b"\x00\x00\x00") is None
    sigs = [c.signature for c in chips.AVR_CHIPS]
    assert len(sigs) == len(set(sigs))


def test_bootloaders_in_the_wild() -> None:
    anet = [b for b in chips.bootloaders_for("m1284p") if b.protocol == "stk500v1"]
    assert any(57600 in b.bauds and 115200 in b.bauds for b in anet)
    mega = [b for b in chips.bootloaders_for("atmega2560") if b.protocol == "stk500v2"]
    assert mega and mega[0].size == 8192 and mega[0].bauds == (115200,)
    caterina = chips.bootloaders_for("atmega32u4")
    assert caterina[0].protocol == "avr109" and caterina[0].size == 4096


def test_stm32_sectors_and_application_addresses() -> None:
    f446 = chips.find_stm32("stm32f446xx")
    assert f446 is not None
    assert sum(n * s for n, s in f446.sectors) == f446.flash_size
    assert f446.sector_at(0x08008000) == (0x08008000, 16384)
    assert f446.sector_at(0x08010000) == (0x08010000, 65536)
    assert f446.default_app_address() == 0x08008000
    h723 = chips.find_stm32("stm32h723xx")
    assert h723 is not None and h723.default_app_address() == 0x08020000
    assert h723.write_word == 32
    g0 = chips.find_stm32("stm32g0b1xx")
    assert g0 is not None and g0.default_app_address() == 0x08002000
    assert g0.default_app_address(0) == 0x08000000
    for chip in chips.STM32_CHIPS:
        assert sum(n * s for n, s in chip.sectors) == chip.flash_size, chip.name


@pytest.mark.parametrize(
    "vid, pid, method",
    [
        (0x0483, 0xDF11, "dfu"),
        (0x1D50, 0x614E, "katapult"),
        (0x1D50, 0x6177, "katapult"),
        (0x1D50, 0x606F, "katapult"),
        (0x2341, 0x0042, "stk500v2"),
        (0x2341, 0x9999, "auto"),  # any other Arduino
        (0x1A86, 0x7523, "auto"),
        (0x0403, 0x6001, "auto"),
        (0x0403, 0x6015, "auto"),
        (0x10C4, 0xEA60, "auto"),
        (0x2C99, 0x0002, "prusa"),
        (0x2C99, 0x0004, "avr109"),
        (0x2C99, 0x0003, "avr109"),
        (0x2C99, 0x000E, "avr109"),
        (0x2C99, 0x000D, None),  # a Buddy-board Prusa
    ],
)
def test_usb_ids(vid: int, pid: int, method: str | None) -> None:
    row = chips.lookup_usb(vid, pid)
    assert row is not None and row.method == method and row.description and row.hint


def test_unknown_usb_id_and_parsing() -> None:
    assert chips.lookup_usb(0x1234, 0x5678) is None and chips.lookup_usb(None, None) is None
    assert chips.parse_usb_id("0483:DF11") == (0x0483, 0xDF11)
    with pytest.raises(ValueError):
        chips.parse_usb_id("0483-df11")
    assert chips.format_usb_id(0x483, 0xDF11) == "0483:df11"


@pytest.mark.parametrize(
    "expected, reported, verdict",
    [
        ("stm32f429xx", "STM32F407/F429", True),  # the DFU ROM's layout fits both
        ("stm32f446xx", "STM32F407/F429", False),
        ("stm32h723xx", "STM32H7 (unknown variant)", None),  # cannot be told
        ("stm32f446xx", "STM32 (unknown)", None),
        ("m1284p", "ATmega1284P", True),
        ("atmega2560", "ATmega1284P", False),
        ("stm32g0b1xx", "stm32g0b1xx", True),  # Katapult's CONNECT string
    ],
)
def test_chip_matches_is_unsure_when_the_bootloader_is(
    expected: str, reported: str, verdict: bool | None
) -> None:
    assert chips.chip_matches(expected, reported) is verdict
