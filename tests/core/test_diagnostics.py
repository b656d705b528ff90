"""Serial-port advice: who holds the port, permissions, missing and vanished ports."""

from __future__ import annotations

import errno
import os
import pty
from pathlib import Path

import pytest
import serial

from octoprint_flasher import diagnostics
from octoprint_flasher.diagnostics import PortHolder
from octoprint_flasher.errors import ConnectError


def fake_proc(root: Path, pid: int, comm: str, cmdline: list[str], fds: list[str]) -> None:
    d = root / str(pid)
    (d / "fd").mkdir(parents=True)
    (d / "comm").write_text(comm + "\n")
    (d / "cmdline").write_bytes(b"\x00".join(a.encode() for a in cmdline) + b"\x00")
    for i, target in enumerate(fds):
        os.symlink(target, d / "fd" / str(i))


def test_holders_are_found_through_proc_fd_links(tmp_path: Path) -> None:
    port = tmp_path / "ttyUSB0"
    port.touch()
    proc = tmp_path / "proc"
    fake_proc(
        proc,
        101,
        "python3",
        ["/opt/octopi/bin/python3", "-m", "octoprint", "serve"],
        ["/dev/null", str(port)],
    )
    fake_proc(proc, 202, "bash", ["bash"], ["/dev/pts/0"])
    holders = diagnostics.port_holders(str(port), proc)
    assert [(h.pid, h.describe()) for h in holders] == [(101, "OctoPrint (pid 101)")]


def test_our_own_open_port_is_found_in_the_real_proc() -> None:
    master, slave = pty.openpty()
    try:
        name = os.ttyname(slave)
        holders = diagnostics.port_holders(name)
        assert os.getpid() in [h.pid for h in holders]
    finally:
        os.close(master)
        os.close(slave)


def test_busy_because_octoprint_is_connected() -> None:
    err = diagnostics.port_busy(
        "/dev/ttyUSB0", [PortHolder(55, "octoprint", "octoprint serve")], own_pid=1
    )
    assert "OctoPrint is still connected" in err.message and "Disconnect" in err.hint


def test_busy_because_this_process_still_holds_it() -> None:
    err = diagnostics.port_busy("/dev/ttyUSB0", [PortHolder(7, "python3", "x")], own_pid=7)
    assert "OctoPrint is still connected" in err.message


def test_busy_because_klipper_runs() -> None:
    err = diagnostics.port_busy(
        "/dev/ttyACM0", [PortHolder(9, "python", "/home/pi/klippy-env/bin/python klippy.py")], 1
    )
    assert "Klipper (pid 9)" in err.message and "systemctl stop klipper" in err.hint


def test_busy_holder_unknown() -> None:
    err = diagnostics.port_busy("/dev/ttyUSB0", [], own_pid=1)
    assert "held by another program" in err.message and err.hint


def test_from_os_error_maps_errnos() -> None:
    busy = diagnostics.from_os_error(
        "/dev/ttyUSB0",
        serial.SerialException(errno.EBUSY, "could not open port /dev/ttyUSB0: [Errno 16]"),
        holders_finder=lambda p: [PortHolder(3, "screen", "screen /dev/ttyUSB0 115200")],
    )
    assert isinstance(busy, ConnectError) and "screen (pid 3)" in busy.message

    denied = diagnostics.from_os_error("/dev/ttyUSB0", PermissionError(errno.EACCES, "denied"))
    assert "Permission denied" in denied.message and "usermod -a -G" in denied.hint

    missing = diagnostics.from_os_error("/dev/ttyNOPE9", FileNotFoundError(errno.ENOENT, "x"))
    assert "There is no serial port /dev/ttyNOPE9" in missing.message
    assert "Ports that exist now:" in missing.hint

    gone = diagnostics.from_os_error("/dev/null", OSError(errno.EIO, "I/O error"))
    assert "disappeared" in gone.message
    assert gone.__cause__ is not None


def test_missing_port_lists_the_alternatives() -> None:
    err = diagnostics.port_missing("/dev/ttyUSB0", ["/dev/ttyUSB1", "/dev/ttyACM0"])
    assert "/dev/ttyUSB1, /dev/ttyACM0" in err.hint


@pytest.mark.parametrize("text", ["[Errno 13] could not open port: Permission denied"])
def test_errno_is_recovered_from_text_when_missing(text: str) -> None:
    err = diagnostics.from_os_error("/dev/ttyUSB0", serial.SerialException(text))
    assert "Permission denied opening" in err.message
