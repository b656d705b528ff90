"""The whole flash, as OctoPrint users get it: a real server, the plugin, a simulated ATmega1284P
printer running real optiboot on a pty, driven only through HTTP and the push socket.

The printer starts with the firmware "E2E-Old"; after the flash it must be Operational again
and answer M115 with the new firmware's name, which only happens if the new image was really
written (the old name lives in the flash being overwritten).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
from intelhex import IntelHex

from tests.e2e.conftest import Client, SimPrinter, SocketCollector

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.realtime,
    pytest.mark.timeout(300, func_only=True),  # see test_security.py
]


def firmware_name(admin: Client, socket: SocketCollector, expected: str) -> str:
    """Ask the printer M115 through OctoPrint and return the terminal line naming ``expected``."""
    mark = socket.mark()
    r = admin.post("api/printer/command", json={"commands": ["M115"]})
    assert r.status_code == 204, r.text

    def answered() -> Any:
        return next((line for line in socket.terminal(mark) if "FIRMWARE_NAME" in line), None)

    line: str = socket.wait_for("M115 answer in the terminal", answered, timeout=20)
    assert expected in line, f"printer says {line!r}, expected {expected!r}"
    return line


def test_printer_answers_as_old_firmware_before_the_flash(
    admin: Client, admin_socket: SocketCollector, printer: SimPrinter
) -> None:
    admin.wait_idle(timeout=120)
    if admin.connection()["state"] != "Operational":
        r = admin.connect_printer(printer.port, printer.baud)
        assert r.status_code == 204, r.text
        admin.wait_printer_state("Operational", timeout=60)
    firmware_name(admin, admin_socket, f"Flasher Test Firmware {printer.old_name}")


def test_devices_lists_the_printer_port(admin: Client, printer: SimPrinter) -> None:
    r = admin.get("plugin/flasher/devices")
    assert r.status_code == 200, r.text
    body = r.json()
    ports = [d.get("port") for d in body["devices"]]
    assert printer.port in ports, f"{printer.port} not among {ports}"
    assert isinstance(body["warnings"], list)


def test_upload_describes_the_image_and_passes_preflight(
    admin: Client, printer: SimPrinter, new_firmware: Path
) -> None:
    r = admin.upload(new_firmware, target=printer.target)
    assert r.status_code == 200, r.text
    body = r.json()
    image = body["image"]
    assert image["filename"] == new_firmware.name
    assert image["kind"] == "hex"
    assert image["start"] == 0
    assert 3 * 1024 <= image["size"] <= 5 * 1024, image
    assert image["end"] == image["start"] + image["size"]
    assert image["sha256"] == hashlib.sha256(new_firmware.read_bytes()).hexdigest()
    assert image["segments"], image
    assert body["preflight"]["ok"] is True, body["preflight"]
    assert body["preflight"]["errors"] == []


def test_flash_over_http_reports_progress_and_writes_the_board(
    admin: Client, admin_socket: SocketCollector, printer: SimPrinter, new_firmware: Path
) -> None:
    admin.wait_idle(timeout=120)
    if admin.connection()["state"] != "Operational":
        admin.connect_printer(printer.port, printer.baud)
        admin.wait_printer_state("Operational", timeout=60)

    uploaded = admin.upload(new_firmware, target=printer.target)
    assert uploaded.status_code == 200, uploaded.text
    image = uploaded.json()["image"]
    mark = admin_socket.mark()

    started = admin.flash(image["id"], printer.target)
    assert started.status_code == 202, started.text
    assert "status" in started.json()

    result = admin_socket.wait_for(
        "flash result message",
        lambda: next((m for m in admin_socket.flasher(mark) if m.get("type") == "result"), None),
        timeout=180,
    )
    messages = admin_socket.flasher(mark)
    progress = [m for m in messages if m.get("type") == "progress"]
    assert progress, f"no progress message among {[m.get('type') for m in messages]}"
    assert result.get("ok") is True, result

    status = admin.wait_idle(timeout=60)
    assert status["result"]["ok"] is True, status
    assert status["result"]["bytes_verified"] >= image["size"], status["result"]
    assert status["progress"]["percent"] == 100, status["progress"]
    assert status["image"]["sha256"] == image["sha256"]

    events = [e.get("type") for e in admin_socket.events(mark)]
    assert "plugin_flasher_flash_started" in events, events
    assert "plugin_flasher_flash_done" in events, events
    assert "plugin_flasher_flash_failed" not in events, events

    # the chip really holds the new image (read from the simulator, not from the plugin)
    expected = IntelHex(str(new_firmware)).tobinstr()
    assert printer.board.flash_dump()[: len(expected)] == expected

    # and the flash is on record with the image that was written
    r = admin.get("plugin/flasher/history")
    assert r.status_code == 200, r.text
    records = [h for h in r.json()["history"] if h.get("sha256") == image["sha256"]]
    assert records, r.json()["history"]
    newest = records[0]
    assert newest["filename"] == new_firmware.name
    assert newest["result"] == "success", newest
    assert "1284" in str(newest.get("chip")), newest


def test_printer_is_operational_after_the_flash_and_runs_the_new_firmware(
    admin: Client, admin_socket: SocketCollector, printer: SimPrinter
) -> None:
    """The plugin disconnected OctoPrint for the flash; it must give the port back and
    reconnect by itself, and the printer must now be the new firmware."""
    status = admin.wait_idle(timeout=120)
    assert status["result"] is not None and status["result"]["ok"] is True, status
    assert status["result"]["reconnected"] is True, status["result"]
    admin.wait_printer_state("Operational", timeout=30)
    firmware_name(admin, admin_socket, f"Flasher Test Firmware {printer.new_name}")
