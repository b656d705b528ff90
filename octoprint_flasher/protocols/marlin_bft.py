"""Marlin's binary file transfer ("Mark II", protocol 0.1.0) and the G-code lines around it.

A stop-and-wait packet protocol: 8-byte header (``AD B5`` token, sync, protocol/type nibbles,
LE16 payload length, LE16 Fletcher-16 of bytes 2..5), then an optional payload and an LE16
Fletcher-16 footer over everything after the token. The printer answers ``ok<n>``,
``rs<n>`` (resend from n), ``fe<n>`` (fatal, counter reset) or ``ss<n>,<buffer>,<version>``;
file results come as separate ``PFT:`` lines *after* the ``ok``. Layouts and receiver quirks
follow ``docs/marlin.md`` (from Marlin 2.1.2.7's ``feature/binary_stream.h``, as observed).

The framing functions are pure. :class:`BftSession` drives one transfer over a byte stream
(``links.serial_port.Wire`` or anything with ``write``/``read(n, timeout)``), with resend,
duplicate handling, capped retries, a smaller block after repeated resends, and a guaranteed
exit from binary mode: a printer left in it ignores all G-code until it is power-cycled.
"""

from __future__ import annotations

import re
import struct
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol

from ..errors import ConnectError, ProtocolError

TOKEN = b"\xad\xb5"
HEADER_SIZE = 8

PROTOCOL_CONTROL = 0
PROTOCOL_FILE = 1
CONTROL_SYNC = 1
CONTROL_CLOSE = 2
FILE_QUERY = 0
FILE_OPEN = 1
FILE_CLOSE = 2
FILE_WRITE = 3
FILE_ABORT = 4

#: Marlin's default MAX_CMD_SIZE, the payload limit when ``ss`` has not been read yet
DEFAULT_BUFFER = 96
#: the printer drops a half-received packet after this much silence (PACKET_MAX_WAIT)
PACKET_MAX_WAIT = 0.5
#: an open transfer with no file packet for this long is aborted and deleted (TIMEOUT)
IDLE_ABORT = 10.0
#: the block size a 64-byte UART receive ring survives while Marlin writes to SD (#21326)
SMALL_BLOCK = 48


def fletcher16(data: bytes, start: int = 0) -> int:
    """Marlin's Fletcher-16 (both sums mod 255), continuing from ``start`` (high<<8 | low)."""
    low, high = start & 0xFF, start >> 8
    for byte in data:
        low = (low + byte) % 255
        high = (high + low) % 255
    return (high << 8) | low


def header(sync: int, protocol: int, ptype: int, length: int) -> bytes:
    """The 8 header bytes: token, the 4 described bytes, their checksum."""
    body = struct.pack("<BBH", sync & 0xFF, ((protocol & 0xF) << 4) | (ptype & 0xF), length)
    return TOKEN + body + struct.pack("<H", fletcher16(body))


def packet(sync: int, protocol: int, ptype: int, payload: bytes = b"") -> bytes:
    """A whole packet. A payload gets a footer over header (with its checksum) + payload; an
    empty one gets none."""
    head = header(sync, protocol, ptype, len(payload))
    if not payload:
        return head
    return head + payload + struct.pack("<H", fletcher16(head[2:] + payload))


def open_payload(name: str, *, dummy: bool = False, compress: bool = False) -> bytes:
    """OPEN's payload: dummy flag, compression flag, the path, NUL."""
    return bytes([int(dummy), int(compress)]) + name.encode("ascii") + b"\0"


def sync_packet(sync: int = 0) -> bytes:
    return packet(sync, PROTOCOL_CONTROL, CONTROL_SYNC)


def close_packet(sync: int) -> bytes:
    """Control CLOSE: leave binary mode."""
    return packet(sync, PROTOCOL_CONTROL, CONTROL_CLOSE)


@dataclass(frozen=True)
class Header:
    sync: int
    protocol: int
    ptype: int
    length: int
    checksum: int

    @property
    def valid(self) -> bool:
        return fletcher16(self.raw_body()) == self.checksum

    def raw_body(self) -> bytes:
        return struct.pack("<BBH", self.sync, (self.protocol << 4) | self.ptype, self.length)


