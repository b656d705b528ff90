"""The command line reaches the emulated board through OCTOPRINT_FLASHER_USB_BACKEND."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Optional

import pytest

from octoprint_flasher import cli
from octoprint_flasher.links import usb_device
from tests.dfu.conftest import klipper_like, make_board
from tests.emulators.dfu_device import DfuBackend, Faults

_BACKEND: Optional[DfuBackend] = None


def shared_backend() -> DfuBackend:
    """The factory the environment variable names: the test's board, every time."""
    assert _BACKEND is not None
    return _BACKEND


@pytest.fixture
def board(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> DfuBackend:
    global _BACKEND
    b = make_board("STM32F446", bootloader=32 * 1024)
    _BACKEND = b.backend
    monkeypatch.setenv(usb_device.ENV_BACKEND, f"{__name__}:shared_backend")
    monkeypatch.setenv(cli.ENV_HOME, str(tmp_path / "home"))
    usb_device._ENV_CACHE.clear()
    return b.backend


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(list(argv), out, err)
    return code, out.getvalue(), err.getvalue()


def test_detect_lists_the_dfu_board(board: DfuBackend) -> None:
    code, out, _ = run("detect", "--json")
    assert code == 0
    devices = json.loads(out)["devices"]
    dfu = [d for d in devices if d["kind"] == "usb-dfu"]
    assert dfu[0]["usb_id"] == "0483:df11" and dfu[0]["chip"] == "STM32F446"
    assert dfu[0]["usb_path"] == "1-2"


def test_flash_then_read_back(board: DfuBackend, tmp_path: Path) -> None:
    data = klipper_like(0x08008000, 40 * 1024)
    firmware = tmp_path / "klipper.bin"
    firmware.write_bytes(data)
    code, out, err = run("flash", str(firmware), "--method", "dfu", "--usb", "0483:df11")
    assert code == 0, err
    assert "40960 bytes verified" in out
    dev = board.devices[0]
    assert dev.read_flash(0x08008000, len(data)) == data
    assert dev.mode == "app"
    dev._reset_dfu()
    dev.mode = "dfu"  # the user sets BOOT0 again to take a backup
    backup = tmp_path / "backup.bin"
    code, _, err = run("read", "--method", "dfu", "--usb-path", "1-2", "--out", str(backup))
    assert code == 0, err
    assert backup.read_bytes() == data


def test_refusal_exit_code_and_message(board: DfuBackend, tmp_path: Path) -> None:
    firmware = tmp_path / "klipper.bin"
    firmware.write_bytes(klipper_like(0x08008000, 4096))
    code, _, err = run("flash", str(firmware), "--method", "dfu", "--address", "0x08000000")
    assert code == cli.EXIT_REFUSED
    assert "bootloader" in err
    assert board.devices[0].erased == []


def test_no_permission_prints_the_udev_rule(board: DfuBackend, tmp_path: Path) -> None:
    board.devices[0].faults = Faults(access_denied=True)
    firmware = tmp_path / "klipper.bin"
    firmware.write_bytes(klipper_like(0x08008000, 4096))
    code, _, err = run("flash", str(firmware), "--method", "dfu")
    assert code == cli.EXIT_FAILED
    assert usb_device.UDEV_RULE in err


def test_reading_an_erased_application_area_writes_no_file(
    board: DfuBackend, tmp_path: Path
) -> None:
    backup = tmp_path / "backup.bin"
    code, _, err = run("read", "--method", "dfu", "--usb", "0483:df11", "--out", str(backup))
    assert code != 0
    assert "nothing to back up" in err
    assert not backup.exists()


def test_a_repeated_flash_is_quick_by_default_and_full_on_request(
    board: DfuBackend, tmp_path: Path
) -> None:
    data = klipper_like(0x08008000, 40 * 1024)
    firmware = tmp_path / "klipper.bin"
    firmware.write_bytes(data)
    dev = board.devices[0]
    dev.load_flash(0x08008000, klipper_like(0x08008000, 40 * 1024, seed=4))  # an older build
    base = ["flash", str(firmware), "--method", "dfu", "--usb", "0483:df11"]
    assert run(*base)[0] == 0
    assert dev.erased == [0x08008000, 0x0800C000, 0x08010000]
    dev._reset_dfu()
    dev.mode = "dfu"  # BOOT0 again
    code, out, err = run(*base)
    assert code == 0, err
    assert dev.erased == [0x08008000, 0x0800C000, 0x08010000]  # nothing erased again
    assert "3 blocks unchanged" in out
    dev._reset_dfu()
    dev.mode = "dfu"
    code, _, err = run(*base, "--full")
    assert code == 0, err
    assert dev.erased[3:] == [0x08008000, 0x0800C000, 0x08010000]
    assert dev.read_flash(0x08008000, len(data)) == data


def test_quick_and_full_cannot_both_be_given(board: DfuBackend, tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["flash", "x.bin", "--quick", "--full"])


# -- issue 10: refuse before touching, leave the board where it was found --------------------


def test_a_blank_board_takes_a_bin_linked_for_the_flash_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The demo's first DFU try: a blank F446 in ROM DFU and a Klipper .bin built with no
    bootloader. The file places itself at 0x08000000 and the board has nothing there to protect."""
    global _BACKEND
    blank = make_board("STM32F446")
    _BACKEND = blank.backend
    monkeypatch.setenv(usb_device.ENV_BACKEND, f"{__name__}:shared_backend")
    monkeypatch.setenv(cli.ENV_HOME, str(tmp_path / "home"))
    usb_device._ENV_CACHE.clear()
    data = klipper_like(0x08000000, 16 * 1024)
    firmware = tmp_path / "klipper-stm32f446-dfu.bin"
    firmware.write_bytes(data)
    code, out, err = run("info", str(firmware))
    assert code == 0 and "0x08000000" in out, out + err
    code, out, err = run("flash", str(firmware), "--method", "dfu", "--usb", "0483:df11")
    assert code == 0, err
    assert "16384 bytes verified" in out
    assert blank.dev.read_flash(0x08000000, len(data)) == data
    assert blank.dev.left_to == 0x08000000


def test_a_refused_image_leaves_the_board_waiting_in_dfu(board: DfuBackend, tmp_path: Path) -> None:
    """A build for 0x08000000 over the board's bootloader is refused, and the board stays in
    ROM DFU (it is not sent to its application), so the right file flashes next without
    touching the BOOT0 jumper."""
    dev = board.devices[0]
    before = dev.read_flash(0x08000000, 0x20000)
    wrong = tmp_path / "no-bootloader.bin"
    wrong.write_bytes(klipper_like(0x08000000, 16 * 1024))
    code, _out, err = run("flash", str(wrong), "--method", "dfu", "--usb", "0483:df11")
    assert code == 4, err
    assert "bootloader" in err and "still waiting in its bootloader" in err
    assert dev.left_to is None and dev.read_flash(0x08000000, 0x20000) == before
    right = tmp_path / "klipper.bin"
    right.write_bytes(klipper_like(0x08008000, 16 * 1024, seed=2))
    code, out, err = run("flash", str(right), "--method", "dfu", "--usb", "0483:df11")
    assert code == 0, err
    assert dev.left_to == 0x08008000


def test_an_address_that_disagrees_with_the_vector_table_is_refused_before_the_board_is_opened(
    board: DfuBackend, tmp_path: Path
) -> None:
    dev = board.devices[0]
    firmware = tmp_path / "klipper.bin"
    firmware.write_bytes(klipper_like(0x08008000, 8 * 1024))
    code, _out, err = run(
        "flash", str(firmware), "--method", "dfu", "--usb", "0483:df11", "--address", "0x08004000"
    )
    assert code != 0
    assert "linked for 0x08008000, but the address 0x08004000 was given" in err
    assert dev.requests == [] and dev.left_to is None
