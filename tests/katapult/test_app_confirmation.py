"""After a serial Katapult flash, leave() waits until the new application is seen.

USB: Klipper re-enumerates as 1d50:614e on the same USB path. UART: Klipper answers
``identify`` in its own message-block protocol at the build's baud. A board that stays silent
gets a sentence saying so (the firmware is written and verified, so nothing is raised).
The framing vectors were derived by hand from Klipper's src/command.c (encode_int,
command_add_frame, command_find_block) and klippy/msgproto.py.
"""

from __future__ import annotations

import struct
import time
from typing import Callable, Optional

import pytest

from octoprint_flasher import methods
from octoprint_flasher.flashers.katapult import KatapultFlasher
from octoprint_flasher.protocols import klipper_serial as ks
from tests.emulators.katapult_node import (
    EmulatedBoard,
    Faults,
    KlipperSerialCore,
    UsbWorld,
    dictionary_blob,
)
from tests.emulators.klipper_firmware import STACK_TOP, make_klipper_bin

from .conftest import as_bin, can_target, serial_target

MakeBoard = Callable[..., EmulatedBoard]
SMALL = 8 * 1024


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


# -- framing vectors ---------------------------------------------------------------------------


def crc_bitwise(data: bytes) -> int:
    """CRC-16/MCRF4XX computed bit by bit (reflected 0x1021 = 0x8408, init 0xFFFF), an
    independent check of Klipper's nibble-folded crc16_ccitt."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x8408 if crc & 1 else crc >> 1
    return crc


def test_crc_is_klippers_crc16_ccitt() -> None:
    assert ks.crc16_ccitt(b"123456789") == 0x6F91
    for sample in (b"", b"\x08\x10\x01\x00\x28", bytes(range(256))):
        assert ks.crc16_ccitt(sample) == crc_bitwise(sample)


@pytest.mark.parametrize(
    ("value", "wire"),
    [
        (0, "00"),
        (95, "5f"),  # one byte holds -32..95
        (96, "80 60"),
        (-1, "7f"),
        (-32, "60"),
        (-33, "ff 5f"),
        (12288, "80 e0 00"),  # 3 << 12 needs a third byte
        (1000000, "bd 84 40"),
        (0x80000000, "88 80 80 80 00"),  # the MCU's encode_int; klippy writes f8 ..
        (0xFFFFFFFF, "7f"),  # as signed this is -1: one byte
    ],
)
def test_vlq_encoding(value: int, wire: str) -> None:
    assert ks.encode_vlq(value) == h(wire)
    decoded, end = ks.decode_vlq(h(wire), 0, signed=value < 0)
    assert (decoded, end) == (value, len(h(wire)))


def test_vlq_sign_extension_and_both_five_byte_forms() -> None:
    assert ks.decode_vlq(h("ff 5f"), signed=True) == (-33, 2)
    assert ks.decode_vlq(h("7f")) == (0xFFFFFFFF, 1)  # unsigned view of -1
    assert ks.decode_vlq(h("f8 80 80 80 00"))[0] == ks.decode_vlq(h("88 80 80 80 00"))[0]
    with pytest.raises(ValueError):
        ks.decode_vlq(h("80"))


def test_identify_block_and_its_response() -> None:
    # identify offset=0 count=40 (id 1) with sequence 0, as a fresh MCU expects
    assert ks.encode_msgblock(0, ks.encode_identify(0)) == h("08 10 01 00 28 5e 9f 7e")
    # identify_response offset=0 data=78 9c (id 0), sent with the MCU's next sequence 1
    response = h("0a 11 00 00 02 78 9c 09 1a 7e")
    assert ks.encode_msgblock(1, ks.encode_identify_response(0, b"\x78\x9c")) == response
    blocks = ks.BlockDecoder().feed(response)
    assert blocks == [ks.Block(1, h("00 00 02 78 9c"))]
    assert blocks[0].first_msgid == ks.MSGID_IDENTIFY_RESPONSE
    assert ks.parse_identify_response(blocks[0].payload) == ks.IdentifyResponse(0, b"\x78\x9c")
    # an empty block is an ACK/NAK naming the sequence expected next
    nak = ks.BlockDecoder().feed(h("05 10 9e 81 7e"))
    assert nak == [ks.Block(0, b"")] and nak[0].is_ack


def test_check_block_needs_length_seq_sync_and_crc() -> None:
    good = h("08 10 01 00 28 5e 9f 7e")
    assert ks.check_block(good) == 8
    assert ks.check_block(good[:6]) == 0  # more bytes needed
    assert ks.check_block(h("04") + good[1:]) == -1  # length below 5
    assert ks.check_block(good[:1] + h("20") + good[2:]) == -1  # not 0x1n
    assert ks.check_block(good[:5] + h("5e 9e 7e")) == -1  # CRC
    assert ks.check_block(good[:7] + h("7d")) == -1  # no sync at the end


def test_decoder_resyncs_on_0x7e_after_garbage() -> None:
    good = ks.encode_msgblock(1, ks.encode_identify_response(0, b"\x78\x9c"))
    broken = bytearray(good)
    broken[4] ^= 0x40  # a corrupted block: dropped through its closing 0x7E
    stream = b"\x00\xff boot noise \x7e" + bytes(broken) + b"\x7e\x7e" + good
    decoder = ks.BlockDecoder()
    blocks = [b for i in range(len(stream)) for b in decoder.feed(stream[i : i + 1])]
    assert blocks == [ks.Block(1, h("00 00 02 78 9c"))]
    assert decoder.discarded == len(stream) - len(good)


# -- the emulated Klipper's parser (what the probe talks to) ---------------------------------


def test_emulated_klipper_answers_identify_with_dictionary_chunks() -> None:
    blob = dictionary_blob(make_klipper_bin(size=SMALL, canbus_frequency=None))
    assert blob is not None and blob[:2] == b"\x78\x9c"
    core = KlipperSerialCore(blob)
    out = core.receive(ks.encode_msgblock(0, ks.encode_identify(0)))
    decoded = ks.BlockDecoder().feed(b"".join(out))
    assert [b.seq for b in decoded] == [1, 1]  # identify_response, then the ACK
    assert ks.parse_identify_response(decoded[0].payload) == ks.IdentifyResponse(0, blob[:40])
    assert decoded[1].is_ack
    # past the end: an empty chunk, as klippy uses to detect the end of the dictionary
    out = core.receive(ks.encode_msgblock(1, ks.encode_identify(len(blob))))
    last = ks.BlockDecoder().feed(b"".join(out))[0]
    assert ks.parse_identify_response(last.payload).data == b""


def test_emulated_klipper_naks_a_stale_sequence_and_resyncs_after_garbage() -> None:
    core = KlipperSerialCore(b"\x78\x9c" + bytes(60))
    stale = core.receive(ks.encode_msgblock(5, b"\x01\x00\x28"))
    assert ks.BlockDecoder().feed(b"".join(stale)) == [ks.Block(0, b"")]  # "I expect 0"
    # the Katapult CONNECT frame and a damaged block: one NAK for the burst, nothing dispatched
    connect = h("01 88 11 00 f1 7c 99 03")
    damaged = bytearray(ks.encode_msgblock(0, ks.encode_identify(0)))
    damaged[3] ^= 1
    out = core.receive(connect + bytes(damaged))
    assert ks.BlockDecoder().feed(b"".join(out)) == [ks.Block(0, b"")]
    assert core.commands == []
    out = core.receive(ks.encode_msgblock(0, ks.encode_identify(0)))
    assert ks.BlockDecoder().feed(b"".join(out))[0].first_msgid == 0
    assert core.commands == [ks.MSGID_IDENTIFY]


class FakeLink:
    """A byte link in front of the emulated parser, for the probe's sequence handling."""

    def __init__(self, core: KlipperSerialCore) -> None:
        self.core = core
        self.pending = b""
        self.sent: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.sent.append(data)
        self.pending += b"".join(self.core.receive(data))

    def read(self, timeout: float) -> bytes:
        out, self.pending = self.pending, b""
        if not out:
            time.sleep(min(timeout, 0.01))
        return out

    def flush_input(self) -> None:
        pass


