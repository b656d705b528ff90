"""The demo's second boards through the real OctoPrint: the emulated STM32F446 in ROM DFU and
the emulated Katapult CAN node running Klipper (demo/flasher_demo_transports.py, installed in
the e2e server as the demo installs it), with the demo's own sample files.

Each board first gets the file a newcomer could wrongly pick: it is refused before that board
is touched (the DFU board is still waiting in DFU with nothing erased; the CAN node was never
asked to reboot), and then the right file flashes without restarting anything. Neither board is
the printer's, so the printer stays connected and Operational throughout.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Client, SimPrinter, SocketCollector, page_target

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.realtime,
    pytest.mark.timeout(300, func_only=True),  # see test_security.py
]

DFU_RIGHT = "klipper-stm32f446-dfu.bin"
DFU_WRONG = "wrong-chip-klipper-stm32f407.bin"
CAN_RIGHT = "klipper-stm32g0b1-katapult.bin"
CAN_WRONG = "wrong-canboot.bin"


@contextmanager
def printer_watch(admin: Client, socket: SocketCollector) -> Iterator[list[str]]:
    """Every connection state the printer was seen in while the block ran: polled from
    ``/api/connection`` and read from the push socket's ``current.state`` frames."""
    seen: list[str] = []
    stop = threading.Event()
    mark = socket.mark()

    def watch() -> None:
        while not stop.wait(0.1):
            seen.append(str(admin.connection().get("state")))

    thread = threading.Thread(target=watch, name="printer-watch", daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join(timeout=5)
        for m in socket.since(mark):
            state = (m.get("current") or {}).get("state") or {}
            if state.get("text"):
                seen.append(str(state["text"]))
        events = [e.get("type") for e in socket.events(mark)]
        seen.extend(e for e in events if e in ("Disconnecting", "Disconnected", "Connecting"))


def operational_printer(admin: Client, printer: SimPrinter) -> None:
    admin.wait_idle(timeout=120)
    if admin.connection()["state"] != "Operational":
        r = admin.connect_printer(printer.port, printer.baud)
        assert r.status_code == 204, r.text
    admin.wait_printer_state("Operational", timeout=60)


def flash_and_wait(
    admin: Client, socket: SocketCollector, path: Path, target: dict[str, Any]
) -> dict[str, Any]:
    """Upload ``path``, flash it (confirmed, as the page does after its dialog) and return the
    job's result once it has ended."""
    uploaded = admin.upload(path, target=target)
    assert uploaded.status_code == 200, uploaded.text
    mark = socket.mark()
    started = admin.flash(uploaded.json()["image"]["id"], target)
    assert started.status_code == 202, started.text
    socket.wait_for(
        "the flash result",
        lambda: any(m.get("type") == "result" for m in socket.flasher(mark)),
        timeout=180,
    )
    result: dict[str, Any] = admin.wait_idle(timeout=60)["result"]
    return result


def test_dfu_wrong_chip_is_refused_untouched_and_the_right_file_then_flashes(
    admin: Client,
    admin_socket: SocketCollector,
    printer: SimPrinter,
    demo_samples: dict[str, Path],
) -> None:
    operational_printer(admin, printer)
    if admin.demo_boards()["dfu"]["mode"] != "dfu":  # an earlier run of this server flashed it
        admin.press_dfu_reset()
    target = page_target(admin.find_device("usb-dfu"))
    assert target["mcu"] == "STM32F446", target
    before = admin.demo_boards()["dfu"]

    with printer_watch(admin, admin_socket) as printer_states:
        # the page's verdict: refused from the file alone (its Klipper dictionary names the MCU)
        r = admin.upload(demo_samples[DFU_WRONG], target=target)
        assert r.status_code == 200, r.text
        verdict = r.json()["preflight"]
        assert verdict["ok"] is False, verdict
        assert "stm32f407" in verdict["errors"][0]["message"].lower(), verdict

        # flashing it anyway (the page offers no button; the API still checks) is refused by
        # the job before the DFU device is opened: nothing erased, still in DFU
        refused = flash_and_wait(admin, admin_socket, demo_samples[DFU_WRONG], target)
        assert refused["ok"] is False, refused
        assert refused["board_state"] == "untouched", refused
        assert "stm32f407" in refused["message"].lower(), refused
        after = admin.demo_boards()["dfu"]
        assert after["mode"] == "dfu" and after["present"] is True, after
        assert after["erased"] == before["erased"], after
        assert after["bytes_programmed"] == before["bytes_programmed"], after

        # the right file: it places itself at 0x08000000 by its vector table and flashes
        r = admin.upload(demo_samples[DFU_RIGHT], target=target)
        assert r.status_code == 200, r.text
        verdict = r.json()["preflight"]
        assert verdict["ok"] is True, verdict
        assert verdict["facts"]["written_at"] == "0x08000000", verdict
        done = flash_and_wait(admin, admin_socket, demo_samples[DFU_RIGHT], target)

    assert done["ok"] is True, done
    assert done["verified_by"] == "read-back", done
    assert done["bytes_verified"] >= demo_samples[DFU_RIGHT].stat().st_size, done
    assert done["reconnected"] is None, "the printer was reconnected for a board that is not its"
    board = admin.demo_boards()["dfu"]
    assert board["head"] == demo_samples[DFU_RIGHT].read_bytes()[:8].hex(), board
    assert board["mode"] == "app", board  # left DFU into the new application
    assert printer_states and set(printer_states) == {"Operational"}, printer_states


def test_katapult_canboot_is_refused_without_rebooting_the_node_and_klipper_then_flashes(
    admin: Client,
    admin_socket: SocketCollector,
    printer: SimPrinter,
    demo_samples: dict[str, Path],
) -> None:
    operational_printer(admin, printer)
    node = admin.find_device("can")
    target = page_target(node)
    before = admin.demo_boards()["katapult"]
    assert before["uuid"] == node["uuid"] and before["mode"] == "klipper", before

    with printer_watch(admin, admin_socket) as printer_states:
        r = admin.upload(demo_samples[CAN_WRONG], target=target)
        assert r.status_code == 200, r.text
        verdict = r.json()["preflight"]
        assert verdict["ok"] is False, verdict
        assert "katapult bootloader itself" in verdict["errors"][0]["message"].lower(), verdict

        refused = flash_and_wait(admin, admin_socket, demo_samples[CAN_WRONG], target)
        assert refused["ok"] is False, refused
        assert refused["board_state"] == "untouched", refused
        after = admin.demo_boards()["katapult"]
        assert after["events"] == before["events"], "the refused file rebooted the node"
        assert after["boots"] == before["boots"] and after["mode"] == "klipper", after

        done = flash_and_wait(admin, admin_socket, demo_samples[CAN_RIGHT], target)

    assert done["ok"] is True, done
    assert done["verified_by"] == "read-back", done
    assert "klipper answers on the can bus" in done["confirmation"].lower(), done
    assert done["reconnected"] is None, done
    now = admin.demo_boards()["katapult"]
    new_events = now["events"][len(before["events"]) :]
    assert "reboot -> katapult" in new_events and new_events[-1] == "klipper running", now
    assert now["mode"] == "klipper", now
    assert printer_states and set(printer_states) == {"Operational"}, printer_states
