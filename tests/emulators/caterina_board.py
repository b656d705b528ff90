"""A Prusa MMU2S/MMU3 or CW1/CW1S control board (ATmega32U4, Prusa's Caterina avr109
bootloader) on ptys, with its USB re-enumeration.

Faithful to ``research/prusa.md`` §2 (Prusa ``Caterina.c``): ``S`` answers ``CATERIN``, ``b``
``Y 00 80``, ``s`` the 32U4 signature reversed, ``A`` takes a big-endian word address, ``B``
erases and writes a page only when it is page-aligned and below 0x7000 (others are silently
ignored but still answered), ``g`` reads any length, addresses auto-increment, byte-level writes
answer ``?``, ``E`` starts the application 0.5 s later. The bootloader leaves after 8 s without
a ``B``/``g`` command, but only when flash word 0 is programmed.

USB is modelled as in :mod:`katapult_node`: the board's current port is a pty listed in a
:class:`UsbWorld` with its VID:PID, serial number and USB location; re-enumeration is that pty
vanishing and a new one appearing (after ``reenumerate`` seconds) at the same location with the
other product id. Entry from the application (``touch=``): ``mmu3`` reboots on any 1200-baud
line coding (``usb_cdc.cpp``); ``arduino`` (MM-control-01, CW1 firmware) only when the port is
then closed at 1200; ``none`` never (a board with a Leonardo bootloader: only the reset button,
:meth:`press_reset`, works).

Timing (scaled by ``time_scale``): every command costs one USB round trip (1 ms frame), a page
erase + write 8.5 ms (two SPM operations of ~4.2 ms). Faults (:meth:`inject`): ``drop`` or
``corrupt`` the n-th byte from the host, ``unplug`` the device at the n-th byte, ``stray``
(``AT\\r`` from a ModemManager-like prober arrives right after re-enumeration).
"""

from __future__ import annotations

import os
import select
import termios
import threading
import time
import tty
from dataclasses import dataclass, field
from typing import Optional

from octoprint_flasher.links.bootloader_entry import UsbPort

from .katapult_node import UsbWorld

SIG_32U4 = b"\x1e\x95\x87"
FLASH = 32 * 1024
PAGE = 128
BOOT_START = 0x7000

MMU_IDS = ((0x2C99, 0x0004), (0x2C99, 0x0003))
CW1_IDS = ((0x2C99, 0x0008), (0x2C99, 0x0007))
CW1S_IDS = ((0x2C99, 0x000F), (0x2C99, 0x000E))
LEONARDO_IDS = ((0x2341, 0x8036), (0x2341, 0x0036))


@dataclass
class Fault:
    kind: str  # drop | corrupt | unplug
    at: int
    fired: bool = False


@dataclass
class Stats:
    rx: int = 0
    commands: int = 0
    pages_written: int = 0
    ignored_pages: int = 0
    touches: int = 0
    enumerations: int = 0
    log: list[str] = field(default_factory=list)


class _Pty:
    def __init__(self) -> None:
        self.master, slave = os.openpty()
        tty.setraw(slave)
        attrs = termios.tcgetattr(slave)
        attrs[3] &= ~termios.ECHO
        termios.tcsetattr(slave, termios.TCSANOW, attrs)
        self.device = os.ttyname(slave)
        os.close(slave)  # a slave opened once reports HUP while nobody holds it
        self.was_open = False

    def close(self) -> None:
        try:
            os.close(self.master)
        except OSError:
            pass


