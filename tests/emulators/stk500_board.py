"""Pure-Python AVR boards on a pty: an optiboot-like STK500v1 bootloader and a Mega-like
stk500v2 bootloader, with a timing model and fault injection.

They reproduce what the host can observe of the real bootloaders (``research/avr.md`` §5):
optiboot leaves for the application on any byte where it expects 0x20, only stays after an
external reset, answers nothing to UNIVERSAL but 0x00 and (before v6) takes RAMPZ from bit 15 of
the word address; the Mega bootloader drops frames with a bad checksum silently, erases at its
own sequential pointer, leaves after ~0.83 s without a byte, and jumps to the app after LEAVE.

Timing model (``timing=True``): every character takes 10 bit times at the AVR's real baud,
replies reach the host when their stop bit would, page erase and write take 4.5 ms each, and
while the bootloader busy-waits (SPM, polled sending) the UART keeps only 3 characters (2-byte
FIFO + shift register): later ones are lost, as on silicon. ``timing=False`` runs as fast as
the host talks, for fault tests. Opening the pty's slave is the reset (as DTR does).
"""

from __future__ import annotations

import os
import pty
import select
import termios
import threading
import time
import tty
from collections import deque
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any, Optional

MCUS: dict[str, dict[str, Any]] = {
    "m328p": {"sig": b"\x1e\x95\x0f", "flash": 32 * 1024, "page": 128, "nrww": 0x7000},
    "m1284p": {"sig": b"\x1e\x97\x05", "flash": 128 * 1024, "page": 256, "nrww": 0x1E000},
    "m2560": {"sig": b"\x1e\x98\x01", "flash": 256 * 1024, "page": 256, "nrww": 0x3E000},
    "m644p": {"sig": b"\x1e\x96\x0a", "flash": 64 * 1024, "page": 256, "nrww": 0xE000},
}

BAUD_TERMIOS = {
    getattr(termios, f"B{b}"): b
    for b in (9600, 19200, 38400, 57600, 115200, 230400, 460800, 500000, 921600)
    if hasattr(termios, f"B{b}")
}


def real_baud(nominal: int, f_cpu: int = 16_000_000) -> float:
    """The baud the AVR really produces with U2X (UBRR rounded), e.g. 117,647 for 115200."""
    ubrr = round(f_cpu / (8 * nominal)) - 1
    return f_cpu / (8 * (ubrr + 1))


class _Idle(Exception):
    """Thrown into a bootloader coroutine when its wait for a byte timed out."""


class _Reset(Exception):
    pass


GET = ("get",)
Op = tuple[Any, ...]
Program = Generator[Op, Any, None]


@dataclass
class Fault:
    """``kind``: drop | corrupt | reset | vanish (at host→board byte ``at``),
    lose_reply | mute (at the ``at``-th command whose first byte is ``command``)."""

    kind: str
    at: int
    command: Optional[int] = None
    fired: bool = False


@dataclass
class Stats:
    rx: int = 0
    tx: int = 0
    commands: int = 0
    overruns: int = 0
    resets: int = 0
    pages_written: int = 0
    unerased_writes: int = 0
    bootloader_overwrites: int = 0
    garbled: int = 0
    log: list[str] = field(default_factory=list)


