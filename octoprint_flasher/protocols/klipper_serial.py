"""Just enough of Klipper's serial protocol to ask a freshly started Klipper "who are you".

Klipper frames everything in *message blocks* (``docs/Protocol.md``, ``src/command.c``,
``klippy/msgproto.py``)::

    len | seq | payload (msgid + args, VLQ-encoded) | crc_hi crc_lo | 0x7E

``len`` counts the whole block (5..64 bytes); ``seq`` is ``0x10 | n`` with a 4-bit counter;
the CRC is CRC-16/MCRF4XX (the same arithmetic as Katapult's) over ``len, seq, payload``,
sent big-endian; 0x7E ends every block, and a receiver that loses sync discards bytes up
to the next 0x7E. Integers are "variable length quantities": 7 bits per byte, most
significant group first, bit 7 set on all but the last byte, and a first byte of the form
``x11xxxxx`` sign-extends. An empty block (len 5) is an ACK/NAK: its ``seq`` is the sequence
number the MCU expects next. A fresh MCU expects 0; a block with another sequence number is
answered with such a NAK and otherwise ignored.

``identify offset=%u count=%c`` (id 1) and ``identify_response offset=%u data=%.*s`` (id 0)
are the two messages whose ids are fixed in every Klipper build (msgproto's DefaultMessages),
because the host needs them to fetch the data dictionary that numbers everything else. The
data is a chunk of that dictionary, which is zlib-compressed JSON, the same bytes a
``klipper.bin`` embeds.

Pure framing plus one probe over a :class:`~octoprint_flasher.protocols.katapult.ByteLink`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

from .katapult import ByteLink

MESSAGE_MIN = 5
MESSAGE_MAX = 64
MESSAGE_HEADER_SIZE = 2
MESSAGE_TRAILER_SIZE = 3
MESSAGE_PAYLOAD_MAX = MESSAGE_MAX - MESSAGE_MIN
MESSAGE_SEQ_MASK = 0x0F
MESSAGE_DEST = 0x10
MESSAGE_SYNC = 0x7E

MSGID_IDENTIFY_RESPONSE = 0
MSGID_IDENTIFY = 1
#: klippy fetches the dictionary in chunks of 40 bytes
IDENTIFY_CHUNK = 40


def crc16_ccitt(data: bytes) -> int:
    """Klipper's ``crc16_ccitt`` (CRC-16/MCRF4XX: reflected 0x1021, init 0xFFFF)."""
    crc = 0xFFFF
    for byte in data:
        byte ^= crc & 0xFF
        byte = (byte ^ (byte << 4)) & 0xFF
        crc = ((byte << 8) | (crc >> 8)) ^ (byte >> 4) ^ (byte << 3)
    return crc & 0xFFFF


def encode_vlq(value: int) -> bytes:
    """A 32-bit integer (signed or unsigned) as Klipper's variable length quantity.

    The length is chosen on the *signed* value so that small negatives stay short, which is
    why the one-byte range is -32..95 rather than 0..127.
    """
    if not -(1 << 31) <= value < (1 << 32):
        raise ValueError(f"{value} does not fit in 32 bits")
    v = value & 0xFFFFFFFF
    sv = v - (1 << 32) if v & 0x80000000 else v
    groups = next(
        (n for n, low in ((1, 5), (2, 12), (3, 19), (4, 26)) if -(1 << low) <= sv < 3 << low),
        5,
    )
    out = bytearray()
    for shift in range(7 * (groups - 1), 0, -7):
        out.append(((v >> shift) & 0x7F) | 0x80)
    out.append(v & 0x7F)
    return bytes(out)


def decode_vlq(data: bytes, pos: int = 0, signed: bool = False) -> tuple[int, int]:
    """``(value, next position)``; raises ValueError if the quantity is cut short."""
    if pos >= len(data):
        raise ValueError("integer missing at the end of the message")
    c = data[pos]
    pos += 1
    v = c & 0x7F
    if c & 0x60 == 0x60:
        v -= 0x80  # x11xxxxx: a negative number, sign-extended as Klipper's parser does
    while c & 0x80:
        if pos >= len(data):
            raise ValueError("integer cut short at the end of the message")
        c = data[pos]
        pos += 1
        v = (v << 7) | (c & 0x7F)
    v &= 0xFFFFFFFF
    if signed and v & 0x80000000:
        v -= 1 << 32
    return v, pos


def encode_msgblock(seq: int, payload: bytes) -> bytes:
    """Frame ``payload`` (one or more encoded messages) as a block with sequence ``seq``."""
    if len(payload) > MESSAGE_PAYLOAD_MAX:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MESSAGE_PAYLOAD_MAX}")
    head = bytes((MESSAGE_MIN + len(payload), MESSAGE_DEST | (seq & MESSAGE_SEQ_MASK)))
    crc = crc16_ccitt(head + payload)
    return head + payload + bytes((crc >> 8, crc & 0xFF, MESSAGE_SYNC))


