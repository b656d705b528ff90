"""Discovery aggregation: serial ports named from USB ids, providers merged, failures as
warnings, and a missing provider module skipped silently."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Optional

import pytest

from octoprint_flasher import discovery
from octoprint_flasher.discovery import Device
from octoprint_flasher.errors import ConnectError


def port(device: str, vid: Optional[int] = None, pid: Optional[int] = None, **kw: Any) -> Any:
    base = {
        "description": "n/a",
        "manufacturer": None,
        "product": None,
        "serial_number": None,
        "location": None,
        "hwid": "n/a",
    }
    base.update(kw)
    return SimpleNamespace(device=device, vid=vid, pid=pid, **base)


PORTS = [
    port("/dev/ttyUSB0", 0x1A86, 0x7523, location="1-1.2"),
    port("/dev/ttyACM0", 0x1D50, 0x6177, manufacturer="katapult", product="stm32g0b1xx"),
    port("/dev/ttyS0"),
]


def providers(table: dict[str, Callable[..., Any]]) -> Callable[[str, str], Any]:
    return lambda module, func: table.get(f"{module}.{func}")


def test_serial_ports_are_named_from_the_usb_table() -> None:
    devs = discovery.serial_devices(lister=lambda: PORTS)
    by_port = {d.port: d for d in devs}
    ch340 = by_port["/dev/ttyUSB0"]
    assert ch340.description.startswith("CH340") and ch340.method == "auto"
    assert ch340.usb_id == "1a86:7523" and ch340.usb_path == "1-1.2"
    kat = by_port["/dev/ttyACM0"]
    assert kat.method == "katapult" and kat.details["product"] == "stm32g0b1xx"
    assert by_port["/dev/ttyS0"].description == "serial port"


def test_extra_port_globs_like_octoprints_additional_ports(tmp_path: Path) -> None:
    for name in ("ttyFLASHER0", "ttyFLASHER1", "other"):
        (tmp_path / name).touch()
    devs = discovery.serial_devices(
        [str(tmp_path / "ttyFLASHER*"), "/dev/does-not-exist"], lister=lambda: []
    )
    assert [d.port for d in devs] == [str(tmp_path / "ttyFLASHER0"), str(tmp_path / "ttyFLASHER1")]


def test_providers_are_merged_and_their_errors_become_warnings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: dict[str, Any] = {}

    def dfu_discover(usb_backend: Any = None) -> list[Device]:
        seen["usb_backend"] = usb_backend
        return [Device(id="usb:1-1.4", kind="usb-dfu", usb_path="1-1.4", vid=0x0483, pid=0xDF11)]

    def katapult_discover(can_bus_factory: Any = None, can_channel: str = "can0") -> Any:
        raise ConnectError("CAN interface can0 does not exist.", hint="ip link set can0 up")

    monkeypatch.setattr(
        discovery,
        "_provider",
        providers({"dfu.discover": dfu_discover, "katapult.discover": katapult_discover}),
    )
    devs = discovery.discover(can=True, usb_backend="BACKEND", port_lister=lambda: PORTS)
    assert seen["usb_backend"] == "BACKEND"
    assert [d.kind for d in devs] == ["serial", "serial", "serial", "usb-dfu"]
    assert devs.warnings == [
        "CAN: CAN interface can0 does not exist.\nWhat to do: ip link set can0 up"
    ]
    doc = devs.to_dict()
    assert doc["devices"][3]["usb_id"] == "0483:df11"


def test_can_is_only_queried_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    called: list[str] = []

    def can_discover(**kw: Any) -> list[Device]:
        called.append("can")
        return []

    monkeypatch.setattr(discovery, "_provider", providers({"katapult.discover": can_discover}))
    discovery.discover(port_lister=lambda: [])
    assert called == []
    discovery.discover(can=True, port_lister=lambda: [])
    assert called == ["can"]


def test_a_provider_returning_dicts_is_adapted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        discovery,
        "_provider",
        providers({"dfu.discover": lambda: [{"id": "x", "kind": "usb-dfu", "serial": "123"}]}),
    )
    devs = discovery.discover(port_lister=lambda: [])
    assert devs[0].id == "x" and devs[0].details == {"serial": "123"}


def test_probe_asks_each_serial_avr_port_and_merges_the_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked: list[str] = []

    def probe(p: str) -> Optional[dict[str, Any]]:
        asked.append(p)
        if p == "/dev/ttyUSB0":
            return {"chip": "ATmega1284P", "method": "stk500v1", "baud": 57600}
        raise ConnectError(f"{p} is busy: OctoPrint is still connected.")

    monkeypatch.setattr(discovery, "_provider", providers({"avr_auto.probe": probe}))
    devs = discovery.discover(probe=True, port_lister=lambda: PORTS)
    by_port = {d.port: d for d in devs}
    assert asked == ["/dev/ttyUSB0", "/dev/ttyS0"]  # never the Katapult port
    assert by_port["/dev/ttyUSB0"].chip == "ATmega1284P"
    assert by_port["/dev/ttyUSB0"].method == "stk500v1"
    assert by_port["/dev/ttyUSB0"].details["probe"]["baud"] == 57600
    assert devs.warnings == ["/dev/ttyS0: /dev/ttyS0 is busy: OctoPrint is still connected."]


def test_missing_provider_modules_are_skipped() -> None:
    assert discovery._provider("no_such_flasher", "discover") is None


def test_unexpected_provider_crash_is_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(usb_backend: Any = None) -> list[Device]:
        raise RuntimeError("libusb exploded")

    monkeypatch.setattr(discovery, "_provider", providers({"dfu.discover": boom}))
    devs = discovery.discover(port_lister=lambda: [])
    assert devs == [] and "libusb exploded" in devs.warnings[0]


def test_device_round_trips_through_dict() -> None:
    dev = Device(id="can:4220d6e9e9f9", kind="can", uuid="4220d6e9e9f9", method="katapult")
    assert Device.from_dict(dev.to_dict()) == dev
