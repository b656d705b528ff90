"""Katapult framing and the command layer, byte-exact against the research test vectors."""

from __future__ import annotations

import struct

import pytest

from octoprint_flasher.errors import ConnectError, ProtocolError
from octoprint_flasher.protocols import katapult as kp


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", "").replace("\n", ""))


CONNECT_ACK = h(
    "01 88 a0 0d 11 00 00 00 00 01 01 00 00 20 00 08 40 00 00 00 73 74 6d 33 32 67 30 62 31"
    "78 78 00 00 00 00 00 76 30 2e 30 2e 31 2d 31 31 30 2d 67 62 30 62 66 34 32 31 00 d8 05 99 03"
)


def test_crc_is_mcrf4xx() -> None:
    assert kp.crc16(b"123456789") == 0x6F91


@pytest.mark.parametrize(
    ("cmd", "payload", "wire"),
    [
        (kp.CMD_CONNECT, b"", "01 88 11 00 f1 7c 99 03"),
        (kp.CMD_SEND_EOF, b"", "01 88 13 00 41 4f 99 03"),
        (kp.CMD_COMPLETE, b"", "01 88 15 00 91 1b 99 03"),
        (kp.CMD_GET_CANBUS_ID, b"", "01 88 16 00 f9 31 99 03"),
        (
            kp.CMD_REQUEST_BLOCK,
            struct.pack("<I", 0x08002000),
            "01 88 14 01 00 20 00 08 5b de 99 03",
        ),
        (kp.RESP_NACK, b"", "01 88 f1 00 68 95 99 03"),
        (kp.RESP_COMMAND_ERROR, b"", "01 88 f2 00 00 bf 99 03"),
        (kp.RESP_BUSY, b"", "01 88 f3 00 d8 a6 99 03"),
        (kp.RESP_ACK, h("12000000 00200008"), "01 88 a0 02 12 00 00 00 00 20 00 08 5a d6 99 03"),
        (kp.RESP_ACK, h("13000000 0d000000"), "01 88 a0 02 13 00 00 00 0d 00 00 00 19 53 99 03"),
        (kp.RESP_ACK, h("15000000"), "01 88 a0 01 15 00 00 00 00 2e 99 03"),
        (
            kp.RESP_ACK,
            h("16000000 4220d6e9e9f9 0000"),
            "01 88 a0 03 16 00 00 00 42 20 d6 e9 e9 f9 00 00 73 1e 99 03",
        ),
    ],
)
def test_frames_match_vectors(cmd: int, payload: bytes, wire: str) -> None:
    assert kp.encode_frame(cmd, payload) == h(wire)


def test_send_block_vector() -> None:
    frame = kp.encode_frame(kp.CMD_SEND_BLOCK, struct.pack("<I", 0x08002000) + b"\xff" * 64)
    assert len(frame) == 76
    assert frame[:8] == h("01 88 12 11 00 20 00 08")
    assert frame[-4:] == h("07 ea 99 03")


def test_connect_ack_parses_protocol_11() -> None:
    dec = kp.FrameDecoder()
    dec.feed(CONNECT_ACK)
    frame = dec.next_frame()
    assert frame is not None and frame.cmd == kp.RESP_ACK
    info = kp.parse_connect(frame.payload[4:])
    assert info.protocol == (1, 1, 0)
    assert info.app_start == 0x08002000
    assert info.block_size == 64
    assert info.mcu == "stm32g0b1xx"
    assert info.version == "v0.0.1-110-gb0bf421"


def test_connect_protocol_10_has_no_version_and_empty_version_is_fine() -> None:
    head = struct.pack("<III", 0x00010000, 0x08002000, 64)
    old = kp.parse_connect(head + b"stm32f103xe\x00")
    assert (old.mcu, old.version, old.protocol_text) == ("stm32f103xe", "", "1.0.0")
    empty = kp.parse_connect(head + b"rp2040\x00\x00" + b"\x00" * 4)
    assert (empty.mcu, empty.version) == ("rp2040", "")


