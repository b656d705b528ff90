"""Emulated Katapult/Klipper boards on a python-can ``virtual`` bus and on a pty.

Reusable by the tests, the benches and the OctoPrint demo. One :class:`EmulatedBoard` is one
physical board: its flash (with STM32 page-erase semantics ported from Katapult's
``src/stm32/flash.c``), its UUID (the same under Klipper and Katapult), and the firmware that
currently runs (``klipper``, ``katapult``, or a broken state). It talks over:

* CAN (``interface="can"``): admin layer on 0x3F0/0x3F1 and Katapult's byte stream on the
  assigned ids, with the real CAN bit time (stuff bits counted per frame) at the bitrate;
* a pty (``"usb"`` or ``"uart"``) with UART byte times or USB full-speed latency;
* ``"usb-can-bridge"``: a Klipper USB-CAN bridge that is a CAN node until it is asked to
  enter Katapult, then disappears from the bus and comes back as a Katapult USB serial port.

The Katapult command parser is a line-by-line port of ``command_find_block`` including its
stall (``faithful=True``): after a damaged frame that starts with 0x01 it never advances again.
Times come from a small model scaled by ``time_scale`` (0 = as fast as possible).
"""

from __future__ import annotations

import os
import struct
import termios
import threading
import time
import tty
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import can

from octoprint_flasher.image.klipper import find_dictionary
from octoprint_flasher.links.bootloader_entry import BridgeInfo, UsbPort
from octoprint_flasher.protocols import katapult as kp
from octoprint_flasher.protocols import klipper_can as kc
from octoprint_flasher.protocols import klipper_serial as ks

from .klipper_firmware import make_katapult_bin

# --------------------------------------------------------------------------------------------
# link time model


def _crc15(bits: list[int]) -> int:
    crc = 0
    for bit in bits:
        nxt = bit ^ ((crc >> 14) & 1)
        crc = (crc << 1) & 0x7FFF
        if nxt:
            crc ^= 0x4599
    return crc


def can_frame_bits(arbitration_id: int, data: bytes) -> int:
    """Bits a classic 11-bit data frame occupies on the wire, stuff bits included, plus the
    3-bit intermission: SOF..CRC are stuffed, CRC delimiter/ACK/EOF/IFS are not."""
    bits = [0]
    bits += [(arbitration_id >> (10 - i)) & 1 for i in range(11)]
    bits += [0, 0, 0]  # RTR, IDE, r0
    bits += [(len(data) >> (3 - i)) & 1 for i in range(4)]
    for byte in data:
        bits += [(byte >> (7 - i)) & 1 for i in range(8)]
    crc = _crc15(bits)
    bits += [(crc >> (14 - i)) & 1 for i in range(15)]
    stuffed = 0
    run_bit, run = -1, 0
    for bit in bits:
        if bit == run_bit:
            run += 1
        else:
            run_bit, run = bit, 1
        if run == 5:
            stuffed += 1
            run_bit, run = 1 - bit, 1
    return len(bits) + stuffed + 1 + 2 + 7 + 3


@dataclass(frozen=True)
class ChipModel:
    """Flash facts of one MCU, as Katapult sees them. Times are model values of the order of
    the datasheets' typical figures (G0: 2 KiB page erase ~22 ms, 64-bit program ~85 us)."""

    mcu: str
    flash_start: int
    flash_size: int
    app_start: int
    page_size: int
    erase_seconds: float
    program_seconds_per_block: float

    def page_of(self, address: int) -> int:
        return address - (address - self.flash_start) % self.page_size


STM32G0B1 = ChipModel("stm32g0b1xx", 0x08000000, 512 * 1024, 0x08002000, 2048, 0.022, 0.00068)
STM32H723 = ChipModel("stm32h723xx", 0x08000000, 1024 * 1024, 0x08020000, 128 * 1024, 1.2, 0.0003)
#: a part the plugin's chip table does not know (flash layout simplified to 4 KiB pages)
LPC1769 = ChipModel("lpc1769", 0x00000000, 512 * 1024, 0x00004000, 4096, 0.1, 0.0005)
CHIPS = {c.mcu: c for c in (STM32G0B1, STM32H723, LPC1769)}


class Clock:
    """One shared medium: transfers queue behind each other; sleeps aim at absolute
    deadlines so Python's sleep overshoot does not accumulate."""

    def __init__(self, scale: float) -> None:
        self.scale = scale
        self.free = 0.0
        self.model_seconds = 0.0

    def occupy(self, seconds: float, not_before: Optional[float] = None) -> float:
        self.model_seconds += seconds
        start = max(self.free, time.perf_counter() if not_before is None else not_before)
        self.free = start + seconds * self.scale
        return self.free

    def wait(self, deadline: float) -> None:
        """Sleep in the OS (releasing the GIL for the host thread) until just before the
        deadline, then spin the last few tens of microseconds."""
        if self.scale <= 0:
            return
        while True:
            left = deadline - time.perf_counter()
            if left <= 0:
                return
            time.sleep(left - 0.00008 if left > 0.00016 else 0)


# --------------------------------------------------------------------------------------------
# flash and Katapult core


