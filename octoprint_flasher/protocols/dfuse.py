"""USB DFU 1.1 with ST's DfuSe extensions, as spoken by the STM32 system-memory bootloader.

Byte-level only: request codes, states, status parsing, the functional descriptor, the DfuSe
memory-layout string and the command/poll loop over a pyusb ``Device`` (or anything with the
same ``ctrl_transfer``). No OctoPrint and no device discovery; every wait is a parameter so the
same code runs against real hardware in real time and against the emulator in scaled time.
Facts and their sources: ``/work/shared/research/dfu.md`` (AN3156/AN2662, dfu-util, pydfu).
"""

from __future__ import annotations

import errno as errno_mod
import re
import struct
import time
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Callable, Iterable, Optional

from ..errors import ConnectError, ProtocolError

# --- DFU 1.1 requests (class requests to the interface) -------------------------------------
REQ_OUT = 0x21  # host-to-device, class, interface
REQ_IN = 0xA1  # device-to-host, class, interface

DFU_DETACH = 0
DFU_DNLOAD = 1
DFU_UPLOAD = 2
DFU_GETSTATUS = 3
DFU_CLRSTATUS = 4
DFU_GETSTATE = 5
DFU_ABORT = 6

DFU_CLASS = 0xFE
DFU_SUBCLASS = 0x01
DFU_FUNCTIONAL_DESCRIPTOR = 0x21
DFUSE_VERSION = 0x011A

# --- DfuSe commands (DNLOAD with wValue=0) ---------------------------------------------------
CMD_GET_COMMANDS = 0x00
CMD_SET_ADDRESS = 0x21
CMD_ERASE = 0x41
CMD_READ_UNPROTECT = 0x92

ST_VID = 0x0483
ST_DFU_PID = 0xDF11


class State(IntEnum):
    APP_IDLE = 0
    APP_DETACH = 1
    DFU_IDLE = 2
    DFU_DNLOAD_SYNC = 3
    DFU_DNBUSY = 4
    DFU_DNLOAD_IDLE = 5
    DFU_MANIFEST_SYNC = 6
    DFU_MANIFEST = 7
    DFU_MANIFEST_WAIT_RESET = 8
    DFU_UPLOAD_IDLE = 9
    DFU_ERROR = 10


class Status(IntEnum):
    OK = 0x00
    ERR_TARGET = 0x01
    ERR_FILE = 0x02
    ERR_WRITE = 0x03
    ERR_ERASE = 0x04
    ERR_CHECK_ERASED = 0x05
    ERR_PROG = 0x06
    ERR_VERIFY = 0x07
    ERR_ADDRESS = 0x08
    ERR_NOTDONE = 0x09
    ERR_FIRMWARE = 0x0A
    ERR_VENDOR = 0x0B
    ERR_USBR = 0x0C
    ERR_POR = 0x0D
    ERR_UNKNOWN = 0x0E
    ERR_STALLEDPKT = 0x0F


STATUS_TEXT: dict[int, str] = {
    Status.OK: "no error",
    Status.ERR_TARGET: "the address is not supported (errTARGET)",
    Status.ERR_FILE: "the data was rejected (errFILE)",
    Status.ERR_WRITE: "the flash could not be written (errWRITE)",
    Status.ERR_ERASE: "the flash could not be erased (errERASE)",
    Status.ERR_CHECK_ERASED: "the erase check failed (errCHECK_ERASED)",
    Status.ERR_PROG: "programming failed (errPROG)",
    Status.ERR_VERIFY: "the device's own verify failed (errVERIFY)",
    Status.ERR_ADDRESS: "the address is out of range (errADDRESS)",
    Status.ERR_NOTDONE: "the download ended early (errNOTDONE)",
    Status.ERR_FIRMWARE: "no valid firmware (errFIRMWARE)",
    Status.ERR_VENDOR: "read-out protection is active (errVENDOR)",
    Status.ERR_USBR: "unexpected USB reset (errUSBR)",
    Status.ERR_POR: "unexpected power-on reset (errPOR)",
    Status.ERR_UNKNOWN: "unknown error (errUNKNOWN)",
    Status.ERR_STALLEDPKT: "the device stalled an unexpected request (errSTALLEDPKT)",
}


