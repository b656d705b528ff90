"""The emulated printer against what real Marlin 2.1.2.7 did (docs/marlin.md, observed
session and receiver table), driven with raw bytes."""

from __future__ import annotations

import time

import pytest
import serial

from octoprint_flasher.protocols import marlin_bft as bft
from tests.emulators.marlin_printer import MarlinPrinter

from .conftest import MakePrinter


class Raw:
    """A host that sends exact bytes and reads exact lines."""

    def __init__(self, printer: MarlinPrinter) -> None:
        self.ser = serial.Serial(printer.port, printer.baud, timeout=0.05)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.ser.write(data)

    def lines(self, quiet: float = 0.05, cap: float = 1.0) -> list[str]:
        """Everything printed until the line was quiet for ``quiet`` seconds."""
        end = time.monotonic() + quiet
        cap = time.monotonic() + cap  # auto-reports never let the line go quiet
        while time.monotonic() < min(end, cap):
            got = self.ser.read(4096)
            if got:
                self.buf += got
                end = time.monotonic() + quiet
        *done, self.buf = self.buf.split(b"\n")
        return [line.decode() for line in done]

    def close(self) -> None:
        self.ser.close()


def test_observed_session_byte_for_byte(make_printer: MakePrinter) -> None:
    printer = make_printer(record=True)
    host = Raw(printer)
    data = bytes(range(256)) * 2  # 512 bytes: 5 full WRITEs and one of 32
    host.send(b"M28 B1\n")
    assert host.lines() == ["echo:Switching to Binary Protocol", "ok"]
    host.send(bft.sync_packet(0))
    assert host.lines() == ["ss0,96,0.1.0"]
    host.send(bft.packet(0, 1, bft.FILE_QUERY))
    assert host.lines() == ["ok0", "PFT:version:0.1.0:compression:heatshrink,8,4"]
    host.send(bft.packet(1, 1, bft.FILE_OPEN, bft.open_payload("rawa.bin")))
    assert host.lines() == [
        "ok1",
        "echo:SD card ok",
        "echo:Now fresh file: rawa.bin",
        "Writing to file: rawa.bin",
        "PFT:success",
    ]
    sync = 2
    for pos in range(0, len(data), 96):
        host.send(bft.packet(sync, 1, bft.FILE_WRITE, data[pos : pos + 96]))
        assert host.lines() == [f"ok{sync}"]  # success is silent apart from the ok
        sync += 1
    host.send(bft.packet(sync, 1, bft.FILE_CLOSE))
    assert host.lines() == [f"ok{sync}", "echo:SD card released", "PFT:success"]
    host.send(bft.close_packet(sync + 1))
    assert host.lines() == [f"ok{sync + 1}"]
    host.send(b"M20\n")  # ASCII again; plain M20 lists no .bin
    assert host.lines() == ["Begin file list", "End file list", "ok"]
    assert printer.file("/RAWA.BIN") == data  # stored 8.3 upper-case
    # the recorded wire: what the host sent is exactly what the framing functions make
    sent = b"".join(chunk for way, chunk in printer.stats.transcript if way == ">")
    assert bft.sync_packet(0) in sent and bft.close_packet(sync + 1) in sent
    host.close()


def enter(host: Raw) -> None:
    host.send(b"M28 B1\n")
    host.lines()