class FlashModel:
    """STM32 flash as Katapult drives it: a page is erased when its first block arrives
    (unless already erased), later blocks must land on erased flash or be identical."""

    def __init__(self, chip: ChipModel) -> None:
        self.chip = chip
        self.mem = bytearray(b"\xff") * chip.flash_size
        self.page_write_count = 0
        self.erases = 0
        self.programs = 0

    def _off(self, address: int) -> int:
        return address - self.chip.flash_start

    def mapped(self, address: int, length: int) -> bool:
        off = self._off(address)
        return 0 <= off and off + length <= len(self.mem)

    def read(self, address: int, length: int) -> bytes:
        off = self._off(address)
        return bytes(self.mem[off : off + length])

    def load(self, address: int, data: bytes) -> None:
        off = self._off(address)
        self.mem[off : off + len(data)] = data

    def erased(self, address: int, length: int) -> bool:
        off = self._off(address)
        return self.mem[off : off + length].count(0xFF) == length

    def write_block(self, address: int, data: bytes, block_size: int) -> tuple[int, float]:
        """Port of ``flash_write_block``: returns (status, modelled seconds)."""
        if address % block_size or not self.mapped(address, block_size):
            return -1, 0.0
        page_size = self.chip.page_size
        page = self.chip.page_of(address)
        need_erase = False
        if page == address:
            if self.erased(address, page_size):
                pass
            elif self.read(address, block_size) == data and self.erased(
                address + block_size, page_size - block_size
            ):
                return 0, 0.0
            else:
                need_erase = True
            self.page_write_count += 1
        elif not self.erased(address, block_size):
            if self.read(address, block_size) == data:
                return 0, 0.0
            return -2, 0.0
        seconds = 0.0
        if need_erase:
            off = self._off(page)
            self.mem[off : off + page_size] = b"\xff" * page_size
            self.erases += 1
            seconds += self.chip.erase_seconds
        self.load(address, data)
        self.programs += 1
        seconds += self.chip.program_seconds_per_block
        return 0, seconds


CF_NEED_SYNC = 1
CF_NEED_VALID = 2


class KatapultParser:
    """``command_find_block`` from Katapult's ``src/command.c``, statement for statement.

    ``faithful=False`` pops at least one byte after an error (what a fixed parser would do).
    """

    def __init__(self, faithful: bool = True) -> None:
        self.faithful = faithful
        self.sync_state = 0

    def find_block(self, buf: bytearray) -> tuple[int, int, bool]:
        """Returns (ret, pop_count, send_nack)."""
        n = len(buf)
        if not (n and self.sync_state & CF_NEED_SYNC):
            if n < kp.MIN_FRAME:
                return 0, 0, False
            ok = buf[0] == kp.SYNC1 and buf[1] == kp.SYNC2
            msglen = buf[3] * 4 + 8
            if ok and kp.MIN_FRAME <= msglen <= kp.MAX_FRAME:
                if n < msglen:
                    return 0, 0, False
                crc = buf[msglen - 4] | (buf[msglen - 3] << 8)
                if (
                    buf[msglen - 2] == 0x99
                    and buf[msglen - 1] == 0x03
                    and kp.crc16(bytes(buf[2 : msglen - 4])) == crc
                ):
                    self.sync_state &= ~CF_NEED_VALID
                    return 1, msglen, False
            self.sync_state |= CF_NEED_SYNC
        nxt = buf.find(kp.SYNC1)
        if nxt >= 0:
            self.sync_state &= ~CF_NEED_SYNC
            pop = nxt
        else:
            pop = n
        if not self.faithful and pop == 0:
            pop = 1
        if self.sync_state & CF_NEED_VALID:
            return -1, pop, False
        self.sync_state |= CF_NEED_VALID
        return -1, pop, True


@dataclass
class Reply:
    frame: bytes
    device_seconds: float = 0.0


