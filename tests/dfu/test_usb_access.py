"""Finding DFU devices and the advice given when none can be used."""

from __future__ import annotations

import errno

import pytest
import usb.core

from octoprint_flasher.errors import BusyError, ConnectError
from octoprint_flasher.flashers import dfu
from octoprint_flasher.links import usb_device
from octoprint_flasher.target import Target
from tests.dfu.conftest import make_board
from tests.emulators.dfu_device import H723, DfuBackend, EmulatedDfuDevice


def running(vid: int, pid: int) -> DfuBackend:
    """A board that runs its firmware, showing only the given USB id."""
    board = make_board("STM32H723")
    board.dev.mode = "app"
    board.dev.app_usb = (vid, pid)
    return board.backend


def test_usb_can_bridge_instead_of_dfu_explains_the_way_in() -> None:
    error = usb_device.not_found_error(running(0x1D50, 0x606F))
    assert "1d50:606f" in error.message and "USB-to-CAN bridge" in error.message
    assert "katapult" in error.hint and "BOOT0" in error.hint


def test_klipper_over_usb_suggests_the_1200_baud_touch() -> None:
    error = usb_device.not_found_error(running(0x1D50, 0x614E))
    assert "1200-baud" in error.hint


def test_nothing_at_all_gives_the_boot0_steps() -> None:
    error = usb_device.not_found_error(DfuBackend([]))
    assert "power it off" in error.hint and "remove the jumper" in error.hint


def test_flasher_uses_that_advice() -> None:
    with pytest.raises(ConnectError, match="606f"):
        dfu.DfuFlasher(Target(method="dfu", usb_backend=running(0x1D50, 0x606F)), None).identify()


@pytest.mark.parametrize(
    ("exc", "kind", "words"),
    [
        (usb.core.USBError("Access denied", -3, errno.EACCES), ConnectError, "udevadm"),
        (ValueError("The device has no langid (permission issue, ...)"), ConnectError, "plugdev"),
        (usb.core.USBError("Resource busy", -6, errno.EBUSY), BusyError, "Another program"),
        (usb.core.NoBackendError("No backend available"), ConnectError, "libusb-1.0-0"),
        (usb.core.USBTimeoutError("timed out", -7, errno.ETIMEDOUT), ConnectError, "cable"),
        (usb.core.USBError("No such device", -4, errno.ENODEV), ConnectError, "BOOT0"),
    ],
)
def test_usb_errors_become_advice(exc: Exception, kind: type, words: str) -> None:
    error = usb_device.explain_usb_error(exc)
    assert isinstance(error, kind)
    assert words in str(error)


def test_environment_backend_is_loaded_once(monkeypatch: pytest.MonkeyPatch) -> None:
    usb_device._ENV_CACHE.clear()
    monkeypatch.setenv(usb_device.ENV_BACKEND, "tests.emulators.dfu_device:backend_from_env")
    monkeypatch.setenv("FLASHER_DFU_EMU", "STM32G0B1,bootloader=8192")
    first = usb_device.resolve_backend()
    assert usb_device.resolve_backend() is first
    assert [c.usb_id for c in usb_device.find_dfu(first)] == ["0483:df11"]
    usb_device._ENV_CACHE.clear()


def test_bad_environment_backend_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    usb_device._ENV_CACHE.clear()
    monkeypatch.setenv(usb_device.ENV_BACKEND, "no_such_module_xyz:factory")
    with pytest.raises(ConnectError, match="cannot be loaded"):
        usb_device.resolve_backend()
    monkeypatch.setenv(usb_device.ENV_BACKEND, "nocolon")
    with pytest.raises(ConnectError, match="module:factory"):
        usb_device.resolve_backend()


def test_filters_by_id_and_path() -> None:
    a = EmulatedDfuDevice(H723, port_numbers=(1, 4))
    backend = DfuBackend([a])
    assert usb_device.find_dfu(backend, "0483:df11", "1-1.4")[0].path == "1-1.4"
    assert usb_device.find_dfu(backend, None, "1-2") == []
    assert usb_device.find_dfu(backend, "1d50:614e") == []
    with pytest.raises(ConnectError, match="VID:PID"):
        usb_device.find_dfu(backend, "df11")


def test_discover_lists_dfu_boards_and_can_bridges() -> None:
    dfu_board = make_board("STM32H723")
    bridge = make_board("STM32F446")
    bridge.dev.mode = "app"
    bridge.dev.app_usb = (0x1D50, 0x606F)
    bridge.dev.port_numbers = (3,)
    backend = DfuBackend([dfu_board.dev, bridge.dev])
    found = {d.usb_id: d for d in dfu.discover(usb_backend=backend)}
    assert found["0483:df11"].chip == "STM32H723"
    assert found["0483:df11"].details["transfer_size"] == 1024
    assert found["0483:df11"].method == "dfu"
    assert found["1d50:606f"].usb_path == "1-3" and "CAN" in found["1d50:606f"].hint


def test_discover_shows_permission_problems_instead_of_hiding_the_board() -> None:
    board = make_board("STM32F446")
    board.dev.faults.access_denied = True
    (device,) = dfu.discover(usb_backend=board.backend)
    assert device.details["error"]["kind"] == "connect"
    assert "udev" in device.hint
