"""An emulated RP2040/RP2350 board for pyusb: Klipper running over USB CDC, and the boot ROM.

``usb.core.find(backend=PicobootBackend([EmulatedRp2040()]))`` finds it like a board on a USB
port. Running Klipper it enumerates as ``1d50:614e`` (CDC ACM, two interfaces) and shows a
serial port through :meth:`EmulatedRp2040.list_ports`; a 1200-baud touch of that port (the
``open_serial`` it offers) makes it re-enumerate on the same USB path as the boot ROM
``2e8a:0003`` (RP2040) or ``2e8a:000f`` (RP2350), or as Katapult ``1d50:6177`` when a Katapult
is installed. The ROM side follows pico-sdk ``boot/picoboot.h``: the mass-storage interface 0
plus the vendor interface 1 (or the vendor interface alone), 32-byte commands with magic and
token, data phase, a zero-length ACK only after the work is done, stalls with a status for
bad commands, lengths and alignment, GET_COMMAND_STATUS and INTERFACE_RESET.

Flash is a NOR chip (W25Q16JV-like): erase sets 4 KiB sectors to 0xFF, programming 256-byte
pages ANDs into what is there (so writing without erasing corrupts), reads beyond the chip
wrap around the 16 MiB XIP window like the real address decoder. The ROM starts in XIP
(command-mode reads work); ERASE and WRITE need EXIT_XIP first: on hardware they would send
commands to a flash still in XIP mode, here they fail with INVALID_STATE so a client that
forgets is caught. EXCLUSIVE_ACCESS locks the USB drive out: a drive write (:meth:`msc_write`)
is refused while it is held, and interleaves with (and spoils) PICOBOOT writes when it is not.

Timing: datasheet typical times (W25Q16JV: sector erase 45 ms, page program 0.4 ms),
full-speed USB (64-byte packets, 12 Mbit/s with packet overhead; control transfers end at a
frame boundary), re-enumeration time, all multiplied by ``time_scale``. Faults: see
:class:`Faults`. Written without looking at ``octoprint_flasher.protocols.picoboot``.
"""

from __future__ import annotations

import errno
import math
import struct
import threading
import time
from array import array
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import usb.core

from octoprint_flasher.links.bootloader_entry import UsbPort
from tests.emulators.usb_backend import Descriptor as _Desc
from tests.emulators.usb_backend import EmulatedBackend
from tests.emulators.usb_backend import gone as _gone
from tests.emulators.usb_backend import pipe as _pipe

FRAME_S = 0.001
PACKET = 64
OVERHEAD = 13  # token, PID, CRC16, handshake, sync/EOP per packet (bytes)
FRAME_BUDGET = 1350  # usable bytes per 1 ms full-speed frame

SECTOR = 4096
PAGE = 256
FLASH_BASE = 0x10000000
XIP_WINDOW = 0x01000000
ERASE_S = 0.045
PROGRAM_S = 0.0004
MAGIC = 0x431FD10B
PICOBIN_START = 0xFFFFDED3

KLIPPER_ID = (0x1D50, 0x614E)
KATAPULT_ID = (0x1D50, 0x6177)

# status codes, restated from picoboot.h on purpose (not imported from the host side)
OK, UNKNOWN_CMD, BAD_CMD_LEN, BAD_XFER_LEN, BAD_ADDRESS, BAD_ALIGN = 0, 1, 2, 3, 4, 5
INTERLEAVED, REBOOTING, UNKNOWN_ERROR, INVALID_STATE = 6, 7, 8, 9

_ARGS = {0x01: 1, 0x02: 12, 0x03: 8, 0x84: 8, 0x05: 8, 0x06: 0, 0x07: 0, 0x0A: 16}


def bulk_seconds(n: int) -> float:
    """Wire time of ``n`` bytes (at least one packet: a ZLP is a packet too) at full speed."""
    packets = max(1, math.ceil(n / PACKET))
    return (n + packets * OVERHEAD) / FRAME_BUDGET * FRAME_S