class KatapultCore:
    """Katapult's command set over one receive buffer (``rx_size`` bytes, like the firmware)."""

    def __init__(
        self,
        board: EmulatedBoard,
        rx_size: int,
        tx_size: int,
        can_build: bool,
        faithful: bool,
    ) -> None:
        self.board = board
        self.rx_size = rx_size
        self.tx_size = tx_size
        self.can_build = can_build
        self.parser = KatapultParser(faithful)
        self.buf = bytearray()
        self.stalled = False
        self.complete_requested = False

    def receive(self, data: bytes, all_or_nothing: bool) -> bool:
        """Append input; CAN drops a whole frame that does not fit, UART drops the excess."""
        room = self.rx_size - len(self.buf)
        if len(data) > room:
            if all_or_nothing:
                return False
            data = data[:room]
        self.buf += data
        return True

    def room(self) -> int:
        return self.rx_size - len(self.buf)

    def process(self) -> list[Reply]:
        out: list[Reply] = []
        while not self.stalled:
            ret, pop, nack = self.parser.find_block(self.buf)
            if nack:
                out.append(Reply(kp.encode_frame(kp.RESP_NACK)))
            if ret > 0:
                reply = self.dispatch(bytes(self.buf[:pop]))
                if reply is not None and len(reply.frame) <= self.tx_size:
                    out.append(reply)
            if not ret:
                break
            if pop == 0:
                # the firmware re-runs the same parse forever; nothing will change that
                self.stalled = True
                self.board.events.append("parser stalled")
                break
            del self.buf[:pop]
        return out

    def dispatch(self, msg: bytes) -> Optional[Reply]:
        cmd, words = msg[2], msg[3]
        payload = msg[4 : 4 + words * 4]
        chip = self.board.chip
        bs = self.board.block_size
        if cmd == kp.CMD_CONNECT:
            return Reply(self._ack(cmd, self._connect_payload()))
        if cmd == kp.CMD_SEND_BLOCK:
            if words != bs // 4 + 1:
                return Reply(kp.encode_frame(kp.RESP_COMMAND_ERROR))
            addr = struct.unpack_from("<I", payload)[0]
            if addr < chip.app_start:
                return Reply(kp.encode_frame(kp.RESP_COMMAND_ERROR))
            status, seconds = self.board.flash.write_block(addr, payload[4:], bs)
            if status < 0:
                return Reply(kp.encode_frame(kp.RESP_COMMAND_ERROR), seconds)
            return Reply(self._ack(cmd, struct.pack("<I", addr)), seconds)
        if cmd == kp.CMD_SEND_EOF:
            count = self.board.flash.page_write_count
            return Reply(self._ack(cmd, struct.pack("<I", count)))
        if cmd == kp.CMD_REQUEST_BLOCK:
            addr = struct.unpack_from("<I", payload)[0] if len(payload) >= 4 else 0
            if not self.board.flash.mapped(addr, bs):
                self.board.crash(f"HardFault reading unmapped address 0x{addr:08X}")
                return None
            data = self.board.flash.read(addr, bs)
            return Reply(self._ack(cmd, struct.pack("<I", addr) + data))
        if cmd == kp.CMD_COMPLETE:
            self.complete_requested = True
            return Reply(self._ack(cmd, b""))
        if cmd == kp.CMD_GET_CANBUS_ID and self.can_build:
            return Reply(self._ack(cmd, self.board.uuid + b"\x00\x00"))
        return Reply(kp.encode_frame(kp.RESP_COMMAND_ERROR))

    def _connect_payload(self) -> bytes:
        board = self.board
        major, minor, patch = board.protocol
        proto = (major << 16) | (minor << 8) | patch
        mcu = board.chip.mcu.encode()
        head = struct.pack("<III", proto, board.chip.app_start, board.block_size)
        mcu_words = mcu + b"\x00" * (-len(mcu) % 4)
        if (major, minor) < (1, 1):
            return head + mcu_words
        version = board.version.encode()
        return head + mcu_words + b"\x00" * 4 + version + b"\x00" * (-len(version) % 4)

    @staticmethod
    def _ack(cmd: int, body: bytes) -> bytes:
        return kp.encode_frame(kp.RESP_ACK, struct.pack("<I", cmd) + body)


# --------------------------------------------------------------------------------------------
# Klipper's serial side (what a running Klipper does with message blocks)


def dictionary_blob(region: bytes) -> Optional[bytes]:
    """The zlib-compressed data dictionary as the build embeds it (Klipper's
    ``command_identify_data``): the exact compressed bytes, not a re-compression."""
    for header in (b"\x78\x01", b"\x78\x5e", b"\x78\x9c", b"\x78\xda"):
        pos = region.find(header)
        while pos >= 0:
            stream = zlib.decompressobj()
            try:
                raw = stream.decompress(region[pos:], 1 << 20)
            except zlib.error:
                raw = b""
            if raw.startswith(b"{") and stream.eof:
                return region[pos : len(region) - len(stream.unused_data)]
            pos = region.find(header, pos + 1)
    return None


class KlipperSerialCore:
    """Klipper's ``command_find_block`` (src/command.c) with its sequence check, and the one
    command this emulator implements, ``identify`` (src/basecmd.c). A fresh MCU expects
    sequence 0; a valid block with another number is answered with a NAK (an empty block
    carrying the expected number) and dropped; after a damaged block the parser discards up to
    the next 0x7E and NAKs once per error burst; leading 0x7E bytes are skipped silently."""

    def __init__(self, identify_data: bytes, baud: Optional[int] = None) -> None:
        self.identify_data = identify_data
        self.baud = baud
        self.next_sequence = ks.MESSAGE_DEST
        self.sync_state = 0
        self.buf = bytearray()
        self.commands: list[int] = []

    def _frame(self, payload: bytes) -> bytes:
        return ks.encode_msgblock(self.next_sequence, payload)

    def find_block(self) -> tuple[int, int, bool]:
        """(ret, pop_count, send_nak), statement for statement."""
        buf = self.buf
        n = len(buf)
        if not (n and self.sync_state & CF_NEED_SYNC):
            if n < ks.MESSAGE_MIN:
                return 0, 0, False
            msglen, msgseq = buf[0], buf[1]
            ok = ks.MESSAGE_MIN <= msglen <= ks.MESSAGE_MAX and (
                msgseq & ~ks.MESSAGE_SEQ_MASK == ks.MESSAGE_DEST
            )
            if ok and n < msglen:
                return 0, 0, False
            if ok and ks.check_block(bytes(buf[:msglen])) == msglen:
                self.sync_state &= ~CF_NEED_VALID
                if msgseq != self.next_sequence:
                    return -1, msglen, True  # lost message: NAK until it is retransmitted
                self.next_sequence = ((msgseq + 1) & ks.MESSAGE_SEQ_MASK) | ks.MESSAGE_DEST
                return 1, msglen, False
            if buf[0] == ks.MESSAGE_SYNC:
                return -1, 1, False
            self.sync_state |= CF_NEED_SYNC
        nxt = buf.find(ks.MESSAGE_SYNC)
        if nxt >= 0:
            self.sync_state &= ~CF_NEED_SYNC
            pop = nxt + 1
        else:
            pop = n
        if self.sync_state & CF_NEED_VALID:
            return -1, pop, False
        self.sync_state |= CF_NEED_VALID
        return -1, pop, True

    def receive(self, data: bytes) -> list[bytes]:
        """Feed bytes; return the blocks Klipper sends back."""
        self.buf += data
        out: list[bytes] = []
        while True:
            ret, pop, nak = self.find_block()
            if nak:
                out.append(self._frame(b""))
            if ret > 0:
                out += self.dispatch(bytes(self.buf[ks.MESSAGE_HEADER_SIZE : pop - 3]))
                out.append(self._frame(b""))  # command_send_ack after the dispatch
            if not ret:
                return out
            del self.buf[:pop]

    def dispatch(self, payload: bytes) -> list[bytes]:
        out: list[bytes] = []
        pos = 0
        while pos < len(payload):
            msgid, pos = ks.decode_vlq(payload, pos, signed=True)
            self.commands.append(msgid)
            if msgid != ks.MSGID_IDENTIFY:
                return out  # real Klipper would shut down on a command it does not know
            offset, pos = ks.decode_vlq(payload, pos)
            count, pos = ks.decode_vlq(payload, pos)
            count &= 0xFF
            size = len(self.identify_data)
            if offset >= size:
                count = 0
            elif offset + count > size:
                count = size - offset
            chunk = self.identify_data[offset : offset + count]
            out.append(self._frame(ks.encode_identify_response(offset, chunk)))
        return out


