"""The RP2040/RP2350 boot ROM's PICOBOOT protocol over pyusb (pico-sdk ``boot/picoboot.h``).

The ROM's vendor interface (class 0xFF, interface 1 next to the mass-storage drive, 0 when the
drive is disabled) has one bulk OUT and one bulk IN endpoint. Every command is a 32-byte
little-endian struct on bulk OUT, then an optional data phase of ``dTransferLength`` bytes,
then a zero-length packet the other way that the ROM sends (or takes) only once the command
has finished: an erase's ACK arrives after the erase. A refused command stalls the endpoints;
GET_COMMAND_STATUS (a control request to the interface) then names the reason, and
INTERFACE_RESET clears the stall. This module knows bytes only; advice lives in the flasher.
"""

from __future__ import annotations

import enum
import errno
import itertools
import struct
from dataclasses import dataclass
from typing import Any, Callable, Optional

MAGIC = 0x431FD10B
VENDOR_ID = 0x2E8A
PID_RP2040 = 0x0003
PID_RP2350 = 0x000F

VENDOR_CLASS = 0xFF
REQ_INTERFACE_RESET = 0x41
REQ_GET_COMMAND_STATUS = 0x42
BM_RESET = 0x41  # host-to-device, vendor, interface
BM_STATUS = 0xC1  # device-to-host, vendor, interface

FLASH_SECTOR = 4096
FLASH_PAGE = 256

_CMD = struct.Struct("<IIBBHI16s")
_STATUS = struct.Struct("<IIBB6x")


class Cmd(enum.IntEnum):
    EXCLUSIVE_ACCESS = 0x01
    REBOOT = 0x02
    FLASH_ERASE = 0x03
    READ = 0x84
    WRITE = 0x05
    EXIT_XIP = 0x06
    ENTER_CMD_XIP = 0x07
    EXEC = 0x08
    VECTORIZE_FLASH = 0x09
    REBOOT2 = 0x0A
    GET_INFO = 0x8B
    OTP_READ = 0x8C
    OTP_WRITE = 0x0D


class Status(enum.IntEnum):
    """``enum picoboot_status`` in pico-sdk ``boot/picoboot.h`` (names and numbers as there;
    Klipper's own string table is ordered differently and mislabels code 2)."""

    OK = 0
    UNKNOWN_CMD = 1
    INVALID_CMD_LENGTH = 2
    INVALID_TRANSFER_LENGTH = 3
    INVALID_ADDRESS = 4
    BAD_ALIGNMENT = 5
    INTERLEAVED_WRITE = 6
    REBOOTING = 7
    UNKNOWN_ERROR = 8
    INVALID_STATE = 9
    NOT_PERMITTED = 10
    INVALID_ARG = 11
    BUFFER_TOO_SMALL = 12
    PRECONDITION_NOT_MET = 13
    MODIFIED_DATA = 14
    INVALID_DATA = 15
    NOT_FOUND = 16
    UNSUPPORTED_MODIFICATION = 17


class Exclusive(enum.IntEnum):
    NOT_EXCLUSIVE = 0
    EXCLUSIVE = 1
    EXCLUSIVE_AND_EJECT = 2


#: argument bytes each command takes (the ROM refuses any other bCmdSize)
ARG_SIZE = {
    Cmd.EXCLUSIVE_ACCESS: 1,
    Cmd.REBOOT: 12,
    Cmd.FLASH_ERASE: 8,
    Cmd.READ: 8,
    Cmd.WRITE: 8,
    Cmd.EXIT_XIP: 0,
    Cmd.ENTER_CMD_XIP: 0,
    Cmd.EXEC: 4,
    Cmd.VECTORIZE_FLASH: 4,
    Cmd.REBOOT2: 16,
}


def status_name(code: int) -> str:
    try:
        return f"PICOBOOT_{Status(code).name}"
    except ValueError:
        return f"status {code}"


def pack_command(cmd: int, token: int, args: bytes = b"", transfer_length: int = 0) -> bytes:
    if len(args) > 16:
        raise ValueError("PICOBOOT arguments are at most 16 bytes")
    return _CMD.pack(MAGIC, token, cmd, len(args), 0, transfer_length, args.ljust(16, b"\0"))


def unpack_command(raw: bytes) -> tuple[int, int, int, int, int, bytes]:
    """``(magic, token, cmd, cmd_size, transfer_length, args)`` of a 32-byte command."""
    magic, token, cmd, size, _unused, length, args = _CMD.unpack(raw)
    return magic, token, cmd, size, length, args


@dataclass(frozen=True)
class CommandStatus:
    token: int
    status: int
    cmd: int
    in_progress: bool

    @classmethod
    def parse(cls, raw: bytes) -> CommandStatus:
        token, status, cmd, busy = _STATUS.unpack(bytes(raw[:16]).ljust(16, b"\0"))
        return cls(token, status, cmd, bool(busy))


class PicobootError(Exception):
    """The ROM refused a command; ``status`` is its GET_COMMAND_STATUS answer (None when even
    that failed), ``usb`` the pyusb error that signalled it."""

    def __init__(self, what: str, status: Optional[CommandStatus], usb: BaseException) -> None:
        self.what = what
        self.status = status
        self.usb = usb
        code = status_name(status.status) if status is not None else "no status"
        super().__init__(f"{what}: {code} ({usb})")


def is_usb_error(exc: BaseException) -> bool:
    return type(exc).__name__ in ("USBError", "USBTimeoutError")