def control_seconds_from(now: float, n: int) -> float:
    """Completion time of a control transfer issued at ``now``: setup, data, status, then the
    end of that frame (as the DFU emulator models it)."""
    wire = (8 + OVERHEAD + n + (math.ceil(n / PACKET) + 1) * OVERHEAD) / FRAME_BUDGET * FRAME_S
    return math.ceil((now + wire) / FRAME_S - 1e-9) * FRAME_S


def mpeg2_crc(data: bytes) -> int:
    """CRC-32/MPEG-2 by a byte table (the host computes it bit by bit)."""
    table = []
    for i in range(256):
        c = i << 24
        for _ in range(8):
            c = (c << 1 ^ 0x04C11DB7) & 0xFFFFFFFF if c & 0x80000000 else (c << 1) & 0xFFFFFFFF
        table.append(c)
    crc = 0xFFFFFFFF
    for b in data:
        crc = (crc << 8 & 0xFFFFFFFF) ^ table[(crc >> 24) ^ b]
    return crc


@dataclass(frozen=True)
class Chip:
    name: str
    pid: int
    rom_magic: int  # the word at ROM 0x10: 'M' 'u' version
    flash_size: int
    sram: tuple[int, int]


RP2040 = Chip("rp2040", 0x0003, 0x0201754D, 2 * 1024 * 1024, (0x20000000, 0x20042000))
RP2350 = Chip("rp2350", 0x000F, 0x0202754D, 4 * 1024 * 1024, (0x20000000, 0x20082000))


@dataclass
class Faults:
    """Things that go wrong, switched on per test."""

    stall: dict[int, int] = field(default_factory=dict)  # command id -> times to refuse
    stall_status: int = UNKNOWN_ERROR
    vanish_after_bytes: Optional[int] = None  # unplugged after programming this many bytes
    hang_command: Optional[int] = None  # this command id never completes (ACK never comes)
    access_denied: bool = False  # no udev rule: open fails with EACCES
    busy: bool = False  # another program holds the interface: claim fails with EBUSY
    weak_bit_at: Optional[int] = None  # a flash cell that reads back with bit 0 flipped
    no_app_after_reboot: bool = False  # the board does not come back after REBOOT


class FakeSerial:
    """The CDC ACM port of the Klipper application, as far as a 1200-baud touch needs it."""

    def __init__(self, board: EmulatedRp2040, port: str, baudrate: int) -> None:
        self.board = board
        self.port = port
        self.baudrate = baudrate
        self._dtr = True
        self.is_open = True

    @property
    def dtr(self) -> bool:
        return self._dtr

    @dtr.setter
    def dtr(self, level: bool) -> None:
        self._dtr = level
        if not level and self.baudrate == 1200:
            self.board.bootloader_request()

    def close(self) -> None:
        if self.is_open and self.baudrate == 1200:
            self.board.bootloader_request()  # closing drops DTR (HUPCL)
        self.is_open = False


