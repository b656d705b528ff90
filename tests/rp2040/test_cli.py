"""`octoprint-flasher flash klipper.uf2 --method picoboot` reaches the emulated board through
OCTOPRINT_FLASHER_USB_BACKEND, as the DFU CLI tests do."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Optional

import pytest

from octoprint_flasher import cli
from octoprint_flasher.image import uf2
from octoprint_flasher.image.model import Segment
from octoprint_flasher.links import usb_device
from tests.emulators.picoboot_device import (
    EmulatedRp2040,
    PicobootBackend,
    klipper_like_rp2040,
    skr_pico,
)

_BACKEND: Optional[PicobootBackend] = None
NEW = klipper_like_rp2040(60 * 1024, seed=5)


def shared_backend() -> PicobootBackend:
    assert _BACKEND is not None
    return _BACKEND


def use(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, board: EmulatedRp2040) -> EmulatedRp2040:
    global _BACKEND
    _BACKEND = PicobootBackend([board])
    monkeypatch.setenv(usb_device.ENV_BACKEND, f"{__name__}:shared_backend")
    monkeypatch.setenv(cli.ENV_HOME, str(tmp_path / "home"))
    usb_device._ENV_CACHE.clear()
    return board


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(list(argv), out, err)
    return code, out.getvalue(), err.getvalue()


def firmware(tmp_path: Path, data: bytes = NEW, family: int = uf2.FAMILY_RP2040) -> Path:
    path = tmp_path / "klipper.uf2"
    path.write_bytes(uf2.write_uf2([Segment(0x10000000, data)], family))
    return path


def test_flash_a_uf2_onto_a_board_in_bootsel(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    board = use(monkeypatch, tmp_path, EmulatedRp2040(time_scale=0.01))
    code, out, err = run(
        "flash", str(firmware(tmp_path)), "--method", "picoboot", "--usb", "2e8a:0003"
    )
    assert code == 0, err
    assert board.read_flash(0x10000000, len(NEW)) == NEW
    assert board.mode == "app"


def test_flash_from_the_running_skr_pico_by_port(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    board = use(monkeypatch, tmp_path, skr_pico(0.01))
    code, out, err = run(
        "flash", str(firmware(tmp_path)), "--method", "picoboot", "--port", "/dev/ttyACM0"
    )
    assert code == 0, err
    assert board.touches == 1 and board.mode == "app"
    assert board.read_flash(0x10000000, len(NEW)) == NEW


def test_auto_picks_picoboot_for_the_boot_rom(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    board = use(monkeypatch, tmp_path, EmulatedRp2040(time_scale=0.01))
    code, _, err = run("flash", str(firmware(tmp_path)), "--usb", "2e8a:0003")
    assert code == 0, err
    assert board.read_flash(0x10000000, len(NEW)) == NEW


def test_a_uf2_for_another_chip_is_refused_before_the_board_is_touched(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    board = use(monkeypatch, tmp_path, skr_pico(0.01))
    path = firmware(tmp_path, family=0x55114460)
    code, _, err = run("flash", str(path), "--method", "picoboot", "--port", "/dev/ttyACM0")
    assert code == cli.EXIT_REFUSED, err
    assert "SAMD51" in err
    assert board.touches == 0 and board.mode == "app"


def test_detect_lists_the_klipper_rp2040(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    use(monkeypatch, tmp_path, skr_pico(0.01))
    code, out, _ = run("detect", "--json")
    assert code == 0
    rows = [d for d in json.loads(out)["devices"] if d.get("method") == "picoboot"]
    assert rows and rows[0]["usb_path"] == "1-1.3" and rows[0]["chip"] == "RP2040"
