"""Prusa devices named from their USB ids, and the MMU followed across re-enumeration by its
USB location and serial number."""

from __future__ import annotations

from typing import Any

from octoprint_flasher import discovery
from octoprint_flasher.links import usb_follow
from octoprint_flasher.links.bootloader_entry import UsbPort


def ports() -> list[UsbPort]:
    return [
        UsbPort(
            "/dev/ttyACM0",
            0x2C99,
            0x0002,
            "CZPX01",
            "Prusa Research",
            "Original Prusa i3 MK3",
            "1-1.2",
        ),
        UsbPort("/dev/ttyACM1", 0x2C99, 0x0004, "MMU01", "Prusa Research", "MMU", "1-1.4"),
        UsbPort("/dev/ttyACM2", 0x2C99, 0x000D, "MK4-1", "Prusa Research", "MK4", "1-1.5"),
        UsbPort("/dev/ttyACM3", 0x2C99, 0x0008, "CW1-1", "Prusa Research", "CW1", "1-1.6"),
    ]


def test_prusa_usb_ids_pick_the_method_and_buddy_printers_are_labelled() -> None:
    found = {d.port: d for d in discovery.serial_devices(lister=ports)}
    assert found["/dev/ttyACM0"].method == "prusa"
    assert "MK3" in found["/dev/ttyACM0"].description
    assert found["/dev/ttyACM1"].method == "avr109" and "MMU" in found["/dev/ttyACM1"].description
    assert found["/dev/ttyACM3"].method == "avr109"
    buddy = found["/dev/ttyACM2"]
    assert buddy.method is None
    assert "Not supported here: use the USB stick or PrusaLink" in buddy.hint
    assert found["/dev/ttyACM1"].usb_path == "1-1.4"


def test_the_bootloader_is_matched_by_location_then_serial_never_by_id_alone() -> None:
    boot = (0x2C99, 0x0003)
    other = UsbPort("/dev/ttyACM7", 0x2C99, 0x0003, "MMU02", location="1-1.7")
    mine = UsbPort("/dev/ttyACM9", 0x2C99, 0x0003, "MMU01", location="1-1.4")
    assert usb_follow.match_port([other, mine], [boot], "1-1.4", "MMU01") is mine
    moved = UsbPort("/dev/ttyACM9", 0x2C99, 0x0003, "MMU01", location="2-1")
    assert usb_follow.match_port([other, moved], [boot], "1-1.4", "MMU01") is moved
    assert usb_follow.match_port([other], [boot], "1-1.4", "MMU01") is None
    # nothing known about the device: only a single new bootloader is taken
    assert (
        usb_follow.match_port([other, mine], [boot], None, None, exclude=["/dev/ttyACM7"]) is mine
    )
    assert usb_follow.match_port([other, mine], [boot], None, None) is None


def test_auto_picks_prusa_for_the_printer_and_avr109_for_the_mmu(monkeypatch: Any) -> None:
    from octoprint_flasher.flashers import auto
    from octoprint_flasher.target import Target

    monkeypatch.setattr(auto, "list_serial_ports", ports)
    assert auto.choose_method(Target(port="/dev/ttyACM0"))[0] == "prusa"
    assert auto.choose_method(Target(port="/dev/ttyACM1"))[0] == "avr109"
    assert auto.choose_method(Target(port="/dev/ttyACM3"))[0] == "avr109"
