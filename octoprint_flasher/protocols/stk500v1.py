"""STK500 version 1, the subset optiboot and the older ATmegaBOOT implement.

Every command ends with CRC_EOP (0x20); every answer is INSYNC (0x14) … OK (0x10). Addresses are
16-bit *word* addresses, little-endian. Pages are always sent whole: optiboot writes a full SPM
page from its RAM buffer whatever length it is told.

The AVR has a 2-byte receive FIFO and optiboot busy-waits (no reading) while SPM programs a page
and while it sends a READ_PAGE answer, so at most the next command's first three bytes could be
sent early. We therefore pipeline only within one page: LOAD_ADDRESS and PROG_PAGE (or
READ_PAGE) go out back to back, because optiboot answers LOAD_ADDRESS without busy-waiting and is
reading again before the next byte's stop bit. That is one turnaround per page instead of two.
"""

from __future__ import annotations

from typing import Any, Optional

from ..errors import ProtocolError
from ..links.serial_port import Wire

#: optiboot flashes its LED for ~375 ms before it reads the first byte
FIRST_SYNC_WAIT = 0.6

CRC_EOP = 0x20
INSYNC = 0x14
OK = 0x10
NOSYNC = 0x15

GET_SYNC = 0x30
GET_PARAMETER = 0x41
SET_DEVICE = 0x42
ENTER_PROGMODE = 0x50
LEAVE_PROGMODE = 0x51
LOAD_ADDRESS = 0x55
UNIVERSAL = 0x56
PROG_PAGE = 0x64
READ_PAGE = 0x74
READ_SIGN = 0x75

PARAM_SW_MAJOR = 0x81
PARAM_SW_MINOR = 0x82
MEMTYPE_FLASH = 0x46  # 'F'
LOAD_EXT_ADDR = 0x4D


def frame(*body: int) -> bytes:
    return bytes(body) + bytes([CRC_EOP])


def get_sync() -> bytes:
    return frame(GET_SYNC)


def get_parameter(param: int) -> bytes:
    return frame(GET_PARAMETER, param)


def load_address(byte_address: int) -> bytes:
    """LOAD_ADDRESS takes a word address, low byte first; bit 15 selects the upper 64 KiB
    (optiboot copies it into RAMPZ)."""
    if byte_address & 1:
        raise ValueError("AVR flash addresses are word aligned")
    word = (byte_address >> 1) & 0xFFFF
    return frame(LOAD_ADDRESS, word & 0xFF, word >> 8)


def load_ext_address(byte_address: int) -> bytes:
    """UNIVERSAL 0x4D: the 64 K-word segment, for flash above 128 KiB (optiboot ≥ 6)."""
    return frame(UNIVERSAL, LOAD_EXT_ADDR, 0x00, (byte_address >> 17) & 0xFF, 0x00)


def prog_page(data: bytes) -> bytes:
    n = len(data)
    return bytes([PROG_PAGE, n >> 8, n & 0xFF, MEMTYPE_FLASH]) + data + bytes([CRC_EOP])


def read_page(length: int) -> bytes:
    return frame(READ_PAGE, length >> 8, length & 0xFF, MEMTYPE_FLASH)


class Stk500v1Error(ProtocolError):
    """The bootloader did not answer a command as STK500v1 says (lost sync or silence)."""

    def __init__(self, message: str, *, got: bytes = b"", silent: bool = False) -> None:
        super().__init__(
            message,
            cause="A byte was lost or garbled on the serial line, or the bootloader left "
            "programming mode (optiboot jumps to the application on any framing error).",
            hint="The flasher resets the board and resumes; if this keeps happening, use a "
            "shorter USB cable and make sure nothing else uses the port.",
        )
        self.got = got
        self.silent = silent


