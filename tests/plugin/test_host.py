"""OctoPrintHost: remember the connection, hold the port, reconnect with the same triple."""

from __future__ import annotations

from typing import Any

import pytest

from octoprint_flasher.errors import ConnectError
from octoprint_flasher.plugin.host import HostOptions, OctoPrintHost
from tests.plugin.fakes import FakePrinter


class Clock:
    """Fake time: sleeping advances it, so timeouts run instantly."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def make_host(printer: FakePrinter, **options: object) -> tuple[OctoPrintHost, Clock, list]:
    clock = Clock()
    lines: list[str] = []
    opts = HostOptions(**{"settle_delay": 0.0, **options})  # type: ignore[arg-type]
    return OctoPrintHost(printer, opts, lines.append, clock.sleep, clock.time), clock, lines


def test_disconnect_remembers_port_baud_and_profile_id() -> None:
    printer = FakePrinter()
    host, _clock, _lines = make_host(printer)
    host.disconnect()
    assert printer.disconnects == 1
    assert host.remembered is not None
    assert (host.remembered.port, host.remembered.baudrate) == ("/dev/ttyUSB0", 115200)
    assert host.remembered.profile_id == "anet_a8"


def test_reconnect_passes_the_profile_id_and_waits_for_operational() -> None:
    printer = FakePrinter()
    host, _clock, lines = make_host(printer)
    host.disconnect()
    host.reconnect()
    assert printer.connects == [{"port": "/dev/ttyUSB0", "baudrate": 115200, "profile": "anet_a8"}]
    assert "Printer is Operational again." in lines


def test_heaters_off_gcode_goes_out_before_the_disconnect() -> None:
    printer = FakePrinter()
    host, _clock, _lines = make_host(printer, pre_gcode="M104 S0 ; hotend\nM140 S0\n\n")
    host.disconnect()
    assert printer.sent == ["M104 S0", "M140 S0"]


def test_post_gcode_is_sent_once_operational() -> None:
    printer = FakePrinter()
    host, _clock, _lines = make_host(printer, post_gcode="M115")
    host.disconnect()
    host.reconnect()
    assert printer.sent == ["M115"]


def test_settle_delay_before_reconnecting_lets_the_new_firmware_boot() -> None:
    printer = FakePrinter()
    host, clock, _lines = make_host(printer, settle_delay=2.5)
    host.disconnect()
    host.reconnect()
    assert clock.slept[:2] == [2.5, 2.5]


def test_a_printer_that_was_not_connected_is_not_connected_afterwards() -> None:
    printer = FakePrinter()
    printer.state = "CLOSED"
    host, _clock, lines = make_host(printer)
    host.disconnect()
    host.reconnect()
    assert printer.disconnects == 0 and printer.connects == []
    assert any("not connected" in line for line in lines)


def test_reconnect_can_be_switched_off() -> None:
    printer = FakePrinter()
    host, _clock, _lines = make_host(printer, reconnect=False)
    host.disconnect()
    host.reconnect()
    assert printer.connects == []
    assert host.veto_connect() is False


def test_a_printer_that_errors_after_reconnect_is_reported_with_its_error() -> None:
    printer = FakePrinter()
    printer.comes_back = False
    host, _clock, _lines = make_host(printer)
    host.disconnect()
    with pytest.raises(ConnectError) as err:
        host.reconnect()
    assert "No more candidates" in err.value.message
    assert "baud rate" in err.value.cause
    assert host.veto_connect() is False


def test_a_printer_that_never_gets_operational_times_out_with_advice() -> None:
    printer = FakePrinter()
    host, clock, _lines = make_host(printer, reconnect_timeout=10)
    host.disconnect()

    def connect_but_hang(**kwargs: Any) -> None:
        printer.connects.append(dict(kwargs))
        printer.state = "DETECT_SERIAL"

    printer.connect = connect_but_hang  # type: ignore[method-assign,assignment]
    with pytest.raises(ConnectError) as err:
        host.reconnect()
    assert "not Operational 10 s" in err.value.message
    assert clock.now >= 10


def test_a_port_octoprint_cannot_open_names_who_holds_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from octoprint_flasher.diagnostics import PortHolder
    from octoprint_flasher.plugin import host as host_module

    printer = FakePrinter()
    host, _clock, _lines = make_host(printer, reconnect_timeout=5)
    host.disconnect()
    monkeypatch.setattr(
        host_module, "port_holders", lambda port: [PortHolder(4242, "screen", "screen " + port)]
    )

    def connect_but_cannot_open(**kwargs: Any) -> None:
        printer.connects.append(dict(kwargs))
        printer.state = "OPEN_SERIAL"

    printer.connect = connect_but_cannot_open  # type: ignore[method-assign,assignment]
    with pytest.raises(ConnectError) as err:
        host.reconnect()
    assert "held by screen (pid 4242)" in err.value.cause


def test_the_port_is_held_from_disconnect_until_reconnect() -> None:
    printer = FakePrinter()
    host, _clock, _lines = make_host(printer)
    assert host.veto_connect() is False
    host.disconnect()
    assert host.veto_connect() is True
    vetoed_during_own_connect = []
    original = printer.connect

    def connect(**kwargs: Any) -> None:
        vetoed_during_own_connect.append(host.veto_connect())
        original(**kwargs)

    printer.connect = connect  # type: ignore[method-assign,assignment]
    host.reconnect()
    assert vetoed_during_own_connect == [False]
    assert host.veto_connect() is False


def test_printing_or_paused_counts_as_printing() -> None:
    printer = FakePrinter()
    host, _clock, _lines = make_host(printer)
    assert host.is_printing() is False
    printer.printing = True
    assert host.is_printing() is True