def status_text(code: int) -> str:
    return STATUS_TEXT.get(code, f"status 0x{code:02X}")


STATE_TEXT: dict[int, str] = {
    State.APP_IDLE: "appIDLE",
    State.APP_DETACH: "appDETACH",
    State.DFU_IDLE: "dfuIDLE",
    State.DFU_DNLOAD_SYNC: "dfuDNLOAD-SYNC",
    State.DFU_DNBUSY: "dfuDNBUSY",
    State.DFU_DNLOAD_IDLE: "dfuDNLOAD-IDLE",
    State.DFU_MANIFEST_SYNC: "dfuMANIFEST-SYNC",
    State.DFU_MANIFEST: "dfuMANIFEST",
    State.DFU_MANIFEST_WAIT_RESET: "dfuMANIFEST-WAIT-RESET",
    State.DFU_UPLOAD_IDLE: "dfuUPLOAD-IDLE",
    State.DFU_ERROR: "dfuERROR",
}


def state_name(code: int) -> str:
    """The state as the DFU specification and dfu-util's messages spell it."""
    return STATE_TEXT.get(code, f"state {code}")


@dataclass(frozen=True)
class DfuStatus:
    """The 6-byte GETSTATUS answer."""

    status: int
    poll_timeout_ms: int
    state: int
    string_index: int = 0

    @classmethod
    def parse(cls, raw: bytes) -> DfuStatus:
        if len(raw) < 6:
            raise ProtocolError(
                f"GETSTATUS returned {len(raw)} bytes instead of 6.",
                cause="The device is not a DFU bootloader, or the USB link is unreliable.",
                hint="Replug the board (or use another cable/port) and try again.",
            )
        return cls(raw[0], raw[1] | raw[2] << 8 | raw[3] << 16, raw[4], raw[5])

    def to_bytes(self) -> bytes:
        t = self.poll_timeout_ms
        return bytes([self.status, t & 0xFF, t >> 8 & 0xFF, t >> 16 & 0xFF, self.state]) + bytes(
            [self.string_index]
        )

    def describe(self) -> str:
        return f"{state_name(self.state)}, {status_text(self.status)}"


# --- functional descriptor -------------------------------------------------------------------
ATTR_CAN_DNLOAD = 0x01
ATTR_CAN_UPLOAD = 0x02
ATTR_MANIFESTATION_TOLERANT = 0x04
ATTR_WILL_DETACH = 0x08


@dataclass(frozen=True)
class FunctionalDescriptor:
    attributes: int
    detach_timeout_ms: int
    transfer_size: int
    dfu_version: int

    @property
    def can_download(self) -> bool:
        return bool(self.attributes & ATTR_CAN_DNLOAD)

    @property
    def can_upload(self) -> bool:
        return bool(self.attributes & ATTR_CAN_UPLOAD)

    @property
    def is_dfuse(self) -> bool:
        return self.dfu_version == DFUSE_VERSION

    def to_bytes(self) -> bytes:
        return struct.pack(
            "<BBBHHH",
            9,
            DFU_FUNCTIONAL_DESCRIPTOR,
            self.attributes,
            self.detach_timeout_ms,
            self.transfer_size,
            self.dfu_version,
        )


def parse_functional_descriptor(extra: Iterable[int]) -> Optional[FunctionalDescriptor]:
    """Walk a blob of extra descriptor bytes and return the DFU functional descriptor in it.

    The ST ROM places it after the last alternate setting, so callers pass the configuration's
    extra bytes first and then each alt's (as dfu-util does). Short (7-byte, DFU 1.0) versions
    lack bcdDFUVersion and are read as 1.0.
    """
    raw = bytes(extra)
    i = 0
    while i + 2 <= len(raw):
        length, dtype = raw[i], raw[i + 1]
        if length < 2:
            break
        if dtype == DFU_FUNCTIONAL_DESCRIPTOR and length >= 7 and i + 7 <= len(raw):
            body = raw[i : i + max(9, length)] + b"\x00\x01"
            attrs, detach, size = struct.unpack_from("<BHH", body, 2)
            version = struct.unpack_from("<H", body, 7)[0] if length >= 9 else 0x0100
            return FunctionalDescriptor(attrs, detach, size, version)
        i += length
    return None