class CaterinaBoard:
    """One 32U4 board; ``port`` is its current pty (None while re-enumerating)."""

    def __init__(
        self,
        ids: tuple[tuple[int, int], tuple[int, int]] = MMU_IDS,
        *,
        touch: str = "mmu3",
        app: bytes = b"",
        mode: str = "app",
        world: Optional[UsbWorld] = None,
        location: str = "1-1.4",
        serial_number: str = "CZPX1234X004XK01234",
        time_scale: float = 1.0,
        timing: bool = True,
        reenumerate: float = 0.8,
        boot_timeout: float = 8.0,
        identifier: bytes = b"CATERIN",
    ) -> None:
        self.app_id, self.boot_id = ids
        self.touch = touch
        self.world = world or UsbWorld()
        self.location = location
        self.serial_number = serial_number
        self.scale = time_scale
        self.timing = timing
        self.reenumerate = reenumerate
        self.boot_timeout = boot_timeout
        self.identifier = identifier
        self.flash = bytearray(b"\xff" * FLASH)
        self.flash[: len(app)] = app
        self.flash[BOOT_START : BOOT_START + 16] = bytes(range(1, 17))  # Caterina's code
        self.stats = Stats()
        self.faults: list[Fault] = []
        self.stray: bytes = b""
        self.events: list[str] = []
        self.mode = "gone"
        self._lock = threading.RLock()
        self._pty: Optional[_Pty] = None
        self._old: list[_Pty] = []
        self._pending: Optional[tuple[float, str]] = None
        self._stop = threading.Event()
        self._buf = bytearray()
        self._address = 0
        self._last_command = 0.0
        self._boot(mode if mode == "bootloader" or self.app_valid else "bootloader")
        self._thread = threading.Thread(target=self._run, name="caterina", daemon=True)
        self._thread.start()

    # --- test API ---------------------------------------------------------------------------

    @property
    def port(self) -> Optional[str]:
        pty = self._pty
        return pty.device if pty is not None else None

    @property
    def app_valid(self) -> bool:
        return self.flash[0:2] != b"\xff\xff"

    def list_ports(self) -> list[UsbPort]:
        return self.world.list_ports()

    def inject(self, kind: str, after: int) -> Fault:
        with self._lock:
            f = Fault(kind, self.stats.rx + after)
            self.faults.append(f)
            return f

    def press_reset(self) -> None:
        """The reset button: an external reset always enters the bootloader."""
        with self._lock:
            self.events.append("reset button")
            self._reenumerate("bootloader", 0.3)

    def wait_for_mode(self, mode: str, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.mode == mode and self._pending is None:
                return True
            time.sleep(0.01)
        return False

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        with self._lock:
            while self._old:
                self._old.pop().close()
            if self._pty is not None:
                self.world.unplug(self._pty.device)
                self._pty.close()
                self._pty = None

    def __enter__(self) -> CaterinaBoard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- USB --------------------------------------------------------------------------------

    def _boot(self, mode: str) -> None:
        self.mode = mode
        self._buf.clear()
        self._address = 0
        self._last_command = time.monotonic()
        self._pty = _Pty()
        while self._old:
            self._old.pop().close()
        vid, pid = self.boot_id if mode == "bootloader" else self.app_id
        product = "MMU bootloader" if mode == "bootloader" else "Original Prusa MMU"
        self.world.plug(
            UsbPort(
                self._pty.device,
                vid,
                pid,
                self.serial_number,
                "Prusa Research (prusa3d.com)",
                product,
                self.location,
            )
        )
        self.stats.enumerations += 1
        self.events.append(f"{mode} on {self._pty.device} ({vid:04x}:{pid:04x})")
        if mode == "bootloader" and self.stray:
            # a prober (ModemManager) got there first: its bytes are taken as commands and
            # the answers wait in the port for whoever opens it next
            self._buf += self.stray
            self._process(self._pty)

    def _reenumerate(self, into: str, delay: float, vanish: bool = False) -> None:
        """Leave the bus; come back as ``into`` after ``delay``. The old pty stays allocated
        until the new one exists, so the device comes back under another tty name (as it
        often does on a real host); ``vanish`` closes it at once (an unplugged cable)."""
        if self._pty is not None:
            self.world.unplug(self._pty.device)
            if vanish:
                self._pty.close()
            else:
                self._old.append(self._pty)
            self._pty = None
        self.mode = "gone"
        self._pending = (time.monotonic() + delay * self.scale, into)

    # --- thread -----------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                pending = self._pending
                if pending is not None and time.monotonic() >= pending[0]:
                    self._pending = None
                    self._boot(pending[1])
                pty = self._pty
            if pty is None:
                time.sleep(0.005)
                continue
            try:
                ready = select.poll()
                ready.register(pty.master, select.POLLIN)
                events = ready.poll(5)
            except (OSError, ValueError):
                time.sleep(0.005)
                continue
            hup = any(ev & select.POLLHUP for _, ev in events)
            with self._lock:
                if pty is not self._pty:
                    continue
                if not hup:
                    pty.was_open = True
                if self.mode == "app":
                    self._app_tick(pty, hup)
                    if any(ev & select.POLLIN for _, ev in events) and not hup:
                        try:
                            os.read(pty.master, 4096)
                        except OSError:
                            pass
                    continue
                if self.mode != "bootloader":
                    continue
                if any(ev & select.POLLIN for _, ev in events) and not hup:
                    try:
                        data = os.read(pty.master, 4096)
                    except OSError:
                        data = b""
                    for b in data:
                        if not self._rx(b):
                            break
                    if self._pty is pty:
                        self._process(pty)
                if (
                    self.mode == "bootloader"
                    and self.app_valid
                    and time.monotonic() - self._last_command > self.boot_timeout * self.scale
                ):
                    self.events.append("bootloader timeout: application")
                    self._reenumerate("app", self.reenumerate)

    def _app_tick(self, pty: _Pty, hup: bool) -> None:
        try:
            speed = termios.tcgetattr(pty.master)[4]
        except termios.error:
            return
        if speed != termios.B1200 or self.touch == "none":
            return
        if self.touch == "arduino" and not hup:
            return  # the line coding alone is not enough: the port must also be closed
        self.stats.touches += 1
        self.events.append("1200-baud touch: rebooting into the bootloader")
        self._reenumerate("bootloader", self.reenumerate)

    def _rx(self, b: int) -> bool:
        self.stats.rx += 1
        for f in self.faults:
            if f.fired or f.at != self.stats.rx:
                continue
            f.fired = True
            self.stats.log.append(f"fault {f.kind} at rx {self.stats.rx}")
            if f.kind == "drop":
                return True
            if f.kind == "corrupt":
                b ^= 0x10
            elif f.kind == "unplug":
                self.events.append("unplugged")
                self._reenumerate("gone", 3600.0, vanish=True)
                return False
        self._buf.append(b)
        return True

    def _send(self, pty: _Pty, data: bytes, device_time: float = 0.0) -> None:
        if self.timing:
            time.sleep((0.001 + device_time) * self.scale)
        try:
            os.write(pty.master, data)
        except OSError:
            pass

    def _process(self, pty: _Pty) -> None:
        buf = self._buf
        while buf:
            cmd = buf[0]
            need = {ord("T"): 2, ord("A"): 3, ord("g"): 4, ord("B"): 4}.get(cmd, 1)
            if cmd == ord("B") and len(buf) >= 4:
                need = 4 + (buf[1] << 8 | buf[2])
            if len(buf) < need:
                return
            body = bytes(buf[:need])
            del buf[:need]
            self.stats.commands += 1
            reply, device_time = self._command(body)
            if reply:
                self._send(pty, reply, device_time)
            if self.mode != "bootloader":
                return

    def _command(self, body: bytes) -> tuple[bytes, float]:
        c = chr(body[0])
        if body[0] == 0x1B:
            return b"", 0.0
        if c == "S":
            return self.identifier, 0.0
        if c == "V":
            return b"10", 0.0
        if c == "p":
            return b"S", 0.0
        if c == "a":
            return b"Y", 0.0
        if c == "b":
            return b"Y\x00\x80", 0.0
        if c == "t":
            return b"\x44\x00", 0.0
        if c in "TPL":
            return b"\r", 0.0
        if c == "s":
            return bytes(reversed(SIG_32U4)), 0.0
        if c == "r":
            return b"\x2f", 0.0
        if c == "F":
            return b"\xff", 0.0
        if c == "N":
            return b"\xd8", 0.0
        if c == "Q":
            return b"\xcb", 0.0
        if c == "A":
            self._address = (body[1] << 8 | body[2]) << 1
            return b"\r", 0.0
        if c == "e":
            self.flash[:BOOT_START] = b"\xff" * BOOT_START
            return b"\r", 0.0045 * (BOOT_START // PAGE)
        if c == "E":
            self.events.append("exit: application in 0.5 s")
            self._pending_exit()
            return b"\r", 0.0
        if c == "B":
            self._last_command = time.monotonic()
            length = body[1] << 8 | body[2]
            data = body[4 : 4 + length]
            addr = self._address
            self._address += length
            if chr(body[3]) != "F":
                return b"\r", 0.0  # EEPROM: not modelled
            if addr % PAGE or addr >= BOOT_START:
                self.stats.ignored_pages += 1
                self.stats.log.append(f"page 0x{addr:04X} ignored")
                return b"\r", 0.0
            page = bytearray(b"\xff" * PAGE)
            for i, b in enumerate(data):
                page[i % PAGE] = b
            self.flash[addr : addr + PAGE] = page
            self.stats.pages_written += 1
            return b"\r", 0.0085
        if c == "g":
            self._last_command = time.monotonic()
            length = body[1] << 8 | body[2]
            addr = self._address
            self._address += length
            return bytes(self.flash[(addr + i) % FLASH] for i in range(length)), 0.0
        return b"?", 0.0

    def _pending_exit(self) -> None:
        # the reply goes out first; the application starts 0.5 s later
        pty = self._pty
        if pty is not None:
            self.mode = "leaving"

            def later() -> None:
                time.sleep(0.5 * self.scale)
                with self._lock:
                    if self._pty is pty:
                        self._reenumerate("app" if self.app_valid else "bootloader", 0.3)

            threading.Thread(target=later, daemon=True).start()
