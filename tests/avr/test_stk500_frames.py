"""Byte-exact STK500v1/v2 frames against the avrdude traces in research/avr.md §5, and the
v2 receive path (stale sequence numbers, bad checksums, silent frames) on a scripted line."""

from __future__ import annotations

from collections import deque
from typing import Callable, Optional

import pytest

from octoprint_flasher.protocols import stk500v1 as v1
from octoprint_flasher.protocols import stk500v2 as v2


def hx(text: str) -> bytes:
    return bytes.fromhex(text)


# --- STK500v1 ---------------------------------------------------------------------------


def test_v1_short_commands_match_the_avrdude_trace() -> None:
    assert v1.get_sync() == hx("30 20")
    assert v1.get_parameter(0x81) == hx("41 81 20")
    assert v1.get_parameter(0x82) == hx("41 82 20")
    assert v1.frame(v1.ENTER_PROGMODE) == hx("50 20")
    assert v1.frame(v1.READ_SIGN) == hx("75 20")
    assert v1.frame(v1.LEAVE_PROGMODE) == hx("51 20")


def test_v1_load_address_is_a_little_endian_word_address() -> None:
    assert v1.load_address(0x0000) == hx("55 00 00 20")
    assert v1.load_address(0x7E00) == hx("55 00 3f 20")
    # bit 15 of the word address is what optiboot copies into RAMPZ
    assert v1.load_address(0x1FC00) == hx("55 00 fe 20")


def test_v1_extended_address_names_the_64k_word_segment() -> None:
    assert v1.load_ext_address(0x20000) == hx("56 4d 00 01 00 20")
    assert v1.load_ext_address(0x3E000) == hx("56 4d 00 01 00 20")
    assert v1.load_ext_address(0x1E000) == hx("56 4d 00 00 00 20")


def test_v1_page_commands() -> None:
    page = bytes(range(128))
    assert v1.prog_page(page) == hx("64 00 80 46") + page + hx("20")
    assert v1.prog_page(b"\xaa" * 256)[:4] == hx("64 01 00 46")
    assert v1.read_page(256) == hx("74 01 00 46 20")


def test_v1_rejects_odd_addresses() -> None:
    with pytest.raises(ValueError):
        v1.load_address(0x101)


# --- STK500v2 ---------------------------------------------------------------------------


def test_v2_sign_on_frame_is_the_traced_one() -> None:
    assert v2.frame(1, v2.sign_on_body()) == hx("1b 01 00 01 0e 01 14")


def test_v2_checksum_includes_the_start_byte() -> None:
    reply = hx("1b 01 00 0b 0e 01 00 08") + b"AVRISP_2"
    assert v2.checksum(reply) == 0x74


def test_v2_bodies_match_the_trace() -> None:
    assert v2.ENTER_PROGMODE_BODY == hx("10 c8 64 19 20 00 53 03 ac 53 00 00")
    assert v2.read_signature_body(1) == hx("1b 04 30 00 01 00")
    assert v2.load_address_body(0x0000) == hx("06 80 00 00 00")
    # word address, big-endian, bit 31 set (m2560 has an extended address byte)
    assert v2.load_address_body(0x3DF00) == hx("06 80 01 ef 80")
    assert v2.program_flash_body(b"\x00" * 256)[:10] == hx("13 01 00 c1 0a 40 4c 20 00 00")
    assert v2.read_flash_body(256) == hx("14 01 00 20")


def test_v2_refuses_frames_the_bootloader_cannot_hold() -> None:
    with pytest.raises(ValueError):
        v2.frame(1, bytes(286))
    with pytest.raises(ValueError):
        v2.program_flash_body(b"\x00" * 3)


class ScriptedLine:
    """A serial line whose board answers each written frame through ``respond``."""

    def __init__(self, respond: Callable[[bytes], Optional[bytes]]) -> None:
        self.respond = respond
        self.rx: deque[int] = deque()
        self.written: list[bytes] = []
        self.timeout: Optional[float] = 0.05
        self.port = "scripted"

    def write(self, data: bytes) -> int:
        self.written.append(bytes(data))
        out = self.respond(bytes(data))
        if out:
            self.rx.extend(out)
        return len(data)

    def read(self, n: int) -> bytes:
        out = bytearray()
        while self.rx and len(out) < n:
            out.append(self.rx.popleft())
        return bytes(out)

    def reset_input_buffer(self) -> None:
        self.rx.clear()


def reply(seq: int, body: bytes) -> bytes:
    return v2.frame(seq, body)


def test_v2_resends_a_command_the_bootloader_dropped_for_its_checksum() -> None:
    calls = {"n": 0}

    def board(data: bytes) -> Optional[bytes]:
        calls["n"] += 1
        if calls["n"] == 1:
            return None  # bad checksum on the way in: the bootloader stays silent
        return reply(data[1], hx("06 00"))

    proto = v2.Stk500v2(ScriptedLine(board), timeout=0.05)
    proto.load_address(0x100)
    assert proto.resends == 1
    assert calls["n"] == 2


def test_v2_skips_late_answers_to_an_older_sequence_number_and_noise() -> None:
    def board(data: bytes) -> Optional[bytes]:
        seq = data[1]
        stale = reply((seq - 1) & 0xFF, hx("1b 00 99 00"))
        corrupt = bytearray(reply(seq, hx("1b 00 77 00")))
        corrupt[-1] ^= 0xFF
        return b"\x00\x55" + stale + bytes(corrupt) + reply(seq, hx(f"1b 00 {data[9]:02x} 00"))

    proto = v2.Stk500v2(ScriptedLine(board), timeout=0.05)
    # the board answers with the idx byte as signature: 0, 1, 2
    assert proto.read_signature() == hx("00 01 02")


def test_v2_program_page_is_never_resent_by_the_protocol_layer() -> None:
    line = ScriptedLine(lambda data: None)
    proto = v2.Stk500v2(line, timeout=0.02, page_timeout=0.02)
    with pytest.raises(v2.Stk500v2Error) as err:
        proto.program_page(b"\x00" * 256)
    assert err.value.silent
    assert len(line.written) == 1


def test_v2_failed_status_is_reported_with_its_code() -> None:
    proto = v2.Stk500v2(ScriptedLine(lambda d: reply(d[1], hx("12 c0"))), timeout=0.05)
    with pytest.raises(v2.Stk500v2Error) as err:
        proto.command(bytes([v2.CMD_CHIP_ERASE_ISP]) + bytes(6), 2)
    assert err.value.status == 0xC0
