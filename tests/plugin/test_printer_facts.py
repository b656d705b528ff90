"""What OctoPrint's connection learnt from the printer's M115 describes only that printer: the
SD upload (marlin-sd) is offered for the port whose firmware reported BINARY_FILE_TRANSFER in
its latest M115, and forgotten when OctoPrint disconnects or another firmware answers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from octoprint.events import Events

from tests.plugin.conftest import Harness


def _printer_device(harness: Harness, tmp_path: Path) -> dict[str, object]:
    devices = harness.client.get("/plugin/flasher/devices").get_json()["devices"]
    (printer,) = [d for d in devices if d["printer"]]
    return dict(printer)


def _connected_to(harness: Harness, tmp_path: Path, name: str) -> None:
    pty = tmp_path / name
    pty.write_text("")
    harness.printer.port = str(pty)
    harness.settings.values["extra_port_globs"] = [str(tmp_path / "tty*")]


def test_a_later_m115_without_binary_file_transfer_takes_the_sd_upload_away(
    harness: Harness, tmp_path: Path
) -> None:
    _connected_to(harness, tmp_path, "ttyFLASHER1")
    plugin = harness.plugin
    plugin.firmware_info_hook(None, "Marlin", {"FIRMWARE_NAME": "Marlin 2.1.2.7"})
    plugin.firmware_capability_hook(None, "BINARY_FILE_TRANSFER", True, {})
    assert _printer_device(harness, tmp_path)["preferred_method"] == "marlin-sd"

    # OctoPrint now talks to an 8-bit printer whose M115 lists no capabilities at all
    _connected_to(harness, tmp_path, "ttyFLASHER0")
    plugin.firmware_info_hook(None, "Marlin 1.1.9", {"FIRMWARE_NAME": "Marlin 1.1.9"})
    printer = _printer_device(harness, tmp_path)
    assert "preferred_method" not in printer and "sd_upload" not in printer
    assert printer["firmware"] == "Marlin 1.1.9"


def test_disconnecting_forgets_what_the_printer_reported(harness: Harness, tmp_path: Path) -> None:
    _connected_to(harness, tmp_path, "ttyFLASHER1")
    plugin = harness.plugin
    plugin.firmware_info_hook(None, "Marlin", {"FIRMWARE_NAME": "Marlin 2.1.2.7"})
    plugin.firmware_capability_hook(None, "BINARY_FILE_TRANSFER", True, {})
    plugin.on_event(Events.DISCONNECTED, {})
    # a port connected next without an M115 answer yet (or a firmware that never answers it)
    _connected_to(harness, tmp_path, "ttyFLASHER0")
    printer = _printer_device(harness, tmp_path)
    assert "preferred_method" not in printer and "firmware" not in printer


def test_the_jobs_own_reconnect_to_the_flashed_port_is_not_vetoed(
    harness: Harness, hex_file: Path
) -> None:
    """OctoPrint asks the handle_connect hooks before every connect, the job's reconnect too:
    the veto that keeps OctoPrint off a port mid-flash must let the job put the printer back."""
    vetoed: list[bool] = []
    connect = harness.printer.connect

    def octoprint_connect(port: Any = None, baudrate: Any = None, profile: Any = None) -> None:
        vetoed.append(harness.plugin.handle_connect(harness.printer, port=port))
        if not vetoed[-1]:
            connect(port=port, baudrate=baudrate, profile=profile)

    harness.printer.connect = octoprint_connect  # type: ignore[method-assign,assignment]
    target = {"method": "stk500v1", "port": "/dev/ttyUSB0", "mcu": "atmega1284p"}
    image_id = harness.upload(hex_file, target=target).get_json()["image"]["id"]
    harness.client.post("/plugin/flasher/flash", json={"image_id": image_id, "target": target})
    status = harness.wait_idle()
    assert vetoed == [False], vetoed
    assert status["result"]["reconnected"] is True, status["result"]
