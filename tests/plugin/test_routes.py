"""The HTTP contract of ``/plugin/flasher/*``, through Flask's test client and a fake board."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from tests.plugin.conftest import Harness

TARGET = {"method": "stk500v1", "port": "/dev/ttyUSB0", "mcu": "atmega1284p"}


def _upload_ok(harness: Harness, hex_file: Path) -> dict:
    r = harness.upload(hex_file, target=TARGET)
    assert r.status_code == 200, r.get_json()
    return r.get_json()


# --- permission ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, path",
    [
        ("get", "status"),
        ("get", "devices"),
        ("get", "history"),
        ("post", "upload"),
        ("post", "flash"),
        ("post", "cancel"),
        ("post", "history/x/reflash"),
        ("post", "history/x/rollback"),
    ],
)
def test_every_route_refuses_a_user_without_the_flash_permission(
    harness: Harness, method: str, path: str
) -> None:
    harness.grant = False
    r = getattr(harness.client, method)(f"/plugin/flasher/{path}")
    assert r.status_code == 403


def test_status_is_idle_before_any_flash(harness: Harness) -> None:
    r = harness.client.get("/plugin/flasher/status")
    assert r.status_code == 200
    status = r.get_json()
    assert status["state"] == "idle"
    assert status["result"] is None
    assert set(status["progress"]) >= {"done", "total", "percent", "rate", "eta"}


def test_blueprint_posts_are_csrf_protected(harness: Harness) -> None:
    assert harness.plugin.is_blueprint_csrf_protected() is True


# --- upload ----------------------------------------------------------------------------------


def test_upload_describes_the_image_and_passes_preflight(harness: Harness, hex_file: Path) -> None:
    answer = _upload_ok(harness, hex_file)
    image = answer["image"]
    assert image["filename"] == "marlin.hex"
    assert image["kind"] == "hex"
    assert image["size"] == 1024
    assert (image["start"], image["end"]) == (0, 1024)
    assert len(image["sha256"]) == 64
    assert image["segments"] == [{"address": 0, "size": 1024}]
    assert answer["preflight"]["ok"] is True
    assert answer["preflight"]["errors"] == []


def test_upload_keeps_a_copy_because_octoprint_deletes_its_temp_file(
    harness: Harness, hex_file: Path
) -> None:
    image_id = _upload_ok(harness, hex_file)["image"]["id"]
    hex_file.unlink()  # what OctoPrint's upload handler does when the request ends
    assert harness.plugin._store.load_image(image_id).size == 1024


def test_upload_of_a_gcode_file_is_refused_with_cause_and_hint(
    harness: Harness, tmp_path: Path
) -> None:
    gcode = tmp_path / "benchy.hex"
    gcode.write_text("G28\nG1 X10 Y10 F3000\nM104 S200\n")
    r = harness.upload(gcode)
    assert r.status_code == 400
    body = r.get_json()
    assert "G-code" in body["error"]
    assert body["kind"] == "image"
    assert body["hint"]
    assert harness.plugin._store.images() == []


def test_upload_without_a_file_says_what_to_do(harness: Harness) -> None:
    r = harness.client.post("/plugin/flasher/upload", data={"target": "{}"})
    assert r.status_code == 400
    assert "No firmware file" in r.get_json()["error"]


def test_upload_of_an_image_for_another_chip_fails_preflight(
    harness: Harness, tmp_path: Path
) -> None:
    from intelhex import IntelHex

    ih = IntelHex()
    ih.frombytes(b"\x0c\x94" * 70000, offset=0)  # 140 KB: more than a 1284P holds
    big = tmp_path / "mega.hex"
    ih.write_hex_file(str(big))
    r = harness.upload(big, target=TARGET)
    assert r.status_code == 200
    verdict = r.get_json()["preflight"]
    assert verdict["ok"] is False
    assert verdict["errors"][0]["message"]
    assert verdict["errors"][0]["kind"] in ("preflight", "image")


def test_upload_with_a_malformed_target_is_a_bad_request(harness: Harness, hex_file: Path) -> None:
    r = harness.upload(hex_file, target="{not json")
    assert r.status_code == 400
    assert r.get_json()["kind"] == "request"


# --- flash -----------------------------------------------------------------------------------


def test_flash_answers_202_and_the_job_writes_and_verifies(
    harness: Harness, hex_file: Path
) -> None:
    image_id = _upload_ok(harness, hex_file)["image"]["id"]
    r = harness.client.post(
        "/plugin/flasher/flash", json={"image_id": image_id, "target": TARGET, "confirm": False}
    )
    assert r.status_code == 202, r.get_json()
    assert "status" in r.get_json()
    status = harness.wait_idle()
    assert status["result"]["ok"] is True, status
    assert status["progress"]["percent"] == 100
    assert harness.board.flash[:4] == bytes([0, 7, 14, 21])
    assert harness.opened[0].port == "/dev/ttyUSB0"
    assert harness.opened[0].method == "stk500v1"


def test_flash_reconnects_with_the_profile_id_not_the_profile_dict(
    harness: Harness, hex_file: Path
) -> None:
    image_id = _upload_ok(harness, hex_file)["image"]["id"]
    harness.client.post("/plugin/flasher/flash", json={"image_id": image_id, "target": TARGET})
    harness.wait_idle()
    assert harness.printer.disconnects == 1
    assert harness.printer.connects == [
        {"port": "/dev/ttyUSB0", "baudrate": 115200, "profile": "anet_a8"}
    ]


def test_the_flasher_frees_the_port_before_octoprint_reconnects(
    harness: Harness, hex_file: Path
) -> None:
    image_id = _upload_ok(harness, hex_file)["image"]["id"]
    harness.client.post("/plugin/flasher/flash", json={"image_id": image_id, "target": TARGET})
    status = harness.wait_idle()
    assert status["result"]["reconnected"] is True, status["result"]
    assert status["result"]["warnings"] == []
    assert harness.printer.state == "OPERATIONAL"
    assert harness.board.port_open is False


def test_flash_fires_started_and_done_events(harness: Harness, hex_file: Path) -> None:
    image_id = _upload_ok(harness, hex_file)["image"]["id"]
    harness.client.post("/plugin/flasher/flash", json={"image_id": image_id, "target": TARGET})
    harness.wait_idle()
    fired = [name for name, _payload in harness.events]
    assert fired == ["plugin_flasher_flash_started", "plugin_flasher_flash_done"]
    assert harness.events[-1][1]["filename"] == "marlin.hex"


def test_a_failed_write_fires_failed_and_does_not_reconnect_into_the_bootloader(
    harness: Harness, hex_file: Path
) -> None:
    harness.board.fail_at_page = 2
    image_id = _upload_ok(harness, hex_file)["image"]["id"]
    harness.client.post("/plugin/flasher/flash", json={"image_id": image_id, "target": TARGET})
    status = harness.wait_idle()
    assert status["result"]["ok"] is False
    assert status["result"]["board_in_bootloader"] is True
    assert "bootloader" in status["result"]["message"]
    assert harness.printer.connects == []
    assert harness.events[-1][0] == "plugin_flasher_flash_failed"
    # the port is free again: OctoPrint may connect once the user has recovered the board
    assert harness.plugin.handle_connect(harness.printer) is False


def test_flash_of_an_unknown_image_is_404(harness: Harness) -> None:
    r = harness.client.post(
        "/plugin/flasher/flash", json={"image_id": "20260101000000-deadbeef", "target": TARGET}
    )
    assert r.status_code == 404
    assert "Upload the firmware file again" in r.get_json()["hint"]


@pytest.mark.parametrize(
    "target, words",
    [
        ({"method": "avrdude", "port": "/dev/ttyUSB0"}, "Unknown flashing method"),
        ({"method": "stk500v1", "port": "dev/ttyAMA0"}, "absolute device path"),
        ({"method": "stk500v1"}, "needs a serial port"),
        ({"method": "stk500v1", "port": "/dev/ttyUSB0", "baud": "fast"}, "not a whole number"),
        ({"method": "dfu", "usb": "0483-df11"}, "VID:PID"),
        ({"method": "katapult", "uuid": "xyz"}, "12 hex digits"),
        ({"method": "dfu", "address": "0x8000000g"}, "not a number"),
        ({"method": "stk500v1", "port": "VIRTUAL"}, "virtual printer"),
    ],
)
def test_flash_with_a_bad_target_is_400_and_touches_nothing(
    harness: Harness, hex_file: Path, target: dict, words: str
) -> None:
    image_id = _upload_ok(harness, hex_file)["image"]["id"]
    r = harness.client.post("/plugin/flasher/flash", json={"image_id": image_id, "target": target})
    assert r.status_code == 400
    assert words in r.get_json()["error"]
    assert harness.opened == [] and harness.printer.disconnects == 0


def test_writing_over_the_bootloader_needs_confirmation(harness: Harness, hex_file: Path) -> None:
    image_id = _upload_ok(harness, hex_file)["image"]["id"]
    target = dict(TARGET, allow_bootloader_erase=True)
    r = harness.client.post("/plugin/flasher/flash", json={"image_id": image_id, "target": target})
    assert r.status_code == 400
    assert "confirmation" in r.get_json()["error"]
    r = harness.client.post(
        "/plugin/flasher/flash", json={"image_id": image_id, "target": target, "confirm": True}
    )
    assert r.status_code == 202
    harness.wait_idle()
    assert harness.opened[0].allow_bootloader_erase is True


def test_flash_while_another_runs_is_409(harness: Harness, hex_file: Path) -> None:
    harness.board.gate = threading.Event()
    first = _upload_ok(harness, hex_file)["image"]["id"]
    second = _upload_ok(harness, hex_file)["image"]["id"]
    r = harness.client.post("/plugin/flasher/flash", json={"image_id": first, "target": TARGET})
    assert r.status_code == 202
    r = harness.client.post("/plugin/flasher/flash", json={"image_id": second, "target": TARGET})
    assert r.status_code == 409
    assert r.get_json()["kind"] == "busy"
    assert "already running" in r.get_json()["error"]
    harness.board.gate.set()
    assert harness.wait_idle()["result"]["ok"] is True


def test_flash_while_printing_is_409_and_the_printer_is_left_alone(
    harness: Harness, hex_file: Path
) -> None:
    harness.printer.printing = True
    image_id = _upload_ok(harness, hex_file)["image"]["id"]
    r = harness.client.post("/plugin/flasher/flash", json={"image_id": image_id, "target": TARGET})
    assert r.status_code == 409
    assert "printing" in r.get_json()["error"]
    assert harness.printer.disconnects == 0


def test_connect_attempts_are_vetoed_while_the_flash_holds_the_port(
    harness: Harness, hex_file: Path
) -> None:
    harness.board.gate = threading.Event()
    image_id = _upload_ok(harness, hex_file)["image"]["id"]
    assert harness.plugin.handle_connect(harness.printer) is False
    harness.client.post("/plugin/flasher/flash", json={"image_id": image_id, "target": TARGET})
    harness.wait_for("writing", lambda: harness.printer.disconnects == 1)
    assert harness.plugin.handle_connect(harness.printer, port="/dev/ttyUSB0") is True
    harness.board.gate.set()
    harness.wait_idle()
    assert harness.plugin.handle_connect(harness.printer) is False
    assert len(harness.printer.connects) == 1  # our own reconnect was not vetoed


def test_a_connect_to_the_port_being_flashed_is_vetoed_even_when_it_is_not_the_printers(
    harness: Harness, hex_file: Path
) -> None:
    """The printer was disconnected by hand and its port flashed: OctoPrint must not open the
    port mid-write (opening it resets the board)."""
    harness.printer.port = None  # nothing connected, no default port configured
    harness.board.gate = threading.Event()
    image_id = _upload_ok(harness, hex_file)["image"]["id"]
    harness.client.post("/plugin/flasher/flash", json={"image_id": image_id, "target": TARGET})
    harness.wait_for("the flash to run", lambda: harness.plugin._job.running)
    assert harness.printer.disconnects == 0  # not the printer's port: nothing to disconnect
    assert harness.plugin.handle_connect(harness.printer, port="/dev/ttyUSB0") is True
    assert harness.plugin.handle_connect(harness.printer, port="AUTO") is True
    assert harness.plugin.handle_connect(harness.printer, port="/dev/ttyACM9") is False
    harness.board.gate.set()
    harness.wait_idle()
    assert harness.plugin.handle_connect(harness.printer, port="/dev/ttyUSB0") is False


# --- cancel ----------------------------------------------------------------------------------


def test_cancel_stops_between_pages_and_reports_cancelled(harness: Harness, hex_file: Path) -> None:
    harness.board.gate = threading.Event()
    image_id = _upload_ok(harness, hex_file)["image"]["id"]
    harness.client.post("/plugin/flasher/flash", json={"image_id": image_id, "target": TARGET})
    harness.wait_for("the job to disconnect", lambda: harness.printer.disconnects == 1)
    r = harness.client.post("/plugin/flasher/cancel")
    assert r.status_code == 200
    assert "status" in r.get_json()
    harness.board.gate.set()
    status = harness.wait_idle()
    assert status["state"] == "cancelled"
    assert status["result"]["status"] == "cancelled"
    assert harness.board.writes < 4


def test_cancel_with_nothing_running_is_409(harness: Harness) -> None:
    r = harness.client.post("/plugin/flasher/cancel")
    assert r.status_code == 409
    assert "nothing to cancel" in r.get_json()["error"]


# --- devices ---------------------------------------------------------------------------------


def test_devices_lists_octoprints_additional_ports(harness: Harness, tmp_path: Path) -> None:
    pty = tmp_path / "ttyFLASHER0"
    pty.write_text("")
    harness.settings.global_values["serial"]["additionalPorts"] = [str(tmp_path / "ttyFLASHER*")]
    r = harness.client.get("/plugin/flasher/devices")
    assert r.status_code == 200
    body = r.get_json()
    assert set(body) == {"devices", "warnings"}
    (device,) = [d for d in body["devices"] if d["port"] == str(pty)]
    assert device["printer"] is False


def test_devices_marks_the_port_octoprint_is_connected_to(harness: Harness, tmp_path: Path) -> None:
    pty = tmp_path / "ttyFLASHER0"
    pty.write_text("")
    harness.printer.port = str(pty)
    harness.settings.values["extra_port_globs"] = [str(pty)]
    devices = harness.client.get("/plugin/flasher/devices").get_json()["devices"]
    assert [d["port"] for d in devices if d["printer"]] == [str(pty)]


def test_devices_refuses_probing_while_printing(harness: Harness) -> None:
    harness.printer.printing = True
    r = harness.client.get("/plugin/flasher/devices?probe=1")
    assert r.status_code == 409


# --- history ---------------------------------------------------------------------------------


def test_history_lists_each_flash_with_hash_target_and_result(
    harness: Harness, hex_file: Path
) -> None:
    image_id = _upload_ok(harness, hex_file)["image"]["id"]
    harness.client.post("/plugin/flasher/flash", json={"image_id": image_id, "target": TARGET})
    harness.wait_idle()
    body = harness.client.get("/plugin/flasher/history").get_json()
    assert set(body) == {"history", "images"}
    (record,) = body["history"]
    assert record["filename"] == "marlin.hex"
    assert record["result"] == "success"
    assert record["target"] == "/dev/ttyUSB0"
    assert len(record["sha256"]) == 64
    assert record["can_reflash"] is False  # a flashed image is not kept
    assert body["images"] == []


def test_a_failed_flash_can_be_reflashed_from_history_to_the_same_target(
    harness: Harness, hex_file: Path
) -> None:
    harness.board.fail_at_page = 1
    image_id = _upload_ok(harness, hex_file)["image"]["id"]
    harness.client.post("/plugin/flasher/flash", json={"image_id": image_id, "target": TARGET})
    harness.wait_idle()
    (record,) = harness.client.get("/plugin/flasher/history").get_json()["history"]
    assert record["can_reflash"] is True
    harness.board.fail_at_page = None
    r = harness.client.post(f"/plugin/flasher/history/{record['id']}/reflash")
    assert r.status_code == 202, r.get_json()
    assert harness.wait_idle()["result"]["ok"] is True
    assert [t.port for t in harness.opened] == ["/dev/ttyUSB0", "/dev/ttyUSB0"]
    assert harness.board.flash[:4] == bytes([0, 7, 14, 21])


def test_rollback_flashes_the_backup_taken_before_the_flash(
    harness: Harness, hex_file: Path
) -> None:
    harness.board.flash[:4] = b"OLD!"
    image_id = _upload_ok(harness, hex_file)["image"]["id"]
    r = harness.client.post(
        "/plugin/flasher/flash", json={"image_id": image_id, "target": TARGET, "backup": True}
    )
    assert r.status_code == 202
    assert harness.wait_idle()["result"]["ok"] is True
    assert harness.board.flash[:4] == bytes([0, 7, 14, 21])
    (record,) = harness.client.get("/plugin/flasher/history").get_json()["history"]
    assert record["backup_id"] and record["can_rollback"] is True
    r = harness.client.post(f"/plugin/flasher/history/{record['id']}/rollback")
    assert r.status_code == 202, r.get_json()
    assert harness.wait_idle()["result"]["ok"] is True
    assert harness.board.flash[:4] == b"OLD!"


def test_reflash_of_an_unknown_record_is_404(harness: Harness) -> None:
    r = harness.client.post("/plugin/flasher/history/nope/reflash")
    assert r.status_code == 404


def test_remembered_targets_survive_a_restart(harness: Harness, hex_file: Path) -> None:
    harness.board.fail_at_page = 0
    image_id = _upload_ok(harness, hex_file)["image"]["id"]
    harness.client.post("/plugin/flasher/flash", json={"image_id": image_id, "target": TARGET})
    harness.wait_idle()
    saved = json.loads((Path(harness.plugin._data_folder) / "targets.json").read_text())
    assert saved["images"][image_id]["port"] == "/dev/ttyUSB0"
    assert list(saved["records"].values())[0]["mcu"] == "atmega1284p"


def test_upload_over_the_configured_limit_is_refused_before_parsing(
    harness: Harness, tmp_path: Path
) -> None:
    harness.settings.values["max_upload_mb"] = 1
    big = tmp_path / "huge.bin"
    big.write_bytes(b"\xff" * (1024 * 1024 + 1))
    r = harness.upload(big)
    assert r.status_code == 400
    assert "more than the 1048576 bytes allowed" in r.get_json()["error"]


def test_status_mid_flash_lets_a_reloaded_page_resync(harness: Harness, hex_file: Path) -> None:
    harness.board.gate = threading.Event()
    image_id = _upload_ok(harness, hex_file)["image"]["id"]
    harness.client.post("/plugin/flasher/flash", json={"image_id": image_id, "target": TARGET})
    harness.wait_for("the job to disconnect", lambda: harness.printer.disconnects == 1)
    status = harness.client.get("/plugin/flasher/status").get_json()
    assert status["running"] is True
    assert status["state"] not in ("idle", "done", "failed", "cancelled")
    assert status["image"]["filename"] == "marlin.hex"
    assert status["target"] == "/dev/ttyUSB0"
    assert any("Flash job" in line for line in status["log"])
    harness.board.gate.set()
    harness.wait_idle()


def test_old_uploads_are_pruned_but_backups_are_kept(harness: Harness, hex_file: Path) -> None:
    from octoprint_flasher.image.model import image_from_bytes
    from octoprint_flasher.plugin.routes import KEPT_UPLOADS

    backup = harness.plugin._store.add_backup(image_from_bytes(b"\x01" * 64, 0), "/dev/ttyUSB0")
    ids = [_upload_ok(harness, hex_file)["image"]["id"] for _ in range(KEPT_UPLOADS + 3)]
    kept = {img.id for img in harness.plugin._store.images()}
    assert backup.id in kept
    assert set(ids[-KEPT_UPLOADS:]) <= kept
    assert not set(ids[:3]) & kept


# --- the printer's own firmware (marlin-sd) and the user's hand ------------------------------


def test_a_printer_that_reports_binary_file_transfer_is_offered_the_sd_upload(
    harness: Harness, tmp_path: Path
) -> None:
    pty = tmp_path / "ttyFLASHER1"
    pty.write_text("")
    harness.printer.port = str(pty)
    harness.settings.values["extra_port_globs"] = [str(pty)]
    plugin = harness.plugin
    plugin.firmware_info_hook(None, "Marlin", {"FIRMWARE_NAME": "Marlin 2.1.2.7 (Sep 27 2024)"})
    plugin.firmware_capability_hook(None, "BINARY_FILE_TRANSFER", True, {})
    devices = harness.client.get("/plugin/flasher/devices").get_json()["devices"]
    (printer,) = [d for d in devices if d["printer"]]
    assert printer["preferred_method"] == "marlin-sd" and printer["sd_upload"] is True
    assert printer["firmware"].startswith("Marlin 2.1.2.7")


def test_a_printer_without_binary_file_transfer_gets_no_sd_upload(
    harness: Harness, tmp_path: Path
) -> None:
    pty = tmp_path / "ttyFLASHER1"
    pty.write_text("")
    harness.printer.port = str(pty)
    harness.settings.values["extra_port_globs"] = [str(pty)]
    harness.plugin.firmware_capability_hook(None, "BINARY_FILE_TRANSFER", False, {})
    devices = harness.client.get("/plugin/flasher/devices").get_json()["devices"]
    (printer,) = [d for d in devices if d["printer"]]
    assert "preferred_method" not in printer


def test_the_flasher_can_ask_the_user_to_press_reset_through_the_page(
    harness: Harness, hex_file: Path
) -> None:
    image_id = _upload_ok(harness, hex_file)["image"]["id"]
    harness.client.post("/plugin/flasher/flash", json={"image_id": image_id, "target": TARGET})
    harness.wait_idle()
    (target,) = harness.opened
    target.options["prompt"]("Press the printer board's reset button now.")
    prompts = [m for _, m in harness.messages if m.get("type") == "prompt"]
    assert prompts == [{"type": "prompt", "message": "Press the printer board's reset button now."}]
    assert target.options["state_dir"] == harness.plugin.get_plugin_data_folder()