def test_probe_follows_the_sequence_number_a_nak_names() -> None:
    core = KlipperSerialCore(b"\x78\x9c" + bytes(60))
    core.next_sequence = ks.MESSAGE_DEST | 7  # a Klipper that has talked to a host before
    link = FakeLink(core)
    result = ks.probe_identify(link, seconds=1.0, reply_window=0.05)
    assert result is not None and result.response.data == core.identify_data[:40]
    assert result.attempts == 2
    assert [block[1] for block in link.sent] == [0x10, 0x17]


def test_probe_gives_up_after_its_time_on_a_silent_link() -> None:
    class Silent(FakeLink):
        def write(self, data: bytes) -> None:
            self.sent.append(data)

    link = Silent(KlipperSerialCore(b""))
    started = time.monotonic()
    assert ks.probe_identify(link, seconds=0.3, reply_window=0.1) is None
    assert 0.3 <= time.monotonic() - started < 0.6
    assert len(link.sent) >= 3  # it kept asking


# -- end to end on the emulated boards ---------------------------------------------------------


def flash_and_leave(
    port: str, world: UsbWorld, data: bytes, check: bool = True, **options: object
) -> tuple[Optional[str], list[str], float]:
    log: list[str] = []
    flasher = methods.open_flasher(serial_target(port, world, **options), log.append)
    assert isinstance(flasher, KatapultFlasher)
    try:
        info = flasher.identify()
        if check:
            flasher.check(as_bin(data), info)
        flasher.flash(as_bin(data))
        started = time.monotonic()
        sentence = flasher.leave()
        seconds = time.monotonic() - started
    finally:
        flasher.close()
    return sentence, log, seconds