def parse_header(raw: bytes) -> Header:
    """Decode 8 header bytes (token included); checksum validity is :attr:`Header.valid`."""
    if len(raw) != HEADER_SIZE or raw[:2] != TOKEN:
        raise ValueError("not a BFT header")
    sync, meta, length, checksum = struct.unpack_from("<BBHH", raw, 2)
    return Header(sync, meta >> 4, meta & 0xF, length, checksum)


# --- printer lines ------------------------------------------------------------------------

_RE_OK = re.compile(r"^ok(\d+)$")
_RE_RS = re.compile(r"^rs(\d+)$")
_RE_FE = re.compile(r"^fe(\d+)$")
_RE_SS = re.compile(r"^ss(\d+),(\d+),(\d+\.\d+\.\d+)$")


@dataclass(frozen=True)
class Reply:
    """One printer line, classified. ``kind``: ok, rs, fe, ss, pft or other."""

    kind: str
    sync: int = -1
    text: str = ""
    buffer_size: int = 0
    version: str = ""


def parse_reply(line: str) -> Reply:
    """Exact tokens only: an ``echo:`` or temperature line never passes for a reply, and a
    ``PTF:`` (Marlin's own spelling for an unknown file packet type) counts as ``PFT:``."""
    line = line.strip()
    for kind, rx in (("ok", _RE_OK), ("rs", _RE_RS), ("fe", _RE_FE)):
        m = rx.match(line)
        if m:
            return Reply(kind, int(m.group(1)) & 0xFF)
    m = _RE_SS.match(line)
    if m:
        return Reply("ss", int(m.group(1)) & 0xFF, buffer_size=int(m.group(2)), version=m.group(3))
    if line.startswith(("PFT:", "PTF:")):
        return Reply("pft", text=line[4:])
    return Reply("other", text=line)


def query_compression(text: str) -> Optional[tuple[int, int]]:
    """(window, lookahead) from a QUERY answer's text after ``PFT:``, or None for ``none``.
    The 2021 sources spell the key ``compresion``: the last field is read, not the word."""
    fields = text.split(":")
    if len(fields) < 2 or not fields[-2].startswith("compres"):
        return None
    parts = fields[-1].split(",")
    if parts[0] != "heatshrink" or len(parts) != 3:
        return None
    return int(parts[1]), int(parts[2])


# --- G-code answers ------------------------------------------------------------------------


@dataclass
class MarlinReport:
    """What M115 said: the FIRMWARE_NAME up to its build stamp, the other fields, the caps."""

    firmware_name: str = ""
    fields: dict[str, str] = field(default_factory=dict)
    caps: dict[str, bool] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)

    def cap(self, name: str) -> bool:
        return self.caps.get(name, False)

    @property
    def machine(self) -> str:
        return self.fields.get("MACHINE_TYPE", "")

    @property
    def is_marlin(self) -> bool:
        return self.firmware_name.startswith("Marlin")


_M115_KEYS = (
    "FIRMWARE_NAME",
    "SOURCE_CODE_URL",
    "PROTOCOL_VERSION",
    "MACHINE_TYPE",
    "EXTRUDER_COUNT",
    "UUID",
)


def firmware_name_key(text: str) -> str:
    """The comparable part of a FIRMWARE_NAME: up to and including the first ``)`` (Marlin's
    ``<version> (<date> <time>)``), else the whole value; whitespace runs kept (``Dec  6``)."""
    close = text.find(")")
    return (text[: close + 1] if close >= 0 else text).strip()


def parse_m115(lines: list[str]) -> MarlinReport:
    """Parse the M115 answer: the FIRMWARE_NAME line and ``Cap:NAME:0|1`` lines."""
    report = MarlinReport(lines=list(lines))
    for raw in lines:
        line = raw.strip()
        if line.startswith("Cap:"):
            name, _, value = line[4:].rpartition(":")
            if name:
                report.caps[name] = value.strip() == "1"
            continue
        if "FIRMWARE_NAME:" not in line:
            continue
        line = line[line.index("FIRMWARE_NAME:") :]
        # values contain spaces; each field ends where the next known key starts
        spans = sorted((line.find(f"{k}:"), k) for k in _M115_KEYS if line.find(f"{k}:") >= 0)
        for i, (pos, key) in enumerate(spans):
            end = spans[i + 1][0] if i + 1 < len(spans) else len(line)
            report.fields[key] = line[pos + len(key) + 1 : end].strip()
        report.firmware_name = firmware_name_key(report.fields.get("FIRMWARE_NAME", ""))
    return report


