"""An emulated STM32 system-memory DFU bootloader, presented to pyusb as a backend.

``usb.core.find(backend=DfuBackend([EmulatedDfuDevice(H723)]))`` finds it like a board on a
USB port. It answers with the descriptors the ST ROMs send (layout strings, functional
descriptor, the F427/F429's truncated string), runs the DFU 1.1 / DfuSe state machine as
AN3156 describes it (a DNLOAD executes on the first GETSTATUS, illegal requests STALL into
dfuERROR/errSTALLEDPKT), keeps flash contents with real semantics (sector erase to 0xFF,
programming only erased flash words, whole-word granularity) and spends datasheet time on
erase and programming plus full-speed USB time on every control transfer. ``time_scale``
shrinks every model second (tests run at 0.01; the benchmark at 1.0). Faults are attributes
of :class:`Faults`.

This is test and demo code: it is written independently of ``octoprint_flasher.protocols``
so that a bug there cannot hide itself here.
"""

from __future__ import annotations

import errno
import math
import struct
import threading
import time
from array import array
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import usb.core

from tests.emulators.usb_backend import Descriptor as _Desc
from tests.emulators.usb_backend import EmulatedBackend
from tests.emulators.usb_backend import usb_error as _usb_error

# --- USB full-speed timing model -------------------------------------------------------------
FRAME_S = 0.001  # full-speed frames are 1 ms
MAX_PACKET = 64  # bMaxPacketSize0 of the ST ROM
PACKET_OVERHEAD = 13  # token + data PID/CRC16 + handshake + sync/EOP/inter-packet gaps, bytes
FRAME_BUDGET = (
    1350  # usable bytes per frame at 12 Mbit/s (1500) less SOF and the end-of-frame guard
)


def control_wire_bytes(data_len: int) -> int:
    """Bytes on the wire for one control transfer with ``data_len`` data bytes."""
    packets = math.ceil(data_len / MAX_PACKET)
    return (8 + PACKET_OVERHEAD) + packets * PACKET_OVERHEAD + data_len + PACKET_OVERHEAD


def control_frames(data_len: int) -> int:
    """Frames one control transfer spans when it starts on a frame boundary."""
    return max(1, math.ceil(control_wire_bytes(data_len) / FRAME_BUDGET))


def control_done_at(now: float, data_len: int) -> float:
    """When the host sees a control transfer submitted at ``now`` complete.

    Its packets go out as soon as it is submitted, at the wire rate that the frame budget
    allows; like an OHCI/UHCI host controller, completion is reported at the end of the frame
    that carried the status stage. So back-to-back transfers cost at least a frame each.
    """
    wire = control_wire_bytes(data_len) / FRAME_BUDGET * FRAME_S
    return math.ceil((now + wire) / FRAME_S - 1e-9) * FRAME_S


def wire_seconds(data_len: int) -> float:
    """Lower bound for moving ``data_len`` bytes in 64-byte packets at full speed."""
    packets = math.ceil(data_len / MAX_PACKET)
    return (data_len + packets * PACKET_OVERHEAD) / FRAME_BUDGET * FRAME_S


# --- chip models -----------------------------------------------------------------------------
@dataclass(frozen=True)
class ChipModel:
    """One ROM bootloader as the host sees it, plus the flash timing it needs.

    Times are datasheet typical values at 2.7-3.6 V (not measured on hardware): sector erase
    per sector size, programming per flash word, mass erase.
    """

    name: str
    bcd_device: int
    transfer_size: int
    sectors: tuple[tuple[int, int, int], ...]  # (start, sector size, count) of internal flash
    alt_names: tuple[str, ...]
    flash_word: int
    erase_s: dict[int, float]  # sector size -> seconds
    program_word_s: float
    mass_erase_s: float
    write_error: int = 0x06  # errPROG for ECC flash; F4 reports errWRITE
    alt0_declared_length: Optional[int] = None  # F427/F429: bLength larger than what is sent
    alt0_sent_length: Optional[int] = None
    option_bytes: tuple[int, int] = (0x1FFFC000, 16)
    set_address_poll_ms: int = 5
    write_poll_ms: int = 5
    erase_poll_ms: int = 100
    app_usb: Optional[tuple[int, int]] = (0x1D50, 0x614E)  # what a valid application enumerates as
    ram: tuple[int, int] = (0x20000000, 0x20030000)

    @property
    def flash_start(self) -> int:
        return self.sectors[0][0]

    @property
    def flash_end(self) -> int:
        start, size, count = self.sectors[-1]
        return start + size * count


