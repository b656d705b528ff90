"""The demo's one emulated USB bus (tests/emulators/usb_bus.py): the STM32 in ROM DFU and the
SKR Pico running Klipper side by side, each reached through the emulator that owns it."""

from __future__ import annotations

import errno

import pytest

from octoprint_flasher import discovery
from octoprint_flasher.flashers.dfu import DfuFlasher
from octoprint_flasher.flashers.picoboot import PicobootFlasher
from octoprint_flasher.target import Target
from tests.dfu.conftest import klipper_like, placed
from tests.emulators import dfu_device, picoboot_device
from tests.emulators.usb_bus import UsbBus
from tests.rp2040.conftest import SCALE, uf2_image

Bus = tuple[UsbBus, dfu_device.EmulatedDfuDevice, picoboot_device.EmulatedRp2040]


@pytest.fixture
def bus() -> Bus:
    dfu = dfu_device.EmulatedDfuDevice(dfu_device.F446, time_scale=SCALE)
    pico = picoboot_device.skr_pico(SCALE)
    return UsbBus(dfu_device.DfuBackend([dfu]), picoboot_device.PicobootBackend([pico])), dfu, pico


def test_discovery_lists_the_dfu_board_and_the_klipper_rp2040_on_one_bus(bus: Bus) -> None:
    backend, dfu, pico = bus
    found = discovery.discover(usb_backend=backend, port_lister=lambda: [])
    assert found.warnings == []
    by_kind = {d.kind: d for d in found}
    assert set(by_kind) == {"usb-dfu", "usb"}
    assert by_kind["usb-dfu"].chip == "STM32F446" and by_kind["usb-dfu"].method == "dfu"
    klipper = by_kind["usb"]
    assert (klipper.method, klipper.chip, klipper.usb_path) == ("picoboot", "RP2040", "1-1.3")
    assert klipper.usb_id == "1d50:614e"


def test_the_skr_pico_is_flashed_from_klipper_through_the_bus_and_the_dfu_board_is_not_touched(
    bus: Bus,
) -> None:
    backend, dfu, pico = bus
    data = picoboot_device.klipper_like_rp2040(20 * 1024, seed=5)
    target = Target(
        method="picoboot",
        usb_path=pico.usb_path,
        mcu="RP2040",
        usb_backend=backend,
        options={"picoboot_time_scale": SCALE},
    )
    flasher = PicobootFlasher(target)
    try:
        result = flasher.flash(uf2_image(data))
        came_back = flasher.leave()
    finally:
        flasher.close()
    assert result.bytes_verified == 20 * 1024
    assert came_back == "Klipper answers again on USB (1d50:614e at 1-1.3)."
    assert pico.touches == 1 and pico.mode == "app"  # the touch went through the bus's serial side
    assert pico.read_flash(0x10000000, len(data)) == data
    assert dfu.mode == "dfu" and dfu.bytes_programmed == 0 and not dfu.erased


def test_the_dfu_board_is_flashed_through_the_bus_next_to_the_pico(bus: Bus) -> None:
    backend, dfu, pico = bus
    data = klipper_like(0x08000000, 8 * 1024)
    target = Target(method="dfu", usb_backend=backend, options={"dfu_time_scale": SCALE})
    flasher = DfuFlasher(target)
    try:
        result = flasher.flash(placed(data, 0x08000000))
    finally:
        flasher.close()
    assert result.bytes_verified >= len(data)
    assert dfu.read_flash(0x08000000, len(data)) == data
    assert pico.touches == 0 and pico.mode == "app"


def test_the_bus_opens_serial_ports_of_its_members_only(bus: Bus) -> None:
    backend, _, pico = bus
    assert [p.device for p in backend.list_serial_ports()] == [pico.tty]
    with pytest.raises(OSError) as info:
        backend.open_serial("/dev/ttyACM9", 1200)
    assert info.value.errno == errno.ENOENT
    port = backend.open_serial(pico.tty, 1200)
    port.close()  # closing at 1200 baud is Klipper's bootloader request
    assert pico.touches == 1