def test_receiver_quirks(make_printer: MakePrinter) -> None:
    printer = make_printer()
    host = Raw(printer)
    enter(host)
    host.send(bft.packet(0, 1, bft.FILE_QUERY))
    assert host.lines()[0] == "ok0"
    # duplicate (our ok was lost): ok again, nothing processed twice
    host.send(bft.packet(0, 1, bft.FILE_QUERY))
    assert host.lines() == ["ok0"]
    # out of order: resend request; while it is pending, wrong syncs are dropped silently
    host.send(bft.packet(5, 1, bft.FILE_QUERY))
    assert host.lines() == ["echo:Datastream packet out of order", "echo:Resend request 1", "rs1"]
    host.send(bft.packet(6, 1, bft.FILE_QUERY))
    assert host.lines() == []
    host.send(bft.packet(1, 1, bft.FILE_QUERY))
    assert host.lines()[0] == "ok1"
    # bad header and bad payload checksums
    bad = bytearray(bft.packet(2, 1, bft.FILE_WRITE, b"xyz"))
    bad[6] ^= 1
    host.send(bytes(bad))
    assert host.lines() == ["echo:Packet header(2?) corrupt", "echo:Resend request 1", "rs2"]
    host.send(bft.packet(2, 1, bft.FILE_OPEN, bft.open_payload("q.bin"))[:-1] + b"\0")
    assert host.lines() == ["echo:Packet(2) payload corrupt", "echo:Resend request 2", "rs2"]
    # half a packet, then silence: dropped after 500 ms (25 ms at this time scale)
    host.send(bft.packet(2, 1, bft.FILE_WRITE, b"abcdef")[:9])
    assert host.lines(0.2) == ["echo:Datastream timeout", "echo:Resend request 3", "rs2"]
    # SYNC answers the expected sync and the buffer, without ok and without a reset
    host.send(bft.sync_packet(77))
    assert host.lines() == ["ss2,96,0.1.0"]
    # WRITE without an open file; an unknown file packet type (Marlin's own "PTF" spelling)
    host.send(bft.packet(2, 1, bft.FILE_WRITE, b"a"))
    assert host.lines() == ["ok2", "PFT:invalid"]
    host.send(bft.packet(3, 1, 9))
    assert host.lines() == ["ok3", "PTF:invalid"]
    # one byte over the buffer: overrun, fe, counter back to 0
    host.send(bft.packet(4, 1, bft.FILE_WRITE, bytes(97)))
    assert host.lines() == ["echo:Datastream packet data buffer overrun", "fe4"]
    host.send(bft.sync_packet(0))
    assert host.lines() == ["ss0,96,0.1.0"]
    host.close()


def test_duplicate_check_misses_at_the_wrap(make_printer: MakePrinter) -> None:
    printer = make_printer()
    host = Raw(printer)
    enter(host)
    printer.sync = 255
    host.send(bft.packet(255, 1, bft.FILE_QUERY))
    assert host.lines()[0] == "ok255"
    host.send(bft.packet(255, 1, bft.FILE_QUERY))  # re-sent: Marlin asks for 0 instead
    assert host.lines() == ["echo:Datastream packet out of order", "echo:Resend request 1", "rs0"]
    host.close()


def test_counter_survives_close_and_a_new_session(make_printer: MakePrinter) -> None:
    printer = make_printer()
    host = Raw(printer)
    enter(host)
    host.send(bft.packet(0, 1, bft.FILE_QUERY))
    host.send(bft.close_packet(1))
    host.lines()
    enter(host)
    host.send(bft.sync_packet(0))
    assert host.lines() == ["ss2,96,0.1.0"]
    host.close()


def test_idle_transfer_is_aborted_and_deleted_after_10_s_but_binary_mode_stays(
    make_printer: MakePrinter,
) -> None:
    printer = make_printer()
    host = Raw(printer)
    enter(host)
    host.send(bft.packet(0, 1, bft.FILE_OPEN, bft.open_payload("fw.bin")))
    host.send(bft.packet(1, 1, bft.FILE_WRITE, b"partial"))
    host.lines()
    assert printer.file("/FW.BIN") == b""
    assert printer.wait_for(lambda: printer.stats.idle_aborts == 1, 2.0)  # 10 s scaled
    assert printer.file("/FW.BIN") is None and printer.binary
    host.send(b"M115\n")  # G-code is not understood in binary mode
    assert host.lines() == []
    host.close()


def test_m997_missing_and_autoreports_in_binary_mode(make_printer: MakePrinter) -> None:
    printer = make_printer(m997=False)
    host = Raw(printer)
    host.send(b"M997\n")
    assert host.lines() == ['echo:Unknown command: "M997"', "ok"]
    host.send(b"M155 S1\n")
    host.lines(cap=0.2)
    host.send(b"M28 B1\n")
    assert any(line.startswith(" T:") for line in host.lines(cap=0.3))  # they keep coming
    host.close()


def test_usb_board_drops_its_port_on_reset_and_comes_back_with_the_same_name(
    make_printer: MakePrinter,
) -> None:
    import os

    printer = make_printer(transport="usb", boot_seconds=4.0)
    host = Raw(printer)
    target = os.path.realpath(printer.port)
    host.send(b"M997\n")
    assert printer.wait_for(lambda: not os.path.exists(printer.port), 1.0)
    with pytest.raises((serial.SerialException, OSError)):
        host.ser.read(1)  # the old handle is dead, as after a USB disconnect
    host.close()
    assert printer.wait_for(lambda: os.path.exists(printer.port), 2.0)
    again = serial.Serial(printer.port, 115200, timeout=1)
    again.write(b"M115\n")
    assert again.readline().startswith(b"FIRMWARE_NAME:")
    again.close()
    assert target.startswith("/dev/pts/")
