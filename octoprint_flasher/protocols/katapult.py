"""Katapult bootloader protocol: framing and the six commands, over any byte stream.

The same frames travel over CAN (as a byte stream split into 8-byte frames), USB-CDC and UART:
``01 88 | cmd | len | payload (len*4 bytes) | crc16 (LE) | 99 03``, with CRC-16/MCRF4XX over
``cmd, len, payload``. The device is strictly stop-and-wait: one command in flight.

This module knows nothing about CAN or serial ports; it talks to a :class:`ByteLink`.
Timeouts are parameters so tests and benches can scale them.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass
from typing import Optional, Protocol

from ..errors import ConnectError, ProtocolError

SYNC1 = 0x01
SYNC2 = 0x88
TRAILER = b"\x99\x03"
HEADER = bytes((SYNC1, SYNC2))
MIN_FRAME = 8
MAX_FRAME = 128
MAX_PAYLOAD = MAX_FRAME - MIN_FRAME

CMD_CONNECT = 0x11
CMD_SEND_BLOCK = 0x12
CMD_SEND_EOF = 0x13
CMD_REQUEST_BLOCK = 0x14
CMD_COMPLETE = 0x15
CMD_GET_CANBUS_ID = 0x16

RESP_ACK = 0xA0
RESP_NACK = 0xF1
RESP_COMMAND_ERROR = 0xF2
RESP_BUSY = 0xF3

COMMAND_NAMES = {
    CMD_CONNECT: "CONNECT",
    CMD_SEND_BLOCK: "SEND_BLOCK",
    CMD_SEND_EOF: "SEND_EOF",
    CMD_REQUEST_BLOCK: "REQUEST_BLOCK",
    CMD_COMPLETE: "COMPLETE",
    CMD_GET_CANBUS_ID: "GET_CANBUS_ID",
}

VALID_BLOCK_SIZES = (64, 128, 256, 512)

#: why Katapult goes quiet after one bad frame (its ``command_find_block`` re-parses a broken
#: frame that starts with 0x01 forever); shared by every transport's error message
PARSER_STALL = (
    "A frame to the board was lost or damaged; Katapult's command parser then re-reads the "
    "same broken frame forever and ignores all further commands until it is reset."
)


def crc16(data: bytes) -> int:
    """CRC-16/MCRF4XX (Klipper's ``crc16_ccitt``): init 0xFFFF, reflected 0x1021, no xor-out."""
    crc = 0xFFFF
    for byte in data:
        byte ^= crc & 0xFF
        byte ^= (byte << 4) & 0xFF
        crc = ((byte << 8) | (crc >> 8)) ^ (byte >> 4) ^ (byte << 3)
        crc &= 0xFFFF
    return crc


def encode_frame(cmd: int, payload: bytes = b"") -> bytes:
    """Frame one command or response; the payload must be whole 32-bit words."""
    if len(payload) % 4:
        raise ValueError("Katapult payloads are whole 32-bit words")
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    body = bytes((cmd, len(payload) // 4)) + payload
    return HEADER + body + struct.pack("<H", crc16(body)) + TRAILER


@dataclass(frozen=True)
class Frame:
    cmd: int
    payload: bytes


class FrameDecoder:
    """Host-side frame finder: tolerant, it skips garbage and bad frames one byte at a time.

    (The device's own parser is far less forgiving; see the emulator's faithful mode.)
    """

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.bad_frames = 0

    def feed(self, data: bytes) -> None:
        self.buffer += data

    def next_frame(self) -> Optional[Frame]:
        buf = self.buffer
        while True:
            start = buf.find(HEADER)
            if start < 0:
                # keep a trailing 0x01 that may be the start of a header
                del buf[: max(0, len(buf) - 1) if buf[-1:] == b"\x01" else len(buf)]
                return None
            if start:
                del buf[:start]
            if len(buf) < MIN_FRAME:
                return None
            total = buf[3] * 4 + MIN_FRAME
            if total > MAX_FRAME:
                self._skip()
                continue
            if len(buf) < total:
                return None
            frame = bytes(buf[:total])
            body = frame[2:-4]
            crc = struct.unpack_from("<H", frame, total - 4)[0]
            if frame[-2:] != TRAILER or crc16(body) != crc:
                self._skip()
                continue
            del buf[:total]
            return Frame(frame[2], frame[4:-4])

    def _skip(self) -> None:
        self.bad_frames += 1
        del self.buffer[:1]


class ByteLink(Protocol):
    """What the protocol needs from a transport: bytes out, bytes in with a timeout."""

    def write(self, data: bytes) -> None: ...

    def read(self, timeout: float) -> bytes:
        """Return what has arrived (at least one byte), or ``b""`` after ``timeout`` seconds."""
        ...

    def flush_input(self) -> None: ...


@dataclass(frozen=True)
class ConnectInfo:
    """CONNECT's answer: protocol version, application start, block size, MCU, version."""

    protocol: tuple[int, int, int]
    app_start: int
    block_size: int
    mcu: str
    version: str

    @property
    def protocol_text(self) -> str:
        return ".".join(str(p) for p in self.protocol)


def parse_connect(payload: bytes) -> ConnectInfo:
    """Decode a CONNECT ACK payload (after the echoed command word).

    Protocol 1.0 sends only the MCU; 1.1 adds a zero word and the version, either of which
    may be empty. MCU = text before the first NUL; version = the rest stripped of NULs.
    """
    if len(payload) < 12:
        raise ProtocolError(
            f"CONNECT answer too short ({len(payload)} bytes).",
            cause="The device is not a Katapult bootloader, or a frame was damaged.",
            hint="Reset the board into Katapult and try again.",
        )
    proto, start, block_size = struct.unpack_from("<III", payload)
    text = payload[12:]
    mcu, _, rest = text.partition(b"\x00")
    return ConnectInfo(
        protocol=((proto >> 16) & 0xFF, (proto >> 8) & 0xFF, proto & 0xFF),
        app_start=start,
        block_size=block_size,
        mcu=mcu.decode("ascii", "replace"),
        version=rest.strip(b"\x00").decode("ascii", "replace"),
    )


@dataclass
class Timeouts:
    """Seconds to wait for each reply; SEND_BLOCK covers a long sector erase (H7: up to 4 s)."""

    command: float = 2.0
    send_block: float = 5.0
    tries: int = 3


class KatapultClient:
    """Stop-and-wait command layer.

    Retries are safe because every command is idempotent on the device (an identical
    SEND_BLOCK retransmission is acknowledged without rewriting). ``on_silence`` lets the
    transport add what it knows when the device says nothing at all (on CAN a wedged parser).
    """

    def __init__(self, link: ByteLink, timeouts: Optional[Timeouts] = None) -> None:
        self.link = link
        self.timeouts = timeouts or Timeouts()
        self.decoder = FrameDecoder()
        self.block_size = 64
        self.app_start = 0
        self.retries = 0

    # -- primitive -------------------------------------------------------------------------
    def exchange(
        self,
        cmd: int,
        payload: bytes = b"",
        timeout: Optional[float] = None,
        tries: Optional[int] = None,
        expect_word: Optional[int] = None,
    ) -> bytes:
        """Send ``cmd`` and return the ACK payload after the echoed command word.

        ``expect_word`` is the first payload word the ACK must carry (the block address for
        SEND_BLOCK/REQUEST_BLOCK), so a stale reply to an earlier retry is never taken.
        """
        name = COMMAND_NAMES.get(cmd, f"0x{cmd:02X}")
        frame = encode_frame(cmd, payload)
        wait = self.timeouts.command if timeout is None else timeout
        attempts = self.timeouts.tries if tries is None else tries
        outcomes: list[str] = []
        for attempt in range(attempts):
            if attempt:
                self.retries += 1
            self.link.write(frame)
            outcome, data = self._await(cmd, wait, expect_word)
            if outcome == "ack":
                return data
            outcomes.append(outcome)
            if outcome == "error":
                raise ProtocolError(
                    f"Katapult refused {name}.",
                    cause=_refusal_cause(cmd),
                    hint="The board stays in Katapult; check the file and flash again.",
                )
        if outcomes[-1] == "silence":
            if "nack" in outcomes:
                raise ConnectError(
                    f"Katapult reported a damaged frame during {name} and then stopped answering.",
                    cause=PARSER_STALL,
                    hint="Press reset twice quickly (or power-cycle) to restart Katapult, "
                    "then flash again.",
                )
            raise ConnectError(
                f"No answer to {name} after {attempts} tries.",
                cause="The board is not in Katapult, is rebooting, or did not receive the command.",
                hint="Check the connection and that the board is in its bootloader.",
            )
        raise ProtocolError(
            f"Error sending command [{name}] to the device ({outcomes[-1]}).",
            cause="Frames were damaged on the way (noise, termination) or the device is not "
            "Katapult.",
            hint="Check wiring and termination, reset the board into Katapult and retry.",
        )

    def _await(self, cmd: int, timeout: float, expect_word: Optional[int]) -> tuple[str, bytes]:
        deadline = time.monotonic() + timeout
        heard = False
        while True:
            frame = self.decoder.next_frame()
            if frame is not None:
                heard = True
                if frame.cmd == RESP_ACK and len(frame.payload) >= 4:
                    acked = struct.unpack_from("<I", frame.payload)[0]
                    body = frame.payload[4:]
                    if acked != cmd:
                        continue  # a late answer to something else
                    if expect_word is not None and (
                        len(body) < 4 or struct.unpack_from("<I", body)[0] != expect_word
                    ):
                        continue
                    return "ack", body
                if frame.cmd == RESP_NACK:
                    return "nack", b""
                if frame.cmd == RESP_COMMAND_ERROR:
                    return "error", b""
                if frame.cmd == RESP_BUSY:
                    deadline = max(deadline, time.monotonic() + timeout)
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if self.decoder.bad_frames or heard or self.decoder.buffer:
                    self.decoder = FrameDecoder()
                    return "garbled reply", b""
                return "silence", b""
            data = self.link.read(remaining)
            if data:
                self.decoder.feed(data)

    # -- commands --------------------------------------------------------------------------
    def connect(self, timeout: Optional[float] = None, tries: Optional[int] = None) -> ConnectInfo:
        info = parse_connect(self.exchange(CMD_CONNECT, timeout=timeout, tries=tries))
        if info.block_size not in VALID_BLOCK_SIZES:
            raise ProtocolError(
                f"Katapult reported an unsupported block size of {info.block_size} bytes.",
                cause="A corrupted reply or an unknown Katapult build.",
                hint="Reset the board and retry; update Katapult if it persists.",
            )
        self.block_size = info.block_size
        self.app_start = info.app_start
        return info

    def send_block(self, address: int, data: bytes) -> None:
        if len(data) != self.block_size:
            raise ValueError(f"block must be {self.block_size} bytes, not {len(data)}")
        self.exchange(
            CMD_SEND_BLOCK,
            struct.pack("<I", address) + data,
            timeout=self.timeouts.send_block,
            expect_word=address,
        )

    def request_block(self, address: int) -> bytes:
        body = self.exchange(CMD_REQUEST_BLOCK, struct.pack("<I", address), expect_word=address)
        data = body[4 : 4 + self.block_size]
        if len(data) != self.block_size:
            raise ProtocolError(
                f"Short read-back at 0x{address:08X} ({len(data)} bytes).",
                cause="The reply was truncated.",
                hint="Retry; if it repeats, check the CAN adapter for dropped frames.",
            )
        return data

    def send_eof(self) -> int:
        body = self.exchange(CMD_SEND_EOF)
        return struct.unpack_from("<I", body)[0] if len(body) >= 4 else 0

    def complete(self) -> None:
        self.exchange(CMD_COMPLETE)

    def get_canbus_id(self) -> str:
        body = self.exchange(CMD_GET_CANBUS_ID)
        return body[:6].hex()

    def prime(self, timeout: float = 0.2) -> None:
        """Send an invalid command and drop its answer: some STM32 USB stacks lose the first
        reply after enumeration, so Katapult's own tool primes the link the same way."""
        self.link.write(encode_frame(0x90))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            data = self.link.read(deadline - time.monotonic())
            if data:
                self.decoder.feed(data)
                if self.decoder.next_frame() is not None:
                    break
        self.decoder = FrameDecoder()


def _refusal_cause(cmd: int) -> str:
    if cmd == CMD_SEND_BLOCK:
        return (
            "the block lies below the application start, is misaligned, overlaps data that "
            "was not erased, or the flash write failed (STM32H7: a full chip erase fixes "
            "the known IAP erratum)"
        )
    if cmd == CMD_GET_CANBUS_ID:
        return "this Katapult was not built for CAN"
    return "the command is not supported by this Katapult build"