# --- memory layout ---------------------------------------------------------------------------
_MULT = {"": 1, " ": 1, "B": 1, "K": 1024, "M": 1024 * 1024}
_SEG = re.compile(r"^\s*(\d+)\s*\*\s*(\d+)\s*([BKM]?)\s*([a-g])\s*$")
_BLOCK = re.compile(r"/\s*0[xX]([0-9A-Fa-f]+)\s*/([^/]*)")


@dataclass(frozen=True)
class MemorySegment:
    """``count`` sectors of ``sector_size`` bytes starting at ``start``."""

    start: int
    sector_size: int
    count: int
    readable: bool
    erasable: bool
    writable: bool

    @property
    def end(self) -> int:
        return self.start + self.sector_size * self.count


@dataclass
class MemoryLayout:
    """A parsed DfuSe memory layout (the alternate setting's iInterface string)."""

    name: str
    segments: list[MemorySegment]
    raw: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def start(self) -> int:
        return min(s.start for s in self.segments) if self.segments else 0

    @property
    def end(self) -> int:
        return max(s.end for s in self.segments) if self.segments else 0

    @property
    def size(self) -> int:
        return sum(s.end - s.start for s in self.segments)

    @property
    def smallest_sector(self) -> int:
        return min((s.sector_size for s in self.segments), default=0)

    def sector_count(self) -> int:
        return sum(s.count for s in self.segments)

    def segment_at(self, address: int) -> Optional[MemorySegment]:
        for seg in self.segments:
            if seg.start <= address < seg.end:
                return seg
        return None

    def sector_at(self, address: int) -> Optional[tuple[int, int]]:
        """``(sector start, sector size)`` of the sector holding ``address``."""
        seg = self.segment_at(address)
        if seg is None:
            return None
        start = seg.start + (address - seg.start) // seg.sector_size * seg.sector_size
        return start, seg.sector_size

    def sectors(self, start: int, end: int) -> list[tuple[int, int]]:
        """Every sector overlapping ``[start, end)``, in address order (gaps skipped)."""
        out: list[tuple[int, int]] = []
        for seg in sorted(self.segments, key=lambda s: s.start):
            for n in range(seg.count):
                s = seg.start + n * seg.sector_size
                if s < end and s + seg.sector_size > start:
                    out.append((s, seg.sector_size))
        return out

    def uncovered(self, start: int, end: int, erasable: bool = True) -> list[tuple[int, int]]:
        """Sub-ranges of ``[start, end)`` that are not writable (and erasable) flash."""
        ok = [
            s
            for s in self.segments
            if s.writable and (s.erasable or not erasable) and s.end > start and s.start < end
        ]
        ok.sort(key=lambda s: s.start)
        gaps: list[tuple[int, int]] = []
        pos = start
        for seg in ok:
            if seg.start > pos:
                gaps.append((pos, min(seg.start, end)))
            pos = max(pos, seg.end)
            if pos >= end:
                break
        if pos < end:
            gaps.append((pos, end))
        return gaps


class LayoutError(ProtocolError):
    """The memory-layout string cannot be understood at all."""


