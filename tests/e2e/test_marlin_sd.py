"""The demo's 32-bit printer through the real OctoPrint: an Ender-3 V2-style board running
Marlin with binary file transfer and an SD card (tests/emulators/marlin_printer.py, started
by demo/run_demo.py's own function), flashed with the demo's sample files from the HTTP API
as the settings page does.

OctoPrint is connected to the printer, as its owner has it; its M115 marks the port for the
SD upload (``preferred_method`` "marlin-sd"). The 8-bit Ender-3's ``.hex`` is refused before
the printer is disconnected or sent anything. The right ``firmware.bin`` is uploaded to the
card over the serial link, the board resets (M997), its bootloader flashes the file, and the
new Marlin's M115 confirms it; OctoPrint is reconnected and Operational, and its own M115
reports the new build. The flash cannot be read back over this path, and the result, the
page's messages and the history all say so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import CREALITY_LINK_NAME, Client, SocketCollector, page_target, poll
from tests.e2e.test_demo_boards import flash_and_wait, printer_watch
from tests.e2e.test_http_flow import firmware_name

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.realtime,
    pytest.mark.timeout(300, func_only=True),  # see test_security.py
]

RIGHT = "firmware-ender3v2-marlin-2.1.2.8.bin"
WRONG = "marlin-ender3-atmega1284p.hex"
OLD = "Marlin 2.1.2.7 (Dec  6 2026 05:42:29)"
NEW = "Marlin 2.1.2.8 (Jan 20 2027 10:15:00)"
BAUD = 115200


def connect_to(admin: Client, port: str) -> None:
    """Connect OctoPrint to ``port`` (after whatever it was connected to) until Operational."""
    admin.wait_idle(timeout=120)
    if admin.connection().get("port") != port or admin.connection()["state"] != "Operational":
        if admin.connection()["state"] != "Closed":
            admin.disconnect_printer()
            admin.wait_printer_state("Closed", timeout=30)
        r = admin.connect_printer(port, BAUD)
        assert r.status_code == 204, r.text
    admin.wait_printer_state("Operational", timeout=60)


def sd_printer_device(admin: Client, port: str) -> dict[str, Any]:
    """The printer's port in the device list, once OctoPrint's M115 has marked it."""

    def marked() -> Any:
        r = admin.get("plugin/flasher/devices")
        assert r.status_code == 200, r.text
        found = [d for d in r.json()["devices"] if d.get("port") == port]
        return found[0] if found and found[0].get("preferred_method") else None

    device: dict[str, Any] = poll("the printer's port marked for the SD upload", marked, 20, 0.5)
    return device


def test_creality_refuses_the_hex_untouched_then_flashes_firmware_bin_confirmed_by_m115(
    admin: Client,
    admin_socket: SocketCollector,
    creality_printer: Any,
    demo_samples: dict[str, Path],
) -> None:
    board = creality_printer
    port = str(admin.server.port_dir / CREALITY_LINK_NAME)
    connect_to(admin, port)
    firmware_name(admin, admin_socket, OLD)
    device = sd_printer_device(admin, port)
    assert device["printer"] is True and device["sd_upload"] is True, device
    assert device["firmware"] == OLD, device
    target = page_target(device)
    assert target == {"method": "marlin-sd", "port": port}, target

    # the 8-bit Ender-3's .hex: refused from the file, before the printer is disconnected
    with printer_watch(admin, admin_socket) as states:
        r = admin.upload(demo_samples[WRONG], target=target)
        assert r.status_code == 200, r.text
        verdict = r.json()["preflight"]
        assert verdict["ok"] is False, verdict
        assert "flash only a .bin" in verdict["errors"][0]["message"], verdict
        refused = flash_and_wait(admin, admin_socket, demo_samples[WRONG], target)
    assert refused["ok"] is False and refused["board_state"] == "untouched", refused
    assert refused["reconnected"] is None, refused
    assert states and set(states) == {"Operational"}, states
    with board.lock:
        assert board.stats.resets == 0 and board.card.files == {}, board.card.files
        assert not board.binary and board.firmware_name == OLD

    # the right firmware.bin: uploaded to the card, flashed by the bootloader, confirmed
    r = admin.upload(demo_samples[RIGHT], target=target)
    assert r.status_code == 200, r.text
    verdict = r.json()["preflight"]
    assert verdict["ok"] is True, verdict
    assert any(NEW in w for w in verdict["warnings"]), verdict  # what the file says it is
    mark = admin_socket.mark()
    with printer_watch(admin, admin_socket) as states:
        done = flash_and_wait(admin, admin_socket, demo_samples[RIGHT], target)
        admin.wait_printer_state("Operational", timeout=60)

    assert done["ok"] is True and done["status"] == "success", done
    assert done["verified_by"] == "firmware-report", done
    assert done["confirmation"].startswith(
        f"Confirmed: the board reports the new build (M115 FIRMWARE_NAME: {NEW})"
    ), done
    assert "the flash cannot be read back over this path" in done["confirmation"], done
    assert done["bytes_verified"] == 0, "nothing can be read back: nothing may count as verified"
    assert done["bytes_written"] == demo_samples[RIGHT].stat().st_size, done
    assert done["reconnected"] is True, done
    # disconnected for its own board (the watch lists polled states, then socket events)
    assert "Disconnected" in states and "Closed" in states, states
    assert admin.connection() == {**admin.connection(), "port": port, "state": "Operational"}

    # the page saw the job's states in order, the upload with a rate and an ETA, then the
    # wait for the SD bootloader (a stage of the progress messages)
    messages = admin_socket.flasher(mark)
    states_seen = [m["state"] for m in messages if m.get("type") == "state"]
    order = ["disconnecting", "writing", "reconnecting", "done"]
    assert [s for s in states_seen if s in order] == order, states_seen
    progress = [m for m in messages if m.get("type") == "progress"]
    stages = [m["stage"] for m in progress]
    assert "writing" in stages and "flashing_from_sd" in stages, stages
    assert stages.index("flashing_from_sd") > max(i for i, s in enumerate(stages) if s == "writing")
    writing = [m for m in progress if m["stage"] == "writing"]
    assert any(m["rate"] > 0 and m["eta"] is not None and 0 < m["percent"] < 100 for m in writing)

    # the printer runs the new build: OctoPrint's own M115 says so
    firmware_name(admin, admin_socket, NEW)
    with board.lock:
        flashed = list(board.stats.flashes)
        assert board.firmware_name == NEW and board.stats.resets == 1
        assert len(flashed) == 1 and flashed[0].startswith("/FW") and flashed[0].endswith(".BIN")
        assert board.card.files[flashed[0]] == demo_samples[RIGHT].read_bytes()

    # the history records how it was confirmed
    record = admin.get("plugin/flasher/history").json()["history"][0]
    assert record["filename"] == RIGHT and record["method"] == "marlin-sd", record
    assert record["result"] == "success" and record["verified_by"] == "firmware-report", record
    assert record["confirmation"] == done["confirmation"], record