class EmulatedRp2040:
    """One RP2040/RP2350 board: its flash, what it runs, and its USB identity."""

    def __init__(
        self,
        chip: Chip = RP2040,
        time_scale: float = 0.01,
        faults: Optional[Faults] = None,
        mode: str = "boot",
        msc: bool = True,
        katapult: bool = False,
        bus: int = 1,
        port_numbers: tuple[int, ...] = (1, 3),
        serial: str = "E66138935F2D3A28",
        tty: str = "/dev/ttyACM0",
        reenumerate_s: float = 0.6,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.chip = chip
        self.scale = time_scale
        self.faults = faults or Faults()
        self.msc = msc
        self.katapult = katapult
        self.bus = bus
        self.port_numbers = port_numbers
        self.serial = serial
        self.tty = tty
        self.reenumerate_s = reenumerate_s
        self.clock = clock
        self._sleep = sleep
        self.epoch = clock()
        self.flash = bytearray(b"\xff" * chip.flash_size)
        self.sram = bytearray(chip.sram[1] - chip.sram[0])
        self.lock = threading.RLock()
        self.address = 7
        self.mode = mode  # "boot", "app", "katapult", "gone", "hung"
        self._next: Optional[tuple[float, str]] = None
        # observable history
        self.commands: list[tuple[int, int, bytes]] = []  # (cmd id, transfer length, args)
        self.erased: list[int] = []
        self.programmed: list[int] = []
        self.bytes_programmed = 0
        self.reboots = 0
        self.touches = 0
        self.corrupted_pages: list[int] = []
        self._reset_rom()

    # -- helpers for tests, the demo and the benchmark ---------------------------------------
    def read_flash(self, address: int, length: int) -> bytes:
        off = address - FLASH_BASE
        return bytes(self.flash[off : off + length])

    def load_flash(self, address: int, data: bytes) -> None:
        off = address - FLASH_BASE
        self.flash[off : off + len(data)] = data

    @property
    def usb_path(self) -> str:
        return f"{self.bus}-{'.'.join(str(p) for p in self.port_numbers)}"

    @property
    def present(self) -> bool:
        self.tick()
        return self.mode in ("boot", "app", "katapult")

    @property
    def usb_ids(self) -> tuple[int, int]:
        if self.mode == "app":
            return KLIPPER_ID
        if self.mode == "katapult":
            return KATAPULT_ID
        return 0x2E8A, self.chip.pid

    def _reset_rom(self) -> None:
        self.xip = "xip"  # "xip" (command-mode XIP reads) or "off" (EXIT_XIP done)
        self.exclusive = 0
        self.stalled = False
        self.phase = "idle"  # idle, data_out, data_in, ack_in, ack_out
        self.cmd: Optional[tuple[int, int, int, bytes]] = None  # (token, id, length, args)
        self.buffer = bytearray()
        self.out_data = b""
        self.status = (0, OK, 0, False)  # token, status, cmd id, in progress
        self.busy_until = 0.0
        self.hung = False
        self.msc_dirty: Optional[int] = None  # a drive write left a page half-assembled

    # -- time --------------------------------------------------------------------------------
    def now(self) -> float:
        """Model seconds since the board was created."""
        return (self.clock() - self.epoch) / self.scale

    def wait_until(self, t_model: float) -> None:
        delay = self.epoch + t_model * self.scale - self.clock()
        if delay > 0:
            self._sleep(delay)

    def spend(self, seconds: float) -> None:
        self.wait_until(self.now() + seconds)

    def tick(self) -> None:
        with self.lock:
            if self._next is not None and self.now() >= self._next[0]:
                then = self._next[1]
                self._next = None
                self.mode = then
                self.address += 1
                if then == "boot":
                    self._reset_rom()

    def _replug(self, then: str, after: float = 0.0) -> None:
        """Drop off the bus now; come back as ``then`` after ``after`` + re-enumeration."""
        self.mode = "gone"
        if then == "hung":
            self.mode = "hung"
            self._next = None
            return
        self._next = (self.now() + after + self.reenumerate_s, then)

    # -- what the flash would boot -----------------------------------------------------------
    def boots_to(self) -> str:
        """After a normal reset: the application if flash holds a bootable image, else the
        ROM's USB boot (an RP2040 boot2 with a bad CRC, an RP2350 without IMAGE_DEF)."""
        if self.faults.no_app_after_reboot:
            return "hung"
        if self.chip is RP2040:
            boot2 = bytes(self.flash[:256])
            if mpeg2_crc(boot2[:252]) != struct.unpack_from("<I", boot2, 252)[0]:
                return "boot"
            sp, reset = struct.unpack_from("<II", self.flash, 256)
        else:
            head = bytes(self.flash[:4096])
            if struct.pack("<I", PICOBIN_START) not in head:
                return "boot"
            sp, reset = struct.unpack_from("<II", self.flash, 0)
        lo, hi = self.chip.sram
        if lo < sp <= hi and FLASH_BASE <= reset < FLASH_BASE + self.chip.flash_size:
            return "app"
        return "hung"

    def bootloader_request(self) -> None:
        """Klipper's usb_cdc: 1200 baud + DTR low -> Katapult if installed, else the ROM."""
        with self.lock:
            if self.mode != "app":
                return
            self.touches += 1
            self._replug("katapult" if self.katapult else "boot")

    # -- serial side (pyserial stand-ins) ---------------------------------------------------
    def list_ports(self) -> list[UsbPort]:
        self.tick()
        if self.mode not in ("app", "katapult"):
            return []
        vid, pid = self.usb_ids
        return [
            UsbPort(
                device=self.tty,
                vid=vid,
                pid=pid,
                serial_number=self.serial,
                manufacturer="Klipper" if self.mode == "app" else "katapult",
                product=self.chip.name,
                location=f"{self.usb_path}:1.0",
            )
        ]

    def open_serial(self, port: str, baudrate: int = 9600, **_kwargs: Any) -> FakeSerial:
        self.tick()
        if port != self.tty or self.mode not in ("app", "katapult"):
            raise OSError(errno.ENOENT, f"could not open port {port}: No such file or directory")
        return FakeSerial(self, port, baudrate)

    # -- descriptors -------------------------------------------------------------------------
    def strings(self) -> dict[int, str]:
        if self.mode == "app":
            return {1: "Klipper", 2: self.chip.name, 3: self.serial}
        if self.mode == "katapult":
            return {1: "katapult", 2: self.chip.name, 3: self.serial}
        return {1: "Raspberry Pi", 2: "RP2 Boot", 3: self.serial}

    def string_descriptor(self, index: int) -> bytes:
        if index == 0:
            return bytes([4, 3, 0x09, 0x04])
        text = self.strings().get(index)
        if text is None:
            raise _pipe()
        body = text.encode("utf-16-le")
        return bytes([2 + len(body), 3]) + body

    def device_descriptor(self) -> _Desc:
        vid, pid = self.usb_ids
        return _Desc(
            bLength=18,
            bDescriptorType=1,
            bcdUSB=0x0110 if self.mode == "boot" else 0x0200,
            bDeviceClass=0 if self.mode == "boot" else 2,
            bDeviceSubClass=0,
            bDeviceProtocol=0,
            bMaxPacketSize0=PACKET,
            idVendor=vid,
            idProduct=pid,
            bcdDevice=0x0100 if self.mode == "boot" else 0x0001,
            iManufacturer=1,
            iProduct=2,
            iSerialNumber=3,
            bNumConfigurations=1,
            bus=self.bus,
            address=self.address,
            port_number=self.port_numbers[-1],
            port_numbers=self.port_numbers,
            speed=2,
        )

    def interfaces(self) -> list[tuple[int, int, int, int, list[tuple[int, int]]]]:
        """``(number, class, subclass, protocol, [(endpoint, attributes)])`` per interface."""
        if self.mode != "boot":  # CDC ACM: communication + data
            return [(0, 0x02, 0x02, 0x01, [(0x81, 3)]), (1, 0x0A, 0, 0, [(0x02, 2), (0x82, 2)])]
        vendor = (1 if self.msc else 0, 0xFF, 0, 0, [(0x03, 2), (0x84, 2)])
        if not self.msc:
            return [vendor]
        return [(0, 0x08, 0x06, 0x50, [(0x01, 2), (0x82, 2)]), vendor]

    def config_descriptor(self) -> _Desc:
        intfs = self.interfaces()
        return _Desc(
            bLength=9,
            bDescriptorType=2,
            wTotalLength=9 + sum(9 + 7 * len(i[4]) for i in intfs),
            bNumInterfaces=len(intfs),
            bConfigurationValue=1,
            iConfiguration=0,
            bmAttributes=0x80,
            bMaxPower=250,
            extra_descriptors=b"",
        )

    def interface_descriptor(self, intf: int, alt: int) -> _Desc:
        intfs = self.interfaces()
        if alt != 0 or intf >= len(intfs):
            raise IndexError("no such interface")
        number, cls, sub, proto, eps = intfs[intf]
        return _Desc(
            bLength=9,
            bDescriptorType=4,
            bInterfaceNumber=number,
            bAlternateSetting=0,
            bNumEndpoints=len(eps),
            bInterfaceClass=cls,
            bInterfaceSubClass=sub,
            bInterfaceProtocol=proto,
            iInterface=0,
            extra_descriptors=b"",
        )

    def endpoint_descriptor(self, ep: int, intf: int) -> _Desc:
        address, attributes = self.interfaces()[intf][4][ep]
        return _Desc(
            bLength=7,
            bDescriptorType=5,
            bEndpointAddress=address,
            bmAttributes=attributes,
            wMaxPacketSize=PACKET,
            bInterval=0,
            bRefresh=0,
            bSynchAddress=0,
            extra_descriptors=b"",
        )

    def vendor_interface(self) -> int:
        return 1 if self.msc else 0

    # -- control requests --------------------------------------------------------------------
    def control(self, bm: int, req: int, value: int, index: int, data: array, timeout: int) -> int:
        with self.lock:
            self.tick()
            if self.mode not in ("boot", "app", "katapult"):
                raise _gone()
            self.wait_until(control_seconds_from(self.now(), len(data)))
            if bm == 0x80 and req == 6:  # GET_DESCRIPTOR (string)
                if value >> 8 != 3:
                    raise _pipe()
                raw = self.string_descriptor(value & 0xFF)[: len(data)]
                data[: len(raw)] = array("B", raw)
                return len(raw)
            if self.mode != "boot" or index != self.vendor_interface():
                raise _pipe()
            if bm == 0x41 and req == 0x41:  # INTERFACE_RESET
                if self.hung:
                    return 0  # the core is stuck in the flash routine; the reset changes nothing
                self.stalled = False
                self.phase = "idle"
                self.cmd = None
                self.buffer = bytearray()
                return 0
            if bm == 0xC1 and req == 0x42 and len(data) >= 16:  # GET_COMMAND_STATUS
                token, status, cmd, _ = self.status
                busy = self.hung or self.now() < self.busy_until
                raw = struct.pack("<IIBB6x", token, status, cmd, 1 if busy else 0)
                data[:16] = array("B", raw)
                return 16
            raise _pipe()

    # -- bulk --------------------------------------------------------------------------------
    def bulk_write(self, ep: int, data: bytes, timeout: int) -> int:
        with self.lock:
            self.tick()
            if self.mode != "boot":
                raise _gone() if self.mode in ("gone", "hung") else _pipe()
            if ep != 0x03:
                raise _pipe()  # the MSC endpoints speak SCSI, which is not emulated
            self.spend(bulk_seconds(len(data)))
            if self.stalled:
                raise _pipe()
            if self.phase == "idle":
                return self._command(bytes(data))
            if self.phase == "data_out":
                self.buffer += data
                assert self.cmd is not None
                if len(self.buffer) > self.cmd[2]:
                    return self._fail(BAD_XFER_LEN)
                if len(self.buffer) == self.cmd[2]:
                    self._execute(bytes(self.buffer))
                return len(data)
            if self.phase == "ack_out":
                if data:
                    return self._fail(BAD_XFER_LEN)
                self._finish()
                return 0
            return self._fail(INVALID_STATE)

    def bulk_read(self, ep: int, buff: array, timeout: int) -> int:
        with self.lock:
            self.tick()
            if self.mode != "boot":
                raise _gone() if self.mode in ("gone", "hung") else _pipe()
            if ep != 0x84:
                raise _pipe()
            if self.stalled:
                raise _pipe()
            if self.phase == "data_in":
                n = min(len(buff), len(self.out_data))
                chunk, self.out_data = self.out_data[:n], self.out_data[n:]
                self.spend(bulk_seconds(n))
                buff[:n] = array("B", chunk)
                if not self.out_data:
                    self.phase = "ack_out"
                return n
            if self.phase == "ack_in":
                if self.hung:
                    self._sleep(timeout / 1000.0)
                    raise usb.core.USBTimeoutError("Operation timed out", -7, errno.ETIMEDOUT)
                wait_real = (self.busy_until - self.now()) * self.scale
                if wait_real > timeout / 1000.0:
                    self._sleep(timeout / 1000.0)
                    raise usb.core.USBTimeoutError("Operation timed out", -7, errno.ETIMEDOUT)
                self.wait_until(self.busy_until)
                self.spend(bulk_seconds(0))
                self._finish()
                return 0
            # a read with no command pending: the host waits for data that never comes
            self._sleep(timeout / 1000.0)
            raise usb.core.USBTimeoutError("Operation timed out", -7, errno.ETIMEDOUT)

    def _fail(self, status: int) -> int:
        token = self.cmd[0] if self.cmd else self.status[0]
        cmd_id = self.cmd[1] if self.cmd else 0
        self.status = (token, status, cmd_id, False)
        self.stalled = True
        self.phase = "idle"
        raise _pipe()

    def _finish(self) -> None:
        if self.cmd is not None:
            self.status = (self.cmd[0], OK, self.cmd[1], False)
        self.phase = "idle"
        self.cmd = None
        if self._after_ack is not None:
            then, delay = self._after_ack
            self._after_ack = None
            self._replug(then, delay)

    _after_ack: Optional[tuple[str, float]] = None

    def _command(self, raw: bytes) -> int:
        if len(raw) != 32:
            self.cmd = None
            return self._fail(BAD_CMD_LEN)
        magic, token, cmd_id, size, _unused, length = struct.unpack_from("<IIBBHI", raw)
        args = raw[16:32]
        self.cmd = (token, cmd_id, length, args[:size])
        self.status = (token, OK, cmd_id, True)
        self.commands.append((cmd_id, length, args[:size]))
        if magic != MAGIC or cmd_id not in _ARGS:
            return self._fail(UNKNOWN_CMD)
        if size != _ARGS[cmd_id]:
            return self._fail(BAD_CMD_LEN)
        if cmd_id == 0x0A and self.chip is RP2040:
            return self._fail(UNKNOWN_CMD)
        left = self.faults.stall.get(cmd_id, 0)
        if left:
            self.faults.stall[cmd_id] = left - 1
            return self._fail(self.faults.stall_status)
        if cmd_id in (0x84, 0x05):
            address, dsize = struct.unpack_from("<II", args)
            if length != dsize:
                return self._fail(BAD_XFER_LEN)
            if cmd_id == 0x84:
                data = self._read(address, dsize)
                if data is None:
                    return 32
                self.out_data = data
                self.phase = "data_in" if data else "ack_out"
                return 32
            if not self._check_write(address, dsize):
                return 32
            self.buffer = bytearray()
            self.phase = "data_out" if dsize else "ack_in"
            if not dsize:
                self.busy_until = self.now()
            return 32
        if length:
            return self._fail(BAD_XFER_LEN)
        self._execute(b"")
        return 32

    def _read(self, address: int, size: int) -> Optional[bytes]:
        if 0 <= address and address + size <= 0x4000:  # boot ROM
            rom = bytearray(0x4000)
            struct.pack_into("<I", rom, 0x10, self.chip.rom_magic)
            return bytes(rom[address : address + size])
        lo, hi = self.chip.sram
        if lo <= address and address + size <= hi:
            return bytes(self.sram[address - lo : address - lo + size])
        if FLASH_BASE <= address and address + size <= FLASH_BASE + XIP_WINDOW:
            out = bytearray()
            for a in range(address - FLASH_BASE, address - FLASH_BASE + size):
                out.append(self.flash[a % self.chip.flash_size])
            weak = self.faults.weak_bit_at
            if weak is not None and address <= weak < address + size:
                out[weak - address] ^= 0x01
            return bytes(out)
        self._fail(BAD_ADDRESS)
        return None

    def _check_write(self, address: int, size: int) -> bool:
        lo, hi = self.chip.sram
        if lo <= address and address + size <= hi:
            return True
        if not (FLASH_BASE <= address and address + size <= FLASH_BASE + self.chip.flash_size):
            self._fail(BAD_ADDRESS)
            return False
        if address % PAGE or size % PAGE:
            self._fail(BAD_ALIGN)
            return False
        if self.xip != "off":
            self._fail(INVALID_STATE)
            return False
        return True

    def _execute(self, payload: bytes) -> None:
        assert self.cmd is not None
        token, cmd_id, length, args = self.cmd
        if self.faults.hang_command == cmd_id:
            self.hung = True
            self.phase = "ack_in"
            return
        seconds = 0.0
        if cmd_id == 0x01:  # EXCLUSIVE_ACCESS
            self.exclusive = args[0]
        elif cmd_id == 0x06:  # EXIT_XIP
            self.xip = "off"
        elif cmd_id == 0x07:  # ENTER_CMD_XIP
            self.xip = "xip"
        elif cmd_id == 0x03:  # FLASH_ERASE
            address, size = struct.unpack_from("<II", args)
            if address % SECTOR or size % SECTOR:
                self._fail(BAD_ALIGN)
                return
            if not (FLASH_BASE <= address and address + size <= FLASH_BASE + self.chip.flash_size):
                self._fail(BAD_ADDRESS)
                return
            if self.xip != "off":
                self._fail(INVALID_STATE)
                return
            off = address - FLASH_BASE
            self.flash[off : off + size] = b"\xff" * size
            self.erased.extend(range(address, address + size, SECTOR))
            seconds = size // SECTOR * ERASE_S
        elif cmd_id == 0x05:  # WRITE
            address, size = struct.unpack_from("<II", args)
            lo, hi = self.chip.sram
            if lo <= address < hi:
                self.sram[address - lo : address - lo + size] = payload
            else:
                seconds = self._program(address, payload)
                if self.mode == "hung":
                    return
        elif cmd_id == 0x02:  # REBOOT (RP2040): pc 0 = normal boot after the delay
            pc, _sp, delay_ms = struct.unpack_from("<III", args)
            self.reboots += 1
            self._after_ack = (self.boots_to() if pc == 0 else "hung", delay_ms / 1000.0)
        elif cmd_id == 0x0A:  # REBOOT2 (RP2350)
            flags, delay_ms = struct.unpack_from("<II", args)
            self.reboots += 1
            then = self.boots_to() if flags & 0xF == 0 else "boot"
            self._after_ack = (then, delay_ms / 1000.0)
        self.busy_until = self.now() + seconds
        self.phase = "ack_in"

    def _program(self, address: int, payload: bytes) -> float:
        seconds = 0.0
        limit = self.faults.vanish_after_bytes
        for i in range(0, len(payload), PAGE):
            if limit is not None and self.bytes_programmed + PAGE > limit:
                self._replug("hung")
                return seconds
            off = address - FLASH_BASE + i
            page = payload[i : i + PAGE]
            if self.msc_dirty == address + i and not self.exclusive:
                self.corrupted_pages.append(address + i)
                page = bytes(b ^ 0x5A for b in page)  # the drive's half page got in the way
                self._fail(INTERLEAVED)
                return seconds
            for j, byte in enumerate(page):
                self.flash[off + j] &= byte  # NOR: programming only clears bits
            self.programmed.append(address + i)
            self.bytes_programmed += PAGE
            seconds += PROGRAM_S
        return seconds

    def msc_write(self, address: int) -> bool:
        """The OS writing a UF2 block to the ROM's drive: refused while PICOBOOT holds
        exclusive access, otherwise it leaves a page in progress that a PICOBOOT write to the
        same page collides with (INTERLEAVED_WRITE)."""
        with self.lock:
            if self.mode != "boot" or not self.msc or self.exclusive:
                return False
            self.msc_dirty = address
            return True


class PicobootBackend(EmulatedBackend[EmulatedRp2040]):
    """pyusb backend holding emulated boards; pass it as ``usb.core.find(backend=...)``."""

    def list_serial_ports(self) -> list[UsbPort]:
        """The serial side of the same boards (the flasher uses it when given this backend)."""
        return [p for d in self.devices for p in d.list_ports()]

    def open_serial(self, port: str, baudrate: int = 9600, **kwargs: Any) -> FakeSerial:
        for d in self.devices:
            if d.tty == port:
                return d.open_serial(port, baudrate, **kwargs)
        raise OSError(errno.ENOENT, f"could not open port {port}: No such file or directory")

    def get_endpoint_descriptor(
        self, dev: EmulatedRp2040, ep: int, intf: int, alt: int, config: int
    ) -> _Desc:
        return dev.endpoint_descriptor(ep, intf)

    def set_interface_altsetting(self, dev_handle: EmulatedRp2040, intf: int, alt: int) -> None:
        if alt != 0:
            raise _pipe()

    def bulk_write(
        self, dev_handle: EmulatedRp2040, ep: int, intf: int, data: array, timeout: int
    ) -> int:
        return dev_handle.bulk_write(ep, bytes(data), timeout)

    def bulk_read(
        self, dev_handle: EmulatedRp2040, ep: int, intf: int, buff: array, timeout: int
    ) -> int:
        return dev_handle.bulk_read(ep, buff, timeout)

    def clear_halt(self, dev_handle: EmulatedRp2040, ep: int) -> None:
        return None  # the ROM's stall is cleared by INTERFACE_RESET, not by CLEAR_FEATURE


# --- sample images ---------------------------------------------------------------------------
def klipper_like_rp2040(size: int = 60 * 1024, seed: int = 1, mcu: str = "rp2040") -> bytes:
    """A no-bootloader RP2040 build: boot2 with its CRC, a vector table, code-like bytes and
    a Klipper data dictionary naming ``mcu`` (as Klipper's out/klipper.bin)."""
    import json
    import random
    import zlib

    rng = random.Random(seed)
    boot2 = bytes(rng.randrange(256) for _ in range(252))
    boot2 += struct.pack("<I", mpeg2_crc(boot2))
    vectors = struct.pack("<II", 0x20042000, FLASH_BASE + 0x1F7)
    dictionary = zlib.compress(
        json.dumps(
            {"app": "Klipper", "version": "v0.13.0-emulated", "config": {"MCU": mcu}}
        ).encode()
    )
    body = bytes(rng.randrange(256) for _ in range(size - 256 - 8 - len(dictionary)))
    return boot2 + vectors + body + dictionary


def skr_pico(time_scale: float = 0.01, **kwargs: Any) -> EmulatedRp2040:
    """The demo's BTT SKR Pico: an RP2040 running Klipper over USB, no Katapult."""
    board = EmulatedRp2040(RP2040, time_scale=time_scale, mode="app", **kwargs)
    board.load_flash(FLASH_BASE, klipper_like_rp2040(48 * 1024, seed=7))
    return board


def backend_from_env() -> PicobootBackend:
    """Factory for ``OCTOPRINT_FLASHER_USB_BACKEND`` =
    ``tests.emulators.picoboot_device:backend_from_env``.

    ``FLASHER_PICOBOOT_EMU`` = ``MODE[,chip=rp2040|rp2350][,scale=S][,nomsc]`` where MODE is
    ``boot`` (waiting in BOOTSEL) or ``app`` (the SKR Pico running Klipper).
    """
    import os

    spec = os.environ.get("FLASHER_PICOBOOT_EMU", "boot").split(",")
    opts: dict[str, str] = {}
    for item in spec[1:]:
        key, _, value = item.partition("=")
        opts[key] = value or "1"
    chip = RP2350 if opts.get("chip") == "rp2350" else RP2040
    scale = float(opts.get("scale", "0.01"))
    if spec[0] == "app":
        board = skr_pico(scale)
    else:
        board = EmulatedRp2040(chip, time_scale=scale, msc="nomsc" not in opts)
    return PicobootBackend([board])