def not_klipper_app(size: int = SMALL, app_start: int = 0x08002000) -> bytes:
    """A valid application for the board that is not Klipper (no data dictionary)."""
    vectors = struct.pack("<II", STACK_TOP, app_start + 0x1C1) + bytes(56)
    return (
        vectors
        + bytes(range(256)) * ((size - len(vectors)) // 256)
        + b"\x00" * ((size - len(vectors)) % 256)
    )


def test_uart_flash_ends_when_klipper_answers_identify(
    make_board: MakeBoard, world: UsbWorld
) -> None:
    board = make_board(interface="uart", firmware="katapult").start()
    assert board.port is not None
    data = make_klipper_bin(size=SMALL, canbus_frequency=None, serial_baud=250000)
    sentence, _, seconds = flash_and_leave(board.port, world, data)
    assert sentence == f"Klipper answers on {board.port} at 250000 baud (identify)."
    assert board.mode == "klipper"
    assert board.klipper_serial().commands[:1] == [ks.MSGID_IDENTIFY]
    assert seconds < 1.0


def test_uart_confirmation_speaks_at_the_builds_baud(
    make_board: MakeBoard, world: UsbWorld
) -> None:
    """Katapult at 250000, the new Klipper at 115200 (its dictionary's SERIAL_BAUD): the probe
    switches the line; the emulated Klipper hears nothing at the wrong rate."""
    board = make_board(interface="uart", firmware="katapult").start()
    assert board.port is not None
    data = make_klipper_bin(size=SMALL, canbus_frequency=None, serial_baud=115200)
    sentence, _, _ = flash_and_leave(board.port, world, data)
    assert sentence == f"Klipper answers on {board.port} at 115200 baud (identify)."
    assert not any("got bytes at" in e for e in board.events)


def test_uart_probe_survives_a_damaged_request_and_a_lost_answer(
    make_board: MakeBoard, world: UsbWorld
) -> None:
    faults = Faults(corrupt_in={1}, drop_out={2})
    board = make_board(interface="uart", firmware="katapult", klipper_faults=faults).start()
    assert board.port is not None
    data = make_klipper_bin(size=SMALL, canbus_frequency=None, serial_baud=250000)
    sentence, _, _ = flash_and_leave(board.port, world, data)
    assert sentence is not None and sentence.startswith("Klipper answers on")
    assert faults.fired == ["corrupt@in1", "drop@out2"]


def test_uart_board_whose_new_application_is_not_klipper_says_so(
    make_board: MakeBoard, world: UsbWorld
) -> None:
    board = make_board(interface="uart", firmware="katapult").start()
    assert board.port is not None
    sentence, _, seconds = flash_and_leave(board.port, world, not_klipper_app())
    assert board.mode == "app"
    assert sentence is not None
    assert sentence.startswith(f"Klipper did not answer on {board.port} at 250000 baud within 1 s")
    assert "written and verified" in sentence and "double-tap reset" in sentence
    assert 1.0 <= seconds < 2.0


def test_uart_klipper_that_crashes_at_start_says_so(make_board: MakeBoard, world: UsbWorld) -> None:
    """A build for another MCU (check() skipped, as if the dictionary lied) hangs at start."""
    board = make_board(interface="uart", firmware="katapult").start()
    assert board.port is not None
    data = make_klipper_bin("stm32f446xx", size=SMALL, canbus_frequency=None, serial_baud=250000)
    sentence, _, _ = flash_and_leave(board.port, world, data, check=False)
    assert board.mode == "crashed"
    assert sentence is not None and "did not answer" in sentence


def test_usb_flash_ends_when_klipper_is_back_on_usb(make_board: MakeBoard, world: UsbWorld) -> None:
    board = make_board(interface="usb", firmware="katapult").start()
    katapult_port = board.port
    assert katapult_port is not None
    data = make_klipper_bin(size=SMALL, canbus_frequency=None)
    sentence, _, seconds = flash_and_leave(katapult_port, world, data)
    assert board.mode == "klipper" and board.port is not None
    assert sentence == f"Klipper is back on USB as {board.port} (1d50:614e)."
    back = [p for p in world.list_ports() if p.device == board.port]
    assert [(p.vid, p.pid, p.location) for p in back] == [(0x1D50, 0x614E, "1-1.3")]
    assert seconds < 1.0


def test_usb_confirmation_ignores_another_boards_klipper(
    make_board: MakeBoard, world: UsbWorld
) -> None:
    other = make_board(interface="usb", firmware="klipper", location="1-1.4", chip_id=bytes(12))
    other.install_app(make_klipper_bin(canbus_frequency=None))
    other.start()
    board = make_board(interface="usb", firmware="katapult").start()
    assert board.port is not None
    sentence, _, _ = flash_and_leave(board.port, world, not_klipper_app())
    assert sentence is not None
    assert sentence.startswith("Klipper did not come back on USB (1d50:614e) at USB path 1-1.3")
    assert other.port is not None and other.port not in sentence


def test_usb_board_whose_new_application_is_not_klipper_says_so(
    make_board: MakeBoard, world: UsbWorld
) -> None:
    board = make_board(interface="usb", firmware="katapult").start()
    assert board.port is not None
    sentence, _, _ = flash_and_leave(board.port, world, not_klipper_app())
    assert board.mode == "app"
    assert sentence is not None and "did not come back on USB" in sentence
    assert "written and verified" in sentence


def test_uart_flash_of_a_usb_build_says_where_to_look(
    make_board: MakeBoard, world: UsbWorld
) -> None:
    board = make_board(interface="uart", firmware="katapult").start()
    assert board.port is not None
    data = make_klipper_bin(size=SMALL, canbus_frequency=None)  # no SERIAL_BAUD: a USB build
    sentence, _, seconds = flash_and_leave(board.port, world, data)
    assert sentence is not None and "talks USB, not over this UART" in sentence
    assert seconds < 0.5


def test_entered_from_klipper_over_usb_and_confirmed_back(
    make_board: MakeBoard, world: UsbWorld
) -> None:
    board = make_board(interface="usb", firmware="klipper")
    board.install_app(make_klipper_bin(canbus_frequency=None))
    board.start()
    assert board.port is not None
    data = make_klipper_bin(size=SMALL, canbus_frequency=None, seed=5)
    sentence, log, _ = flash_and_leave(board.port, world, data)
    assert "1200-baud" in " ".join(log)
    assert sentence == f"Klipper is back on USB as {board.port} (1d50:614e)."


def test_entered_from_klipper_over_uart_and_confirmed_back(
    make_board: MakeBoard, world: UsbWorld
) -> None:
    board = make_board(interface="uart", firmware="klipper")
    board.install_app(make_klipper_bin(canbus_frequency=None, serial_baud=250000))
    board.start()
    assert board.port is not None
    data = make_klipper_bin(size=SMALL, canbus_frequency=None, serial_baud=250000, seed=6)
    sentence, log, _ = flash_and_leave(board.port, world, data)
    assert "serial bootloader request" in " ".join(log)
    assert sentence == f"Klipper answers on {board.port} at 250000 baud (identify)."
    # the new build answered: its first dictionary bytes are the ones in the flashed file
    blob = dictionary_blob(data)
    assert blob is not None and board.klipper_serial().identify_data == blob


def test_usb_can_bridge_build_is_confirmed_by_its_channel_coming_back(
    make_board: MakeBoard, world: UsbWorld
) -> None:
    board = make_board(
        interface="usb-can-bridge", firmware="klipper", usb_serial="0E0022001750425938323120"
    )
    board.install_app(make_klipper_bin(usb_can_bridge=True))
    board.start()
    log: list[str] = []
    flasher = methods.open_flasher(can_target(board, world), log.append)
    try:
        info = flasher.identify()
        data = make_klipper_bin(size=SMALL, usb_can_bridge=True, seed=3)
        flasher.check(as_bin(data), info)
        flasher.flash(as_bin(data))
        sentence = flasher.leave()
    finally:
        flasher.close()
    assert sentence == f"Klipper is back as the USB-CAN bridge that owns {board.channel}."
    assert world.find_bridge(board.channel) is not None
