"""The demo's Prusa boards through the real OctoPrint, flashed from the HTTP API as the
settings page does, with the demo's own sample files (demo/run_demo.py prusa_samples).

The MK3S (tests/emulators/prusa_einsy.py, started by the demo's own function on
<port_dir>/ttyFLASHER2) is the printer OctoPrint is connected to: a MULTILANG file whose
catalogs belong to another build is refused from the file while the printer stays
Operational; the right one is written in two passes (firmware through the bootloader, the
language catalogs through the new firmware into the SPI flash), both read back, and OctoPrint
is connected and Operational again. The MMU3 (tests/emulators/caterina_board.py, inside
OctoPrint through the demo plugin) gets its ISP image refused by name without a touch, then
its firmware: touched at 1200 baud, followed to its new port, written, read back, and running
its application again.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from octoprint_flasher.image.load import load
from tests.e2e.conftest import (
    Client,
    SimPrinter,
    SocketCollector,
    page_target,
    poll,
)
from tests.e2e.test_demo_boards import flash_and_wait, printer_watch
from tests.e2e.test_marlin_sd import connect_to

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.realtime,
    pytest.mark.timeout(300, func_only=True),  # see test_security.py
]

MK3S_RIGHT = "prusa-mk3s-multilang-demo.hex"
MK3S_WRONG = "prusa-mk3s-languages-of-another-build.hex"
MMU_RIGHT = "prusa-mmu3-demo.hex"
MMU_WRONG = "MMU2S_MMU3_BOOTLOADER_demo.hex"
MMU_APP_AREA = 0x7000  # below Caterina


def serial_device(admin: Client, where: Any) -> dict[str, Any]:
    def listed() -> Any:
        r = admin.get("plugin/flasher/devices")
        assert r.status_code == 200, r.text
        return next((d for d in r.json()["devices"] if where(d)), None)

    device: dict[str, Any] = poll("the device in the list", listed, 20, 0.5)
    return device


def stages(socket: SocketCollector, mark: int) -> list[str]:
    return [str(m.get("stage")) for m in socket.flasher(mark) if m.get("stage")]


def test_mk3s_multilang_writes_firmware_and_languages_and_the_printer_is_operational_again(
    admin: Client,
    admin_socket: SocketCollector,
    mk3s: tuple[Any, str],
    demo_samples: dict[str, Path],
) -> None:
    board, port = mk3s
    connect_to(admin, port)  # Operational: the firmware model answered OctoPrint's hello
    assert any(line.startswith("M115") or " M115" in line for line in board.gcode_lines)
    target = page_target(serial_device(admin, lambda d: d.get("port") == port))
    assert target == {"method": "auto", "port": port}, target
    old_flash = bytes(board.flash)

    # another build's catalogs: refused from the file, the printer is not disconnected
    with printer_watch(admin, admin_socket) as seen:
        r = admin.upload(demo_samples[MK3S_WRONG], target=target)
        assert r.status_code in (200, 400), r.text
        body = r.json()
        refused = body.get("preflight", body)
        assert refused.get("ok") is not True, body
        assert "signature" in str(body).lower() or "build" in str(body).lower(), body
    assert set(seen) <= {"Operational"}, seen
    assert bytes(board.flash) == old_flash

    # the right file: two passes, both read back, OctoPrint reconnected
    image = load(demo_samples[MK3S_RIGHT])
    firmware, catalogs = image.segments[0].data, image.external[0].data
    verdict = admin.upload(demo_samples[MK3S_RIGHT], target=target).json()
    assert verdict["preflight"]["ok"] is True, verdict
    assert verdict["image"]["external"], verdict["image"]  # the page numbers the two passes
    mark = admin_socket.mark()
    result = flash_and_wait(admin, admin_socket, demo_samples[MK3S_RIGHT], target)
    assert result["status"] == "success", result
    assert result["verified_by"] == "read-back", result
    assert "languages" in result["confirmation"], result
    assert "choose a language on the printer" in result["board_message"], result
    assert result["reconnected"] is True, result
    seen_stages = stages(admin_socket, mark)
    assert "writing" in seen_stages and "verifying" in seen_stages, seen_stages
    assert "writing_languages" in seen_stages and "verifying_languages" in seen_stages
    assert seen_stages.index("verifying") < seen_stages.index("writing_languages")

    assert bytes(board.flash[: len(firmware)]) == firmware
    assert board.xflash.read(image.external[0].address, len(catalogs)) == catalogs
    assert board.lcd_upload_size is not None  # Prusa's 0x71 reached the bootloader
    current = admin.wait_printer_state("Operational", timeout=60)
    assert current["port"] == port, current


def test_mmu_isp_image_is_refused_untouched_and_its_firmware_flashes_and_runs_again(
    admin: Client,
    admin_socket: SocketCollector,
    printer: SimPrinter,
    demo_samples: dict[str, Path],
) -> None:
    connect_to(admin, printer.port)
    device = serial_device(admin, lambda d: d.get("usb_id") == "2c99:0004")
    assert "MMU" in device["description"], device
    target = page_target(device)
    assert target["port"] == device["port"], target
    before = admin.demo_boards()["mmu"]
    assert before["mode"] == "app" and before["port"] == device["port"], before

    with printer_watch(admin, admin_socket) as seen:
        r = admin.upload(demo_samples[MMU_WRONG], target=target)
        assert r.status_code == 200, r.text
        verdict = r.json()["preflight"]
        assert verdict["ok"] is False and "ISP image" in str(verdict), verdict
        refused = flash_and_wait(admin, admin_socket, demo_samples[MMU_WRONG], target)
        assert refused["board_state"] == "untouched", refused
        assert admin.demo_boards()["mmu"]["touches"] == before["touches"]

        image = load(demo_samples[MMU_RIGHT])
        result = flash_and_wait(admin, admin_socket, demo_samples[MMU_RIGHT], target)
    assert set(seen) <= {"Operational"}, seen  # the MMU is not the printer's board
    assert result["status"] == "success", result
    assert result["verified_by"] == "read-back", result
    assert "Reconnect the printer so it sees the MMU" in result["board_message"], result

    after = admin.demo_boards()["mmu"]
    assert after["touches"] == before["touches"] + 1, after
    assert after["mode"] == "app" and after["enumerations"] == before["enumerations"] + 2, after
    assert after["port"] in result["board_message"], (after, result)
    app = image.segments[0].data.ljust(MMU_APP_AREA, b"\xff")
    assert after["app_sha256"] == hashlib.sha256(app).hexdigest()