def parse_layout(text: str) -> MemoryLayout:
    """Parse ``@Name /0xADDR/NN*SSSMt,...`` tolerantly.

    Real ROMs send extra spaces, leading zeros, several ``/0x…/`` blocks and (F427/F429) a
    string cut short or followed by junk, so non-printable characters are dropped and an
    incomplete final sector group is ignored with a note rather than failing the flash.
    """
    clean = "".join(ch for ch in text if 0x20 <= ord(ch) <= 0x7E)
    at = clean.find("@")
    if at < 0 or "/" not in clean[at:]:
        raise LayoutError(
            f"The DFU memory layout {text!r} cannot be parsed.",
            cause="The device is not an STM32 DfuSe bootloader, or it sent a garbled string.",
            hint="Replug the board and try again; if it persists, report the string above.",
        )
    body = clean[at + 1 :]
    name = body.split("/", 1)[0].strip()
    rest = body[len(body.split("/", 1)[0]) :]
    segments: list[MemorySegment] = []
    notes: list[str] = []
    blocks = list(_BLOCK.finditer(rest))
    for b_index, block in enumerate(blocks):
        address = int(block.group(1), 16)
        items = block.group(2).split(",")
        for i_index, item in enumerate(items):
            if not item.strip():
                continue
            m = _SEG.match(item)
            if m is None:
                last = b_index == len(blocks) - 1 and i_index == len(items) - 1
                if last:
                    notes.append(f"ignored incomplete sector group {item.strip()!r} (truncated)")
                    continue
                raise LayoutError(
                    f"The DFU memory layout has an unreadable sector group {item.strip()!r}.",
                    cause=f"Unexpected layout string {clean!r}.",
                    hint="Report this string; flashing is refused rather than guessed.",
                )
            count, size = int(m.group(1), 10), int(m.group(2), 10) * _MULT[m.group(3)]
            kind = ord("e") if name == "Device Feature" else ord(m.group(4))
            bits = kind & 7
            if count and size:
                segments.append(
                    MemorySegment(
                        address, size, count, bool(bits & 1), bool(bits & 2), bool(bits & 4)
                    )
                )
            address += count * size
    if not segments:
        raise LayoutError(
            f"The DFU memory layout {clean!r} lists no memory.",
            cause="The device sent an empty or truncated layout string.",
            hint="Replug the board and try again.",
        )
    return MemoryLayout(name, segments, raw=clean, notes=notes)


# --- commands --------------------------------------------------------------------------------
def cmd_set_address(address: int) -> bytes:
    return struct.pack("<BI", CMD_SET_ADDRESS, address)


def cmd_erase(address: int) -> bytes:
    return struct.pack("<BI", CMD_ERASE, address)


def cmd_mass_erase() -> bytes:
    return bytes([CMD_ERASE])


def cmd_read_unprotect() -> bytes:
    return bytes([CMD_READ_UNPROTECT])


def block_address(pointer: int, block: int, transfer_size: int) -> int:
    """Flash address of DNLOAD/UPLOAD block ``block`` (≥ 2) after SET_ADDRESS ``pointer``."""
    return pointer + (block - 2) * transfer_size


# --- errors ----------------------------------------------------------------------------------
class DfuStatusError(ProtocolError):
    """The device reported dfuERROR (or an unexpected state) for a request."""

    def __init__(self, what: str, status: DfuStatus, cause: str = "", hint: str = "") -> None:
        super().__init__(
            f"{what} failed: the device reported {status.describe()}.",
            cause=cause or "The bootloader refused the operation.",
            hint=hint or "Replug the board (it stays in its bootloader) and try again.",
        )
        self.what = what
        self.status = status


class StuckBusyError(DfuStatusError):
    """The device stayed in dfuDNBUSY past the deadline."""


# pyusb errno values that mean "the request did not go through"
STALL_ERRNOS = {errno_mod.EPIPE}
GONE_ERRNOS = {errno_mod.ENODEV, errno_mod.ENOENT}
LEAVE_ERRNOS = {errno_mod.EPIPE, errno_mod.EIO, errno_mod.ENODEV, errno_mod.ETIMEDOUT}
LEAVE_BACKEND_CODES = {-9, -1, -4, -7}


def usb_errno(exc: BaseException) -> Optional[int]:
    return getattr(exc, "errno", None)


def is_usb_error(exc: BaseException) -> bool:
    try:
        import usb.core
    except ImportError:  # pragma: no cover - pyusb is a dependency
        return False
    return isinstance(exc, usb.core.USBError)


def is_timeout(exc: BaseException) -> bool:
    try:
        import usb.core
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, usb.core.USBTimeoutError) or usb_errno(exc) == errno_mod.ETIMEDOUT


def is_stall(exc: BaseException) -> bool:
    return usb_errno(exc) in STALL_ERRNOS or getattr(exc, "backend_error_code", None) == -9


def is_gone(exc: BaseException) -> bool:
    return usb_errno(exc) in GONE_ERRNOS or getattr(exc, "backend_error_code", None) == -4


def disconnected_error(what: str) -> ConnectError:
    return ConnectError(
        f"The board disconnected during {what}.",
        cause="The USB cable moved, the board was reset, or it lost power.",
        hint=(
            "The STM32 bootloader lives in ROM and cannot be damaged: put the board back into "
            "DFU mode (hold BOOT0 high and reset), then flash again."
        ),
    )


