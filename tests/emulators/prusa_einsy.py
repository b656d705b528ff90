"""A Prusa MK3 (Einsy RAMBo) on a pty: the Mega stk500v2 bootloader of :mod:`stk500_board`
with Prusa's additions, the Einsy's USB-serial chip with its ';' defect, and a model of the
MK3 firmware's start-up: ``start``, the XFLASH handshake and the in-firmware STK500v1 handler
that writes the language catalogs into a W25X20CL SPI flash.

Faithful to ``research/prusa.md`` §1.2, §1.3, §1.6 and §5.2:

* bootloader: ``0x71 s0 s1 s2`` answers ``71 00`` (Prusa) or ``71 C0`` (stock Mega bootloader,
  ``prusa_bootloader=False``) and counts LCD progress; a watchdog reset goes straight to the
  application;
* the USB chip (``semicolon_defect=True``): every 0x3B from the host reaches the AVR followed by
  an extra 0xFF, as early 32U2 firmware did;
* firmware: flushes RX, prints ``start\\n``, waits ~1.75 s for ``w25x20cl_enter\\n``, answers
  ``w25x20cl_cfm\\n`` and serves GET_SYNC, GET_PARAMETER, SET_DEVICE(_EXT), READ_SIGN (the
  2560's), UNIVERSAL 0x4D (extended address), LOAD_ADDRESS with nibble-split bytes (no
  auto-increment), PROG_PAGE/READ_PAGE with nibble-split lengths, LEAVE (watchdog reboot and a
  fresh ``start``). A wrong end-of-packet byte answers 0x11 and reboots; PROG_PAGE type 'E'
  hangs the MCU (the watchdog is off);
* W25X20CL: page program ANDs and wraps inside its 256-byte page; a 64 KB block is erased only
  when a PROG_PAGE targets an address whose low 16 bits are 0, once per block per session.

After a boot without the handshake the firmware model answers what OctoPrint sends at
connect, as Prusa-Firmware 3.x does: every G-code line gets ``ok`` (line numbers and checksums
accepted), M115 the ``FIRMWARE_NAME`` line and capabilities, M105 temperatures, M20/M21 an
empty SD card; bytes that broke the handshake are the start of the host's first line.

Firmware faults (``firmware=``): ``prusa`` (v3.10+), ``old`` (prints ``start``, no XFLASH
handler: before v3.3, or a GD25Q20C board under v3.10), ``junk`` (pre-3.10: stray bytes after
the confirmation), ``silent`` (never prints ``start``: stuck at the splash screen).
``time_scale`` scales the firmware model's delays (start-up, handshake window, erase).
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any, Optional

from .stk500_board import Op, Program, Stk500Board, _Idle

XFLASH_SIZE = 0x40000
BLOCK = 0x10000
PAGE = 256
ENTER = b"w25x20cl_enter\n"
CONFIRM = b"w25x20cl_cfm\n"
FIRMWARE_NAME = "Prusa-Firmware 3.14.1 based on Marlin"


class W25X20CL:
    """The MK3's 256 KB SPI NOR flash: program can only clear bits, erase is per 64 KB block."""

    def __init__(self, size: int = XFLASH_SIZE) -> None:
        self.data = bytearray(b"\xff" * size)
        self.block_erases = 0
        self.page_programs = 0
        #: programs that needed a 1 where the flash holds a 0 (stale, never-erased data)
        self.stale_programs = 0

    def erase_block(self, address: int) -> None:
        start = address - address % BLOCK
        self.data[start : start + BLOCK] = b"\xff" * BLOCK
        self.block_erases += 1

    def program(self, address: int, data: bytes) -> None:
        page = address - address % PAGE
        stale = False
        for i, b in enumerate(data):
            a = page + (address % PAGE + i) % PAGE  # wraps inside the page
            if b & ~self.data[a] & 0xFF:
                stale = True
            self.data[a] &= b
        self.page_programs += 1
        self.stale_programs += stale

    def read(self, address: int, n: int) -> bytes:
        return bytes(self.data[(address + i) % len(self.data)] for i in range(n))