def test_decoder_skips_garbage_and_damaged_frames() -> None:
    good = kp.encode_frame(kp.RESP_ACK, struct.pack("<I", kp.CMD_COMPLETE))
    damaged = bytearray(good)
    damaged[5] ^= 0xFF
    dec = kp.FrameDecoder()
    dec.feed(b"\x00\x01\x99" + bytes(damaged) + b"\x01" + good[:5])
    assert dec.next_frame() is None
    dec.feed(good[5:])
    frame = dec.next_frame()
    assert frame is not None and frame.payload == struct.pack("<I", kp.CMD_COMPLETE)
    assert dec.bad_frames >= 1


class ScriptedLink:
    """A device that answers each written frame from a script (None = stays silent)."""

    def __init__(self, answers: list[bytes | None]) -> None:
        self.answers = list(answers)
        self.written: list[bytes] = []
        self.pending = b""

    def write(self, data: bytes) -> None:
        self.written.append(data)
        answer = self.answers.pop(0) if self.answers else None
        self.pending += answer or b""

    def read(self, timeout: float) -> bytes:
        data, self.pending = self.pending, b""
        return data

    def flush_input(self) -> None:
        self.pending = b""


def ack(cmd: int, body: bytes = b"") -> bytes:
    return kp.encode_frame(kp.RESP_ACK, struct.pack("<I", cmd) + body)


FAST = kp.Timeouts(command=0.05, send_block=0.05, tries=3)


def test_send_block_retries_after_lost_reply_and_ignores_stale_acks() -> None:
    addr = 0x08002040
    link = ScriptedLink(
        [
            None,
            ack(kp.CMD_SEND_BLOCK, struct.pack("<I", 0x08002000))
            + ack(kp.CMD_SEND_BLOCK, struct.pack("<I", addr)),
        ]
    )
    client = kp.KatapultClient(link, FAST)
    client.send_block(addr, b"\x00" * 64)
    assert len(link.written) == 2 and link.written[0] == link.written[1]
    assert client.retries == 1


def test_command_error_is_a_protocol_error_naming_the_command() -> None:
    link = ScriptedLink([kp.encode_frame(kp.RESP_COMMAND_ERROR)])
    client = kp.KatapultClient(link, FAST)
    with pytest.raises(ProtocolError, match="refused SEND_BLOCK"):
        client.send_block(0x08000000, b"\x00" * 64)
    assert len(link.written) == 1


def test_silence_is_a_connect_error_after_all_tries() -> None:
    link = ScriptedLink([None, None, None])
    with pytest.raises(ConnectError, match="No answer to CONNECT after 3 tries"):
        kp.KatapultClient(link, FAST).connect()
    assert len(link.written) == 3


def test_nack_then_success() -> None:
    link = ScriptedLink(
        [kp.encode_frame(kp.RESP_NACK), ack(kp.CMD_SEND_EOF, struct.pack("<I", 13))]
    )
    assert kp.KatapultClient(link, FAST).send_eof() == 13


def test_garbled_replies_are_reported_as_such() -> None:
    bad = bytearray(ack(kp.CMD_COMPLETE))
    bad[6] ^= 1
    link = ScriptedLink([bytes(bad)] * 3)
    with pytest.raises(ProtocolError, match=r"\[COMPLETE\]"):
        kp.KatapultClient(link, FAST).complete()


def test_unsupported_block_size_is_refused() -> None:
    payload = struct.pack("<III", 0x00010100, 0x08002000, 48) + b"x\x00\x00\x00"
    link = ScriptedLink([ack(kp.CMD_CONNECT, payload)])
    with pytest.raises(ProtocolError, match="block size of 48"):
        kp.KatapultClient(link, FAST).connect()


def test_payload_must_be_words() -> None:
    with pytest.raises(ValueError):
        kp.encode_frame(kp.CMD_SEND_BLOCK, b"\x00" * 3)
