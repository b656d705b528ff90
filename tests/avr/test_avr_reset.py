"""Reset strategies and the serial port opener: what they do to the lines, and the clear errors
they give when a port is missing, busy or has no modem lines."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
import time
from typing import Any, Iterator

import pytest
import serial

from octoprint_flasher.errors import ConnectError
from octoprint_flasher.links.reset import (
    DtrPulse,
    ManualReset,
    NoModemLines,
    ReopenReset,
    arduino_reset,
    reset_chain,
    wiring_reset,
)
from octoprint_flasher.links.serial_port import (
    SerialLink,
    Wire,
    modem_lines_work,
    open_port,
    port_holders,
    set_low_latency,
)


class LineRecorder:
    """A Serial stand-in that records modem-line changes and sleeps in one timeline."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []
        self.is_open = True
        self.port = "recorder"

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("dtr", "rts"):
            self.events.append((name, value))
        object.__setattr__(self, name, value)

    def reset_input_buffer(self) -> None:
        self.events.append(("flush", None))

    def sleep(self, seconds: float) -> None:
        self.events.append(("sleep", seconds))


@pytest.fixture
def pty_port() -> Iterator[str]:
    master, slave = pty.openpty()
    name = os.ttyname(slave)
    os.close(slave)
    yield name
    os.close(master)


@pytest.mark.parametrize(
    "make,off,on",
    [(arduino_reset, 0.25, 0.05), (wiring_reset, 0.05, 0.05)],
)
def test_dtr_pulse_drops_both_lines_then_raises_them(make: Any, off: float, on: float) -> None:
    ser = LineRecorder()
    make(ser.sleep)(SerialLink.wrap(ser, 115200))
    assert ser.events == [
        ("dtr", False),
        ("rts", False),
        ("sleep", off),
        ("flush", None),
        ("dtr", True),
        ("rts", True),
        ("sleep", on),
    ]


def test_a_pty_has_no_modem_lines_and_the_pulse_says_so(pty_port: str) -> None:
    with serial.Serial(pty_port, 115200) as ser:
        assert not modem_lines_work(ser)
        with pytest.raises(NoModemLines):
            DtrPulse(0.0, 0.0, "test")(SerialLink.wrap(ser))


def test_a_transport_handed_in_cannot_be_reset_by_reopening() -> None:
    with pytest.raises(NoModemLines):
        ReopenReset()(SerialLink.wrap(LineRecorder()))


def test_manual_reset_prompts_once() -> None:
    said: list[str] = []
    ManualReset(said.append, window=7)(SerialLink.wrap(LineRecorder()))
    assert said == ["Press the board's reset button now (waiting 7 s for the bootloader)."]


def test_chain_order_is_pulse_open_reopen_button() -> None:
    chain = reset_chain(arduino_reset(), prompt=print)
    assert [s.name for s in chain] == ["arduino", "open", "reopen", "manual"]
    assert [s.name for s in reset_chain(wiring_reset())] == ["wiring", "open", "reopen"]


def test_missing_port_is_named() -> None:
    with pytest.raises(ConnectError) as err:
        open_port("/dev/ttyNOPE-flasher", 115200)
    assert "does not exist" in err.value.message
    assert "detect" in err.value.hint


def test_a_port_held_by_another_process_is_refused_with_its_name(pty_port: str) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys,time; f=open(sys.argv[1]); time.sleep(30)", pty_port]
    )
    try:
        deadline = time.monotonic() + 5
        while not port_holders(pty_port) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [h.pid for h in port_holders(pty_port)] == [holder.pid]
        with pytest.raises(ConnectError) as err:
            open_port(pty_port, 115200)
    finally:
        holder.kill()
        holder.wait()
    assert f"pid {holder.pid}" in err.value.message
    assert "Close the program" in err.value.hint


def test_low_latency_request_is_harmless_where_the_driver_refuses(pty_port: str) -> None:
    with serial.Serial(pty_port, 115200) as ser:
        assert set_low_latency(ser) is False


def test_a_second_exclusive_open_is_refused(pty_port: str) -> None:
    first = open_port(pty_port, 115200)
    try:
        with pytest.raises(ConnectError) as err:
            open_port(pty_port, 115200, check_holders=False)
    finally:
        first.close()
    assert "in use" in err.value.message


def test_wire_read_stops_at_its_deadline(pty_port: str) -> None:
    with serial.Serial(pty_port, 115200) as ser:
        t = time.monotonic()
        assert Wire(ser).read(10, 0.1) == b""
        assert 0.09 <= time.monotonic() - t < 0.5