class PrusaEinsy(Stk500Board):
    """An Einsy RAMBo; ``port`` is the pty a host opens (opening it resets the board)."""

    LISTENING = ("bootloader", "firmware", "xflash", "marlin")

    def __init__(
        self,
        *,
        prusa_bootloader: bool = True,
        semicolon_defect: bool = True,
        firmware: str = "prusa",
        time_scale: float = 1.0,
        app: bytes = b"",
        timing: bool = False,
        erase_time: float = 0.15,
        program_time: float = 0.0008,
        firmware_name: str = FIRMWARE_NAME,
        **kw: Any,
    ) -> None:
        self.prusa_bootloader = prusa_bootloader
        self.firmware_name = firmware_name
        #: G-code lines the firmware model received (after the handshake window)
        self.gcode_lines: list[str] = []
        self.semicolon_defect = semicolon_defect
        self.firmware = firmware
        self.scale = time_scale
        self.erase_time = erase_time
        self.program_time = program_time
        self.xflash = W25X20CL()
        #: LCD progress the Prusa bootloader would show: upload size from 0x71, bytes written
        self.lcd_upload_size: Optional[int] = None
        self.lcd_written = 0
        self.events: list[str] = []
        self.starts = 0
        self._watchdog = False
        super().__init__("stk500v2", "m2560", 115200, timing=timing, app=app, **kw)

    def __enter__(self) -> PrusaEinsy:
        return self

    # --- the 32U2 USB-serial chip ----------------------------------------------------------

    def _rx_byte(self, b: int, now: float, garbled: bool) -> bool:
        if super()._rx_byte(b, now, garbled):
            return True
        if b == 0x3B and self.semicolon_defect:
            with self._lock:
                self.stats.log.append("32U2: extra 0xFF after ';'")
            return super()._rx_byte(0xFF, now, garbled)
        return False

    # --- bootloader additions --------------------------------------------------------------

    def _other_command(self, body: bytes) -> bytes:
        if body[0] == 0x71 and self.prusa_bootloader and len(body) >= 4:
            self.lcd_upload_size = body[1] | body[2] << 8 | body[3] << 16
            self.lcd_written = 0
            self.events.append(f"LCD: upgrading firmware, {self.lcd_upload_size} bytes")
            return bytes([0x71, 0x00])
        return super()._other_command(body)

    def _write(self, addr: int, buf: bytes) -> None:
        super()._write(addr, buf)
        self.lcd_written += len(buf)

    def _stk500v2(self) -> Program:
        if self._watchdog:
            # a watchdog reset goes straight to the application
            self._watchdog = False
        else:
            yield from super()._stk500v2()
            self.stats.log.append("bootloader done")
            yield ("busy", 0.05 * self.scale)
        yield from self._firmware()

    def watchdog_reset(self) -> None:
        """What the firmware's LEAVE does: a reset that skips the bootloader's window."""
        self._watchdog = True
        self.press_reset()

    # --- the MK3 firmware --------------------------------------------------------------------

    def _firmware(self) -> Program:
        while True:
            self.state = "firmware"
            self.starts += 1
            if self.flash[0:2] == b"\xff\xff":
                self.events.append("no application: the bootloader waits")
                self.state = "bootloader"
                yield from super()._stk500v2()
                continue
            if self.firmware == "silent":
                self.events.append("stuck at the splash screen")
                while True:
                    try:
                        yield ("get", 3600.0)
                    except _Idle:
                        pass
            yield ("busy", 0.002 * self.scale)
            self._rxq.clear()  # the firmware flushes RX before announcing itself
            yield self._put(b"start\n")
            self.events.append("start")
            if self.firmware == "old":
                yield from self._marlin()
                return
            entered, early = yield from self._handshake()
            if not entered:
                yield from self._marlin(early)
                return
            yield self._put(CONFIRM)
            if self.firmware == "junk":
                yield self._put(b"\x00ol\x00")
            self.events.append("xflash handler entered")
            self.state = "xflash"
            again = yield from self._xflash()
            if not again:
                return
            self.events.append("watchdog reboot")
            yield ("busy", 0.06 * self.scale)

    def _handshake(self) -> Generator[Op, Any, tuple[bool, bytes]]:
        """(entered, the bytes that broke it: the start of the host's first line)."""
        got = bytearray()
        window = 1.75 * self.scale
        while len(got) < len(ENTER):
            try:
                b = yield ("get", window)
            except _Idle:
                self.events.append("no handshake: normal boot")
                return False, b""
            got.append(b)
            if got != ENTER[: len(got)]:
                self.events.append(f"handshake broken by {bytes(got)!r}: normal boot")
                return False, bytes(got)
        return True, b""

    def _marlin(self, early: bytes = b"") -> Program:
        """The running firmware: a G-code line in, its answer out."""
        self.state = "marlin"
        line = bytearray(early)
        while True:
            try:
                b = yield ("get", 3600.0)
            except _Idle:
                continue
            if b not in (0x0A, 0x0D):
                if len(line) < 96:  # Marlin's MAX_CMD_SIZE: longer lines are cut
                    line.append(b)
                continue
            text = line.decode("ascii", "replace").strip()
            line.clear()
            if text:
                yield self._put(self._gcode(text).encode())

    def _gcode(self, text: str) -> str:
        """Prusa-Firmware's answer to one line (``N<n> … *<checksum>`` taken as sent)."""
        self.gcode_lines.append(text)
        if text.startswith("N") and " " in text:
            text = text.split(" ", 1)[1]
        text = text.split("*", 1)[0].strip()
        word = text.split(" ", 1)[0].upper()
        if word == "M115":
            return (
                f"FIRMWARE_NAME:{self.firmware_name} SOURCE_CODE_URL:https://github.com/"
                "prusa3d/Prusa-Firmware PROTOCOL_VERSION:1.0 MACHINE_TYPE:Prusa i3 MK3S "
                "EXTRUDER_COUNT:1 UUID:00000000-0000-0000-0000-000000000000\n"
                "Cap:AUTOREPORT_TEMP:1\nCap:AUTOREPORT_FANS:1\nCap:AUTOREPORT_POSITION:1\n"
                "Cap:EXTENDED_M20:1\nok\n"
            )
        if word == "M105":
            return "ok T:21.3 /0.0 B:21.1 /0.0 T0:21.3 /0.0 @:0 B@:0 P:0.0 A:26.4\n"
        if word == "M21":
            return "echo:SD card ok\nok\n"
        if word == "M20":
            return "Begin file list\nEnd file list\nok\n"
        if word and word[0] in "GMT" and word[1:].isdigit():
            return "ok\n"
        return f'echo:Unknown command: "{text}"\nok\n'

    def _xflash(self) -> Generator[Op, Any, bool]:
        """The in-firmware STK500v1 handler; returns True when it reboots (LEAVE, bad EOP)."""
        erased: set[int] = set()
        address = 0
        ext = 0

        def getch() -> Generator[Op, Any, int]:
            b = yield ("get", 3600.0)
            return int(b)

        def eop() -> Generator[Op, Any, bool]:
            b = yield from getch()
            if b != 0x20:
                self.events.append(f"bad end of packet 0x{b:02X}: reboot")
                yield self._put(b"\x11")
                return False
            return True

        try:
            while True:
                ch = yield from getch()
                answer = self._command(ch)
                out = b""
                if ch == 0x41:
                    which = yield from getch()
                    out = bytes([{0x81: 6, 0x82: 2}.get(which, 3)])
                elif ch == 0x42:
                    for _ in range(20):
                        yield from getch()
                elif ch == 0x45:
                    for _ in range(5):
                        yield from getch()
                elif ch == 0x75:
                    out = b"\x1e\x98\x01"
                elif ch == 0x56:
                    a = yield from getch()
                    yield from getch()
                    c = yield from getch()
                    yield from getch()
                    if a == 0x4D:
                        ext = c
                    out = b"\x00"
                elif ch == 0x55:
                    n = []
                    for _ in range(4):
                        n.append((yield from getch()))
                    word = (n[0] | n[1]) | (n[2] | n[3]) << 8
                    address = (ext << 17) | (word << 1)
                elif ch in (0x64, 0x74):
                    n = []
                    for _ in range(4):
                        n.append((yield from getch()))
                    length = ((n[0] | n[1]) << 8) | (n[2] | n[3])
                    memtype = yield from getch()
                    if ch == 0x64:
                        buf = bytearray()
                        for _ in range(length):
                            buf.append((yield from getch()))
                        data = bytes(buf)
                        if memtype == ord("E"):
                            self.events.append("PROG_PAGE type E: MCU hangs")
                            while True:  # the watchdog is off: nothing answers again
                                try:
                                    yield ("get", 3600.0)
                                except _Idle:
                                    pass
                        if not (yield from eop()):
                            return True
                        if answer:
                            yield self._put(b"\x14")
                        if address & 0xFFFF == 0 and address // BLOCK not in erased:
                            erased.add(address // BLOCK)
                            self.xflash.erase_block(address)
                            yield ("busy", self.erase_time * self.scale)
                        self.xflash.program(address, data)
                        yield ("busy", self.program_time * self.scale)
                        if answer:
                            yield self._put(b"\x10")
                        continue
                    if not (yield from eop()):
                        return True
                    if answer:
                        yield self._put(b"\x14" + self.xflash.read(address, length) + b"\x10")
                    continue
                elif ch == 0x51:
                    if not (yield from eop()):
                        return True
                    if answer:
                        yield self._put(b"\x14\x10")
                    self.events.append("xflash leave")
                    return True
                if not (yield from eop()):
                    return True
                if answer:
                    yield self._put(b"\x14" + out + b"\x10")
        except _Idle:  # pragma: no cover - the handler waits forever
            return False


def make_prusa_app(size: int, seed: int = 3, signature: Optional[bytes] = None) -> bytes:
    """A firmware-like image: a 2560 vector table (57 JMPs), pseudo-random code with plenty
    of ';' bytes, and ``signature`` (the language signature) embedded near the end."""
    import random

    rnd = random.Random(seed)
    vectors = b"".join(
        b"\x0c\x94" + rnd.randrange(0x100, 0x4000).to_bytes(2, "little") for _ in range(57)
    )
    body = bytearray(rnd.randrange(256) for _ in range(size - len(vectors)))
    for i in range(0, len(body), 97):
        body[i] = 0x3B
    if signature is not None:
        body[-64 : -64 + len(signature)] = signature
    return vectors + bytes(body)
