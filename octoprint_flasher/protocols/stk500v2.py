"""STK500 version 2, as the Arduino Mega 2560's bootloader (stk500boot.c) implements it.

Frame: ``1B SEQ LEN_HI LEN_LO 0E BODY CKSUM``, CKSUM the XOR of every byte before it including
the 0x1B. The bootloader echoes SEQ and drops a frame with a bad checksum without answering, so
a silent command is resent after a timeout. Answers with a stale SEQ (the late answer to a
command we already resent) are discarded.

Flash addresses are word addresses, big-endian, with bit 31 set as avrdude does for parts with
an extended address byte (the bootloader shifts it out). The bootloader advances its address
after every PROGRAM_FLASH_ISP and READ_FLASH_ISP, so one LOAD_ADDRESS serves a whole run of
pages. It also erases, on every PROGRAM_FLASH_ISP, the page at its own *erase pointer* (page 0,
then the next one …) rather than the page being written: see :mod:`..flashers.stk500v2` for
why sessions must write a contiguous run of pages from 0.
"""

from __future__ import annotations

import time
from typing import Any, Optional

from ..errors import ProtocolError
from ..links.serial_port import Wire

#: the bootloader jumps to the application ~0.83 s after reset unless a byte arrives
SIGN_ON_WAIT = 0.25

MESSAGE_START = 0x1B
TOKEN = 0x0E

CMD_SIGN_ON = 0x01
CMD_GET_PARAMETER = 0x03
CMD_LOAD_ADDRESS = 0x06
CMD_ENTER_PROGMODE_ISP = 0x10
CMD_LEAVE_PROGMODE_ISP = 0x11
CMD_CHIP_ERASE_ISP = 0x12
CMD_PROGRAM_FLASH_ISP = 0x13
CMD_READ_FLASH_ISP = 0x14
CMD_READ_FUSE_ISP = 0x18
CMD_READ_SIGNATURE_ISP = 0x1B

STATUS_CMD_OK = 0x00
STATUS_CMD_FAILED = 0xC0

#: the bootloader's receive buffer; a body longer than this is never answered
MAX_BODY = 285

# ENTER_PROGMODE_ISP parameters as avrdude sends them for the m2560 (the bootloader ignores them)
ENTER_PROGMODE_BODY = bytes([0x10, 0xC8, 0x64, 0x19, 0x20, 0x00, 0x53, 0x03, 0xAC, 0x53, 0, 0])
# PROGRAM_FLASH_ISP mode/delay/cmd/poll bytes as avrdude sends them (ignored by the bootloader)
PROGRAM_FLASH_PARAMS = bytes([0xC1, 0x0A, 0x40, 0x4C, 0x20, 0x00, 0x00])


def checksum(data: bytes) -> int:
    c = 0
    for b in data:
        c ^= b
    return c


def frame(seq: int, body: bytes) -> bytes:
    if len(body) > MAX_BODY:
        raise ValueError(f"STK500v2 body of {len(body)} bytes exceeds the bootloader's buffer")
    head = bytes([MESSAGE_START, seq & 0xFF, len(body) >> 8, len(body) & 0xFF, TOKEN]) + body
    return head + bytes([checksum(head)])


def sign_on_body() -> bytes:
    return bytes([CMD_SIGN_ON])


def load_address_body(byte_address: int) -> bytes:
    if byte_address & 1:
        raise ValueError("AVR flash addresses are word aligned")
    word = (byte_address >> 1) | 0x80000000
    return bytes([CMD_LOAD_ADDRESS]) + word.to_bytes(4, "big")


def program_flash_body(data: bytes) -> bytes:
    if len(data) & 1:
        raise ValueError("PROGRAM_FLASH_ISP needs an even number of bytes")
    n = len(data)
    return bytes([CMD_PROGRAM_FLASH_ISP, n >> 8, n & 0xFF]) + PROGRAM_FLASH_PARAMS + data


def read_flash_body(length: int) -> bytes:
    return bytes([CMD_READ_FLASH_ISP, length >> 8, length & 0xFF, 0x20])


def read_signature_body(index: int) -> bytes:
    return bytes([CMD_READ_SIGNATURE_ISP, 0x04, 0x30, 0x00, index, 0x00])


class Stk500v2Error(ProtocolError):
    """The bootloader did not answer, or answered with a failure status."""

    def __init__(self, message: str, *, silent: bool = False, status: Optional[int] = None) -> None:
        super().__init__(
            message,
            cause="Bytes were lost or garbled on the serial line, or the board reset.",
            hint="The flasher resends and, if needed, restarts the session; if this keeps "
            "happening use a shorter USB cable and make sure nothing else uses the port.",
        )
        self.silent = silent
        self.status = status