_F4_ERASE = {16 * 1024: 0.25, 64 * 1024: 0.55, 128 * 1024: 1.0}
_F4_ALTS = (
    "@Option Bytes  /0x1FFFC000/01*016 e",
    "@OTP Memory /0x1FFF7800/01*512 e,01*016 e",
    "@Device Feature/0xFFFF0000/01*004 e",
)

F446 = ChipModel(
    name="STM32F446",
    bcd_device=0x2200,
    transfer_size=2048,
    sectors=((0x08000000, 16384, 4), (0x08010000, 65536, 1), (0x08020000, 131072, 3)),
    alt_names=("@Internal Flash  /0x08000000/04*016Kg,01*064Kg,03*128Kg",) + _F4_ALTS,
    flash_word=4,
    erase_s=_F4_ERASE,
    program_word_s=16e-6,
    mass_erase_s=8.0,
    write_error=0x03,
)

F429 = ChipModel(
    name="STM32F429",
    bcd_device=0x2200,
    transfer_size=2048,
    sectors=(
        (0x08000000, 16384, 4),
        (0x08010000, 65536, 1),
        (0x08020000, 131072, 7),
        (0x08100000, 16384, 4),
        (0x08110000, 65536, 1),
        (0x08120000, 131072, 7),
    ),
    alt_names=(
        "@Internal Flash  /0x08000000/04*016Kg,01*064Kg,07*128Kg,04*016Kg,01*064Kg,07*128Kg",
    )
    + _F4_ALTS,
    flash_word=4,
    erase_s=_F4_ERASE,
    program_word_s=16e-6,
    mass_erase_s=16.0,
    write_error=0x03,
    alt0_declared_length=166,
    alt0_sent_length=112,
    ram=(0x20000000, 0x20030000),
)

H723 = ChipModel(
    name="STM32H723",
    bcd_device=0x0200,
    transfer_size=1024,
    sectors=((0x08000000, 131072, 8),),
    alt_names=(
        "@Internal Flash   /0x08000000/08*128Kg",
        "@Option Bytes   /0x5200201C/01*128 e",
    ),
    flash_word=32,
    erase_s={131072: 1.0},
    program_word_s=100e-6,
    mass_erase_s=8.0,
    option_bytes=(0x5200201C, 128),
    ram=(0x20000000, 0x24100000),
)

G0B1 = ChipModel(
    name="STM32G0B1",
    bcd_device=0x0200,
    transfer_size=1024,
    sectors=((0x08000000, 2048, 256),),
    alt_names=(
        "@Internal Flash   /0x08000000/256*02Kg",
        "@Option Bytes   /0x1FFF7800/01*128 e",
    ),
    flash_word=8,
    erase_s={2048: 0.022},
    program_word_s=85e-6,
    mass_erase_s=0.05,
    option_bytes=(0x1FFF7800, 128),
    ram=(0x20000000, 0x20024000),
)

MODELS = {m.name: m for m in (F446, F429, H723, G0B1)}

# DFU constants (restated here on purpose: the emulator must not share the host's tables)
APP_IDLE, DFU_IDLE, DNLOAD_SYNC, DNBUSY, DNLOAD_IDLE = 0, 2, 3, 4, 5
MANIFEST_SYNC, MANIFEST, UPLOAD_IDLE, DFU_ERROR = 6, 7, 9, 10
OK, ERR_TARGET, ERR_FILE, ERR_WRITE, ERR_ERASE = 0x00, 0x01, 0x02, 0x03, 0x04
ERR_PROG, ERR_FIRMWARE, ERR_VENDOR, ERR_UNKNOWN, ERR_STALLEDPKT = 0x06, 0x0A, 0x0B, 0x0E, 0x0F