# --------------------------------------------------------------------------------------------
# fault injection


@dataclass
class Faults:
    """Numbered events, counted from 1: ``in`` = host->node data frames (CAN) or reads (pty),
    ``out`` = node->host frames/writes. Each fault fires once."""

    drop_in: set[int] = field(default_factory=set)
    corrupt_in: set[int] = field(default_factory=set)
    drop_out: set[int] = field(default_factory=set)
    corrupt_out: set[int] = field(default_factory=set)
    delay_out: dict[int, float] = field(default_factory=dict)
    reset_at_in: set[int] = field(default_factory=set)
    bus_off_at_in: set[int] = field(default_factory=set)
    bus_off_seconds: float = 0.2
    n_in: int = 0
    n_out: int = 0
    fired: list[str] = field(default_factory=list)

    def inbound(self, data: bytes) -> tuple[Optional[bytes], str]:
        self.n_in += 1
        n = self.n_in
        if n in self.reset_at_in:
            self.fired.append(f"reset@in{n}")
            return None, "reset"
        if n in self.bus_off_at_in:
            self.fired.append(f"bus-off@in{n}")
            return None, "bus-off"
        if n in self.drop_in:
            self.fired.append(f"drop@in{n}")
            return None, ""
        if n in self.corrupt_in:
            self.fired.append(f"corrupt@in{n}")
            return _corrupt(data), ""
        return data, ""

    def outbound(self, data: bytes) -> tuple[Optional[bytes], float]:
        self.n_out += 1
        n = self.n_out
        delay = self.delay_out.get(n, 0.0)
        if delay:
            self.fired.append(f"delay@out{n}")
        if n in self.drop_out:
            self.fired.append(f"drop@out{n}")
            return None, delay
        if n in self.corrupt_out:
            self.fired.append(f"corrupt@out{n}")
            return _corrupt(data), delay
        return data, delay


def _corrupt(data: bytes) -> bytes:
    if not data:
        return data
    pos = len(data) // 2
    return data[:pos] + bytes((data[pos] ^ 0x5A,)) + data[pos + 1 :]


# --------------------------------------------------------------------------------------------
# the USB world (port list and bridges), injectable into the host code