class Stk500v2:
    """Framed commands to an stk500v2 bootloader over an open serial transport."""

    def __init__(
        self, ser: Any, *, timeout: float = 0.3, page_timeout: float = 0.5, retries: int = 3
    ) -> None:
        self.wire = Wire(ser)
        self.timeout = timeout
        self.page_timeout = page_timeout
        #: resends of a silent command (checksum error on the way in)
        self.retries = retries
        self.seq = 0
        #: number of resends performed so far (for tests and logs)
        self.resends = 0

    @property
    def ser(self) -> Any:
        return self.wire.ser

    def _next_seq(self) -> int:
        self.seq = (self.seq + 1) & 0xFF
        return self.seq

    def send(self, body: bytes) -> int:
        seq = self._next_seq()
        self.wire.write(frame(seq, body))
        return seq

    def receive(self, seq: int, timeout: float, *, started: bool = False) -> Optional[bytes]:
        """The body of the answer with ``seq``; ``None`` when nothing valid arrives in time.

        Bytes before a 0x1B, frames with a bad checksum and answers to older sequence numbers
        are skipped. ``started``: its 0x1B was already read (see :meth:`answer_started`)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if started:
                b, started = bytes([MESSAGE_START]), False
            else:
                b = self.wire.read(1, left)
            if not b:
                return None
            if b[0] != MESSAGE_START:
                continue
            head = self.wire.read(4, max(left, 0.05))
            if len(head) < 4 or head[3] != TOKEN:
                continue
            length = (head[1] << 8) | head[2]
            if length > MAX_BODY + 16:
                continue
            rest = self.wire.read(length + 1, max(deadline - time.monotonic(), 0.05) + 0.05)
            if len(rest) < length + 1:
                return None
            body = rest[:length]
            if checksum(b + head + body) != rest[length]:
                continue
            if head[0] != seq:
                continue
            return body

    def command(
        self,
        body: bytes,
        reply_len: Optional[int] = None,
        *,
        slow: bool = False,
        resend: bool = True,
    ) -> bytes:
        """Send ``body``, return the answer body after checking its command byte and status.

        A silent command is resent up to :attr:`retries` times when ``resend`` is true; the
        caller turns resend off for commands whose double execution would be harmful."""
        timeout = self.page_timeout if slow else self.timeout
        tries = 1 + (self.retries if resend else 0)
        name = f"0x{body[0]:02X}"
        for attempt in range(tries):
            if attempt:
                self.resends += 1
            seq = self.send(body)
            answer = self.receive(seq, timeout)
            if answer is None:
                continue
            if not answer or answer[0] != body[0]:
                raise Stk500v2Error(
                    f"Answer to command {name} is for another command: {answer[:4].hex(' ')}"
                )
            if len(answer) < 2 or answer[1] != STATUS_CMD_OK:
                status = answer[1] if len(answer) > 1 else None
                raise Stk500v2Error(
                    f"The bootloader refused command {name} (status 0x{status or 0:02X}).",
                    status=status,
                )
            if reply_len is not None and len(answer) != reply_len:
                raise Stk500v2Error(
                    f"Answer to command {name} has {len(answer)} bytes, expected {reply_len}."
                )
            return answer
        raise Stk500v2Error(f"No answer from the bootloader to command {name}.", silent=True)

    def sign_on(self, timeout: Optional[float] = None) -> Optional[str]:
        """One SIGN_ON; the programmer name (``AVRISP_2``) or ``None`` when silent."""
        seq = self.send(sign_on_body())
        answer = self.receive(seq, self.timeout if timeout is None else timeout)
        if answer is None or len(answer) < 3 or answer[:2] != bytes([CMD_SIGN_ON, 0]):
            return None
        n = answer[2]
        return answer[3 : 3 + n].decode("ascii", errors="replace")

    def enter_progmode(self) -> None:
        self.command(ENTER_PROGMODE_BODY, 2)

    def leave_progmode(self) -> None:
        self.command(bytes([CMD_LEAVE_PROGMODE_ISP, 0x01, 0x01]), 2)

    def read_signature(self) -> bytes:
        return bytes(self.command(read_signature_body(i), 4)[2] for i in range(3))

    def load_address(self, byte_address: int) -> None:
        self.command(load_address_body(byte_address), 2)

    def program_page(self, data: bytes) -> None:
        """Program the page at the bootloader's current address (which then advances).

        Not resent on silence: if the frame arrived and only the answer was lost, a resend
        would also advance the erase pointer. The flasher decides how to recover."""
        self.command(program_flash_body(data), 2, slow=True, resend=False)

    def send_program(self, data: bytes) -> int:
        """Send a PROGRAM_FLASH_ISP without waiting; returns its sequence number."""
        return self.send(program_flash_body(data))

    def answer_started(self, timeout: float) -> bool:
        """Wait for the first byte of the next answer. The bootloader answers a PROGRAM only
        after its flash operations, so this byte says "flash done, sending, then listening"."""
        return self.wire.read(1, timeout) == bytes([MESSAGE_START])

    def finish_program(self, seq: int) -> None:
        """Read the rest of a PROGRAM answer whose first byte :meth:`answer_started` took."""
        answer = self.receive(seq, self.page_timeout, started=True)
        if answer != bytes([CMD_PROGRAM_FLASH_ISP, STATUS_CMD_OK]):
            raise Stk500v2Error(
                "No valid answer to PROGRAM_FLASH_ISP"
                + (f": {answer.hex(' ')}" if answer else "."),
                silent=answer is None,
            )

    def read_flash(self, length: int) -> bytes:
        """Read ``length`` bytes at the current address (which then advances). Not resent
        either: the address has moved if only the answer was lost."""
        answer = self.command(read_flash_body(length), length + 3, slow=True, resend=False)
        if answer[-1] != STATUS_CMD_OK:
            raise Stk500v2Error("READ_FLASH_ISP answer ends with a failure status.")
        return answer[2 : 2 + length]