@dataclass
class Faults:
    """Things that go wrong on real boards, switched on per test."""

    start_in_error: bool = False  # ROM starts in dfuERROR/errFIRMWARE (seen on F407/F429)
    stall: dict[int, int] = field(default_factory=dict)  # bRequest -> count (-1 = always)
    stall_write_block_at: Optional[int] = None  # stall the data DNLOAD for this address
    stall_write_count: int = 1
    timeout: dict[int, int] = field(default_factory=dict)  # bRequest -> count (-1 = always)
    stuck_busy_on_erase: bool = False  # STM32H7 rev V: erase done, state stays dfuDNBUSY
    erase_incomplete: int = 0  # this many sector erases are cut short: the old content stays
    read_protected: bool = False
    disappear_after_bytes: Optional[int] = None  # unplugged after writing this many bytes
    access_denied: bool = False  # no udev rule: open fails with EACCES
    busy: bool = False  # another program holds the interface: claim fails with EBUSY
    boot0_held: bool = False  # after leave, the chip comes back as 0483:df11
    busy_mode: str = "block"  # "block": GETSTATUS waits while busy; "answer": answers DNBUSY
    leave_error: Optional[int] = None  # errno raised by the leave DNLOAD instead of dfuMANIFEST
    weak_bit_at: Optional[int] = None  # a flash cell that reads back with bit 0 flipped
    lost_ack_at: Optional[int] = None  # the data DNLOAD for this address arrives, its ACK is lost


class _Gone(Exception):
    pass


