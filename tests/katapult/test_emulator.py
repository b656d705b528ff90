"""The emulator's own fidelity: Katapult's parser (and its stall), STM32 page-erase rules and
the CAN bit-time model. The host tests are only as good as these."""

from __future__ import annotations

import struct
from typing import Callable

import pytest

from octoprint_flasher import discovery
from octoprint_flasher.protocols import katapult as kp
from tests.emulators.katapult_node import (
    STM32G0B1,
    EmulatedBoard,
    FlashModel,
    KatapultParser,
    UsbWorld,
    can_frame_bits,
)
from tests.emulators.klipper_firmware import make_klipper_bin

from .conftest import as_bin, can_target

MakeBoard = Callable[..., EmulatedBoard]


def run_parser(parser: KatapultParser, buf: bytearray) -> tuple[list[bytes], int, bool]:
    """Drive find_block like canserial_rx_task; report frames, NACKs and a stall."""
    frames, nacks = [], 0
    while True:
        ret, pop, nack = parser.find_block(buf)
        nacks += nack
        if ret > 0:
            frames.append(bytes(buf[:pop]))
        if not ret:
            return frames, nacks, False
        if pop == 0:
            return frames, nacks, True
        del buf[:pop]


BLOCK = kp.encode_frame(kp.CMD_SEND_BLOCK, struct.pack("<I", 0x08002000) + bytes(64))
CONNECT = kp.encode_frame(kp.CMD_CONNECT)


def test_parser_takes_back_to_back_frames() -> None:
    frames, nacks, stalled = run_parser(KatapultParser(), bytearray(CONNECT + BLOCK))
    assert frames == [CONNECT, BLOCK] and nacks == 0 and not stalled


def test_a_lost_can_frame_then_the_resend_stalls_the_parser_for_good() -> None:
    parser = KatapultParser()
    partial = BLOCK[:16] + BLOCK[24:]  # frame 3 of 10 lost on the bus
    frames, nacks, stalled = run_parser(parser, bytearray(partial + BLOCK))
    assert frames == [] and nacks == 1 and stalled
    # whatever comes later, the same bytes are parsed again and nothing is answered
    frames, nacks, stalled = run_parser(parser, bytearray(partial + BLOCK + CONNECT))
    assert frames == [] and nacks == 0 and stalled


def test_leading_garbage_without_0x01_is_skipped() -> None:
    frames, nacks, stalled = run_parser(KatapultParser(), bytearray(b"\x99\x03\x55" + CONNECT))
    assert frames == [CONNECT] and nacks == 1 and not stalled


def test_fixed_parser_recovers_where_katapult_does_not() -> None:
    partial = BLOCK[:16] + BLOCK[24:]
    frames, _nacks, stalled = run_parser(KatapultParser(faithful=False), bytearray(partial + BLOCK))
    assert frames == [BLOCK] and not stalled


def test_stm32_page_rules() -> None:
    flash = FlashModel(STM32G0B1)
    page = 0x08002000
    assert flash.write_block(page, b"\x11" * 64, 64)[0] == 0
    assert flash.write_block(page + 64, b"\x22" * 64, 64)[0] == 0
    assert flash.write_block(page + 64, b"\x22" * 64, 64) == (0, 0.0)  # identical resend
    assert flash.write_block(page + 64, b"\x33" * 64, 64)[0] == -2  # not erased: out of order
    status, seconds = flash.write_block(page, b"\x44" * 64, 64)  # first block again: erase
    assert status == 0 and seconds >= STM32G0B1.erase_seconds
    assert flash.read(page + 64, 64) == b"\xff" * 64
    assert flash.write_block(page + 32, b"\x00" * 64, 64)[0] == -1  # misaligned


def test_can_bit_times_include_stuffing() -> None:
    # 47 overhead bits + 8 per byte, plus 3 intermission bits, plus stuff bits
    plain = can_frame_bits(0x202, bytes.fromhex("5a5a5a5a5a5a5a5a"))
    zeros = can_frame_bits(0x202, bytes(8))
    assert 47 + 64 <= plain <= 47 + 64 + 8
    assert zeros > plain  # a run of zeros forces a stuff bit every five bits
    assert can_frame_bits(0x3F0, b"\x00") < plain


def test_protocol_10_board_flashes(make_board: MakeBoard, world: UsbWorld) -> None:
    from octoprint_flasher import methods

    board = make_board(firmware="katapult", protocol=(1, 0, 0)).start()
    data = make_klipper_bin(size=2048)
    flasher = methods.open_flasher(can_target(board, world))
    info = flasher.identify()
    flasher.flash(as_bin(data))
    flasher.close()
    assert info.details["protocol"] == "1.0.0" and board.app_bytes(2048) == data


def test_discovery_aggregates_can_nodes(make_board: MakeBoard) -> None:
    board = make_board(firmware="katapult").start()
    found = discovery.discover(can=True, can_interface="virtual", can_channel=board.channel)
    can_nodes = [d for d in found if d.kind == "can"]
    assert [d.uuid for d in can_nodes] == [board.uuid_text]
    assert not [w for w in found.warnings if "CAN" in w]


def test_unknown_mcu_flashes_fully_and_passes_the_generic_preflight(
    make_board: MakeBoard, world: UsbWorld
) -> None:
    from octoprint_flasher import methods, preflight
    from octoprint_flasher.errors import ProtocolError

    board = make_board(chip="lpc1769", firmware="katapult").start()
    data = make_klipper_bin("lpc1769", app_start=0x4000, size=4096)
    flasher = methods.open_flasher(can_target(board, world))
    info = flasher.identify()
    report = preflight.check(as_bin(data), info)
    assert report.ok, report.errors
    result = flasher.flash(as_bin(data), quick=True)  # no page layout: writes everything
    with pytest.raises(ProtocolError, match="flash size of lpc1769 is unknown"):
        flasher.read()  # an unmapped REQUEST_BLOCK would hard-fault the board
    flasher.close()
    assert result.blocks_written == 64 and board.app_bytes(4096) == data