class Stk500v1:
    """Commands of an optiboot-class bootloader over an open serial transport."""

    def __init__(self, ser: Any, *, timeout: float = 0.3, page_timeout: float = 0.5) -> None:
        self.wire = Wire(ser)
        #: answer timeout for short commands (the AVR answers within a few character times)
        self.timeout = timeout
        #: extra time for a page program (erase + write are ≤ 9 ms on silicon) or page read
        self.page_timeout = page_timeout
        self._segment: Optional[int] = None

    @property
    def ser(self) -> Any:
        return self.wire.ser

    def _expect(self, what: str, payload_len: int, timeout: float) -> bytes:
        want = payload_len + 2
        got = self.wire.read(want, timeout)
        if len(got) == want and got[0] == INSYNC and got[-1] == OK:
            return got[1:-1]
        if not got:
            raise Stk500v1Error(f"No answer from the bootloader to {what}.", silent=True)
        raise Stk500v1Error(
            f"Unexpected answer to {what}: {got[:8].hex(' ')}" + (" …" if len(got) > 8 else ""),
            got=got,
        )

    def sync_once(self, timeout: float) -> bool:
        """Send one GET_SYNC and wait ``timeout`` for ``14 10``. Never sends a second one
        before the first is answered: optiboot takes any stray byte where it expects 0x20 as
        a framing error and leaves for the application."""
        self.wire.write(get_sync())
        got = self.wire.read(2, timeout)
        if got == bytes([INSYNC, OK]):
            return True
        if got:
            # a half answer or noise: let the rest arrive, it must not poison the next reply
            self.wire.drain(0.02)
        return False

    def get_parameter(self, param: int) -> int:
        self.wire.write(get_parameter(param))
        return self._expect(f"GET_PARAMETER 0x{param:02X}", 1, self.timeout)[0]

    def version(self) -> tuple[int, int]:
        return self.get_parameter(PARAM_SW_MAJOR), self.get_parameter(PARAM_SW_MINOR)

    def enter_progmode(self) -> None:
        self.wire.write(frame(ENTER_PROGMODE))
        self._expect("ENTER_PROGMODE", 0, self.timeout)

    def leave_progmode(self) -> None:
        self.wire.write(frame(LEAVE_PROGMODE))
        self._expect("LEAVE_PROGMODE", 0, self.timeout)

    def read_signature(self) -> bytes:
        self.wire.write(frame(READ_SIGN))
        return self._expect("READ_SIGN", 3, self.timeout)

    def _address(self, byte_address: int, extended: bool) -> tuple[bytes, bytes]:
        """The address commands for ``byte_address`` and the answers they produce (when
        UNIVERSAL leads, its answer byte at index 1 may be anything)."""
        cmd = b""
        answer = b""
        if extended and (byte_address >> 17) != self._segment:
            cmd += load_ext_address(byte_address)
            answer += bytes([INSYNC, 0, OK])
        return cmd + load_address(byte_address), answer + bytes([INSYNC, OK])

    def write_page(self, byte_address: int, data: bytes, *, extended: bool = False) -> None:
        """LOAD_ADDRESS + PROG_PAGE in one write; one wait for both answers."""
        cmd, answer = self._address(byte_address, extended)
        self.wire.write(cmd + prog_page(data))
        want = answer + bytes([INSYNC, OK])
        got = self.wire.read(len(want), self.page_timeout)
        self._check(got, want, f"PROG_PAGE at 0x{byte_address:05X}")
        if extended:
            self._segment = byte_address >> 17

    def read_page(self, byte_address: int, length: int, *, extended: bool = False) -> bytes:
        """LOAD_ADDRESS + READ_PAGE in one write; one wait for both answers."""
        cmd, answer = self._address(byte_address, extended)
        self.wire.write(cmd + read_page(length))
        head = len(answer) + 1
        got = self.wire.read(head + length + 1, self.page_timeout + length * 0.0002)
        want = answer + bytes([INSYNC]) + got[head : head + length] + bytes([OK])
        self._check(got, want, f"READ_PAGE at 0x{byte_address:05X}")
        if extended:
            self._segment = byte_address >> 17
        return got[head : head + length]

    def _check(self, got: bytes, want: bytes, what: str) -> None:
        universal = want[:3] == bytes([INSYNC, 0, OK]) and len(want) > 4
        same = len(got) == len(want) and all(
            g == w or (universal and i == 1) for i, (g, w) in enumerate(zip(got, want))
        )
        if same:
            return
        self._segment = None
        if not got:
            raise Stk500v1Error(f"No answer from the bootloader to {what}.", silent=True)
        raise Stk500v1Error(
            f"Unexpected answer to {what}: {got[:8].hex(' ')}" + (" …" if len(got) > 8 else ""),
            got=got,
        )

    def forget_segment(self) -> None:
        """After a reset the bootloader's extended address is unknown again."""
        self._segment = None