class Stk500Board:
    """A simulated board; ``port`` is the pty path a host opens."""

    def __init__(
        self,
        kind: str = "optiboot",
        mcu: str = "m328p",
        baud: int = 115200,
        *,
        timing: bool = False,
        auto_reset: bool = True,
        boot_size: Optional[int] = None,
        version: tuple[int, int] = (4, 4),
        app: bytes = b"",
        led_time: Optional[float] = None,
        page_time: float = 0.0045,
        window: float = 0.83,
        watchdog: float = 1.0,
    ) -> None:
        if kind not in ("optiboot", "stk500v2"):
            raise ValueError(kind)
        self.kind = kind
        self.mcu = MCUS[mcu]
        self.baud = baud
        self.timing = timing
        self.auto_reset = auto_reset
        self.version = version
        flash = self.mcu["flash"]
        self.boot_size = boot_size or (8192 if kind == "stk500v2" else 1024)
        self.boot_start = flash - self.boot_size
        self.flash = bytearray(b"\xff" * flash)
        self.flash[: len(app)] = app
        # the bootloader's own code, so "find the bootloader by reading the top" has data
        code = bytes((i * 37 + 11) & 0xFF or 1 for i in range(min(600, self.boot_size)))
        self.flash[self.boot_start : self.boot_start + len(code)] = code
        self.char = 10.0 / real_baud(baud) if timing else 0.0
        self.led_time = (0.375 if timing else 0.0) if led_time is None else led_time
        self.page_time = page_time if timing else 0.0
        self.window = window
        self.watchdog = watchdog
        self.faults: list[Fault] = []
        self.stats = Stats()
        self._state_changed = threading.Condition()
        self.state = "app"
        self._lock = threading.RLock()
        self._rxq: deque[tuple[float, int]] = deque()
        self._reset_pending = False
        self._stop = False
        self._closed = False
        self.master, slave = pty.openpty()
        self.port = os.ttyname(slave)
        tty.setraw(slave)
        os.close(slave)  # a slave opened once reports HUP while nobody has it open
        self._thread = threading.Thread(target=self._run, name=f"stk500-{kind}", daemon=True)
        self._thread.start()

    # --- test API -------------------------------------------------------------------------

    @property
    def state(self) -> str:
        """The board's state: "app", "bootloader" or a subclass's; set by its own thread."""
        return self._state

    @state.setter
    def state(self, value: str) -> None:
        with self._state_changed:
            self._state = value
            self._state_changed.notify_all()

    def wait_for_state(self, state: str, timeout: float = 5.0) -> bool:
        """Wait until the board's own thread has reached ``state``: the host's last reply
        goes out before the program finishes, so reading ``state`` right after it races."""
        with self._state_changed:
            return self._state_changed.wait_for(lambda: self._state == state, timeout)

    def inject(self, kind: str, after: int = 0, command: Optional[int] = None) -> Fault:
        """Arm a fault ``after`` bytes (or ``command`` occurrences) from now."""
        with self._lock:
            base = self.stats.rx if command is None else self._command_count(command)
            f = Fault(kind, base + after, command)
            self.faults.append(f)
            return f

    def _command_count(self, command: int) -> int:
        return self._cmd_counts.get(command, 0)

    def press_reset(self) -> None:
        with self._lock:
            self._reset_pending = True

    def close(self) -> None:
        self._stop = True
        self._thread.join(timeout=2)
        if not self._closed:
            self._closed = True
            os.close(self.master)

    def app_bytes(self, n: int) -> bytes:
        return bytes(self.flash[:n])

    def __enter__(self) -> Stk500Board:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- driver ---------------------------------------------------------------------------

    _cmd_counts: dict[int, int]

    def _run(self) -> None:
        self._cmd_counts = {}
        hup = True
        prog: Optional[Program] = None
        op: Optional[Op] = None
        wait_until = 0.0
        busy_until = 0.0
        pending_tx: Optional[bytes] = None
        poller = select.poll()
        poller.register(self.master, select.POLLIN)
        while not self._stop and not self._closed:
            now = time.monotonic()
            timeout_ms = 2.0
            if busy_until:
                timeout_ms = max(0.0, min(timeout_ms, (busy_until - now) * 1000))
            try:
                ready = poller.poll(timeout_ms)
            except (OSError, ValueError):
                return
            now = time.monotonic()
            is_hup = any(ev & select.POLLHUP for _, ev in ready)
            if hup != is_hup:
                hup = is_hup
                if not hup and self.auto_reset:
                    prog, op = self._boot()
                    busy_until, pending_tx, wait_until = 0.0, None, 0.0
            if self._reset_pending:
                self._reset_pending = False
                prog, op = self._boot()
                busy_until, pending_tx, wait_until = 0.0, None, 0.0
            if hup:
                time.sleep(0.002)
                continue
            if any(ev & select.POLLIN for _, ev in ready):
                try:
                    data = os.read(self.master, 4096)
                except OSError:
                    data = b""
                garbled = self._garbled()
                for b in data:
                    if self._rx_byte(b, now, garbled):
                        prog, op = self._boot()
                        busy_until, pending_tx, wait_until = 0.0, None, 0.0
                    if self._closed:
                        return
            # run the bootloader until it needs something that is not there yet
            while prog is not None and op is not None and not self._stop:
                now = time.monotonic()
                try:
                    if busy_until:
                        if now < busy_until:
                            break
                        self._overrun(busy_until)
                        busy_until = 0.0
                        if pending_tx is not None:
                            self._send(pending_tx)
                            pending_tx = None
                        op = prog.send(None)
                        continue
                    kind = op[0]
                    if kind == "get":
                        if self._rxq and self._rxq[0][0] <= now:
                            _, b = self._rxq.popleft()
                            wait_until = 0.0
                            op = prog.send(b)
                            continue
                        if not wait_until:
                            wait_until = now + op[1]
                        if now >= wait_until:
                            wait_until = 0.0
                            op = prog.throw(_Idle())
                            continue
                        break
                    if kind == "put":
                        with self._lock:
                            self.stats.tx += len(op[1])
                        if self.timing and len(op[1]) > 2:
                            # polled putch: the CPU waits while all but the last two
                            # characters (UDR + shift register) go out
                            busy_until = now + (len(op[1]) - 2) * self.char
                            pending_tx = op[1]
                            continue
                        self._send(op[1])
                        op = prog.send(None)
                        continue
                    if kind == "busy":
                        if op[1] > 0:
                            busy_until = now + op[1]
                            continue
                        op = prog.send(None)
                        continue
                    raise AssertionError(op)
                except StopIteration:
                    prog, op = None, None
                    self.state = "app"
                    self.stats.log.append("application started")

    def _send(self, data: bytes) -> None:
        if not data or self._closed:
            return
        if self._garbled():
            data = bytes((b * 29 + 0x5B) & 0xFF for b in data)
        try:
            os.write(self.master, data)
        except OSError:
            pass

    def _boot(self) -> tuple[Optional[Program], Optional[Op]]:
        self.stats.resets += 1
        self._rxq.clear()
        self.state = "bootloader"
        self.stats.log.append("reset")
        prog = self._optiboot() if self.kind == "optiboot" else self._stk500v2()
        return prog, next(prog)

    def _rx_byte(self, b: int, now: float, garbled: bool) -> bool:
        """Queue one received byte; True when a fault resets the board."""
        with self._lock:
            self.stats.rx += 1
            n = self.stats.rx
            for f in self.faults:
                if f.fired or f.command is not None or f.at != n:
                    continue
                f.fired = True
                self.stats.log.append(f"fault {f.kind} at rx {n}")
                if f.kind == "drop":
                    return False
                if f.kind == "corrupt":
                    b ^= 0x10
                elif f.kind == "reset":
                    return True
                elif f.kind == "vanish":
                    self._closed = True
                    os.close(self.master)
                    return False
        if garbled:
            self.stats.garbled += 1
            b = (b * 29 + 0x5B) & 0xFF
        if self.state not in self.LISTENING:
            return False
        last = self._rxq[-1][0] if self._rxq else 0.0
        self._rxq.append((max(now, last) + self.char, b))
        return False

    def _garbled(self) -> bool:
        try:
            speed = termios.tcgetattr(self.master)[5]
        except termios.error:
            return False
        host = BAUD_TERMIOS.get(speed)
        return host is not None and abs(host - self.baud) / self.baud > 0.04

    def _overrun(self, end: float) -> None:
        if not self.timing:
            return
        kept: deque[tuple[float, int]] = deque()
        during = 0
        for t, b in self._rxq:
            if t <= end:
                during += 1
                if during > 3:
                    self.stats.overruns += 1
                    continue
            kept.append((t, b))
        self._rxq = kept

    def _command(self, first: int) -> bool:
        """Count a command; False when a fault says it must go unanswered."""
        with self._lock:
            self.stats.commands += 1
            n = self._cmd_counts.get(first, 0) + 1
            self._cmd_counts[first] = n
            for f in self.faults:
                if not f.fired and f.command == first and f.at == n:
                    f.fired = True
                    self.stats.log.append(f"fault {f.kind} on command 0x{first:02X} #{n}")
                    self._lost_reply = f.kind == "lose_reply"
                    return f.kind != "mute"
        self._lost_reply = False
        return True

    _lost_reply = False
    #: states in which received bytes reach the running program (subclasses add firmware)
    LISTENING: tuple[str, ...] = ("bootloader",)

    def _other_command(self, body: bytes) -> bytes:
        """The stk500v2 bootloader's answer to a command it does not know."""
        return bytes([body[0], 0xC0])

    def _put(self, data: bytes) -> Op:
        if self._lost_reply:
            return ("put", b"")
        return ("put", data)

    # --- flash ----------------------------------------------------------------------------

    def _erase(self, addr: int) -> None:
        page = self.mcu["page"]
        start = addr - addr % page
        if start >= self.boot_start:
            self.stats.bootloader_overwrites += 1
        self.flash[start : start + page] = b"\xff" * page
        self._erased.add(start)

    def _write(self, addr: int, buf: bytes) -> None:
        page = self.mcu["page"]
        start = addr - addr % page
        if start >= self.boot_start:
            self.stats.bootloader_overwrites += 1
        if start not in self._erased:
            self.stats.unerased_writes += 1
            self.stats.log.append(f"page 0x{start:05X} written without erase")
        self._erased.discard(start)
        for i, b in enumerate(buf[:page]):
            self.flash[start + i] &= b
        self.stats.pages_written += 1

    _erased: set[int] = set()

    # --- optiboot 4.4 (and ≥ 6 with 0x4D) ---------------------------------------------------

    def _optiboot(self) -> Program:
        self._erased = set()
        sig = self.mcu["sig"]
        page = self.mcu["page"]
        rampz = 0
        address = 0
        # LED flashes with the UART enabled but unread: only 3 characters survive
        yield ("busy", self.led_time)

        def getch() -> Generator[Op, Any, int]:
            try:
                b = yield ("get", self.watchdog)
            except _Idle:
                self.stats.log.append("watchdog: no byte for 1 s")
                raise
            return int(b)

        try:
            while True:
                ch = yield from getch()
                answer = self._command(ch)
                out = b""
                if ch == 0x41:
                    which = yield from getch()
                    out = bytes([{0x81: self.version[0], 0x82: self.version[1]}.get(which, 3)])
                elif ch == 0x42:
                    for _ in range(20):
                        yield from getch()
                elif ch == 0x45:
                    for _ in range(5):
                        yield from getch()
                elif ch == 0x55:
                    lo = yield from getch()
                    hi = yield from getch()
                    word = lo | hi << 8
                    if self.mcu["flash"] > 64 * 1024:
                        rampz = (rampz & 0xFE) | (1 if word & 0x8000 else 0)
                    address = (word << 1) & 0xFFFF
                elif ch == 0x56:
                    a = yield from getch()
                    yield from getch()
                    c = yield from getch()
                    yield from getch()
                    if a == 0x4D and self.version[0] >= 6:
                        rampz = (rampz & 0x01) | ((c << 1) & 0xFF)
                    out = b"\x00"
                elif ch == 0x64:
                    yield from getch()
                    length = (yield from getch()) or 256
                    yield from getch()
                    full = (rampz << 16) | address
                    if full < self.mcu["nrww"]:
                        self._erase(full)
                    buf = bytearray()
                    for _ in range(length):
                        buf.append((yield from getch()))
                    if full >= self.mcu["nrww"]:
                        self._erase(full)
                        yield ("busy", self.page_time)
                    eop = yield from getch()
                    if eop != 0x20:
                        return
                    if answer:
                        yield self._put(b"\x14")
                    buf += b"\xff" * (page - len(buf))
                    self._write(full, bytes(buf))
                    yield ("busy", self.page_time)
                    if answer:
                        yield self._put(b"\x10")
                    continue
                elif ch == 0x74:
                    yield from getch()
                    length = (yield from getch()) or 256
                    yield from getch()
                    eop = yield from getch()
                    if eop != 0x20:
                        return
                    data = bytearray()
                    for _ in range(length):
                        data.append(self.flash[((rampz << 16) | address) % len(self.flash)])
                        address = (address + 1) & 0xFFFF
                    if answer:
                        yield self._put(b"\x14" + bytes(data) + b"\x10")
                    continue
                elif ch == 0x75:
                    out = sig
                elif ch == 0x51:
                    eop = yield from getch()
                    if eop == 0x20 and answer:
                        yield self._put(b"\x14\x10")
                    self.stats.log.append("leave: watchdog 16 ms")
                    return
                eop = yield from getch()
                if eop != 0x20:
                    self.stats.log.append(f"framing: 0x{eop:02X} where 0x20 expected")
                    return  # watchdogConfig(16 ms); while(1);
                if answer:
                    yield self._put(b"\x14" + out + b"\x10")
        except _Idle:
            return

    # --- Debian stk500boot (Mega 2560) -------------------------------------------------------

    def _stk500v2(self) -> Program:
        self._erased = set()
        sig = self.mcu["sig"]
        page = self.mcu["page"]
        address = 0
        erase_address = 0
        bangs = 0
        seen = 0
        try:
            first = yield ("get", self.window)
        except _Idle:
            self.stats.log.append("no byte within the window: application")
            return
        pending: Optional[int] = first
        while True:
            try:
                # --- frame parser ---
                def nxt() -> Generator[Op, Any, int]:
                    nonlocal pending
                    if pending is not None:
                        b, pending = pending, None
                        return b
                    b = yield ("get", 4.9)
                    return int(b)

                b = yield from nxt()
                seen += 1
                if seen <= 9:
                    bangs = bangs + 1 if b == 0x21 else 0
                    if bangs >= 3:
                        self.stats.log.append("monitor entered (!!!)")
                        return
                if b != 0x1B:
                    continue
                seq = yield from nxt()
                hi = yield from nxt()
                lo = yield from nxt()
                length = hi << 8 | lo
                tok = yield from nxt()
                if tok != 0x0E or length > 285:
                    continue
                body = bytearray()
                for _ in range(length):
                    body.append((yield from nxt()))
                ck = yield from nxt()
                c = 0
                for x in bytes([0x1B, seq, hi, lo, 0x0E]) + body:
                    c ^= x
                if c != ck or not body:
                    self.stats.log.append("checksum error: frame dropped")
                    continue
                answer = self._command(body[0])
                if not answer:
                    continue
                cmd = body[0]
                leave = False
                if cmd == 0x01:
                    reply = b"\x01\x00\x08AVRISP_2"
                elif cmd == 0x03:
                    reply = bytes([cmd, 0, 0x0F])
                elif cmd in (0x10, 0x11):
                    reply = bytes([cmd, 0])
                    leave = cmd == 0x11
                elif cmd == 0x12:
                    reply = bytes([cmd, 0xC0])
                elif cmd == 0x06:
                    word = int.from_bytes(body[1:5], "big")
                    address = (word << 1) & 0xFFFFFFFF
                    reply = bytes([cmd, 0])
                elif cmd == 0x13:
                    size = body[1] << 8 | body[2]
                    if erase_address < self.boot_start:
                        self._erase(erase_address)
                        yield ("busy", self.page_time)
                        erase_address += page
                    temp = address
                    # boot_page_fill only loads the words given; the rest of the buffer is 0xFF
                    fill = bytearray(b"\xff" * page)
                    fill[temp % page : temp % page + size] = body[10 : 10 + size]
                    self._write(temp, bytes(fill))
                    yield ("busy", self.page_time)
                    address += size
                    reply = bytes([cmd, 0])
                elif cmd == 0x14:
                    size = body[1] << 8 | body[2]
                    data = bytes(self.flash[(address + i) % len(self.flash)] for i in range(size))
                    address += size
                    reply = bytes([cmd, 0]) + data + b"\x00"
                elif cmd == 0x1B:
                    reply = bytes([cmd, 0, sig[body[4] % 3], 0])
                elif cmd == 0x18:
                    reply = bytes([cmd, 0, 0xD8, 0])
                else:
                    reply = self._other_command(bytes(body))
                head = bytes([0x1B, seq, len(reply) >> 8, len(reply) & 0xFF, 0x0E]) + reply
                c = 0
                for x in head:
                    c ^= x
                yield self._put(head + bytes([c]))
                if leave:
                    self.stats.log.append("leave: jump to application")
                    return
            except _Idle:
                if self.flash[0:2] != b"\xff\xff":
                    self.stats.log.append("byte timeout: application")
                    return
