"""Who may flash, and when: the plugin's routes against a real OctoPrint server.

Flashing rewrites the printer's firmware, so every route needs the plugin's FLASH permission,
every POST needs OctoPrint's CSRF token, uploads are size-limited, and a flash is refused
while another runs or while the printer prints. Connecting the printer during a flash is
vetoed, because OctoPrint opening the port would reset the board mid-write.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.e2e.conftest import (
    ADMIN,
    Client,
    OctoPrintServer,
    SimPrinter,
    SocketCollector,
    job_running,
    poll,
)

# Fixture setup (server start, waiting for the machine-wide real-time lock, board boot) is not
# under the per-test timeout: another package's board may hold the lock for minutes.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300, func_only=True)]

GET_ROUTES = ["status", "devices", "history"]
POST_ROUTES = ["upload", "flash", "cancel", "history/0/reflash", "history/0/rollback"]
REFUSED = (401, 403)


def post_route(client: Client, route: str) -> requests.Response:
    """POST a well-formed request to ``route`` so only the access check can refuse it."""
    if route == "upload":
        files = {"file": ("firmware.hex", b":00000001FF\n", "application/octet-stream")}
        return client.post("plugin/flasher/upload", files=files)
    body: dict[str, Any] = {"image_id": "0", "target": {"method": "auto"}, "confirm": True}
    return client.post(f"plugin/flasher/{route}", json=body)


def test_anonymous_visitor_can_neither_read_nor_flash(octoprint_server: OctoPrintServer) -> None:
    anonymous = Client(octoprint_server)  # has a CSRF token, is not logged in
    for route in GET_ROUTES:
        r = anonymous.get(f"plugin/flasher/{route}")
        assert r.status_code in REFUSED, f"GET {route}: {r.status_code} {r.text[:200]}"
    for route in POST_ROUTES:
        r = post_route(anonymous, route)
        assert r.status_code in REFUSED, f"POST {route}: {r.status_code} {r.text[:200]}"


def test_user_without_flash_permission_gets_403(viewer: Client, admin: Client) -> None:
    for route in GET_ROUTES:
        r = viewer.get(f"plugin/flasher/{route}")
        assert r.status_code == 403, f"GET {route}: {r.status_code} {r.text[:200]}"
    for route in POST_ROUTES:
        r = post_route(viewer, route)
        assert r.status_code == 403, f"POST {route}: {r.status_code} {r.text[:200]}"
    # the same requests from an admin reach the plugin (whatever it then says about them)
    assert admin.get("plugin/flasher/status").status_code == 200


def test_post_without_csrf_token_is_rejected(octoprint_server: OctoPrintServer) -> None:
    forger = Client(octoprint_server).login(*ADMIN)
    del forger.session.headers["X-CSRF-Token"]  # the cookie alone is what a forged form sends
    for route in POST_ROUTES:
        r = post_route(forger, route)
        assert r.status_code == 400, f"POST {route}: {r.status_code} {r.text[:200]}"
        assert r.json().get("error") == "CSRF validation failed", r.text
    # reading is not CSRF-protected, and none of the refused posts started a flash
    status = forger.get("plugin/flasher/status")
    assert status.status_code == 200, status.text
    assert not job_running(status.json()), status.json()


def raw_upload_status(server: OctoPrintServer, client: Client, declared_size: int) -> int:
    """Send only the headers of a multipart upload declaring ``declared_size`` bytes and return
    the HTTP status. Tornado decides on Content-Length before reading the body, so this tests
    the limit without pushing megabytes through the loopback."""
    cookies = "; ".join(f"{c.name}={c.value}" for c in client.session.cookies)
    head = (
        "POST /plugin/flasher/upload HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{server.port}\r\n"
        f"Cookie: {cookies}\r\n"
        f"X-CSRF-Token: {client.csrf_token}\r\n"
        "Content-Type: multipart/form-data; boundary=xyzzy\r\n"
        f"Content-Length: {declared_size}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(head.encode())
        answer = s.recv(4096).decode(errors="replace")
    assert answer.startswith("HTTP/1.1 "), answer[:200]
    return int(answer.split()[1])


def test_upload_over_the_size_limit_is_refused(
    octoprint_server: OctoPrintServer, admin: Client
) -> None:
    assert raw_upload_status(octoprint_server, admin, 17 * 1024 * 1024) == 400


def test_upload_limit_is_raised_above_octoprint_default(admin: Client, tmp_path: Path) -> None:
    """OctoPrint's default body limit is 100 KB; a real firmware is bigger, so the plugin's
    bodysize hook must let a 300 KB file reach the route (which then judges the file)."""
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(range(256)) * 1200)  # 300 KiB raw binary
    r = admin.upload(big)
    assert r.status_code in (200, 400), r.status_code
    assert r.headers.get("Content-Type", "").startswith("application/json"), r.text[:200]
    body = r.json()
    assert "image" in body or "error" in body, body


def test_cancel_with_nothing_running_is_409(admin: Client) -> None:
    admin.wait_idle(timeout=120)
    r = admin.post("plugin/flasher/cancel")
    assert r.status_code == 409, r.text
    assert "error" in r.json()


WRITING_STATES = ("entering_bootloader", "erasing", "writing", "verifying")


@pytest.mark.realtime
def test_flash_refused_while_a_flash_runs_and_connect_is_vetoed(
    admin: Client,
    viewer: Client,
    admin_socket: SocketCollector,
    printer: SimPrinter,
    big_firmware: Path,
) -> None:
    """While a flash runs: a second flash gets 409, OctoPrint's connect is vetoed (the port
    stays the flasher's, so the flash still verifies), and progress goes only to users who may
    flash."""
    admin.wait_idle(timeout=120)
    if admin.connection()["state"] not in ("Closed", "Offline"):
        admin.disconnect_printer()
    viewer_socket = SocketCollector(viewer)
    # OctoPrint answers an authenticated socket with its "history" frame: the viewer's socket is
    # live, so hearing no flash messages on it below means they were withheld, not lost
    poll(
        "the viewer's socket to be authenticated",
        lambda: any("history" in m for m in viewer_socket.since(0)),
        15,
    )
    try:
        uploaded = admin.upload(big_firmware, target=printer.target)
        assert uploaded.status_code == 200, uploaded.text
        image_id = uploaded.json()["image"]["id"]
        mark = admin_socket.mark()
        viewer_mark = viewer_socket.mark()

        started = admin.flash(image_id, printer.target)
        assert started.status_code == 202, started.text

        second = admin.flash(image_id, printer.target)
        assert second.status_code == 409, second.text
        assert second.json()["error"]

        # OctoPrint's own connect, as the Connection panel sends it, once the flasher has the port
        poll(
            "the flasher to open the port",
            lambda: admin.status()["state"] in WRITING_STATES,
            timeout=30,
            interval=0.05,
        )
        r = admin.connect_printer(printer.port, printer.baud)
        assert r.status_code in (204, 400, 409), r.text
        states = set()
        while job_running(admin.status()):
            states.add(admin.connection()["state"])
            time.sleep(0.1)
        assert states, "the flash ended before the connect attempt could be watched"
        assert states <= {"Closed", "Offline"}, f"OctoPrint opened the port mid-flash: {states}"

        status = admin.wait_idle(timeout=180)
        assert status["result"] is not None and status["result"].get("ok") is True, status
        assert any(m.get("type") == "progress" for m in admin_socket.flasher(mark))
        # the push channel is rate limited (10 messages/s), whatever the flasher reports
        times = admin_socket.flasher_times(mark)
        span = times[-1] - times[0]
        assert len(times) <= 10 * span + 3, f"{len(times)} plugin messages in {span:.1f} s"
        assert viewer_socket.flasher(viewer_mark) == [], "a user without FLASH saw flash progress"
    finally:
        viewer_socket.close()
    # the connect was refused, not queued: the printer stays disconnected after the flash
    assert admin.connection()["state"] in ("Closed", "Offline"), admin.connection()


@pytest.mark.realtime
def test_flash_refused_while_printing(
    admin: Client, printer: SimPrinter, new_firmware: Path, tmp_path: Path
) -> None:
    """A print streams G-code over the port the flasher needs: the flash is refused with 409
    and the print goes on (the test firmware answers ``ok`` to every line)."""
    admin.wait_idle(timeout=120)
    if admin.connection()["state"] != "Operational":
        admin.connect_printer(printer.port, printer.baud)
        admin.wait_printer_state("Operational", timeout=60)

    gcode = tmp_path / "long_print.gcode"
    gcode.write_text("".join(f"G1 X{i % 200} Y{(i * 7) % 200} F3000\n" for i in range(40000)))
    with gcode.open("rb") as fh:
        r = admin.post(
            "api/files/local",
            files={"file": (gcode.name, fh, "text/x-gcode")},
            data={"select": "true", "print": "true"},
        )
    assert r.status_code == 201, r.text
    try:
        admin.wait_printer_state("Printing", timeout=30)
        uploaded = admin.upload(new_firmware, target=printer.target)
        assert uploaded.status_code == 200, uploaded.text
        image_id = uploaded.json()["image"]["id"]

        refused = admin.flash(image_id, printer.target)
        assert refused.status_code == 409, refused.text
        assert refused.json()["error"]
        assert admin.connection()["state"] == "Printing", "the refused flash disturbed the print"
        assert not job_running(admin.status()), "the refused flash started anyway"
    finally:
        admin.post("api/job", json={"command": "cancel"})
        poll(
            "the print to stop",
            lambda: admin.connection()["state"] in ("Operational", "Closed", "Error"),
            timeout=60,
        )
    admin.disconnect_printer()


def test_errors_are_json_with_message_cause_hint(admin: Client, tmp_path: Path) -> None:
    bad = tmp_path / "garbage.hex"
    bad.write_text(":10000000ZZ\nthis is not intel hex\n")
    r = admin.upload(bad)
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["error"] and "cause" in body and "hint" in body and body.get("kind"), body

    unknown = admin.flash("no-such-image", {"method": "stk500v1", "port": "/dev/null"})
    assert unknown.status_code == 404, unknown.text
    assert unknown.json()["error"]


def test_bad_target_is_400(admin: Client, new_firmware: Path) -> None:
    uploaded = admin.upload(new_firmware)
    assert uploaded.status_code == 200, uploaded.text
    image_id = uploaded.json()["image"]["id"]
    r = admin.flash(image_id, {"method": "teleport", "port": "/dev/null"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]
    r = admin.post(
        "plugin/flasher/flash",
        data=json.dumps({"image_id": image_id, "target": "not an object", "confirm": True}),
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 400, r.text
