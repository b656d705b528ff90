"""Reading klipper.bin's embedded dictionary, the reset-vector rule, and socketcan advice."""

from __future__ import annotations

import json
from pathlib import Path

from octoprint_flasher.image.klipper import check_reset_vector, klipper_build, looks_like_katapult
from octoprint_flasher.links import can_diagnostics as cd
from tests.emulators.klipper_firmware import make_deployer_bin, make_katapult_bin, make_klipper_bin

FIXTURES = Path(__file__).parent / "fixtures"
APP, END = 0x08002000, 0x08080000


def test_embedded_dictionary_of_a_can_build() -> None:
    build = klipper_build(make_klipper_bin("stm32g0b1xx", canbus_frequency=500000))
    assert build is not None
    assert (build.mcu, build.canbus_frequency, build.interface) == ("stm32g0b1xx", 500000, "can")


def test_usb_uart_and_bridge_builds_are_told_apart() -> None:
    usb = klipper_build(make_klipper_bin(canbus_frequency=None))
    uart = klipper_build(make_klipper_bin(canbus_frequency=None, serial_baud=250000))
    bridge = klipper_build(make_klipper_bin(canbus_frequency=1000000, usb_can_bridge=True))
    assert usb is not None and usb.interface == "usb"
    assert uart is not None and uart.interface == "serial"
    assert bridge is not None and bridge.interface == "usb-can-bridge"


def test_no_dictionary_in_katapult_bin() -> None:
    assert klipper_build(make_katapult_bin()) is None


def test_reset_vector_rule() -> None:
    assert check_reset_vector(make_klipper_bin()[:8], APP, END).ok
    assert check_reset_vector(make_deployer_bin()[:8], APP, END).ok
    katapult = make_katapult_bin()
    assert not check_reset_vector(katapult[:8], APP, END).ok
    assert looks_like_katapult(katapult) and looks_like_katapult(make_deployer_bin())
    built_for_8k = make_klipper_bin(app_start=0x08002000)
    assert not check_reset_vector(built_for_8k[:8], 0x08008000, END).ok  # Katapult at 32 KiB


def reader(name: str) -> cd.IpReader:
    row = json.loads((FIXTURES / name).read_text())[0]
    return lambda _channel: row


def codes(name: str, expected: int | None = None) -> set[str]:
    facts = cd.read_facts("can0", reader=reader(name), sysfs=Path("/nonexistent"))
    return {a.code for a in cd.advise(facts, expected)}


def test_seed_frame_errors_point_at_termination() -> None:
    facts = cd.read_facts("can0", reader=reader("seed_can0_frame_errors.json"), sysfs=Path("/x"))
    advice = cd.advise(facts)
    assert [a.code for a in advice] == ["bus-errors"]
    assert "8 receive errors" in advice[0].message and "termination" in advice[0].message


def test_bus_off_without_restart_and_small_queue() -> None:
    found = codes("can0_bus_off.json", expected=1000000)
    assert {"bus-off", "bitrate", "txqueuelen", "bus-errors"} <= found
    facts = cd.read_facts("can0", reader=reader("can0_bus_off.json"), sysfs=Path("/x"))
    bus_off = next(a for a in cd.advise(facts) if a.code == "bus-off")
    assert "restart-ms 100" in bus_off.message


def test_down_and_missing_interfaces() -> None:
    assert codes("can0_down.json") == {"down"}
    missing = cd.advise(cd.read_facts("can9", reader=lambda _c: {"missing": True}))
    assert [a.code for a in missing] == ["missing"]


def test_healthy_interface_gives_no_advice() -> None:
    assert codes("can0_healthy.json", expected=1000000) == set()


def test_sysfs_fills_what_ip_did_not_say(tmp_path: Path) -> None:
    base = tmp_path / "class" / "net" / "can0"
    (base / "statistics").mkdir(parents=True)
    (base / "tx_queue_len").write_text("10\n")
    (base / "statistics" / "rx_over_errors").write_text("3\n")
    facts = cd.read_facts("can0", reader=lambda _c: None, sysfs=tmp_path)
    assert facts.txqueuelen == 10 and facts.rx["over_errors"] == 3
    found = {a.code for a in cd.advise(facts)}
    assert {"txqueuelen", "overrun"} <= found