class UsbWorld:
    """What ``list_ports`` and the bridge finder would report, updated by emulated boards
    as they re-enumerate."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ports: dict[str, UsbPort] = {}
        self._bridges: dict[str, BridgeInfo] = {}

    def list_ports(self) -> list[UsbPort]:
        with self._lock:
            return list(self._ports.values())

    def find_bridge(self, channel: str) -> Optional[BridgeInfo]:
        with self._lock:
            return self._bridges.get(channel)

    def plug(self, port: UsbPort) -> None:
        with self._lock:
            self._ports[port.device] = port

    def unplug(self, device: str) -> None:
        with self._lock:
            self._ports.pop(device, None)

    def add_bridge(self, info: BridgeInfo) -> None:
        with self._lock:
            self._bridges[info.channel] = info

    def remove_bridge(self, channel: str) -> None:
        with self._lock:
            self._bridges.pop(channel, None)


@dataclass
class LinkStats:
    """Where real time goes besides the model: ``host_seconds`` sums the gaps between the
    node's last reply byte and the host's next command (the host's turnaround)."""

    replied_at: Optional[float] = None
    host_seconds: float = 0.0
    exchanges: int = 0

    def command_arrived(self, now: float) -> None:
        if self.replied_at is not None:
            self.host_seconds += now - self.replied_at
            self.exchanges += 1
            self.replied_at = None


# --------------------------------------------------------------------------------------------
# the board


class EmulatedBoard:
    """One board. ``firmware`` is what runs at start: ``katapult`` or ``klipper``."""

    def __init__(
        self,
        chip: str = "stm32g0b1xx",
        interface: str = "can",
        firmware: str = "katapult",
        channel: str = "katapult-test",
        bitrate: int = 1000000,
        bus_bitrate: Optional[int] = None,
        baud: int = 250000,
        chip_id: bytes = bytes.fromhex("2d0029001250304b53313420"),
        usb_serial: Optional[str] = None,
        location: str = "1-1.3",
        world: Optional[UsbWorld] = None,
        time_scale: float = 1.0,
        faithful: bool = True,
        protocol: tuple[int, int, int] = (1, 1, 0),
        version: str = "v0.0.1-110-gb0bf421",
        katapult_installed: bool = True,
        klipper_assigned: bool = False,
        reboot_seconds: float = 0.15,
        faults: Optional[Faults] = None,
        block_size: int = 64,
        klipper_faults: Optional[Faults] = None,
    ) -> None:
        self.chip = CHIPS[chip]
        self.interface = interface
        self.channel = channel
        self.bitrate = bitrate
        self.bus_bitrate = bus_bitrate or bitrate
        self.baud = baud
        self.chip_id = chip_id
        self.usb_serial = usb_serial or chip_id.hex().upper()
        self.location = location
        self.world = world or UsbWorld()
        self.time_scale = time_scale
        self.faithful = faithful
        self.protocol = protocol
        self.version = version
        self.katapult_installed = katapult_installed
        self.reboot_seconds = reboot_seconds
        self.faults = faults or Faults()
        #: faults on the running Klipper's serial traffic, counted apart from Katapult's
        self.klipper_faults = klipper_faults or Faults()
        self.block_size = block_size
        if interface == "usb-can-bridge":
            self.uuid = kc.uuid_from_chip_id(bytes.fromhex(self.usb_serial))
        else:
            self.uuid = kc.uuid_from_chip_id(chip_id)
        self.flash = FlashModel(self.chip)
        if katapult_installed:
            self.flash.load(self.chip.flash_start, make_katapult_bin(self.chip.flash_start))
        self.events: list[str] = []
        self.lock = threading.RLock()
        self.mode = firmware
        self.klipper_nodeid: Optional[int] = 4 if klipper_assigned else None
        self.katapult_id = 0  # assigned CAN id (0x100 + 2n), 0 = none
        self.core: Optional[KatapultCore] = None
        self._pending: Optional[tuple[float, str]] = None
        self._silent_until = 0.0
        self.clock = Clock(time_scale)
        self.stats = LinkStats()
        self.boots = 0
        self._can: Optional[_CanRunner] = None
        self._serial: Optional[_SerialRunner] = None
        self._klipper: Optional[KlipperSerialCore] = None
        self._stop = threading.Event()
        if firmware == "katapult":
            self._new_core()

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def uuid_text(self) -> str:
        return self.uuid.hex()

    @property
    def port(self) -> Optional[str]:
        return self._serial.device if self._serial else None

    def start(self) -> EmulatedBoard:
        if self.interface in ("can", "usb-can-bridge") and not (
            self.interface == "usb-can-bridge" and self.mode == "katapult"
        ):
            self._can = _CanRunner(self)
            self._can.start()
            if self.interface == "usb-can-bridge":
                self.world.add_bridge(BridgeInfo(self.channel, self.usb_serial, self.location))
        else:
            self._serial = _SerialRunner(self, self._serial_kind(), self._usb_id())
            self._serial.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for runner in (self._can, self._serial):
            if runner is not None:
                runner.stop()

    def __enter__(self) -> EmulatedBoard:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _serial_kind(self) -> str:
        return "uart" if self.interface == "uart" else "usb"

    def _usb_id(self) -> Optional[tuple[int, int]]:
        if self.interface == "uart":
            return None
        if self.mode == "katapult":
            return (0x1D50, 0x6177)
        if self.interface == "usb-can-bridge":
            return (0x1D50, 0x606F)
        return (0x1D50, 0x614E)

    def _new_core(self) -> None:
        can_side = self.interface == "can"
        rx, tx = (192, 96) if can_side or self.interface == "uart" else (128, 192)
        self.core = KatapultCore(self, rx, tx, can_side, self.faithful)

    # -- state changes -------------------------------------------------------------------------
    def app_bytes(self, length: int) -> bytes:
        return self.flash.read(self.chip.app_start, length)

    def install_app(self, data: bytes) -> None:
        """Put an application in flash as if it had been flashed earlier."""
        self.flash.load(self.chip.app_start, data)

    def crash(self, why: str) -> None:
        with self.lock:
            self.events.append(why)
            self.mode = "crashed"

    def reboot(self, into: str, delay: Optional[float] = None) -> None:
        """Start a reboot; ``into`` is ``katapult`` (requested) or ``app`` (normal boot)."""
        with self.lock:
            self.events.append(f"reboot -> {into}")
            self.mode = "rebooting"
            self.katapult_id = 0
            self.core = None
            self._klipper = None
            if self._serial is not None and self.interface == "usb":
                self.world.unplug(self._serial.device)  # USB drops off at once
            wait = self.reboot_seconds if delay is None else delay
            self._pending = (time.perf_counter() + wait * self.time_scale, into)

    def klipper_serial(self) -> KlipperSerialCore:
        """Klipper's serial command parser, fresh after every boot."""
        if self._klipper is None:
            region = self.flash.read(self.chip.app_start, 256 * 1024)
            config = (find_dictionary(region) or {}).get("config", {})
            baud = config.get("SERIAL_BAUD")
            self._klipper = KlipperSerialCore(
                dictionary_blob(region) or b"", int(baud) if baud else None
            )
        return self._klipper

    def double_reset(self) -> None:
        """The user double-taps reset: Katapult stays resident whatever the app is."""
        self.reboot("katapult", delay=0.0)

    def reset(self) -> None:
        """A plain reset: Katapult's double-reset window, then the application if valid."""
        self.reboot("app")

    def tick(self) -> None:
        with self.lock:
            if self._pending is None or time.perf_counter() < self._pending[0]:
                return
            into = self._pending[1]
            self._pending = None
            self.boots += 1
            if into == "katapult":
                self._boot_katapult()
            else:
                self._boot_app()

    def _boot_katapult(self) -> None:
        if not self.katapult_installed:
            self.mode = "dfu"
            self.events.append("no Katapult signature: fell back to ROM DFU")
            if self.interface != "can":
                self._replug((0x0483, 0xDF11))
            return
        self.mode = "katapult"
        self._new_core()
        self.events.append("katapult running")
        if self.interface == "usb-can-bridge":
            self.world.remove_bridge(self.channel)
            if self._can is not None:
                self._can.detach()
                self._can = None
            if self._serial is None:
                self._serial = _SerialRunner(self, "usb", (0x1D50, 0x6177))
                self._serial.start()
                return
        if self.interface == "usb":
            self._replug((0x1D50, 0x6177))

    def _boot_app(self) -> None:
        first = self.flash.read(self.chip.app_start, 8)
        sp, reset = struct.unpack("<II", first)
        if sp in (0, 0xFFFFFFFF):
            self._boot_katapult()
            return
        handler = reset & ~1
        if not (self.chip.app_start <= handler < self.chip.flash_start + self.chip.flash_size):
            # the "app" is a bootloader: it jumps back into the installed Katapult, which
            # boots, waits its double-reset window and "starts the app" again, forever
            self.mode = "bootloop"
            self.events.append("boot loop: the application's reset vector is the bootloader's")
            return
        region = self.flash.read(self.chip.app_start, 256 * 1024)
        dictionary = find_dictionary(region)
        if not dictionary:
            self.mode = "app"
            self.events.append("unknown application running")
            return
        config = dictionary.get("config", {})
        self.klipper_nodeid = None
        if config.get("MCU") != self.chip.mcu:
            self.mode = "crashed"
            self.events.append("Klipper built for another MCU: hangs")
            return
        if self.interface == "can" and config.get("CANBUS_FREQUENCY") != self.bus_bitrate:
            self.mode = "app"
            self.events.append("Klipper without matching CAN build: off the bus")
            return
        self.mode = "klipper"
        self.events.append("klipper running")
        if self.interface == "usb":
            self._replug((0x1D50, 0x614E))
        elif self.interface == "usb-can-bridge" and self._can is None:
            if self._serial is not None:
                self._serial.stop()
                self._serial = None
            self._can = _CanRunner(self)
            self._can.start()
            self.world.add_bridge(BridgeInfo(self.channel, self.usb_serial, self.location))

    def _replug(self, usb_id: tuple[int, int]) -> None:
        if self._serial is not None:
            self._serial.stop()
        self._serial = _SerialRunner(self, "usb", usb_id)
        self._serial.start()

    def silent(self) -> bool:
        return time.perf_counter() < self._silent_until

    def go_bus_off(self, seconds: float) -> None:
        self._silent_until = time.perf_counter() + seconds * max(self.time_scale, 0.01)
        self.events.append("bus-off")

    def fault_reset(self) -> None:
        self.events.append("node reset (fault)")
        self.reboot("katapult")


# --------------------------------------------------------------------------------------------
# CAN side


class _CanRunner:
    def __init__(self, board: EmulatedBoard) -> None:
        self.board = board
        self.bus: Any = can.Bus(interface="virtual", channel=board.channel)
        self._stop = threading.Event()
        self._detached = False
        self._clock_offset = time.perf_counter() - time.time()
        self.thread = threading.Thread(target=self._run, name="katapult-can-node", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self.thread.is_alive() and threading.current_thread() is not self.thread:
            self.thread.join(2)
        self.bus.shutdown()

    def detach(self) -> None:
        """The bridge left the bus (called from our own thread, which then shuts the bus)."""
        self._detached = True
        self._stop.set()

    def _run(self) -> None:
        board = self.board
        while not self._stop.is_set():
            board.tick()
            msg = self.bus.recv(0.002 if board.mode == "rebooting" else 0.02)
            if msg is None or msg.is_extended_id or msg.is_remote_frame:
                continue
            # the frame went on the wire when the host sent it (python-can stamps time.time())
            sent = msg.timestamp + self._clock_offset if msg.timestamp else None
            with board.lock:
                self._on_frame(msg.arbitration_id, bytes(msg.data), sent)
        if self._detached:
            self.bus.shutdown()

    def _send(self, arb_id: int, data: bytes) -> None:
        board = self.board
        deadline = board.clock.occupy(can_frame_bits(arb_id, data) / board.bitrate)
        out, delay = board.faults.outbound(data) if arb_id != kc.ADMIN_RESP_ID else (data, 0.0)
        board.clock.wait(deadline + delay * board.time_scale)
        if delay and board.time_scale <= 0:
            time.sleep(delay)
        if out is not None:
            self.bus.send(can.Message(arbitration_id=arb_id, data=out, is_extended_id=False))
        board.stats.replied_at = time.perf_counter()

    def _send_burst(self, arb_id: int, chunks: list[bytes], ready: float) -> None:
        """A reply's frames: the bus time of each is booked, then they are handed over when
        the last one would have finished (the host can use none before the last anyway), so
        one wait per reply instead of one per frame keeps the model's clock honest."""
        board = self.board
        deadline = ready
        extra = 0.0
        out: list[bytes] = []
        for chunk in chunks:
            deadline = board.clock.occupy(
                can_frame_bits(arb_id, chunk) / board.bitrate, not_before=ready
            )
            got, delay = board.faults.outbound(chunk)
            extra += delay
            if got is not None:
                out.append(got)
        board.clock.wait(deadline + extra * board.time_scale)
        if extra and board.time_scale <= 0:
            time.sleep(extra)
        for chunk in out:
            self.bus.send(can.Message(arbitration_id=arb_id, data=chunk, is_extended_id=False))
        board.stats.replied_at = time.perf_counter()

    def _on_frame(self, arb_id: int, data: bytes, sent: Optional[float] = None) -> None:
        board = self.board
        if board.mode not in ("katapult", "klipper") or board.silent():
            return
        if board.bus_bitrate != board.bitrate:
            return  # every frame is an error frame at the wrong bitrate
        now = time.perf_counter()
        start = min(sent, now) if sent is not None else now
        arrival = board.clock.occupy(can_frame_bits(arb_id, data) / board.bitrate, start)
        if arb_id == kc.ADMIN_ID:
            board.clock.wait(arrival)
            self._admin(data)
            return
        if board.mode != "katapult" or board.core is None:
            return
        if board.katapult_id and arb_id == board.katapult_id + 1:
            board.katapult_id = 0  # another node uses our id
            board.events.append("id conflict")
            return
        if not board.katapult_id or arb_id != board.katapult_id:
            return
        board.stats.command_arrived(time.perf_counter())
        got, action = board.faults.inbound(data)
        if action == "reset":
            board.fault_reset()
            return
        if action == "bus-off":
            board.go_bus_off(board.faults.bus_off_seconds)
            return
        if got is None or not board.core.receive(got, all_or_nothing=True):
            return
        core = board.core
        replies = core.process()
        ready = arrival
        for reply in replies:
            if reply.device_seconds:
                ready = board.clock.occupy(reply.device_seconds, not_before=ready)
            chunks = [reply.frame[pos : pos + 8] for pos in range(0, len(reply.frame), 8)]
            self._send_burst(board.katapult_id + 1, chunks, ready)
        if core.complete_requested:
            core.complete_requested = False
            board.reboot("app", delay=0.1)

    def _admin(self, data: bytes) -> None:
        board = self.board
        if not data:
            return
        op = data[0]
        mine = len(data) >= 7 and data[1:7] == board.uuid
        if board.mode == "katapult":
            if op == kc.CMD_QUERY_UNASSIGNED and not board.katapult_id:
                self._send(
                    kc.ADMIN_RESP_ID,
                    bytes((kc.RESP_NEED_NODEID,))
                    + board.uuid
                    + bytes((kc.CMD_SET_KATAPULT_NODEID,)),
                )
            elif op == kc.CMD_SET_KATAPULT_NODEID and len(data) >= 8:
                new = kc.node_tx_id(data[7])
                if mine:
                    board.katapult_id = new
                elif new == board.katapult_id:
                    board.katapult_id = 0
            elif op == kc.CMD_CLEAR_KATAPULT_NODEID:
                board.katapult_id = 0
            return
        # Klipper
        if op == kc.CMD_QUERY_UNASSIGNED and board.klipper_nodeid is None:
            self._send(
                kc.ADMIN_RESP_ID,
                bytes((kc.RESP_NEED_NODEID,)) + board.uuid + bytes((kc.CMD_SET_KLIPPER_NODEID,)),
            )
        elif op == kc.CMD_SET_KLIPPER_NODEID and len(data) >= 8 and mine:
            board.klipper_nodeid = data[7]
        elif op == kc.CMD_REQUEST_BOOTLOADER and mine:
            board.reboot("katapult")


# --------------------------------------------------------------------------------------------
# serial side (pty)


class _SerialRunner:
    """A pty standing in for a USB-CDC or UART port. UART: 10 bits per byte at ``baud``;
    USB full speed: a 1 ms frame grid for each transfer plus 12 Mbit/s payload time."""

    def __init__(self, board: EmulatedBoard, kind: str, usb_id: Optional[tuple[int, int]]):
        self.board = board
        self.kind = kind
        self.usb_id = usb_id
        self.master, slave = os.openpty()
        tty.setraw(slave)
        attrs = termios.tcgetattr(slave)
        attrs[3] &= ~termios.ECHO
        termios.tcsetattr(slave, termios.TCSANOW, attrs)
        self.device = os.ttyname(slave)
        # the device side stays free, like a real port nobody has opened yet (tools that
        # refuse a port someone holds, e.g. Katapult's flashtool, then work too); Linux
        # reports the device side's line settings through the master as well
        os.close(slave)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="katapult-pty-node", daemon=True)
        self._magic = bytearray()
        self._pending_in = bytearray()

    def start(self) -> None:
        vid, pid = self.usb_id if self.usb_id else (None, None)
        product = self.board.chip.mcu if self.board.mode == "katapult" else "Klipper"
        maker = "katapult" if self.board.mode == "katapult" else "Klipper"
        self.board.world.plug(
            UsbPort(
                self.device,
                vid,
                pid,
                self.board.usb_serial if vid is not None else None,
                maker if vid is not None else None,
                product if vid is not None else None,
                self.board.location if vid is not None else None,
            )
        )
        self.thread.start()

    def stop(self) -> None:
        self.board.world.unplug(self.device)
        self._stop.set()
        if self.thread.is_alive() and threading.current_thread() is not self.thread:
            self.thread.join(2)
        try:
            os.close(self.master)
        except OSError:
            pass

    def _byte_seconds(self, n: int) -> float:
        if self.kind == "uart":
            return n * 10 / self.board.baud
        return 0.0005 + n * 8 * 1.2 / 12e6

    def _write(
        self, data: bytes, ready: Optional[float] = None, faults: Optional[Faults] = None
    ) -> None:
        board = self.board
        deadline = board.clock.occupy(self._byte_seconds(len(data)), not_before=ready)
        out, delay = (faults or board.faults).outbound(data)
        board.clock.wait(deadline + delay * board.time_scale)
        if delay and board.time_scale <= 0:
            time.sleep(delay)
        if out is not None:
            try:
                os.write(self.master, out)
            except OSError:
                pass
        board.stats.replied_at = time.perf_counter()

    def _run(self) -> None:
        import select

        board = self.board
        while not self._stop.is_set():
            board.tick()
            if board._serial is not self:
                return
            if board.mode == "klipper" and self.kind == "usb" and self._touched_1200():
                board.reboot("katapult")
                continue
            try:
                ready, _, _ = select.select([self.master], [], [], 0.005)
            except (OSError, ValueError):
                return
            if not ready:
                self._feed_pending()
                continue
            try:
                data = os.read(self.master, 4096)
            except OSError:
                if not self._stop.is_set():
                    time.sleep(0.002)  # nobody has the port open (EIO): wait for one
                    continue
                return
            with board.lock:
                self._on_data(data)

    def _line_baud(self) -> Optional[int]:
        """The rate the host set, when it is a standard termios rate (custom rates such as
        250000 are set with BOTHER and read back as such: unknown here)."""
        try:
            speed = termios.tcgetattr(self.master)[4]
        except termios.error:
            return None
        for rate in (9600, 19200, 38400, 57600, 115200, 230400, 460800, 500000, 921600):
            if getattr(termios, f"B{rate}", None) == speed:
                return rate
        return None

    def _touched_1200(self) -> bool:
        try:
            speed = termios.tcgetattr(self.master)[4]
        except termios.error:
            return False
        return speed == termios.B1200

    def _on_data(self, data: bytes) -> None:
        board = self.board
        if board.mode == "klipper":
            self._magic += data
            from octoprint_flasher.links.bootloader_entry import SERIAL_BOOTLOADER_REQUEST

            if SERIAL_BOOTLOADER_REQUEST[1:-1] in self._magic:
                self._magic.clear()
                board.reboot("katapult")
                return
            del self._magic[:-64]
            self._klipper_blocks(data)
            return
        if board.mode != "katapult" or board.core is None:
            return
        board.stats.command_arrived(time.perf_counter())
        arrival = board.clock.occupy(self._byte_seconds(len(data)))
        got, action = board.faults.inbound(data)
        if action in ("reset", "bus-off"):
            board.fault_reset()
            return
        if got is None:
            return
        if self.kind == "usb":
            self._pending_in += got  # USB is flow-controlled: nothing is lost
        elif not board.core.receive(got, all_or_nothing=False):
            return
        self._feed_pending(arrival)

    def _klipper_blocks(self, data: bytes) -> None:
        """Klipper's side of the link: message blocks in, identify_response/ACK/NAK out, on
        the same byte-time model and fault counters as Katapult's replies."""
        board = self.board
        arrival = board.clock.occupy(self._byte_seconds(len(data)))
        core = board.klipper_serial()
        line = self._line_baud()
        if self.kind == "uart" and core.baud and line and line != core.baud:
            board.events.append(f"Klipper at {core.baud} baud got bytes at {line} baud")
            return  # every byte is a framing error at the wrong rate
        got, action = board.klipper_faults.inbound(data)
        if action == "reset":
            board.events.append("node reset (fault)")
            board.reset()  # a reset under Klipper boots the application again
            return
        if got is None:
            return
        replies = core.receive(got)
        if replies:
            self._write(b"".join(replies), arrival, board.klipper_faults)

    def _feed_pending(self, arrival: Optional[float] = None) -> None:
        board = self.board
        core = board.core
        if core is None or board.mode != "katapult":
            return
        if self._pending_in:
            take = min(core.room(), len(self._pending_in))
            core.receive(bytes(self._pending_in[:take]), all_or_nothing=False)
            del self._pending_in[:take]
        replies = core.process()
        ready = arrival if arrival is not None else time.perf_counter()
        for reply in replies:
            if reply.device_seconds:
                ready = board.clock.occupy(reply.device_seconds, not_before=ready)
            self._write(reply.frame, ready)
        if core.complete_requested:
            core.complete_requested = False
            board.reboot("app", delay=0.1)


# --------------------------------------------------------------------------------------------
# helpers for the demo and for the CLI's env hook


def virtual_bus_factory(channel: str) -> Callable[[], Any]:
    """A bus factory for :class:`~octoprint_flasher.target.Target.can_bus_factory`."""

    def factory() -> Any:
        return can.Bus(interface="virtual", channel=channel)

    return factory


_DEMO: dict[str, EmulatedBoard] = {}


def demo_bus() -> Any:
    """``OCTOPRINT_FLASHER_CAN_BUS_FACTORY=tests.emulators.katapult_node:demo_bus``: starts
    (once per process) a G0B1 running Klipper on CAN and returns a bus next to it."""
    channel = os.environ.get("OCTOPRINT_FLASHER_DEMO_CAN_CHANNEL", "flasher-demo")
    if channel not in _DEMO:
        from .klipper_firmware import make_klipper_bin

        board = EmulatedBoard(
            channel=channel,
            firmware="klipper",
            time_scale=float(os.environ.get("OCTOPRINT_FLASHER_DEMO_TIME_SCALE", "0.2")),
        )
        board.install_app(make_klipper_bin())
        _DEMO[channel] = board.start()
    return can.Bus(interface="virtual", channel=channel)