def check_block(buf: bytes) -> int:
    """Klipper's block check: the block's length if ``buf`` starts with a valid block, 0 if
    more bytes are needed, -1 if ``buf`` does not start with a valid block."""
    if len(buf) < MESSAGE_MIN:
        return 0
    msglen = buf[0]
    if not MESSAGE_MIN <= msglen <= MESSAGE_MAX:
        return -1
    if buf[1] & ~MESSAGE_SEQ_MASK != MESSAGE_DEST:
        return -1
    if len(buf) < msglen:
        return 0
    if buf[msglen - 1] != MESSAGE_SYNC:
        return -1
    crc = (buf[msglen - 3] << 8) | buf[msglen - 2]
    if crc16_ccitt(bytes(buf[: msglen - MESSAGE_TRAILER_SIZE])) != crc:
        return -1
    return msglen


@dataclass(frozen=True)
class Block:
    """A received message block: its sequence number (low 4 bits) and its payload."""

    seq: int
    payload: bytes

    @property
    def is_ack(self) -> bool:
        """An empty block: an ACK/NAK naming the sequence number expected next."""
        return not self.payload

    @property
    def first_msgid(self) -> Optional[int]:
        if not self.payload:
            return None
        try:
            return decode_vlq(self.payload, 0, signed=True)[0]
        except ValueError:
            return None


class BlockDecoder:
    """Splits a byte stream into valid blocks; after garbage it skips to the next 0x7E."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.need_sync = False
        self.discarded = 0

    def feed(self, data: bytes) -> list[Block]:
        self.buf += data
        out: list[Block] = []
        while self.buf:
            if self.need_sync:
                at = self.buf.find(MESSAGE_SYNC)
                drop = len(self.buf) if at < 0 else at + 1
                self.discarded += drop
                del self.buf[:drop]
                self.need_sync = at < 0
                continue
            ret = check_block(bytes(self.buf[:MESSAGE_MAX]))
            if ret == 0:
                break
            if ret < 0:
                if self.buf[0] == MESSAGE_SYNC:
                    del self.buf[:1]  # stray sync bytes between blocks are harmless
                    self.discarded += 1
                else:
                    self.need_sync = True
                continue
            out.append(
                Block(
                    self.buf[1] & MESSAGE_SEQ_MASK,
                    bytes(self.buf[MESSAGE_HEADER_SIZE : ret - MESSAGE_TRAILER_SIZE]),
                )
            )
            del self.buf[:ret]
        return out


def encode_identify(offset: int, count: int = IDENTIFY_CHUNK) -> bytes:
    """The payload of ``identify offset=%u count=%c``."""
    if not 0 <= count <= 0xFF:
        raise ValueError("count is one byte")
    return encode_vlq(MSGID_IDENTIFY) + encode_vlq(offset) + encode_vlq(count)


@dataclass(frozen=True)
class IdentifyResponse:
    offset: int
    data: bytes


def parse_identify_response(payload: bytes) -> IdentifyResponse:
    """``identify_response offset=%u data=%.*s`` from a block payload (it comes first)."""
    msgid, pos = decode_vlq(payload, 0, signed=True)
    if msgid != MSGID_IDENTIFY_RESPONSE:
        raise ValueError(f"message id {msgid} is not identify_response")
    offset, pos = decode_vlq(payload, pos)
    if pos >= len(payload):
        raise ValueError("identify_response without its data length")
    length = payload[pos]
    pos += 1
    if pos + length > len(payload):
        raise ValueError("identify_response data cut short")
    return IdentifyResponse(offset, bytes(payload[pos : pos + length]))


def encode_identify_response(offset: int, data: bytes) -> bytes:
    """The payload an MCU sends for ``identify`` (the emulator's side)."""
    if len(data) > 0xFF:
        raise ValueError("data length is one byte")
    return encode_vlq(MSGID_IDENTIFY_RESPONSE) + encode_vlq(offset) + bytes((len(data),)) + data


@dataclass(frozen=True)
class ProbeResult:
    response: IdentifyResponse
    seconds: float
    attempts: int


def probe_identify(
    link: ByteLink,
    seconds: float,
    reply_window: float = 0.25,
) -> Optional[ProbeResult]:
    """Send ``identify offset=0`` until a valid ``identify_response`` arrives or ``seconds``
    pass. A NAK (empty block) tells which sequence number the MCU expects: the next request
    uses it, as klippy's serial queue does after a reset."""
    started = time.monotonic()
    deadline = started + seconds
    seq = 0
    attempts = 0
    while True:
        link.flush_input()
        decoder = BlockDecoder()
        link.write(encode_msgblock(seq, encode_identify(0)))
        attempts += 1
        window_end = min(deadline, time.monotonic() + reply_window)
        resend = False
        while not resend:
            left = window_end - time.monotonic()
            if left <= 0:
                break
            for block in decoder.feed(link.read(left)):
                if block.first_msgid == MSGID_IDENTIFY_RESPONSE:
                    try:
                        response = parse_identify_response(block.payload)
                    except ValueError:
                        continue
                    return ProbeResult(response, time.monotonic() - started, attempts)
                if block.is_ack and block.seq != seq:
                    seq = block.seq  # our request went unheard under a stale number
                    resend = True
        if time.monotonic() >= deadline:
            return None
