"""The demo's BTT SKR Pico through the real OctoPrint: an RP2040 running Klipper on USB
(emulated, on the demo's one emulated USB bus next to the DFU board), flashed over HTTP as the
settings page does it, with the demo's own sample files.

The board's device (Klipper on an RP2040, 1d50:614e) carries the picoboot method, so the page
sends a picoboot target by USB path. A UF2 built for the RP2350 is refused from the file, at
upload and again by the job, before Klipper is asked to reboot; Klipper's klipper.uf2 then
makes it reboot into the boot ROM (1200-baud touch), is written, read back, and Klipper runs
again with exactly the file's bytes in flash. The SKR Pico is not the printer's board, so the
printer stays connected and Operational throughout.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Client, SimPrinter, SocketCollector, page_target, poll
from tests.e2e.test_demo_boards import flash_and_wait, operational_printer, printer_watch

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.realtime,
    pytest.mark.timeout(300, func_only=True),  # see test_security.py
]

RIGHT = "klipper-rp2040-skr-pico.uf2"
WRONG = "wrong-chip-klipper-rp2350.uf2"
KLIPPER_USB = "1d50:614e"


def uf2_flash_bytes(path: Path) -> bytes:
    """What a UF2 puts into flash from 0x10000000 on, read straight from its 512-byte blocks
    (independently of the plugin's loader): to compare with the board's flash."""
    data = path.read_bytes()
    out = bytearray()
    for offset in range(0, len(data), 512):
        _, _, _, address, size = struct.unpack_from("<5I", data, offset)
        at = address - 0x10000000
        out[len(out) :] = b"\xff" * max(0, at + size - len(out))
        out[at : at + size] = data[offset + 32 : offset + 32 + size]
    return bytes(out)


def skr_pico_device(admin: Client) -> dict[str, Any]:
    """The SKR Pico in the plugin's device list (Klipper on an RP2040, found over USB)."""

    def listed() -> Any:
        r = admin.get("plugin/flasher/devices")
        assert r.status_code == 200, r.text
        return next((d for d in r.json()["devices"] if d.get("method") == "picoboot"), None)

    device: dict[str, Any] = poll("the SKR Pico in the device list", listed, 30, 0.5)
    return device


def pico_state(admin: Client) -> dict[str, Any]:
    state: dict[str, Any] = admin.demo_boards()["rp2040"]
    return state


def test_rp2350_uf2_is_refused_untouched_and_klipper_uf2_flashes_the_running_skr_pico(
    admin: Client,
    admin_socket: SocketCollector,
    printer: SimPrinter,
    demo_samples: dict[str, Path],
) -> None:
    operational_printer(admin, printer)
    device = skr_pico_device(admin)
    assert device["kind"] == "usb" and device["usb_id"] == KLIPPER_USB, device
    assert device["chip"] == "RP2040", device
    target = page_target(device)
    assert target == {"method": "picoboot", "usb_path": device["usb_path"], "mcu": "RP2040"}
    before = pico_state(admin)
    assert before["mode"] == "app" and before["usb_id"] == KLIPPER_USB, before
    assert before["usb_path"] == device["usb_path"], before

    with printer_watch(admin, admin_socket) as printer_states:
        # the page's verdict: the UF2's family says RP2350, the board is an RP2040
        r = admin.upload(demo_samples[WRONG], target=target)
        assert r.status_code == 200, r.text
        assert r.json()["image"]["extra"]["uf2"]["family_name"] == "RP2350 Arm secure"
        verdict = r.json()["preflight"]
        assert verdict["ok"] is False, verdict
        assert "RP2350" in verdict["errors"][0]["message"], verdict

        # flashing it anyway is refused by the job before Klipper is asked to reboot
        refused = flash_and_wait(admin, admin_socket, demo_samples[WRONG], target)
        assert refused["ok"] is False, refused
        assert refused["board_state"] == "untouched", refused
        assert "RP2350" in refused["message"], refused
        assert pico_state(admin) == before, "the refused file touched the SKR Pico"

        # Klipper's klipper.uf2 for the RP2040: no warnings, so no "Flash anyway" dialog
        r = admin.upload(demo_samples[RIGHT], target=target)
        assert r.status_code == 200, r.text
        image, verdict = r.json()["image"], r.json()["preflight"]
        assert image["kind"] == "uf2" and image["extra"]["uf2"]["family_name"] == "RP2040"
        assert verdict["ok"] is True and verdict["warnings"] == [], verdict
        done = flash_and_wait(admin, admin_socket, demo_samples[RIGHT], target)

    assert done["ok"] is True, done
    assert done["verified_by"] == "read-back", done
    assert done["warnings"] == [], done  # boot2 + vectors are the picoboot check's, not Cortex-M's
    expected = uf2_flash_bytes(demo_samples[RIGHT])
    assert done["bytes_verified"] >= len(expected), done
    assert (
        f"Klipper answers again on USB ({KLIPPER_USB} at {device['usb_path']})" in (done["message"])
    ), done
    assert done["reconnected"] is None, "the printer was reconnected for a board that is not its"
    after = pico_state(admin)
    assert after["mode"] == "app" and after["present"] is True, after
    assert after["usb_id"] == KLIPPER_USB and after["usb_path"] == before["usb_path"], after
    assert after["touches"] == before["touches"] + 1, after  # one 1200-baud request
    assert after["reboots"] == before["reboots"] + 1, after  # one reboot out of the ROM
    assert after["flash_used"] == len(expected.rstrip(b"\xff")), after
    assert after["flash_sha256"] == hashlib.sha256(expected.rstrip(b"\xff")).hexdigest()
    assert printer_states and set(printer_states) == {"Operational"}, printer_states
