"""An emulated 32-bit Marlin 2.1.x printer on a pty: G-code, binary file transfer, SD card, and
the board's SD bootloader.

Behaviour follows ``docs/marlin.md`` (Marlin 2.1.2.7's ``binary_stream.h`` as observed):

* G-code: ``ok``, M115 (capabilities), M20/M21/M22/M23/M30, M105, M155 auto-reports (which
  keep coming in binary mode), M28 B1, M997 (or ``Unknown command`` on HALs without it);
* the binary receiver statement by statement: token search, header/payload Fletcher-16,
  ``ok<n>`` *before* the packet's own output, duplicate (``sync == expected-1`` compared as
  int, so it misses at the wrap) answered ``ok`` and dropped, out-of-order ``rs``, silent
  drop while a resend is pending, the 500 ms half-packet drop, payload overrun ``fe`` with
  the counter reset, SYNC that neither checks nor resets the counter, the 10 s idle abort
  that deletes the open file, and a counter that survives CLOSE and new sessions;
* an SD card model (8.3 names upper-cased unless LFN write, directories with short aliases,
  read-only firmware, write errors) and one scripted bootloader per family that flashes on
  reset and boots the new FIRMWARE_NAME;
* the link: UART (10 bits per byte, the port stays and ``start`` is printed) or native USB
  (port vanishes on reset and comes back, like ``/dev/ttyACM0``), with a 64-byte receive
  ring that overruns while the card is busy, and fault injection both ways.

Times are model seconds scaled by ``time_scale`` (0.05 = 20x faster than real time).
"""

from __future__ import annotations

import os
import random
import select
import struct
import tempfile
import termios
import threading
import time
import tty
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from octoprint_flasher.image.marlin import MKS_KEY, MKS_START, describe_bin, mks_decrypt
from octoprint_flasher.protocols.marlin_bft import fletcher16

DEFAULT_NAME = "Marlin 2.1.2.7 (Dec  6 2026 05:42:29)"
VERSION = "0.1.0"

#: bootloader families and what each one flashes
FAMILIES = ("btt", "creality", "creality-f4", "mks", "mks-encrypted")
F4_DIR = "STM32F4_UPDATE"
F4_ALIAS = "STM32F~1"

# --------------------------------------------------------------------------------------------
# synthetic firmware


