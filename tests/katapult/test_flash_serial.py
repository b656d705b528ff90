"""Katapult over USB-CDC and UART (ptys), entering from Klipper, and the USB-CAN bridge."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

from octoprint_flasher import methods
from octoprint_flasher.errors import ConnectError
from tests.emulators.katapult_node import EmulatedBoard, UsbWorld
from tests.emulators.klipper_firmware import make_klipper_bin

from .conftest import as_bin, can_target, serial_target
from .test_flash_can import wait_until

MakeBoard = Callable[..., EmulatedBoard]
SMALL = 8 * 1024


def run_flash(target_port: str, world: UsbWorld, data: bytes, **options: object) -> list[str]:
    log: list[str] = []
    flasher = methods.open_flasher(serial_target(target_port, world, **options), log.append)
    try:
        info = flasher.identify()
        flasher.check(as_bin(data), info)
        flasher.flash(as_bin(data))
        flasher.leave()
    finally:
        flasher.close()
    return log


def usb_ids(world: UsbWorld) -> set[tuple[int | None, int | None]]:
    return {(p.vid, p.pid) for p in world.list_ports()}


def test_katapult_usb_port_flashes_directly(make_board: MakeBoard, world: UsbWorld) -> None:
    board = make_board(interface="usb", firmware="katapult").start()
    assert board.port is not None
    data = make_klipper_bin(size=SMALL, canbus_frequency=None)
    run_flash(board.port, world, data)
    assert board.app_bytes(SMALL) == data
    assert wait_until(lambda: board.mode == "klipper")
    assert wait_until(lambda: usb_ids(world) == {(0x1D50, 0x614E)})  # Klipper is back on USB


def test_klipper_usb_1200_baud_touch_follows_reenumeration(
    make_board: MakeBoard, world: UsbWorld
) -> None:
    board = make_board(interface="usb", firmware="klipper")
    board.install_app(make_klipper_bin(canbus_frequency=None))
    board.start()
    klipper_port = board.port
    assert klipper_port is not None
    data = make_klipper_bin(size=SMALL, canbus_frequency=None, seed=11)
    log = run_flash(klipper_port, world, data)
    text = " ".join(log)
    assert "1200-baud" in text and "re-enumerated as" in text
    assert board.events[:2] == ["reboot -> katapult", "katapult running"]
    assert board.app_bytes(SMALL) == data


def test_klipper_uart_request_string(make_board: MakeBoard, world: UsbWorld) -> None:
    board = make_board(interface="uart", firmware="klipper")
    board.install_app(make_klipper_bin(canbus_frequency=None, serial_baud=250000))
    board.start()
    assert board.port is not None
    data = make_klipper_bin(size=SMALL, canbus_frequency=None, serial_baud=250000, seed=12)
    log = run_flash(board.port, world, data)
    assert "serial bootloader request" in " ".join(log)
    assert board.app_bytes(SMALL) == data
    assert wait_until(lambda: board.mode == "klipper")


def test_uart_without_katapult_says_what_to_check(make_board: MakeBoard, world: UsbWorld) -> None:
    board = make_board(interface="uart", firmware="klipper", katapult_installed=False)
    board.install_app(make_klipper_bin(canbus_frequency=None, serial_baud=250000))
    board.start()
    assert board.port is not None
    flasher = methods.open_flasher(serial_target(board.port, world, entry_timeout=0.5))
    with pytest.raises(ConnectError) as err:
        flasher.identify()
    flasher.close()
    assert "250000" in err.value.cause and "Double-tap reset" in err.value.hint


def test_usb_can_bridge_jumps_and_is_followed_to_usb_serial(
    make_board: MakeBoard, world: UsbWorld
) -> None:
    """The seed's Octopus Pro as a Klipper USB-CAN bridge (1d50:606f): asked by UUID over CAN,
    its can0 vanishes and Katapult comes up as USB serial 1d50:6177."""
    board = make_board(
        chip="stm32h723xx",
        interface="usb-can-bridge",
        firmware="klipper",
        usb_serial="0E0022001750425938323120",
    )
    board.install_app(make_klipper_bin("stm32h723xx", app_start=0x08020000, usb_can_bridge=True))
    board.start()
    assert world.find_bridge(board.channel) is not None
    log: list[str] = []
    flasher = methods.open_flasher(can_target(board, world), log.append)
    info = flasher.identify()
    assert info.details["transport"] == "serial" and info.chip == "stm32h723xx"
    assert world.find_bridge(board.channel) is None  # can0 is gone
    data = make_klipper_bin("stm32h723xx", app_start=0x08020000, size=SMALL, usb_can_bridge=True)
    warnings = flasher.check(as_bin(data), info)
    flasher.flash(as_bin(data))
    flasher.leave()
    flasher.close()
    assert warnings == []
    assert "USB-CAN bridge" in " ".join(log)
    assert board.app_bytes(SMALL) == data
    assert wait_until(lambda: world.find_bridge(board.channel) is not None)  # can0 is back


def test_klipper_usb_without_katapult_lands_in_rom_dfu(
    make_board: MakeBoard, world: UsbWorld
) -> None:
    board = make_board(interface="usb", firmware="klipper", katapult_installed=False)
    board.install_app(make_klipper_bin(canbus_frequency=None))
    board.start()
    assert board.port is not None
    flasher = methods.open_flasher(serial_target(board.port, world))
    with pytest.raises(ConnectError) as err:
        flasher.identify()
    flasher.close()
    assert "ROM bootloader instead of Katapult" in err.value.message
    assert "dfu method" in err.value.hint


def test_bridge_is_found_in_sysfs(tmp_path: Path) -> None:
    """/sys/class/net/can0/device -> the USB interface; its parent is the Klipper bridge."""
    from octoprint_flasher.links.bootloader_entry import find_usb_can_bridge

    usb = tmp_path / "devices" / "usb1" / "1-1.3"
    (usb / "1-1.3:1.0").mkdir(parents=True)
    for name, value in (
        ("idVendor", "1d50"),
        ("idProduct", "606f"),
        ("manufacturer", "Klipper"),
        ("serial", "0E0022001750425938323120"),
    ):
        (usb / name).write_text(value + "\n")
    net = tmp_path / "class" / "net" / "can0"
    net.mkdir(parents=True)
    (net / "device").symlink_to(usb / "1-1.3:1.0")
    found = find_usb_can_bridge("can0", sysfs=tmp_path)
    assert found is not None and found.location == "1-1.3"
    assert found.uuid.hex() == "6cbab3314b18"
    (usb / "manufacturer").write_text("OpenMoko\n")  # a plain gs_usb adapter
    assert find_usb_can_bridge("can0", sysfs=tmp_path) is None
    assert find_usb_can_bridge("can1", sysfs=tmp_path) is None
