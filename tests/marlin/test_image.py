"""What a .bin says about itself before it goes to the card."""

from __future__ import annotations

import struct

from octoprint_flasher.image.marlin import describe_bin, find_firmware_name, looks_mks_encrypted
from tests.emulators.klipper_firmware import make_klipper_bin
from tests.emulators.marlin_printer import DEFAULT_NAME, make_marlin_bin


def test_marlin_bin_gives_its_firmware_name_and_link_base() -> None:
    info = describe_bin(make_marlin_bin(size=16 * 1024, base=0x08007000))
    assert info is not None and info.kind == "marlin"
    assert info.firmware_name == DEFAULT_NAME
    assert info.link_base == 0x08007000 and not info.encrypted_mks


def test_lpc176x_image_is_placed_after_the_16k_bootloader() -> None:
    data = make_marlin_bin(base=0x4000)
    data = struct.pack("<I", 0x10008000) + data[4:]  # LPC176x local SRAM stack
    info = describe_bin(data)
    assert info is not None and info.link_base == 0x4000


def test_mks_encrypted_image_is_named_as_such_and_its_name_read_after_decrypting() -> None:
    data = make_marlin_bin(size=24 * 1024, mks_encrypt=True)
    assert find_firmware_name(data) == ""  # the literal sits in the encrypted region
    assert looks_mks_encrypted(data)
    info = describe_bin(data)
    assert info is not None and info.encrypted_mks and info.firmware_name == DEFAULT_NAME
    assert "MKS-encrypted" in info.describe()


def test_plain_images_are_not_taken_for_encrypted_ones() -> None:
    assert not looks_mks_encrypted(make_marlin_bin(size=24 * 1024))
    assert not looks_mks_encrypted(make_klipper_bin(size=24 * 1024))


def test_klipper_bin_is_recognised_by_its_dictionary() -> None:
    info = describe_bin(make_klipper_bin(mcu="stm32f103xe", app_start=0x08007000))
    assert info is not None and info.kind == "klipper" and info.klipper_mcu == "stm32f103xe"


def test_files_without_a_cortex_m_vector_table_are_not_firmware() -> None:
    assert describe_bin(b"G28\nG1 X10 Y10\n" * 100) is None
    assert describe_bin(b"\x0c\x94\x5c\x00" * 64) is None  # AVR jump vectors
    assert describe_bin(b"\xff" * 4096) is None
    # a reset handler outside the image (a .bin cut short or for another offset)
    head = struct.pack("<II", 0x20010000, 0x08100001)
    assert describe_bin(head + bytes(4096)) is None