class EmulatedDfuDevice:
    """One STM32 in ROM DFU mode (and what it turns into after leaving)."""

    def __init__(
        self,
        model: ChipModel = F446,
        time_scale: float = 0.01,
        faults: Optional[Faults] = None,
        bus: int = 1,
        port_numbers: tuple[int, ...] = (2,),
        serial: str = "2065367E5753",
        reenumerate_s: float = 0.8,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.model = model
        self.scale = time_scale
        self.faults = faults or Faults()
        self.bus = bus
        self.port_numbers = port_numbers
        self.address = 5
        self.serial = serial
        self.reenumerate_s = reenumerate_s
        self.clock = clock
        self._sleep = sleep
        self.epoch = clock()
        self.flash = bytearray(b"\xff" * (model.flash_end - model.flash_start))
        self.option_bytes = bytearray(b"\xaa" * model.option_bytes[1])
        self.lock = threading.Lock()
        # observable history for tests
        self.requests: list[
            tuple[int, int, int, int]
        ] = []  # (bmRequestType, bRequest, wValue, len)
        self.erased: list[int] = []
        self.commands: list[bytes] = []  # DfuSe commands in execution order
        self.mass_erased = 0
        self.bytes_programmed = 0
        self.left_to: Optional[int] = None
        self.mode = "dfu"  # "dfu", "gone", "app", "hung"
        self._reappear_at: Optional[float] = None
        self._next_mode = "dfu"
        self.app_usb = model.app_usb
        self._reset_dfu()

    # -- helpers for tests and the demo --
    def read_flash(self, address: int, length: int) -> bytes:
        off = address - self.model.flash_start
        return bytes(self.flash[off : off + length])

    def load_flash(self, address: int, data: bytes) -> None:
        """Put bytes into flash as if programmed earlier (e.g. a vendor bootloader)."""
        off = address - self.model.flash_start
        self.flash[off : off + len(data)] = data

    def install_bootloader(self, size: int) -> bytes:
        """A plausible bootloader in a ``size``-byte region: a vector table whose reset handler
        points inside it and code-like bytes filling about three quarters of the region, the
        rest erased (as a 20-odd KiB BTT bootloader sits in its 32 KiB)."""
        sp = self.model.ram[0] + 0x8000
        reset = self.model.flash_start + 0x1C1
        used = size * 3 // 4
        code = bytes((i * 7 + 3) & 0xFF for i in range(used - 8))
        body = struct.pack("<II", sp, reset) + code + b"\xff" * (size - used)
        self.load_flash(self.model.flash_start, body)
        return body

    def press_reset(self, boot0: bool = True) -> None:
        """The user presses the reset button: with the BOOT0 jumper fitted the ROM bootloader
        enumerates again (flash kept), without it the application starts if it is valid."""
        then = "dfu" if boot0 else self._after_leave(self.model.flash_start)
        self._disconnect(then)

    @property
    def present(self) -> bool:
        self._tick()
        return self.mode in ("dfu", "app")

    @property
    def usb_ids(self) -> tuple[int, int]:
        if self.mode == "app" and self.app_usb is not None:
            return self.app_usb
        return 0x0483, 0xDF11

    def _reset_dfu(self) -> None:
        self.state = DFU_ERROR if self.faults.start_in_error else DFU_IDLE
        self.status = ERR_FIRMWARE if self.faults.start_in_error else OK
        self.alt = 0
        self.pointer = self.model.flash_start
        self.pending: Optional[tuple[int, bytes]] = None
        self.busy_until = 0.0
        self.after_busy = (DNLOAD_IDLE, OK)
        self.stuck = False
        self.poll_ms = 0
        self.manifesting = False

    # -- time --
    def _model_now(self) -> float:
        return (self.clock() - self.epoch) / self.scale

    def _wait_until_model(self, t_model: float) -> None:
        real = self.epoch + t_model * self.scale
        delay = real - self.clock()
        if delay > 0:
            self._sleep(delay)

    def _bus(self, data_len: int) -> None:
        self._wait_until_model(control_done_at(self._model_now(), data_len))

    def _tick(self) -> None:
        if self.mode == "gone" and self._reappear_at is not None:
            if self._model_now() >= self._reappear_at:
                self._reappear_at = None
                self.mode = self._next_mode
                self.address += 1
                if self.mode == "dfu":
                    self._reset_dfu()

    def _disconnect(self, then: str, after: float = 0.0) -> None:
        self.mode = "gone"
        self._next_mode = then
        delay = after + self.reenumerate_s
        self._reappear_at = self._model_now() + delay if then != "hung" else None
        if then == "hung":
            self.mode = "hung"

    # -- descriptors --
    def strings(self) -> dict[int, str]:
        if self.mode == "app":
            return {1: "Klipper", 2: self.model.name.lower(), 3: self.serial}
        out = {1: "STMicroelectronics", 2: "STM32  BOOTLOADER", 3: self.serial}
        for i, name in enumerate(self.model.alt_names):
            out[4 + i] = name
        return out

    def string_descriptor(self, index: int) -> bytes:
        if index == 0:
            return bytes([4, 3, 0x09, 0x04])
        text = self.strings().get(index)
        if text is None:
            raise _usb_error("Pipe error", -9, errno.EPIPE)
        body = text.encode("utf-16-le")
        length = 2 + len(body)
        if index == 4 and self.mode == "dfu" and self.model.alt0_declared_length:
            raw = bytes([self.model.alt0_declared_length, 3]) + body
            return raw[: self.model.alt0_sent_length]
        return bytes([length, 3]) + body

    def functional_descriptor(self) -> bytes:
        return struct.pack("<BBBHHH", 9, 0x21, 0x0B, 255, self.model.transfer_size, 0x011A)

    def device_descriptor(self) -> _Desc:
        vid, pid = self.usb_ids
        return _Desc(
            bLength=18,
            bDescriptorType=1,
            bcdUSB=0x0200,
            bDeviceClass=0 if self.mode == "dfu" else 2,
            bDeviceSubClass=0,
            bDeviceProtocol=0,
            bMaxPacketSize0=MAX_PACKET,
            idVendor=vid,
            idProduct=pid,
            bcdDevice=self.model.bcd_device if self.mode == "dfu" else 0x0100,
            iManufacturer=1,
            iProduct=2,
            iSerialNumber=3,
            bNumConfigurations=1,
            bus=self.bus,
            address=self.address,
            port_number=self.port_numbers[-1],
            port_numbers=self.port_numbers,
            speed=2,  # full speed
        )

    def config_descriptor(self) -> _Desc:
        alts = len(self.model.alt_names) if self.mode == "dfu" else 1
        return _Desc(
            bLength=9,
            bDescriptorType=2,
            wTotalLength=9 + 9 * alts + (9 if self.mode == "dfu" else 0),
            bNumInterfaces=1,
            bConfigurationValue=1,
            iConfiguration=0,
            bmAttributes=0xC0,
            bMaxPower=50,
            extra_descriptors=b"",
        )

    def interface_descriptor(self, intf: int, alt: int) -> _Desc:
        alts = len(self.model.alt_names) if self.mode == "dfu" else 1
        if intf != 0 or alt >= alts:
            raise IndexError("no such interface")
        dfu = self.mode == "dfu"
        return _Desc(
            bLength=9,
            bDescriptorType=4,
            bInterfaceNumber=0,
            bAlternateSetting=alt,
            bNumEndpoints=0,
            bInterfaceClass=0xFE if dfu else 0x0A,
            bInterfaceSubClass=1 if dfu else 0,
            bInterfaceProtocol=2 if dfu else 0,
            iInterface=4 + alt if dfu else 0,
            extra_descriptors=self.functional_descriptor() if dfu and alt == alts - 1 else b"",
        )

    # -- requests --
    def _stall(self) -> usb.core.USBError:
        self.state, self.status = DFU_ERROR, ERR_STALLEDPKT
        return _usb_error("Pipe error", -9, errno.EPIPE)

    def _take(self, table: dict[int, int], request: int) -> bool:
        count = table.get(request, 0)
        if count == 0:
            return False
        if count > 0:
            table[request] = count - 1
        return True

    def control(self, bm: int, req: int, value: int, index: int, data: array, timeout: int) -> int:
        with self.lock:
            self._tick()
            if self.mode not in ("dfu", "app"):
                raise _usb_error("No such device (it may have been disconnected)", -4, errno.ENODEV)
            out = not bm & 0x80
            length = len(data)
            self.requests.append((bm, req, value, length))
            self._bus(length)
            if bm == 0x80 and req == 6:
                if value >> 8 != 3:
                    raise _usb_error("Pipe error", -9, errno.EPIPE)
                raw = self.string_descriptor(value & 0xFF)[:length]
                data[: len(raw)] = array("B", raw)
                return len(raw)
            if self.mode != "dfu" or (bm & 0x60) != 0x20:
                raise _usb_error("Pipe error", -9, errno.EPIPE)
            if self._take(self.faults.timeout, req):
                self._sleep(timeout / 1000.0 * self.scale)
                raise usb.core.USBTimeoutError("Operation timed out", -7, errno.ETIMEDOUT)
            if self._take(self.faults.stall, req):
                raise self._stall()
            try:
                if out:
                    self._request_out(req, value, bytes(data))
                    return length
                raw = self._request_in(req, value, length, timeout)
            except _Gone:
                raise _usb_error(
                    "No such device (it may have been disconnected)", -4, errno.ENODEV
                ) from None
            data[: len(raw)] = array("B", raw)
            return len(raw)

    def _request_out(self, req: int, value: int, payload: bytes) -> None:
        if req == 1:  # DNLOAD
            if self.state not in (DFU_IDLE, DNLOAD_IDLE):
                raise self._stall()
            if (
                value >= 2
                and self.faults.stall_write_block_at is not None
                and self.faults.stall_write_count != 0
                and self._block_address(value) == self.faults.stall_write_block_at
            ):
                self.faults.stall_write_count -= 1
                raise self._stall()
            if not payload and self.faults.leave_error is not None:
                self._disconnect(self._after_leave(self.pointer))
                raise _usb_error(
                    "leave",
                    -9 if self.faults.leave_error == errno.EPIPE else -1,
                    self.faults.leave_error,
                )
            self.pending = (value, payload)
            self.state = DNLOAD_SYNC
            if value >= 2 and self.faults.lost_ack_at == self._block_address(value):
                self.faults.lost_ack_at = None
                raise usb.core.USBTimeoutError("Operation timed out", -7, errno.ETIMEDOUT)
        elif req == 4:  # CLRSTATUS
            if self.state == DFU_ERROR:
                self.state, self.status = DFU_IDLE, OK
            elif self.state == DNBUSY and self.stuck:
                # the ROM takes the request once the flash controller has finished the erase
                self._wait_until_model(self.busy_until)
                self.stuck = False
                self.state, self.status = DFU_ERROR, ERR_UNKNOWN
            else:
                raise self._stall()
        elif req == 6:  # ABORT
            if self.state in (DFU_IDLE, DNLOAD_IDLE, UPLOAD_IDLE):
                self.state, self.status = DFU_IDLE, OK
            else:
                raise self._stall()
        elif req == 0:  # DETACH: already in DFU mode, nothing to do
            return
        else:
            raise self._stall()

    def _request_in(self, req: int, value: int, length: int, timeout: int) -> bytes:
        if req == 3:  # GETSTATUS
            if length < 6:
                raise self._stall()
            return self._get_status(timeout)
        if req == 5:  # GETSTATE
            return bytes([self.state])
        if req == 2:  # UPLOAD
            return self._upload(value, length)
        raise self._stall()

    def _status_bytes(self) -> bytes:
        t = self.poll_ms
        return bytes([self.status, t & 0xFF, t >> 8 & 0xFF, t >> 16 & 0xFF, self.state, 0])

    def _get_status(self, timeout: int) -> bytes:
        if self.state == DNLOAD_SYNC:
            assert self.pending is not None
            value, payload = self.pending
            self.pending = None
            if not payload:
                # leave: answer dfuMANIFEST, then let go of USB and jump
                self.state, self.status, self.poll_ms = MANIFEST, OK, 0
                answer = self._status_bytes()
                self.left_to = self.pointer
                self._disconnect(self._after_leave(self.pointer))
                return answer
            seconds, poll_ms, result = self._execute(value, payload)
            self.state, self.status, self.poll_ms = DNBUSY, OK, poll_ms
            self.busy_until = self._model_now() + seconds
            self.after_busy = result
            return self._status_bytes()
        if self.state == DNBUSY:
            if self.stuck and self._model_now() >= self.busy_until:
                return self._status_bytes()  # H7 rev V: done, yet busy for ever
            if self.faults.busy_mode == "answer":
                left = self.busy_until - self._model_now()
                if left > 0:
                    self.poll_ms = max(1, math.ceil(left * 1000 * self.scale))
                    return self._status_bytes()
            else:
                wait_real = (self.busy_until - self._model_now()) * self.scale
                if wait_real > timeout / 1000.0:
                    self._sleep(timeout / 1000.0)
                    raise usb.core.USBTimeoutError("Operation timed out", -7, errno.ETIMEDOUT)
                self._wait_until_model(self.busy_until)
            if self.stuck:
                return self._status_bytes()
            self.state, self.status = self.after_busy
            self.poll_ms = 0
            if self.status == OK and self.mode == "gone":
                raise _Gone()
        return self._status_bytes()

    def _block_address(self, value: int) -> int:
        return self.pointer + (value - 2) * self.model.transfer_size

    def _scaled_ms(self, ms: int) -> int:
        return math.ceil(ms * self.scale) if ms else 0

    def _region(self, address: int, length: int) -> Optional[str]:
        if self.alt == 0:
            m = self.model
            if m.flash_start <= address and address + length <= m.flash_end:
                return "flash"
            return None
        ob, size = self.model.option_bytes
        if ob <= address and address + length <= ob + size:
            return "ob"
        return None

    def _sector(self, address: int) -> Optional[tuple[int, int]]:
        for start, size, count in self.model.sectors:
            if start <= address < start + size * count:
                return start + (address - start) // size * size, size
        return None

    def _execute(self, value: int, payload: bytes) -> tuple[float, int, tuple[int, int]]:
        """Run a DNLOAD the way the ROM does when the first GETSTATUS arrives: returns the model
        time it takes, the bwPollTimeout to report, and the (state, status) when done."""
        m = self.model
        fail_target = (0.0, self._scaled_ms(m.set_address_poll_ms), (DFU_ERROR, ERR_TARGET))
        fail_vendor = (0.0, self._scaled_ms(m.set_address_poll_ms), (DFU_ERROR, ERR_VENDOR))
        if value == 0:
            self.commands.append(payload)
            cmd = payload[0]
            if cmd == 0x21 and len(payload) == 5:
                address = struct.unpack_from("<I", payload, 1)[0]
                if self._region(address, 1) is None:
                    return fail_target
                self.pointer = address
                return 0.0, self._scaled_ms(m.set_address_poll_ms), (DNLOAD_IDLE, OK)
            if cmd == 0x41 and len(payload) == 5:
                if self.faults.read_protected:
                    return fail_vendor
                address = struct.unpack_from("<I", payload, 1)[0]
                sector = self._sector(address) if self.alt == 0 else None
                if sector is None:
                    return fail_target
                start, size = sector
                off = start - m.flash_start
                if self.faults.erase_incomplete > 0:
                    self.faults.erase_incomplete -= 1
                else:
                    self.flash[off : off + size] = b"\xff" * size
                self.erased.append(start)
                if self.faults.stuck_busy_on_erase:
                    self.stuck = True
                return m.erase_s[size], self._scaled_ms(m.erase_poll_ms), (DNLOAD_IDLE, OK)
            if cmd == 0x41 and len(payload) == 1:
                if self.faults.read_protected:
                    return fail_vendor
                self.flash[:] = b"\xff" * len(self.flash)
                self.mass_erased += 1
                return m.mass_erase_s, self._scaled_ms(m.erase_poll_ms), (DNLOAD_IDLE, OK)
            if cmd == 0x92 and len(payload) == 1:
                self.faults.read_protected = False
                self.flash[:] = b"\xff" * len(self.flash)
                self.mass_erased += 1
                self._disconnect("dfu", after=m.mass_erase_s)
                return m.mass_erase_s, self._scaled_ms(m.erase_poll_ms), (DNLOAD_IDLE, OK)
            return 0.0, 0, (DFU_ERROR, ERR_FILE)
        if value == 1:
            return 0.0, 0, (DFU_ERROR, ERR_FILE)
        address = self._block_address(value)
        if self.faults.read_protected:
            return fail_vendor
        if self._region(address, len(payload)) != "flash":
            return fail_target
        word = m.flash_word
        first = address // word * word
        last = (address + len(payload) + word - 1) // word * word
        image = bytearray(b"\xff" * (last - first))
        image[address - first : address - first + len(payload)] = payload
        off = first - m.flash_start
        current = self.flash[off : off + len(image)]
        for w in range(0, len(image), word):
            if current[w : w + word] != b"\xff" * word:
                return 0.0, self._scaled_ms(m.write_poll_ms), (DFU_ERROR, m.write_error)
        limit = self.faults.disappear_after_bytes
        if limit is not None and self.bytes_programmed + len(payload) > limit:
            keep = max(0, limit - self.bytes_programmed)
            self.flash[off : off + keep] = image[:keep]
            self._disconnect("hung")
            return 0.0, 0, (DNLOAD_IDLE, OK)
        self.flash[off : off + len(image)] = image
        weak = self.faults.weak_bit_at
        if weak is not None and first <= weak < last:
            self.flash[weak - m.flash_start] ^= 0x01
        self.bytes_programmed += len(payload)
        seconds = len(image) // word * m.program_word_s
        return seconds, self._scaled_ms(m.write_poll_ms), (DNLOAD_IDLE, OK)

    def _upload(self, value: int, length: int) -> bytes:
        if self.state not in (DFU_IDLE, UPLOAD_IDLE):
            raise self._stall()
        if value == 0:
            self.state = DFU_IDLE
            return bytes([0x00, 0x21, 0x41, 0x92])[:length]
        if value == 1:
            raise self._stall()
        if self.faults.read_protected:
            self.state, self.status = DFU_ERROR, ERR_VENDOR
            raise _usb_error("Pipe error", -9, errno.EPIPE)
        if length > self.model.transfer_size:
            raise self._stall()
        address = self._block_address(value)
        region = self._region(address, length)
        if region is None:
            self.state, self.status = DFU_ERROR, ERR_TARGET
            raise _usb_error("Pipe error", -9, errno.EPIPE)
        if region == "ob":
            ob = self.model.option_bytes[0]
            raw = bytes(self.option_bytes[address - ob : address - ob + length])
        else:
            raw = self.read_flash(address, length)
        self.state = UPLOAD_IDLE if length == self.model.transfer_size else DFU_IDLE
        return raw

    def set_alt(self, alt: int) -> None:
        if alt >= len(self.model.alt_names):
            raise _usb_error("Pipe error", -9, errno.EPIPE)
        self.alt = alt
        self.state = DFU_IDLE if self.state != DFU_ERROR else self.state

    def _after_leave(self, address: int) -> str:
        """What the chip does after the jump: DFU again with BOOT0 high, the application when
        the address holds a plausible vector table, otherwise nothing that enumerates."""
        if self.faults.boot0_held:
            return "dfu"
        off = address - self.model.flash_start
        if 0 <= off <= len(self.flash) - 8:
            sp, reset = struct.unpack_from("<II", self.flash, off)
            lo, hi = self.model.ram
            if (
                lo < sp <= hi
                and self.model.flash_start <= reset < self.model.flash_end
                and reset & 1
            ):
                return "app" if self.app_usb is not None else "hung"
        return "hung"


class DfuBackend(EmulatedBackend[EmulatedDfuDevice]):
    """pyusb backend holding emulated devices; pass it as ``usb.core.find(backend=...)``."""

    def add(self, device: EmulatedDfuDevice) -> EmulatedDfuDevice:
        self.devices.append(device)
        return device

    def set_interface_altsetting(
        self, dev_handle: EmulatedDfuDevice, intf: int, altsetting: int
    ) -> None:
        dev_handle.set_alt(altsetting)


def make_backend(
    model: str = "STM32F446",
    time_scale: float = 0.01,
    bootloader: int = 0,
    faults: Optional[Faults] = None,
    app_usb: Optional[tuple[int, int]] = (0x1D50, 0x614E),
) -> DfuBackend:
    """One emulated board, optionally with a vendor bootloader of ``bootloader`` bytes."""
    chip = MODELS[model]
    if app_usb != chip.app_usb:
        chip = replace(chip, app_usb=app_usb)
    dev = EmulatedDfuDevice(chip, time_scale=time_scale, faults=faults)
    if bootloader:
        dev.install_bootloader(bootloader)
    return DfuBackend([dev])


def backend_from_env() -> DfuBackend:
    """Factory for ``OCTOPRINT_FLASHER_USB_BACKEND=tests.emulators.dfu_device:backend_from_env``.

    Reads ``FLASHER_DFU_EMU`` (``MODEL[,bootloader=BYTES][,scale=S][,state=FILE]``) so a CLI
    user or the demo gets a board without USB hardware. With ``state=FILE`` the flash contents
    persist between CLI invocations.
    """
    import os

    spec = os.environ.get("FLASHER_DFU_EMU", "STM32F446").split(",")
    opts = dict(item.split("=", 1) for item in spec[1:] if "=" in item)
    backend = make_backend(
        spec[0],
        time_scale=float(opts.get("scale", "0.01")),
        bootloader=int(opts.get("bootloader", "0")),
    )
    state = opts.get("state")
    if state:
        _persist(backend.devices[0], state)
    return backend


def _persist(dev: EmulatedDfuDevice, path: str) -> None:
    """Load flash contents from ``path`` and write them back at interpreter exit."""
    import atexit
    import os

    if os.path.exists(path):
        with open(path, "rb") as fh:
            data = fh.read()
        dev.flash[: len(data)] = data

    def save() -> None:
        with open(path, "wb") as fh:
            fh.write(bytes(dev.flash))

    atexit.register(save)