def sd_card_ok(lines: list[str]) -> Optional[bool]:
    """M21's verdict: True for ``echo:SD card ok``, False for a missing/failed card, None if
    the answer says neither."""
    for line in lines:
        low = line.lower()
        if "sd card ok" in low:
            return True
        if "no sd card" in low or "sd init fail" in low or "no media" in low:
            return False
    return None


def parse_listing(lines: list[str]) -> list[tuple[str, int]]:
    """(name, size) pairs from an M20 answer between ``Begin file list`` and ``End file
    list``; Marlin prints ``NAME.GCO 1234`` (long names optional after the size)."""
    out: list[tuple[str, int]] = []
    inside = False
    for line in lines:
        text = line.strip()
        if text == "Begin file list":
            inside = True
        elif text == "End file list":
            inside = False
        elif inside and text:
            parts = text.split(" ")
            size = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else -1
            out.append((parts[0], size))
    return out


def parse_file_opened(lines: list[str]) -> Optional[int]:
    """The size from M23's ``File opened: NAME Size: N``; None when it said ``open failed``."""
    for line in lines:
        m = re.search(r"File opened:\s*\S+\s+Size:\s*(\d+)", line)
        if m:
            return int(m.group(1))
    return None


# --- session --------------------------------------------------------------------------------


class ByteStream(Protocol):
    def write(self, data: bytes) -> None: ...

    def read(self, n: int, timeout: float) -> bytes: ...


LogFn = Callable[[str], None]


def _no_log(_line: str) -> None:
    pass


def _waiting(stream: object) -> int:
    """Bytes already received by the port under ``stream`` (a Wire's ``ser``), 0 if unknown."""
    ser = getattr(stream, "ser", stream)
    try:
        return int(getattr(ser, "in_waiting", 0) or 0)
    except (OSError, ValueError, TypeError):
        return 0


class LineReader:
    """Splits the printer's output into lines; keeps a partial line for the next read."""

    def __init__(self, stream: ByteStream, log: LogFn = _no_log) -> None:
        self.stream = stream
        self.log = log
        self._buf = bytearray()

    def next_line(self, timeout: float) -> Optional[str]:
        """One line, or None when ``timeout`` passed without a whole one."""
        deadline = time.monotonic() + timeout
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                raw = bytes(self._buf[:nl])
                del self._buf[: nl + 1]
                line = raw.decode("ascii", "replace").strip("\r\x00 ")
                if line:
                    return line
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            # one byte with a deadline, then whatever else is already there: a stream's
            # read(n, timeout) waits for all n bytes
            chunk = self.stream.read(1, min(left, 0.05))
            if chunk:
                self._buf += chunk
                more = _waiting(self.stream)
                if more:
                    self._buf += self.stream.read(more, 0.05)

    def pending(self) -> list[str]:
        """Whole lines that already arrived, without waiting (called after every WRITE)."""
        more = _waiting(self.stream)
        if more:
            self._buf += self.stream.read(more, 0.05)
        out: list[str] = []
        while self._buf.find(b"\n") >= 0:
            line = self.next_line(0.0)
            if line is None:
                break
            out.append(line)
        return out


@dataclass
class TransferStats:
    packets: int = 0
    resends: int = 0
    timeouts: int = 0
    duplicates: int = 0
    block_size: int = 0
    smaller_blocks: int = 0
    pft_lines: list[str] = field(default_factory=list)


class TransferError(ProtocolError):
    """The transfer failed in a way the printer told us (or stayed silent about)."""