def is_stall(exc: BaseException) -> bool:
    return getattr(exc, "errno", None) == errno.EPIPE or "Pipe error" in str(exc)


@dataclass(frozen=True)
class Endpoints:
    interface: int
    ep_out: int
    ep_in: int
    max_packet: int


def find_interface(dev: Any) -> Optional[Endpoints]:
    """The PICOBOOT vendor interface: 1 next to the MSC drive, 0 without it."""
    for cfg in dev:
        for intf in cfg:
            if intf.bInterfaceClass != VENDOR_CLASS or intf.bNumEndpoints < 2:
                continue
            ep_out = ep_in = 0
            packet = 64
            for ep in intf:
                if ep.bEndpointAddress & 0x80:
                    ep_in = ep.bEndpointAddress
                else:
                    ep_out = ep.bEndpointAddress
                packet = ep.wMaxPacketSize or packet
            if ep_out and ep_in:
                return Endpoints(intf.bInterfaceNumber, ep_out, ep_in, packet)
        break
    return None


class PicobootSession:
    """Commands on one claimed PICOBOOT interface. Timeouts are in milliseconds of real time
    (``scale`` shrinks them for emulated boards whose clock runs faster)."""

    def __init__(
        self,
        dev: Any,
        endpoints: Endpoints,
        timeout_ms: int = 3000,
        log: Callable[[str], None] = lambda _line: None,
    ) -> None:
        self.dev = dev
        self.ep = endpoints
        self.timeout_ms = timeout_ms
        self.log = log
        self._tokens = itertools.count(1)
        self.last_token = 0

    # -- control requests ------------------------------------------------------------------
    def interface_reset(self) -> None:
        """Clear a stall and abandon any half-done command (the ROM's IF_RESET)."""
        self.dev.ctrl_transfer(
            BM_RESET, REQ_INTERFACE_RESET, 0, self.ep.interface, None, self.timeout_ms
        )

    def command_status(self) -> CommandStatus:
        raw = self.dev.ctrl_transfer(
            BM_STATUS, REQ_GET_COMMAND_STATUS, 0, self.ep.interface, 16, self.timeout_ms
        )
        return CommandStatus.parse(bytes(raw))

    # -- commands ----------------------------------------------------------------------------
    def command(
        self,
        cmd: Cmd,
        args: bytes = b"",
        data: bytes = b"",
        read_length: int = 0,
        timeout_ms: Optional[int] = None,
    ) -> bytes:
        """Send one command with its data phase and wait for its ACK. A stall becomes a
        :class:`PicobootError` carrying the ROM's status; other USB errors pass through."""
        timeout = timeout_ms if timeout_ms is not None else self.timeout_ms
        token = next(self._tokens) & 0xFFFFFFFF
        self.last_token = token
        is_in = bool(cmd & 0x80)
        length = read_length if is_in else len(data)
        raw = pack_command(cmd, token, args, length)
        got = b""
        try:
            self.dev.write(self.ep.ep_out, raw, timeout)
            if is_in and length:
                got = bytes(self.dev.read(self.ep.ep_in, length, timeout))
                if len(got) != length:
                    raise PicobootError(
                        f"{cmd.name} returned {len(got)} of {length} bytes",
                        None,
                        OSError(errno.EIO, "short read"),
                    )
            elif length:
                self.dev.write(self.ep.ep_out, data, timeout)
            if is_in:
                self.dev.write(self.ep.ep_out, b"", timeout)
            else:
                self.dev.read(self.ep.ep_in, 1, timeout)
        except Exception as exc:
            if isinstance(exc, PicobootError) or not is_usb_error(exc) or not is_stall(exc):
                raise
            status: Optional[CommandStatus]
            try:
                status = self.command_status()
            except Exception:
                status = None
            try:
                self.interface_reset()
            except Exception as reset_exc:
                self.log(f"picoboot: interface reset after a stall failed: {reset_exc}")
            raise PicobootError(cmd.name, status, exc) from exc
        return got

    def exclusive_access(self, mode: Exclusive = Exclusive.EXCLUSIVE) -> None:
        self.command(Cmd.EXCLUSIVE_ACCESS, bytes([mode]))

    def exit_xip(self) -> None:
        self.command(Cmd.EXIT_XIP)

    def enter_cmd_xip(self) -> None:
        self.command(Cmd.ENTER_CMD_XIP)

    def flash_erase(self, address: int, size: int, timeout_ms: Optional[int] = None) -> None:
        self.command(Cmd.FLASH_ERASE, struct.pack("<II", address, size), timeout_ms=timeout_ms)

    def write(self, address: int, data: bytes) -> None:
        self.command(Cmd.WRITE, struct.pack("<II", address, len(data)), data=data)

    def read(self, address: int, size: int) -> bytes:
        return self.command(Cmd.READ, struct.pack("<II", address, size), read_length=size)

    def reboot(self, pc: int = 0, sp: int = 0, delay_ms: int = 500) -> None:
        """RP2040 REBOOT: pc 0 means a normal boot from flash after ``delay_ms``."""
        self.command(Cmd.REBOOT, struct.pack("<III", pc, sp, delay_ms))

    def reboot2_normal(self, delay_ms: int = 500) -> None:
        """RP2350 REBOOT2 with flags 0 (REBOOT2_FLAG_REBOOT_TYPE_NORMAL)."""
        self.command(Cmd.REBOOT2, struct.pack("<IIII", 0, delay_ms, 0, 0))