def make_marlin_bin(
    name: str = DEFAULT_NAME,
    size: int = 16 * 1024,
    base: int = 0x08007000,
    seed: int = 1,
    mks_encrypt: bool = False,
    machine: str = "Ender-3 V2",
) -> bytes:
    """A Marlin-shaped .bin: vector table, code-like filler (plenty of zero bytes, as real
    Thumb code and data have) and the M115 literal in the middle."""
    rng = random.Random(seed)
    vectors = struct.pack("<II", 0x20010000, base + 0x1E1) + struct.pack("<I", base + 0x201) * 60
    literal = (
        f"FIRMWARE_NAME:{name} SOURCE_CODE_URL:github.com/MarlinFirmware/Marlin "
        f"PROTOCOL_VERSION:1.0 MACHINE_TYPE:{machine} EXTRUDER_COUNT:1 UUID:"
    ).encode() + b"\0"
    body_len = size - len(vectors) - len(literal)
    words = [rng.getrandbits(32).to_bytes(4, "little") for _ in range(96)]
    parts = []
    for _ in range(body_len // 4 + 1):  # Thumb-like: a vocabulary of words, many zeros
        roll = rng.random()
        parts.append(b"\0\0\0\0" if roll < 0.15 else words[int(roll * 1000) % 96])
    body = b"".join(parts)[:body_len]
    half = min(body_len // 2, 8000)
    data = vectors + body[:half] + literal + body[half:]
    return _mks(data) if mks_encrypt else data


def _mks(data: bytes) -> bytes:
    return mks_decrypt(data)  # XOR: the same operation encrypts


assert MKS_START == 320 and len(MKS_KEY) == 32

# --------------------------------------------------------------------------------------------
# SD card


def short_name(name: str) -> str:
    return name.upper()


@dataclass
class SdCard:
    """Files by upper-case path (``/FIRMWARE.BIN``, ``/STM32F~1/FW1.BIN``); directories keep
    their long name and an 8.3 alias."""

    files: dict[str, bytes] = field(default_factory=dict)
    dirs: dict[str, str] = field(default_factory=dict)  # alias -> long name
    present: bool = True
    write_protected: bool = False  # the card's lock switch / a card that refuses writes
    ioerror_at: Optional[int] = None  # file offset at which SD writes start failing

    def resolve(self, path: str, long_names: bool) -> Optional[str]:
        """The card key for ``path``, or None if its folder does not exist."""
        parts = [p for p in path.strip().split("/") if p]
        if not parts:
            return None
        folders = []
        for part in parts[:-1]:
            up = part.upper()
            if up in self.dirs:
                folders.append(up)
            elif long_names and any(v.upper() == up for v in self.dirs.values()):
                folders.append(next(a for a, v in self.dirs.items() if v.upper() == up))
            else:
                return None
        return "/" + "/".join(folders + [short_name(parts[-1])])

    def get(self, path: str) -> Optional[bytes]:
        return self.files.get(path)


# --------------------------------------------------------------------------------------------
# faults and timing


@dataclass
class Faults:
    """Deterministic faults (by position) and random ones (by rate, seeded)."""

    rx_drop_offsets: set[int] = field(default_factory=set)  # binary bytes from the host
    rx_corrupt_offsets: set[int] = field(default_factory=set)
    lose_ok_syncs: set[int] = field(default_factory=set)  # first ok<n> for these n is lost
    corrupt_ok_syncs: set[int] = field(default_factory=set)
    rx_loss_rate: float = 0.0
    rx_corrupt_rate: float = 0.0
    tx_loss_rate: float = 0.0  # whole reply lines lost
    tx_corrupt_rate: float = 0.0
    seed: int = 1
    rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)


@dataclass
class Stats:
    packets_ok: int = 0
    duplicates: int = 0
    resend_requests: int = 0
    silent_drops: int = 0
    timeouts: int = 0
    overruns: int = 0
    rx_ring_drops: int = 0
    writes: int = 0
    idle_aborts: int = 0
    flashes: list[str] = field(default_factory=list)
    unknown_commands: list[str] = field(default_factory=list)
    resets: int = 0
    transcript: list[tuple[str, bytes]] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# the printer


class MarlinPrinter:
    """One emulated printer board with its SD card and bootloader, on a pty."""

    def __init__(
        self,
        *,
        family: str = "btt",
        firmware_name: str = DEFAULT_NAME,
        machine: str = "3D Printer",  # Marlin's default CUSTOM_MACHINE_NAME
        transport: str = "uart",  # "uart" (CH340: port stays) or "usb" (re-enumerates)
        baud: int = 115200,
        time_scale: float = 0.05,
        buffer_size: int = 96,
        rx_buffer: Optional[int] = None,  # e.g. 64: the UART ring that overruns on SD writes
        m997: bool = True,
        bft: bool = True,
        sd_write: bool = True,
        long_filename: bool = False,
        lfn_write: bool = False,
        compression: bool = True,
        old_spelling: bool = False,  # 2021 sources: "compresion"
        boot_seconds: float = 1.5,
        flash_seconds_per_kib: float = 0.02,
        faults: Optional[Faults] = None,
        card: Optional[SdCard] = None,
        mks_name: str = "Robin_nano35.bin",
        port_dir: Optional[str] = None,
        mount_dir: Optional[str] = None,
        record: bool = False,
    ) -> None:
        if family not in FAMILIES:
            raise ValueError(family)
        self.family = family
        self.firmware_name = firmware_name
        self.machine = machine
        self.transport = transport
        self.baud = baud
        self.time_scale = time_scale
        self.buffer_size = buffer_size
        self.rx_buffer = rx_buffer
        self.m997 = m997
        self.bft = bft
        self.sd_write = sd_write
        self.long_filename = long_filename
        self.lfn_write = lfn_write
        self.compression = compression
        self.old_spelling = old_spelling
        self.boot_seconds = boot_seconds
        self.flash_seconds_per_kib = flash_seconds_per_kib
        self.faults = faults or Faults()
        self.card = card if card is not None else SdCard()
        if family == "creality-f4" and F4_ALIAS not in self.card.dirs:
            self.card.dirs[F4_ALIAS] = F4_DIR
        self.mks_name = mks_name
        self.record = record
        self.mount_dir = mount_dir  # the card is also mounted on the host (USB mass storage)
        self.printing = False
        self.stats = Stats()
        self.state = "marlin"  # marlin | klipper | dead | off
        self.last_flashed: Optional[str] = None  # Creality's "must differ" memory
        self.lock = threading.RLock()
        self._dir = port_dir or tempfile.mkdtemp(prefix="marlin-")
        self.port = os.path.join(self._dir, "ttyACM0" if transport == "usb" else "ttyUSB0")
        self.master = -1
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._reset_lines_once: list[str] = []
        self._t0 = time.perf_counter()
        self._line_free = 0.0
        self.retries = 0
        self._h = (0, 0, 0, 0)
        self._reset_stream()
        self.sync = 0  # the stream counter outlives sessions
        self.binary = False
        self._gline = bytearray()
        self.autoreport = 0.0
        self._next_report = 0.0
        self._file: Optional[str] = None
        self._file_data = bytearray()
        self._file_dummy = False
        self._file_compressed = False
        self._decoder: Any = None
        self._line_free_rx = 0.0
        self.state_after_boot = "marlin"
        self._last_file_packet = 0.0
        self._next_idle_check = 0.0
        self._busy_bytes = 0  # bytes that will arrive while a card write blocks the loop
        self._ring_left = 0
        self._rx_offset = 0
        self._sectors = 0
        self.selected: Optional[str] = None

    # -- lifecycle --

    def start(self) -> MarlinPrinter:
        self._open_pty()
        self._thread = threading.Thread(target=self._run, name="marlin-printer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(3)
        self._close_pty()

    def _open_pty(self) -> None:
        master, slave = os.openpty()
        tty.setraw(slave)
        attrs = termios.tcgetattr(slave)
        attrs[3] &= ~termios.ECHO
        termios.tcsetattr(slave, termios.TCSANOW, attrs)
        device = os.ttyname(slave)
        os.close(slave)  # free, like a port nobody has opened
        tmp = self.port + ".new"
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.symlink(device, tmp)
        os.replace(tmp, self.port)
        self.master = master

    def _close_pty(self) -> None:
        if self.master >= 0:
            try:
                os.close(self.master)
            except OSError:
                pass
            self.master = -1

    # -- time --

    def _seconds(self, model: float) -> float:
        return model * self.time_scale

    def _sleep_until(self, deadline: float) -> None:
        """Sleep in the OS until just before ``deadline`` (releasing the GIL for the host),
        then spin the last tens of microseconds: sleep overshoot must not pile up per packet."""
        while True:
            left = deadline - time.perf_counter()
            if left <= 0 or self._stop.is_set():
                return
            if left > 0.00016:
                time.sleep(min(left - 0.00008, 0.05))

    def _byte_time(self, n: int) -> float:
        """Model seconds ``n`` bytes occupy the link."""
        if self.transport == "uart":
            return n * 10 / self.baud
        return 0.00025 + n * 8 * 1.2 / 12e6  # USB full speed: a frame slot + payload

    # -- output --

    def emit(self, line: str) -> None:
        """Write one line as the firmware prints it (with fault injection)."""
        data = line.encode() + b"\n"
        f = self.faults
        if self.binary and f.tx_loss_rate and f.rng.random() < f.tx_loss_rate:
            return
        if self.binary and f.tx_corrupt_rate and f.rng.random() < f.tx_corrupt_rate:
            pos = f.rng.randrange(len(data) - 1)
            data = data[:pos] + bytes([data[pos] ^ 0x04]) + data[pos + 1 :]
        now = time.perf_counter()
        start = max(now, self._line_free)
        self._line_free = start + self._seconds(self._byte_time(len(data)))
        self._sleep_until(self._line_free)
        if self.record:
            self.stats.transcript.append(("<", data))
        if self.master >= 0:
            try:
                os.write(self.master, data)
            except OSError:
                pass

    # -- main loop --

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.master < 0:
                time.sleep(0.002)
                continue
            try:
                ready, _, _ = select.select([self.master], [], [], 0.002)
            except (OSError, ValueError):
                time.sleep(0.002)
                continue
            data = b""
            if ready:
                try:
                    data = os.read(self.master, 4096)
                except OSError:
                    time.sleep(0.002)  # nobody has the port open
            with self.lock:
                if data and self.state == "marlin":
                    self._receive(data)
                self._idle()

    def _receive(self, data: bytes) -> None:
        """Bytes arrive one byte time apart (USB: one transfer). The host could start
        sending as soon as our last line reached it, so arrival is credited back to then.
        While a card write blocks the main loop, the UART ring holds ``rx_buffer`` bytes and
        the bytes after them that arrive during the write are lost (Marlin #21326)."""
        if self.record:
            self.stats.transcript.append((">", data))
        now = time.perf_counter()
        if self.transport == "uart":
            per = self._seconds(self._byte_time(1))
            span = len(data) * per
        else:
            per, span = 0.0, self._seconds(self._byte_time(len(data)))
        start = max(now - span, self._line_free, self._line_free_rx)
        kept = bytearray()
        for byte in data:
            if self.binary and self.rx_buffer is not None and self._busy_bytes > 0:
                self._busy_bytes -= 1
                if self._ring_left <= 0:
                    self.stats.rx_ring_drops += 1
                    continue
                self._ring_left -= 1
            kept.append(byte)
        self._line_free_rx = start + span
        self._sleep_until(self._line_free_rx)
        i = 0
        while i < len(kept):
            if not self.binary:
                self._gcode_byte(kept[i])
                i += 1
            elif self._rx_state == "data" and self._no_rx_faults():
                # a payload run at once (the per-byte path would cost more than the link)
                n = min(self._want + 2 - len(self._payload), len(kept) - i)
                self._payload += kept[i : i + n]
                self._rx_offset += n
                self._last_byte = time.perf_counter()
                i += n
                if len(self._payload) == self._want + 2:
                    self._on_payload()
            else:
                self._binary_byte(kept[i])
                i += 1

    def _no_rx_faults(self) -> bool:
        f = self.faults
        return not (
            f.rx_drop_offsets or f.rx_corrupt_offsets or f.rx_loss_rate or f.rx_corrupt_rate
        )

    def _idle(self) -> None:
        now = time.perf_counter()
        if self.binary:
            self._check_stall(now)
        if self._file is not None and now >= self._next_idle_check:
            self._next_idle_check = now + self._seconds(1.0)
            if now - self._last_file_packet > self._seconds(10.0):
                self.stats.idle_aborts += 1
                self._abort_file()
        if self.autoreport and now >= self._next_report:
            self._next_report = now + self._seconds(self.autoreport)
            self.emit(" T:21.40 /0.00 B:20.90 /0.00 @:0 B@:0")

    # -- G-code --

    def _gcode_byte(self, byte: int) -> None:
        if byte in (10, 13):
            line = self._gline.decode("ascii", "replace").strip()
            self._gline.clear()
            if line:
                self._gcode(line)
        else:
            self._gline.append(byte)

    def _gcode(self, line: str) -> None:
        if line.startswith("N") and "*" in line:  # line numbers and checksums
            line = line.split(" ", 1)[1] if " " in line else ""
            line = line.rsplit("*", 1)[0].strip()
        word, _, rest = line.partition(" ")
        word = word.upper()
        if word.startswith("M28") and word != "M28":  # binproto2 sends M28B1
            word, rest = "M28", word[3:] + rest
        handler = {
            "M115": self._m115,
            "M21": self._m21,
            "M22": self._m22,
            "M20": self._m20,
            "M23": self._m23,
            "M30": self._m30,
            "M27": self._m27,
            "M105": self._m105,
            "M155": self._m155,
            "M28": self._m28,
            "M110": lambda _r: None,
        }.get(word)
        if word == "M997" and self.m997:
            self._reset(from_m997=True)
            return
        if handler is None:
            self.stats.unknown_commands.append(line)
            self.emit(f'echo:Unknown command: "{line}"')
            self.emit("ok")
            return
        if word == "M105":
            handler(rest)
            return
        handler(rest)
        if not (word == "M28" and self.binary):
            self.emit("ok")

    def _m115(self, _rest: str) -> None:
        self.emit(
            f"FIRMWARE_NAME:{self.firmware_name} SOURCE_CODE_URL:github.com/MarlinFirmware/"
            f"Marlin PROTOCOL_VERSION:1.0 MACHINE_TYPE:{self.machine} EXTRUDER_COUNT:1 "
            "UUID:cede2a2f-41a2-4748-9b12-c55c62f367ff"
        )
        caps = [
            ("SERIAL_XON_XOFF", 0),
            ("BINARY_FILE_TRANSFER", int(self.bft)),
            ("EEPROM", 1),
            ("AUTOREPORT_TEMP", 1),
            ("SDCARD", 1),
            ("SD_WRITE", int(self.sd_write)),
            ("LONG_FILENAME", int(self.long_filename)),
            ("LFN_WRITE", int(self.lfn_write)),
            ("CUSTOM_FIRMWARE_UPLOAD", 0),
            ("EXTENDED_M20", 0),
            ("THERMAL_PROTECTION", 1),
            ("MEATPACK", int(not self.bft)),
        ]
        for name, value in caps:
            self.emit(f"Cap:{name}:{value}")

    def _m21(self, _rest: str) -> None:
        self.emit("echo:SD card ok" if self.card.present else "echo:No SD card")

    def _m22(self, _rest: str) -> None:
        self.selected = None
        self.emit("echo:SD card released")

    def _m20(self, rest: str) -> None:
        if not self.card.present:
            self.emit("echo:No media")
            return
        self.emit("Begin file list")
        if "F" not in rest.upper():  # M20 F lists nothing without DWIN_LCD_PROUI
            for path in sorted(self.card.files):
                if ".G" in path.rsplit("/", 1)[-1]:  # plain M20 shows *.G* only
                    shown = path.lstrip("/")
                    self.emit(f"{shown} {len(self.card.files[path])}")
        self.emit("End file list")

    def _m23(self, rest: str) -> None:
        key = self.card.resolve(rest, self.long_filename)
        data = self.card.get(key) if key else None
        name = rest.strip().lstrip("/")
        if data is None or not self.card.present:
            self.emit(f"open failed, File: {name}.")
            return
        self.selected = key
        self.emit(f"File opened: {name.upper()} Size: {len(data)}")
        self.emit("File selected")

    def _m30(self, rest: str) -> None:
        key = self.card.resolve(rest, self.long_filename)
        name = rest.strip().lstrip("/")
        if key and key in self.card.files:
            del self.card.files[key]
            self.emit(f"File deleted:{name}")
        else:
            self.emit(f"Deletion failed, File: {name}.")

    def _m27(self, _rest: str) -> None:
        if self.printing:
            self.emit("SD printing byte 1234/56789")
        else:
            self.emit("Not SD printing")

    def _m105(self, _rest: str) -> None:
        self.emit("ok T:21.40 /0.00 B:20.90 /0.00 @:0 B@:0")

    def _m155(self, rest: str) -> None:
        try:
            self.autoreport = float(rest.strip().lstrip("Ss") or 0)
        except ValueError:
            self.autoreport = 0.0
        self._next_report = time.perf_counter() + self._seconds(self.autoreport)

    def _m28(self, rest: str) -> None:
        arg = rest.replace(" ", "").upper()
        if self.bft and arg.startswith("B") and arg[1:2].isdigit() and int(arg[1:2]) > 0:
            self.emit("echo:Switching to Binary Protocol")
            self.emit("ok")
            self.binary = True
            self._reset_stream()
            self._rx_offset = 0
            return
        self.emit(f"echo:Now fresh file: {rest.strip()}")  # plain M28: not used by the flasher

    # -- binary receiver ([BS] receive()) --

    def _reset_stream(self) -> None:
        self._rx_state = "wait"
        self._hdr = bytearray()
        self._payload = bytearray()
        self._want = 0
        self._last_byte = 0.0
        self._prev = -1

    def _binary_byte(self, byte: int) -> None:
        f = self.faults
        offset = self._rx_offset
        self._rx_offset += 1
        if offset in f.rx_drop_offsets or (f.rx_loss_rate and f.rng.random() < f.rx_loss_rate):
            return
        if offset in f.rx_corrupt_offsets or (
            f.rx_corrupt_rate and f.rng.random() < f.rx_corrupt_rate
        ):
            byte ^= 0x10
        self._last_byte = time.perf_counter()
        state = self._rx_state
        if state == "wait":
            if self._prev == 0xAD and byte == 0xB5:
                self._rx_state = "header"
                self._hdr = bytearray()
                self._prev = -1
            else:
                self._prev = byte
            return
        if state == "header":
            self._hdr.append(byte)
            if len(self._hdr) == 6:
                self._on_header()
            return
        if state == "data":
            self._payload.append(byte)
            if len(self._payload) == self._want + 2:
                self._on_payload()

    def _on_header(self) -> None:
        sync, meta, length, check = struct.unpack("<BBHH", bytes(self._hdr))
        self._h = (sync, meta >> 4, meta & 0xF, length)
        if fletcher16(bytes(self._hdr[:4])) != check:
            self.emit(f"echo:Packet header({sync}?) corrupt")
            self._resend()
            return
        protocol, ptype = meta >> 4, meta & 0xF
        if protocol == 0 and ptype == 1:  # SYNC: no sync check, no ok, no counter reset
            self.emit(f"ss{self.sync},{self.buffer_size},{VERSION}")
            self._reset_stream()
            return
        if sync == self.sync:
            if length > self.buffer_size:
                self.stats.overruns += 1
                self.emit("echo:Datastream packet data buffer overrun")
                self.emit(f"fe{sync}")
                self.sync = 0
                self.retries = 0
                self._reset_stream()
                return
            if length:
                self._want = length
                self._payload = bytearray()
                self._rx_state = "data"
            else:
                self._process(b"")
        elif int(sync) == self.sync - 1:  # compared as int: misses at the wrap (sync 0)
            self.stats.duplicates += 1
            self._ok(sync)
            self._reset_stream()
        elif self.retries:
            self.stats.silent_drops += 1
            self._reset_stream()
        else:
            self.emit("echo:Datastream packet out of order")
            self._resend()

    def _on_payload(self) -> None:
        sync = self._h[0]
        payload = bytes(self._payload[: self._want])
        (check,) = struct.unpack("<H", bytes(self._payload[self._want :]))
        head = bytes(self._hdr)
        if fletcher16(head + payload) != check:
            self.emit(f"echo:Packet({sync}) payload corrupt")
            self._resend()
            return
        self._process(payload)

    def _resend(self) -> None:
        self.retries += 1
        self.stats.resend_requests += 1
        self._reset_stream()
        self.emit(f"echo:Resend request {self.retries}")
        self.emit(f"rs{self.sync}")

    def _check_stall(self, now: float) -> None:
        if self._rx_state in ("header", "data") and now - self._last_byte > self._seconds(0.5):
            self.stats.timeouts += 1
            self.emit("echo:Datastream timeout")
            self._resend()

    def _ok(self, sync: int) -> None:
        f = self.faults
        if sync in f.lose_ok_syncs:
            f.lose_ok_syncs.discard(sync)
            return
        if sync in f.corrupt_ok_syncs:
            f.corrupt_ok_syncs.discard(sync)
            self.emit(f"oj{sync}")
            return
        self.emit(f"ok{sync}")

    def _process(self, payload: bytes) -> None:
        sync, protocol, ptype, _length = self._h
        self.sync = (self.sync + 1) & 0xFF
        self.retries = 0
        self.stats.packets_ok += 1
        self._reset_stream()
        self._ok(sync)
        if protocol == 0:
            if ptype == 2:  # CLOSE: back to G-code
                self.binary = False
                self._gline.clear()
            return
        if protocol != 1:
            self.emit("echo:Unsupported Binary Protocol")
            return
        self._file_packet(ptype, payload)

    # -- file transfer protocol ([BS] SDFileTransferProtocol) --

    def _file_packet(self, ptype: int, payload: bytes) -> None:
        self._last_file_packet = time.perf_counter()
        if ptype == 0:
            comp = "heatshrink,8,4" if self.compression else "none"
            key = "compresion" if self.old_spelling else "compression"
            self.emit(f"PFT:version:{VERSION}:{key}:{comp}")
        elif ptype == 1:
            self._open(payload)
        elif ptype == 2:
            self._close_file()
        elif ptype == 3:
            self._write(payload)
        elif ptype == 4:
            self._abort_file()
            self.emit("PFT:success")
        else:
            self.emit("PTF:invalid")

    def _open(self, payload: bytes) -> None:
        if len(payload) <= 2 or payload[-1] != 0:
            self.emit("PFT:fail")
            return
        if self._file is not None:
            self.emit("PFT:busy")
            return
        dummy, compressed = bool(payload[0] & 1), bool(payload[1] & 1)
        name = payload[2:-1].decode("ascii", "replace")
        if not self.card.present:
            self.emit("echo:No SD card")
            self.emit("PFT:fail")
            return
        self.emit("echo:SD card ok")
        key = self.card.resolve(name, self.long_filename)
        if dummy:
            self._file, self._file_dummy = "(dummy)", True
        elif key is None or not self.sd_write or self.card.write_protected:
            self.emit(f"open failed, File: {name}.")
            self.emit("PFT:fail")
            return
        else:
            if not self.lfn_write:
                key = key.upper()
            self.emit(f"echo:Now fresh file: {name}")
            self.emit(f"Writing to file: {name}")
            self._file, self._file_dummy = key, False
            self.card.files[key] = b""
        self._file_data = bytearray()
        self._file_compressed = compressed
        self._decoder = None
        if compressed and not dummy:
            import heatshrink2.core as hs

            self._decoder = hs.Encoder(hs.Reader(window_sz2=8, lookahead_sz2=4))
        self._next_idle_check = time.perf_counter() + self._seconds(1.0)
        self.emit("PFT:success")

    def _write(self, payload: bytes) -> None:
        if self._file is None:
            self.emit("PFT:invalid")
            return
        self.stats.writes += 1
        if self._file_dummy:
            return
        if self._decoder is not None:  # one heatshrink stream per file, decoded as it comes
            self._store(bytes(self._decoder.fill(payload)))
            return
        self._store(payload)

    def _store(self, data: bytes) -> None:
        before = len(self._file_data)
        self._file_data += data
        limit = self.card.ioerror_at
        if limit is not None and len(self._file_data) > limit:
            self._file_data = self._file_data[:limit]
            self.emit("PFT:ioerror")
            return
        # the card write blocks the main loop once per 512-byte sector; every 16th sector
        # also updates the FAT (cluster allocation), which takes far longer
        sectors = len(self._file_data) // 512 - before // 512
        busy = 0.0
        for _ in range(sectors):
            self._sectors += 1
            busy += 0.012 if self._sectors % 16 == 0 else 0.0015
        if busy:
            if self.transport == "uart":
                self._busy_bytes = int(busy / self._byte_time(1))
                self._ring_left = self.rx_buffer or 0
            self._sleep_until(max(time.perf_counter(), self._line_free) + self._seconds(busy))

    def _close_file(self) -> None:
        if self._file is None:
            self.emit("PFT:invalid")
            return
        if self._decoder is not None:
            self._store(bytes(self._decoder.finish()))
            self._decoder = None
        if not self._file_dummy:
            self.card.files[self._file] = bytes(self._file_data)
        self._file = None
        self.emit("echo:SD card released")
        self.emit("PFT:success")

    def _abort_file(self) -> None:
        if self._file is None:
            self.emit("Deletion failed, File: .")
            return
        if not self._file_dummy:
            self.card.files.pop(self._file, None)
        self._file = None
        self._decoder = None

    # -- reset and the SD bootloader --

    def press_reset(self) -> None:
        """The user presses the reset button (or power-cycles)."""
        with self.lock:
            self._reset(from_m997=False)

    def _reset(self, from_m997: bool) -> None:
        self.stats.resets += 1
        self.binary = False
        self._file = None
        self.autoreport = 0.0
        self.selected = None
        self._gline.clear()
        self._reset_stream()
        self.sync = 0
        if self.transport == "usb":
            self._close_pty()
            try:
                os.unlink(self.port)
            except OSError:
                pass
        seconds = self.boot_seconds + self._bootloader()
        threading.Thread(target=self._boot, args=(seconds,), daemon=True).start()
        self.state = "off"

    def _bootloader(self) -> float:
        """Flash from the card like this family's bootloader; returns the model seconds."""
        if self.mount_dir:
            self._card_from_mount()
        key = self._firmware_file()
        if key is None:
            return 0.0
        try:
            return self._flash_from(key)
        finally:
            if self.mount_dir:
                self._card_to_mount()

    def _card_from_mount(self) -> None:
        assert self.mount_dir is not None
        self.card.files.clear()
        for root, _dirs, names in os.walk(self.mount_dir):
            rel = os.path.relpath(root, self.mount_dir)
            for name in names:
                folder = "" if rel == "." else "/" + rel.upper()
                alias = {v.upper(): a for a, v in self.card.dirs.items()}
                folder = "/" + alias.get(folder[1:], folder[1:]) if folder else ""
                with open(os.path.join(root, name), "rb") as fh:
                    self.card.files[f"{folder}/{name.upper()}"] = fh.read()

    def _card_to_mount(self) -> None:
        assert self.mount_dir is not None
        for root, _dirs, names in os.walk(self.mount_dir):
            for name in names:
                os.unlink(os.path.join(root, name))
        for key, data in self.card.files.items():
            parts = key.strip("/").split("/")
            folder = os.path.join(self.mount_dir, *[self.card.dirs.get(p, p) for p in parts[:-1]])
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, parts[-1]), "wb") as fh:
                fh.write(data)

    def _flash_from(self, key: str) -> float:
        data = self.card.files[key]
        if self.family == "mks-encrypted":
            data = mks_decrypt(data)
        info = describe_bin(data)
        self.stats.flashes.append(key)
        if self.family == "btt":
            self.card.files["/FIRMWARE.CUR"] = self.card.files.pop(key)
        elif self.family.startswith("creality"):
            self.last_flashed = key
        if info is None:
            self.state_after_boot = "dead"
        elif info.kind == "klipper":
            self.state_after_boot = "klipper"
        else:
            self.state_after_boot = "marlin"
            if info.firmware_name:
                self.firmware_name = info.firmware_name
        return len(data) / 1024 * self.flash_seconds_per_kib

    def _firmware_file(self) -> Optional[str]:
        files = self.card.files
        if self.family == "btt":
            return "/FIRMWARE.BIN" if "/FIRMWARE.BIN" in files else None
        if self.family.startswith("mks"):
            key = "/" + self.mks_name.upper()
            return key if key in files else None
        folder = "/" if self.family == "creality" else f"/{F4_ALIAS}/"
        for key in sorted(files):
            if (
                key.startswith(folder)
                and "/" not in key[len(folder) :]
                and key.endswith(".BIN")
                and key != self.last_flashed
            ):
                return key
        return None

    def _boot(self, seconds: float) -> None:
        time.sleep(self._seconds(seconds))
        with self.lock:
            if self._stop.is_set():
                return
            self.state = self.state_after_boot
            if self.transport == "usb":
                self._open_pty()
            self._line_free = 0.0
            if self.state == "marlin":
                self.emit("start")
                self.emit(f"echo:Marlin {self.firmware_name.split(' ')[1]}")
                self.emit("echo: Last Updated: 2026-01-22 | Author: (none, default config)")
                self.emit(f"echo:Compiled: {self.firmware_name.split('(')[-1].rstrip(')')}")
                self.emit("echo:SD card ok" if self.card.present else "echo:No SD card")

    # -- helpers for tests --

    def file(self, path: str) -> Optional[bytes]:
        return self.card.files.get(path)

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if predicate():
                    return True
            time.sleep(0.005)
        return False