class BftSession:
    """One binary-mode session: M28 B1, SYNC, file packets, CLOSE.

    Use as a context manager: leaving it always sends control CLOSE (and, if a file is open
    and was not closed, ABORT first), so an exception or a cancel never leaves the printer
    deaf to G-code."""

    def __init__(
        self,
        stream: ByteStream,
        log: LogFn = _no_log,
        *,
        ack_timeout: float = 1.0,
        max_retries: int = 10,
        resends_before_smaller: int = 3,
        gcode_timeout: float = 5.0,
    ) -> None:
        self.stream = stream
        self.log = log
        self.reader = LineReader(stream, log)
        self.ack_timeout = ack_timeout
        self.max_retries = max_retries
        self.resends_before_smaller = resends_before_smaller
        self.gcode_timeout = gcode_timeout
        self.sync = 0
        self.buffer_size = DEFAULT_BUFFER
        self.version = ""
        self.active = False
        self.file_open = False
        self.stats = TransferStats()
        self._late: list[str] = []  # PFT lines that arrived after an ok

    # -- ASCII --

    def command(self, line: str, timeout: Optional[float] = None) -> list[str]:
        """Send one G-code line, return the lines up to its plain ``ok``."""
        self.stream.write(line.encode("ascii") + b"\n")
        got: list[str] = []
        deadline = time.monotonic() + (timeout or self.gcode_timeout)
        while True:
            text = self.reader.next_line(max(0.0, deadline - time.monotonic()))
            if text is None:
                raise ConnectError(
                    f"The printer did not answer {line!r}.",
                    cause="The port is not a Marlin printer, the baud rate is wrong, or the "
                    "printer is still in binary transfer mode from an earlier upload.",
                    hint="Check the port and baud rate; if an upload was interrupted, use "
                    "'octoprint-flasher rescue-bft --port PORT' (or power-cycle the printer).",
                )
            if text == "ok" or text.startswith("ok "):
                return got
            got.append(text)

    # -- binary mode --

    def start(self) -> None:
        """Enter binary mode and SYNC: learn the expected sync and the buffer size."""
        lines = self.command("M28 B1")
        self.log("M28 B1: " + " | ".join(lines))
        self.active = True
        self.resync()

    def resync(self) -> None:
        for _ in range(self.max_retries):
            self.stream.write(sync_packet(self.sync))
            deadline = time.monotonic() + self.ack_timeout
            while True:
                line = self.reader.next_line(max(0.0, deadline - time.monotonic()))
                if line is None:
                    break
                reply = parse_reply(line)
                if reply.kind == "ss":
                    self.sync, self.buffer_size, self.version = (
                        reply.sync,
                        reply.buffer_size,
                        reply.version,
                    )
                    self.log(
                        f"SYNC: expected sync {self.sync}, buffer {self.buffer_size} B, "
                        f"protocol {self.version}"
                    )
                    return
                self._note(reply, line)
        raise TransferError(
            "The printer did not answer the binary transfer SYNC.",
            cause="It did not switch to binary mode (M28 B1), or the link loses bytes.",
            hint="Check that the firmware has BINARY_FILE_TRANSFER and try again.",
        )

    def _note(self, reply: Reply, line: str) -> None:
        if reply.kind == "pft":
            self._late.append(reply.text)
            self.stats.pft_lines.append(reply.text)
        elif reply.kind == "other":
            self.log(f"printer: {line}")

    def send(self, protocol: int, ptype: int, payload: bytes = b"") -> None:
        """Send one packet until it is acknowledged.

        ``rs<ours+1>`` means the printer already has it (Marlin's duplicate check misses at
        the 255->0 wrap); a timeout resends the same sync (a duplicate is answered ``ok``
        and not written twice); ``fe`` resyncs and resends once the payload fits."""
        tries = 0
        while True:
            self.stream.write(packet(self.sync, protocol, ptype, payload))
            self.stats.packets += 1
            outcome = self._await_ack()
            if outcome == "ok":
                self.sync = (self.sync + 1) & 0xFF
                return
            tries += 1
            if outcome == "timeout":
                self.stats.timeouts += 1
            elif outcome == "fe":
                self.resync()
                if len(payload) > self.buffer_size:
                    raise TransferError(
                        f"The printer refused a {len(payload)}-byte packet (buffer overrun); "
                        f"its buffer is {self.buffer_size} bytes.",
                        hint="Flash again; the block size follows the printer's report.",
                    )
            else:
                self.stats.resends += 1
            if tries > self.max_retries:
                raise TransferError(
                    f"Packet {self.sync} was not accepted after {self.max_retries} retries "
                    f"({self.stats.resends} resend requests, {self.stats.timeouts} timeouts).",
                    cause="The serial link loses or corrupts bytes: a 64-byte receive buffer "
                    "overrunning while the printer writes to the SD card, a long or unshielded "
                    "cable, or a baud rate the USB-serial chip does not hold.",
                    hint="Try a lower baud rate or a shorter USB cable, and flash again.",
                )

    def _await_ack(self) -> str:
        deadline = time.monotonic() + self.ack_timeout
        while True:
            line = self.reader.next_line(max(0.0, deadline - time.monotonic()))
            if line is None:
                return "timeout"
            reply = parse_reply(line)
            if reply.kind == "ok":
                if reply.sync == self.sync:
                    return "ok"
                self.stats.duplicates += 1  # an ack for an earlier copy: keep waiting
                continue
            if reply.kind == "rs":
                if reply.sync == (self.sync + 1) & 0xFF:
                    self.log(f"rs{reply.sync}: the printer already has packet {self.sync}")
                    return "ok"
                return "rs"
            if reply.kind == "fe":
                self.log(f"fe{reply.sync}: the printer reset its packet counter")
                return "fe"
            self._note(reply, line)

    def take_pft(self, timeout: float) -> Optional[str]:
        """The next ``PFT:`` line (already arrived or within ``timeout``)."""
        if self._late:
            return self._late.pop(0)
        deadline = time.monotonic() + timeout
        while True:
            line = self.reader.next_line(max(0.0, deadline - time.monotonic()))
            if line is None:
                return None
            reply = parse_reply(line)
            if reply.kind == "pft":
                self.stats.pft_lines.append(reply.text)
                return reply.text
            self._note(reply, line)

    def query(self) -> Optional[tuple[int, int]]:
        """QUERY: the printer's compression parameters, None when it has none."""
        self.send(PROTOCOL_FILE, FILE_QUERY)
        text = self.take_pft(self.ack_timeout)
        self.log(f"QUERY: {text}")
        return query_compression(text) if text else None

    def open(self, name: str, *, dummy: bool = False, compress: bool = False) -> None:
        payload = open_payload(name, dummy=dummy, compress=compress)
        if len(payload) > self.buffer_size:
            raise TransferError(
                f"The file name {name!r} is too long for the printer's {self.buffer_size}-byte "
                "buffer.",
                hint="Use a shorter name (sd_filename).",
            )
        self.send(PROTOCOL_FILE, FILE_OPEN, payload)
        answer = self.take_pft(self.gcode_timeout)
        if answer == "success":
            self.file_open = True
            return
        cause = {
            "busy": "Another transfer is already open on the printer.",
            "fail": "The SD card is read-only, missing, or the folder does not exist.",
            None: "The printer did not say whether it opened the file.",
        }.get(answer, f"The printer answered {answer!r}.")
        raise TransferError(
            f"The printer could not open {name} on its SD card ({answer or 'no answer'}).",
            cause=cause,
            hint="Check the card (M21 in a terminal) and that it is not write-protected.",
        )

    def check_write_errors(self) -> None:
        """Raise on a ``PFT:ioerror``/``PFT:invalid`` that arrived after an ``ok``."""
        late = [t for t in self._late if t in ("ioerror", "invalid")]
        if late:
            self._late = [t for t in self._late if t not in ("ioerror", "invalid")]
            self.file_open = self.file_open and late[0] != "invalid"
            raise TransferError(
                f"The printer reported PFT:{late[0]} while writing the file.",
                cause="The SD card failed a write (worn, full or loose card)"
                if late[0] == "ioerror"
                else "The printer has no file open for writing.",
                hint="Check the SD card (reformat FAT32, or try another card) and flash again.",
            )

    def write_file(
        self,
        data: bytes,
        block_size: Optional[int] = None,
        progress: Callable[[int], None] = lambda _n: None,
        between_blocks: Callable[[], None] = lambda: None,
    ) -> None:
        """WRITE ``data`` in blocks of at most the printer's buffer; after repeated resends
        the block halves (down to :data:`SMALL_BLOCK`): a small UART receive ring overruns
        on full packets while the printer is busy writing to the card."""
        size = min(block_size or self.buffer_size, self.buffer_size)
        self.stats.block_size = size
        pos = 0
        since = self.stats.resends + self.stats.timeouts  # failures at the last size change
        while pos < len(data):
            between_blocks()
            chunk = data[pos : pos + size]
            self.send(PROTOCOL_FILE, FILE_WRITE, chunk)
            self.pulse_pft()
            self.check_write_errors()
            pos += len(chunk)
            progress(pos)
            failures = self.stats.resends + self.stats.timeouts - since
            if failures >= self.resends_before_smaller and size > SMALL_BLOCK:
                size = max(SMALL_BLOCK, size // 2)
                since += failures
                self.stats.block_size = size
                self.stats.smaller_blocks += 1
                self.log(f"{failures} resends: sending blocks of {size} B from now on")

    def pulse_pft(self) -> None:
        """Collect lines that already arrived, without waiting (a late ``PFT:ioerror``)."""
        for line in self.reader.pending():
            self._note(parse_reply(line), line)

    def close_file(self) -> None:
        """File CLOSE; any answer but ``PFT:success`` is a failure (binproto2 only warned)."""
        self.pulse_pft()
        self.check_write_errors()
        self.send(PROTOCOL_FILE, FILE_CLOSE)
        self.file_open = False
        answer = self.take_pft(self.gcode_timeout)
        if answer == "success":
            return
        if answer in ("ioerror", "invalid"):
            raise TransferError(
                f"The printer reported PFT:{answer} when closing the file.",
                cause="The last write to the SD card failed.",
                hint="Check the SD card and flash again.",
            )
        raise TransferError(
            f"The printer did not confirm closing the file ({answer or 'no answer'}).",
            hint="Flash again; the file on the card may be incomplete.",
        )

    def abort(self) -> None:
        """ABORT: the printer closes and deletes the open file. Only after a successful OPEN
        (without one Marlin tries to delete whatever file name it last used)."""
        if not self.file_open:
            return
        self.file_open = False
        self.send(PROTOCOL_FILE, FILE_ABORT)
        self.take_pft(self.ack_timeout)

    def close(self) -> None:
        """Control CLOSE: back to G-code. Tries the current sync, then resyncs once."""
        if not self.active:
            return
        try:
            self.send(PROTOCOL_CONTROL, CONTROL_CLOSE)
        except (TransferError, ConnectError):
            self.resync()
            self.send(PROTOCOL_CONTROL, CONTROL_CLOSE)
        self.active = False

    def __enter__(self) -> BftSession:
        return self

    def __exit__(self, exc_type: object, *_rest: object) -> None:
        try:
            if self.file_open:
                try:
                    self.abort()
                except Exception as exc:  # still try to leave binary mode
                    self.log(f"ABORT failed: {exc}")
        finally:
            try:
                self.close()
            except Exception as exc:
                self.log(f"Could not leave binary mode: {exc}")
                if exc_type is None:
                    raise


def rescue(stream: ByteStream, log: LogFn = _no_log, timeout: float = 1.0) -> str:
    """Bring a printer out of binary mode: SYNC, read ``ss<N>``, CLOSE with N, then check
    that G-code is answered. Returns one sentence saying what was found."""
    reader = LineReader(stream, log)
    stream.write(sync_packet(0))
    expected: Optional[int] = None
    deadline = time.monotonic() + timeout
    while expected is None:
        line = reader.next_line(max(0.0, deadline - time.monotonic()))
        if line is None:
            break
        reply = parse_reply(line)
        if reply.kind == "ss":
            expected = reply.sync
    if expected is not None:
        stream.write(close_packet(expected))
        deadline = time.monotonic() + timeout
        while True:
            line = reader.next_line(max(0.0, deadline - time.monotonic()))
            if line is None or parse_reply(line) == Reply("ok", expected):
                break
    stream.write(b"\nM21\n")  # the SYNC bytes may have left half a line in the G-code buffer
    deadline = time.monotonic() + 3 * timeout
    while True:
        line = reader.next_line(max(0.0, deadline - time.monotonic()))
        if line is None:
            raise ConnectError(
                "The printer answers neither binary SYNC nor G-code.",
                cause="Wrong port or baud rate, or the printer is off or hung.",
                hint="Check the port; otherwise power-cycle the printer.",
            )
        if line == "ok" or line.startswith("ok "):
            if expected is None:
                return "The printer was not in binary mode; it answers G-code."
            return "The printer was stuck in binary mode; it left it and answers G-code again."