# --- transport -------------------------------------------------------------------------------
@dataclass
class Timeouts:
    """Host-side limits. ``scale`` shrinks the device-time deadlines for scaled emulators."""

    control_ms: int = 5000
    status_ms: int = 10000
    command_s: float = 5.0
    sector_erase_s_per_128k: float = 4.0
    sector_erase_min_s: float = 1.5
    mass_erase_s: float = 60.0
    leave_gone_s: float = 5.0
    scale: float = 1.0

    def erase_deadline(self, sector_size: int) -> float:
        s = max(self.sector_erase_min_s, self.sector_erase_s_per_128k * sector_size / 131072)
        return s * self.scale

    def seconds(self, value: float) -> float:
        return value * self.scale


class DfuSession:
    """DFU/DfuSe requests on one interface of an opened pyusb device.

    Holds the knowledge of which request is legal when, how long to wait (bwPollTimeout within
    overall deadlines) and how to get back to dfuIDLE. Raises :class:`DfuStatusError` when the
    device says no and lets pyusb's ``USBError`` through when the link itself failed.
    """

    def __init__(
        self,
        device: Any,
        interface: int = 0,
        transfer_size: int = 2048,
        timeouts: Optional[Timeouts] = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        log: Optional[Callable[[str], None]] = None,
    ) -> None:
        self.dev = device
        self.interface = interface
        self.transfer_size = transfer_size
        self.timeouts = timeouts or Timeouts()
        self.sleep = sleep
        self.clock = clock
        self.log = log or (lambda _line: None)
        self.quirks_used: list[str] = []

    # raw requests
    def _out(
        self, request: int, value: int, data: bytes = b"", timeout: Optional[int] = None
    ) -> int:
        result: int = self.dev.ctrl_transfer(
            REQ_OUT, request, value, self.interface, data, timeout or self.timeouts.control_ms
        )
        return result

    def _in(self, request: int, value: int, length: int, timeout: Optional[int] = None) -> bytes:
        raw = self.dev.ctrl_transfer(
            REQ_IN, request, value, self.interface, length, timeout or self.timeouts.control_ms
        )
        return bytes(raw)

    def get_status(self, timeout_ms: Optional[int] = None) -> DfuStatus:
        """GETSTATUS; the ROM NAKs it while erasing, so the USB timeout must outlast the job."""
        return DfuStatus.parse(self._in(DFU_GETSTATUS, 0, 6, timeout_ms or self.timeouts.status_ms))

    def get_state(self) -> int:
        raw = self._in(DFU_GETSTATE, 0, 1)
        if not raw:
            raise ProtocolError("GETSTATE returned no data.", hint="Replug the board and retry.")
        return raw[0]

    def clear_status(self) -> None:
        self._out(DFU_CLRSTATUS, 0)

    def abort(self) -> None:
        self._out(DFU_ABORT, 0)

    def dnload(self, block: int, data: bytes) -> None:
        self._out(DFU_DNLOAD, block, bytes(data))

    def upload(self, block: int, length: int) -> bytes:
        return self._in(DFU_UPLOAD, block, length)

    # state handling
    def recover(self, attempts: int = 6) -> DfuStatus:
        """Bring the device to dfuIDLE: CLRSTATUS only in dfuERROR, ABORT from the idle states."""
        status: Optional[DfuStatus] = None
        for _ in range(attempts):
            try:
                status = self.get_status()
            except Exception as exc:
                # a stalled request puts the device in dfuERROR; the next round clears it
                if is_usb_error(exc) and is_stall(exc):
                    self.log(f"dfu: GETSTATUS stalled while recovering ({exc})")
                    continue
                raise
            if status.state == State.DFU_IDLE:
                return status
            self.log(f"dfu: recovering from {status.describe()}")
            if status.state == State.DFU_ERROR:
                self.clear_status()
            elif status.state in (State.DFU_DNLOAD_IDLE, State.DFU_UPLOAD_IDLE):
                self.abort()
            elif status.state in (State.DFU_DNBUSY, State.DFU_DNLOAD_SYNC, State.DFU_MANIFEST_SYNC):
                self.sleep(max(status.poll_timeout_ms, 1) / 1000.0)
            else:
                self.abort()
        if status is None:
            raise ProtocolError(
                "The bootloader stalls every status request.",
                cause="The device is not an STM32 DFU bootloader, or it is stuck.",
                hint="Power-cycle the board with BOOT0 held high and try again.",
            )
        raise DfuStatusError(
            "Bringing the bootloader to its idle state",
            status,
            cause="The device is stuck in a state the DFU protocol cannot leave.",
            hint="Power-cycle the board with BOOT0 held high and try again.",
        )

    def poll(
        self,
        what: str,
        deadline_s: float,
        stuck_quirk: bool = False,
        stuck_after_s: Optional[float] = None,
    ) -> DfuStatus:
        """Wait out dfuDNBUSY after a DNLOAD, honouring bwPollTimeout within ``deadline_s``.

        The first GETSTATUS is what makes the ROM execute the command. With ``stuck_quirk``
        (erase on STM32H7 rev V) a device still busy after ``stuck_after_s`` (default: the
        deadline) gets CLRSTATUS twice and the erase is taken as done; the caller must confirm
        it by reading the flash (:meth:`erase_sector` does).
        """
        stuck_at = deadline_s if stuck_after_s is None else min(stuck_after_s, deadline_s)
        start = self.clock()
        zero_polls = 0
        stalls = 0
        last_timeout = 0
        first = True
        first_busy = True  # the answer to the GETSTATUS that starts the command
        usb_timeout = max(self.timeouts.status_ms, int(deadline_s * 1000) + 1000)
        while True:
            try:
                status = self.get_status(usb_timeout)
            except Exception as exc:
                if is_usb_error(exc) and is_stall(exc) and last_timeout and stalls < 3:
                    stalls += 1
                    self.sleep(last_timeout / 1000.0)
                    continue
                raise
            if first and status.state not in (State.DFU_DNBUSY, State.DFU_DNLOAD_IDLE):
                if status.state == State.DFU_MANIFEST:
                    return status
                raise DfuStatusError(what, status)
            first = False
            if status.state != State.DFU_DNBUSY:
                if status.state == State.DFU_DNLOAD_IDLE and status.status == Status.OK:
                    return status
                if status.state == State.DFU_MANIFEST:
                    return status
                raise DfuStatusError(what, status)
            elapsed = self.clock() - start
            if stuck_quirk and elapsed >= stuck_at and not first_busy:
                self.log(f"dfu: {what} still busy after {elapsed:.2f}s; applying H7 quirk")
                self.quirks_used.append("stuck-dnbusy")
                self.clear_status()
                self.clear_status()
                return self.recover()
            first_busy = False
            if elapsed > deadline_s:
                raise StuckBusyError(
                    what,
                    status,
                    cause=f"The device stayed busy for more than {deadline_s:.1f}s.",
                    hint="Power-cycle the board with BOOT0 held high and flash again.",
                )
            last_timeout = status.poll_timeout_ms
            if last_timeout == 0:
                zero_polls += 1
                if zero_polls > 100:
                    raise StuckBusyError(
                        what,
                        status,
                        cause="The device answered busy 100 times in a row without a poll time.",
                    )
            else:
                zero_polls = 0
            until = stuck_at if stuck_quirk else deadline_s
            wait = min(last_timeout / 1000.0, max(0.0, until - elapsed) + 0.001)
            if wait > 0:
                self.sleep(wait)

    def command(
        self,
        payload: bytes,
        what: str,
        deadline_s: Optional[float] = None,
        stuck_quirk: bool = False,
        retries: int = 2,
        stuck_after_s: Optional[float] = None,
    ) -> DfuStatus:
        """Send a DfuSe command and wait for it. Every command is idempotent (set address,
        erase), so a request lost to a stall or timeout is sent again after recovery."""
        limit = self.timeouts.seconds(self.timeouts.command_s) if deadline_s is None else deadline_s
        attempt = 0
        while True:
            try:
                self.dnload(0, payload)
                return self.poll(what, limit, stuck_quirk, stuck_after_s)
            except Exception as exc:
                attempt += 1
                if not is_usb_error(exc) or is_gone(exc) or attempt > retries:
                    raise
                self._refused(what)
                self.log(f"dfu: retrying {what.lower()} after: {exc}")
                self.recover()

    def set_address(self, address: int) -> None:
        self.command(cmd_set_address(address), f"Setting the address to 0x{address:08X}")

    def erase_sector(
        self,
        address: int,
        sector_size: int,
        stuck_quirk: bool = True,
        typical_s: Optional[float] = None,
        max_s: Optional[float] = None,
    ) -> int:
        """Erase one sector; return how many erase commands it took.

        A device that reports completion is done. One that stays in dfuDNBUSY (the STM32H7
        rev V ROM never leaves it after an erase) is recovered with CLRSTATUS x2 as soon as the
        erase must be over: after ``typical_s`` (the datasheet's typical sector-erase time,
        device seconds; without it, the overall deadline). Because that completion is only
        inferred, the sector is read back and must be blank; a sector that is not is erased
        again, this time waiting ``max_s`` (the datasheet maximum) before recovering.
        """
        what = f"Erasing the sector at 0x{address:08X}"
        deadline = self.timeouts.erase_deadline(sector_size)
        waits: list[Optional[float]] = [None]
        if stuck_quirk and typical_s is not None:
            waits = [self.timeouts.seconds(typical_s)]
            waits.append(self.timeouts.seconds(max_s if max_s is not None else 2 * typical_s))
        for attempt, wait in enumerate(waits, start=1):
            seen = len(self.quirks_used)
            self.command(cmd_erase(address), what, deadline, stuck_quirk, stuck_after_s=wait)
            if len(self.quirks_used) == seen:
                return attempt  # the device itself reported the erase complete
            back = self.read(address, sector_size)
            left = len(back) - len(back.lstrip(b"\xff"))
            if left == sector_size:
                return attempt
            self.log(
                f"dfu: the sector at 0x{address:08X} is not blank after the H7 recovery "
                f"(0x{address + left:08X} reads 0x{back[left]:02X}); erasing it again"
            )
        raise ProtocolError(
            f"The sector at 0x{address:08X} is still not blank after erasing it {len(waits)} "
            "times (the bootloader never reported the erase complete).",
            cause="The STM32H7 ROM stays busy after an erase, and this sector did not erase "
            "within the datasheet's maximum time.",
            hint="The board stays in DFU mode: power-cycle it with BOOT0 held high and flash "
            "again. If it repeats, the flash sector may be worn out.",
        )

    def mass_erase(self) -> None:
        self.command(
            cmd_mass_erase(), "Mass erase", self.timeouts.seconds(self.timeouts.mass_erase_s)
        )

    def read_unprotect(self) -> None:
        """Send read-unprotect: the chip mass-erases and resets, so only the first status counts."""
        self.dnload(0, cmd_read_unprotect())
        try:
            status = self.get_status()
        except Exception as exc:
            if is_usb_error(exc):
                return
            raise
        if status.state == State.DFU_ERROR:
            raise DfuStatusError("Removing read-out protection", status)

    def get_commands(self) -> bytes:
        """UPLOAD block 0: the list of supported DfuSe commands (``00 21 41 92``)."""
        return self.upload(0, 16)

    def write(
        self,
        address: int,
        data: bytes,
        on_chunk: Optional[Callable[[int], None]] = None,
        retries: int = 3,
    ) -> int:
        """Write contiguous ``data`` at ``address`` in wTransferSize chunks; return chunk count.

        One SET_ADDRESS starts a run of full-size blocks numbered 2, 3, …; a short block gets its
        own SET_ADDRESS with block 2 so the ROM's block-size arithmetic never matters. A stalled
        or timed-out chunk is retried from a fresh SET_ADDRESS.
        """
        size = self.transfer_size
        pos = 0
        chunks = 0
        run_base: Optional[int] = None
        while pos < len(data):
            chunk = data[pos : pos + size]
            addr = address + pos
            attempt = 0
            while True:
                try:
                    if run_base is None or len(chunk) < size or addr - run_base >= 0xFFF0 * size:
                        self.set_address(addr)
                        run_base = addr
                    block = 2 + (addr - run_base) // size
                    self.dnload(block, chunk)
                    self.poll(
                        f"Writing {len(chunk)} bytes at 0x{addr:08X}",
                        self.timeouts.seconds(self.timeouts.command_s),
                    )
                    break
                except DfuStatusError as exc:
                    code = exc.status.status
                    if attempt > 0 and code in (Status.ERR_PROG, Status.ERR_WRITE):
                        # the first attempt reached the flash and only its status was lost:
                        # flash words cannot be programmed twice, so accept what reads back equal
                        self.clear_status()
                        run_base = None
                        if self.read(addr, len(chunk)) == chunk:
                            self.log(f"dfu: chunk at 0x{addr:08X} was already written")
                            break
                        raise
                    if (
                        code not in (Status.ERR_STALLEDPKT, Status.ERR_UNKNOWN)
                        or attempt >= retries
                    ):
                        raise
                    attempt += 1
                    self.log(f"dfu: retrying chunk at 0x{addr:08X} after: {exc}")
                    run_base = None
                    self.recover()
                except Exception as exc:
                    if not is_usb_error(exc) or is_gone(exc) or attempt >= retries:
                        raise
                    attempt += 1
                    self._refused(f"Writing at 0x{addr:08X}")
                    self.log(f"dfu: retrying chunk at 0x{addr:08X} after: {exc}")
                    run_base = None
                    self.recover()
            if len(chunk) < size:
                run_base = None
            pos += len(chunk)
            chunks += 1
            if on_chunk is not None:
                on_chunk(len(chunk))
        return chunks

    def read(
        self,
        address: int,
        length: int,
        on_chunk: Optional[Callable[[int], None]] = None,
        retries: int = 3,
    ) -> bytes:
        """Read ``length`` bytes from ``address``: SET_ADDRESS, ABORT, UPLOAD blocks 2, 3, …"""
        size = self.transfer_size
        out = bytearray()
        attempt = 0
        while len(out) < length:
            base = address + len(out)
            try:
                self.set_address(base)
                self.abort()
                block = 2
                while len(out) < length:
                    want = min(size, length - len(out))
                    # a short block ends the upload (device back in dfuIDLE)
                    raw = self.upload(block, want)
                    if not raw:
                        raise ProtocolError(
                            f"The device returned no data reading 0x{base:08X}.",
                            hint="Replug the board and try again.",
                        )
                    out += raw[:want]
                    block += 1
                    if on_chunk is not None:
                        on_chunk(min(len(raw), want))
                    if len(raw) < size:
                        break
                    if block > 0xFFF0:
                        break
                self.abort()
            except Exception as exc:
                attempt += 1
                retryable = is_usb_error(exc) and not is_gone(exc)
                if not retryable or attempt > retries:
                    raise
                self._refused(f"Reading 0x{base:08X}")
                self.log(f"dfu: retrying read at 0x{base:08X} after: {exc}")
                self.recover()
        return bytes(out[:length])

    def _refused(self, what: str) -> None:
        """After a stalled request: raise if the device refused for a reason a retry cannot
        fix (read protection, bad address), leaving it back in dfuIDLE."""
        status = self.get_status()
        if status.state == State.DFU_ERROR and status.status in (
            Status.ERR_VENDOR,
            Status.ERR_TARGET,
            Status.ERR_ADDRESS,
        ):
            self.clear_status()
            raise DfuStatusError(what, status)

    def leave(self, address: Optional[int]) -> str:
        """Jump to ``address`` and let go of the device. Errors after the zero-length DNLOAD are
        how a manifestation-intolerant ROM says goodbye, so they count as success."""
        if address is not None:
            self.set_address(address)
        try:
            self.dnload(0, b"")
        except Exception as exc:
            if is_usb_error(exc) and usb_errno(exc) in LEAVE_ERRNOS | {None}:
                return f"device left during the leave request ({exc})"
            raise
        try:
            status = self.get_status()
        except Exception as exc:
            if is_usb_error(exc):
                return f"device left while answering ({exc})"
            raise
        if status.state in (State.DFU_MANIFEST, State.DFU_MANIFEST_SYNC):
            return "device entered dfuMANIFEST"
        if status.state == State.DFU_ERROR:
            raise DfuStatusError("Leaving the bootloader", status)
        return f"device answered {status.describe()}"
