"""The emulated ROM behaves like the ST bootloader, seen through plain pyusb.

These pin the emulator itself (independently of the flasher), so a flasher test passing
against it means something.
"""

from __future__ import annotations

import errno
import struct
import time

import pytest
import usb.core
import usb.util

from tests.dfu.conftest import SCALE, make_board
from tests.emulators import dfu_device as emu
from tests.emulators.dfu_device import Faults

OUT, IN = 0x21, 0xA1


def status(dev: usb.core.Device) -> tuple[int, int, int]:
    raw = bytes(dev.ctrl_transfer(IN, 3, 0, 0, 6))
    return raw[4], raw[0], raw[1] | raw[2] << 8 | raw[3] << 16


def find(board_backend: emu.DfuBackend) -> usb.core.Device:
    dev = usb.core.find(backend=board_backend, idVendor=0x0483, idProduct=0xDF11)
    assert dev is not None
    return dev


def test_descriptors_and_strings_are_what_the_rom_sends() -> None:
    board = make_board("STM32F446")
    dev = find(board.backend)
    assert (dev.bcdDevice, dev.bMaxPacketSize0, dev.bus, dev.port_numbers) == (0x2200, 64, 1, (2,))
    assert usb.util.get_string(dev, dev.iProduct) == "STM32  BOOTLOADER"
    cfg = dev.get_active_configuration()
    alts = [(i.bInterfaceClass, i.bInterfaceSubClass, i.bAlternateSetting) for i in cfg]
    assert alts == [(0xFE, 1, 0), (0xFE, 1, 1), (0xFE, 1, 2), (0xFE, 1, 3)]
    last = list(cfg)[-1]
    assert bytes(last.extra_descriptors) == bytes.fromhex("09210bff0000081a01")
    assert usb.util.get_string(dev, list(cfg)[0].iInterface).startswith("@Internal Flash  /0x08")


def test_f429_string_is_truncated_like_the_real_rom() -> None:
    board = make_board("STM32F429")
    dev = find(board.backend)
    raw = bytes(dev.ctrl_transfer(0x80, 6, 0x0304, 0x0409, 254))
    assert raw[0] == 166 and len(raw) == 112
    assert usb.util.get_string(dev, 4) == "@Internal Flash  /0x08000000/04*016Kg,01*064Kg,07*128Kg"


def test_dnload_executes_on_the_first_getstatus() -> None:
    board = make_board("STM32F446")
    board.dev.load_flash(0x08008000, b"\x00" * 16)
    dev = find(board.backend)
    dev.ctrl_transfer(OUT, 1, 0, 0, bytes([0x41, 0x00, 0x80, 0x00, 0x08]))
    assert board.dev.read_flash(0x08008000, 4) == b"\x00" * 4  # not yet
    state, st, poll = status(dev)
    assert (state, st) == (emu.DNBUSY, 0) and poll == 1  # 100 ms scaled by 0.01
    assert board.dev.erased == [0x08008000]
    assert status(dev)[:2] == (emu.DNLOAD_IDLE, 0)
    assert board.dev.read_flash(0x08008000, 16 * 1024) == b"\xff" * 16 * 1024


def test_erase_takes_datasheet_time_scaled() -> None:
    board = make_board("STM32F446")
    dev = find(board.backend)
    dev.ctrl_transfer(OUT, 1, 0, 0, bytes([0x41, 0x00, 0x00, 0x02, 0x08]))  # a 128 KiB sector
    t0 = time.monotonic()
    status(dev)
    status(dev)  # blocks while the device is busy, as the ROM NAKs
    assert time.monotonic() - t0 >= 1.0 * SCALE


def test_busy_can_answer_dnbusy_instead_of_blocking() -> None:
    board = make_board("STM32F446", faults=Faults(busy_mode="answer"))
    dev = find(board.backend)
    dev.ctrl_transfer(OUT, 1, 0, 0, bytes([0x41, 0x00, 0x00, 0x02, 0x08]))
    status(dev)
    assert status(dev)[0] == emu.DNBUSY


def test_illegal_requests_stall_into_error() -> None:
    board = make_board("STM32F446")
    dev = find(board.backend)
    dev.ctrl_transfer(OUT, 1, 0, 0, bytes([0x21, 0x00, 0x80, 0x00, 0x08]))
    status(dev)
    status(dev)  # dfuDNLOAD-IDLE: UPLOAD is not allowed here
    with pytest.raises(usb.core.USBError) as info:
        dev.ctrl_transfer(IN, 2, 2, 0, 64)
    assert info.value.errno == errno.EPIPE
    assert status(dev)[:2] == (emu.DFU_ERROR, emu.ERR_STALLEDPKT)
    dev.ctrl_transfer(OUT, 4, 0, 0, b"")  # CLRSTATUS is right in dfuERROR
    assert status(dev)[:2] == (emu.DFU_IDLE, 0)
    with pytest.raises(usb.core.USBError):
        dev.ctrl_transfer(OUT, 4, 0, 0, b"")  # ... and stalls elsewhere (STM32C5 ROM)


def test_get_commands_and_upload_blocks() -> None:
    board = make_board("STM32G0B1")
    board.dev.load_flash(0x08000400, b"ABCD")
    dev = find(board.backend)
    assert bytes(dev.ctrl_transfer(IN, 2, 0, 0, 16)) == bytes([0x00, 0x21, 0x41, 0x92])
    dev.ctrl_transfer(OUT, 1, 0, 0, bytes([0x21, 0, 0, 0, 0x08]))
    status(dev)
    status(dev)
    dev.ctrl_transfer(OUT, 6, 0, 0, b"")  # ABORT to dfuIDLE before uploading
    assert bytes(dev.ctrl_transfer(IN, 2, 3, 0, 1024))[:4] == b"ABCD"  # block 3 = +1024
    assert status(dev)[0] == emu.UPLOAD_IDLE


def program(dev: usb.core.Device, address: int, data: bytes) -> tuple[int, int]:
    dev.ctrl_transfer(OUT, 1, 0, 0, struct.pack("<BI", 0x21, address))
    status(dev)
    status(dev)
    dev.ctrl_transfer(OUT, 1, 2, 0, data)
    status(dev)
    return status(dev)[:2]


def test_programming_needs_erased_flash_words() -> None:
    board = make_board("STM32H723")
    dev = find(board.backend)
    assert program(dev, 0x08020000, b"\x12" * 8) == (emu.DNLOAD_IDLE, 0)
    # the ROM programs the whole 256-bit word: the rest of it is no longer erased
    assert board.dev.read_flash(0x08020000, 32) == b"\x12" * 8 + b"\xff" * 24
    assert program(dev, 0x08020008, b"\x34" * 8) == (emu.DFU_ERROR, emu.ERR_PROG)


def test_f4_reports_errwrite_on_programmed_flash() -> None:
    board = make_board("STM32F446", bootloader=16 * 1024)
    dev = find(board.backend)
    assert program(dev, 0x08000000, b"\x00" * 4) == (emu.DFU_ERROR, emu.ERR_WRITE)


def test_bad_address_is_errtarget() -> None:
    board = make_board("STM32F446")
    dev = find(board.backend)
    dev.ctrl_transfer(OUT, 1, 0, 0, struct.pack("<BI", 0x21, 0x08080000))
    assert status(dev)[0] == emu.DNBUSY
    assert status(dev)[:2] == (emu.DFU_ERROR, emu.ERR_TARGET)


def test_read_protection_refuses_erase_and_read() -> None:
    board = make_board("STM32F446", faults=Faults(read_protected=True))
    dev = find(board.backend)
    dev.ctrl_transfer(OUT, 1, 0, 0, struct.pack("<BI", 0x41, 0x08008000))
    status(dev)
    assert status(dev)[:2] == (emu.DFU_ERROR, emu.ERR_VENDOR)
    assert board.dev.erased == []


def test_leave_answers_manifest_then_reenumerates_as_the_application() -> None:
    board = make_board("STM32F446")
    board.dev.load_flash(0x08008000, struct.pack("<II", 0x20001000, 0x08008201))
    dev = find(board.backend)
    dev.ctrl_transfer(OUT, 1, 0, 0, struct.pack("<BI", 0x21, 0x08008000))
    status(dev)
    status(dev)
    dev.ctrl_transfer(OUT, 1, 0, 0, b"")
    assert status(dev)[0] == emu.MANIFEST
    with pytest.raises(usb.core.USBError) as info:
        status(dev)
    assert info.value.errno == errno.ENODEV
    assert usb.core.find(backend=board.backend) is None
    time.sleep(0.8 * SCALE + 0.005)
    app = usb.core.find(backend=board.backend)
    assert app is not None and (app.idVendor, app.idProduct) == (0x1D50, 0x614E)


def test_boot0_held_comes_back_as_dfu() -> None:
    board = make_board("STM32F446", faults=Faults(boot0_held=True))
    dev = find(board.backend)
    dev.ctrl_transfer(OUT, 1, 0, 0, b"")
    assert status(dev)[0] == emu.MANIFEST
    time.sleep(0.8 * SCALE + 0.005)
    again = find(board.backend)
    assert again.address != dev.address


def test_permission_and_busy_faults() -> None:
    denied = make_board("STM32F446", faults=Faults(access_denied=True))
    dev = find(denied.backend)
    with pytest.raises(ValueError, match="no langid"):
        usb.util.get_string(dev, 2)
    busy = make_board("STM32F446", faults=Faults(busy=True))
    with pytest.raises(usb.core.USBError) as info:
        status(find(busy.backend))
    assert info.value.errno == errno.EBUSY


def test_usb_full_speed_time_model() -> None:
    assert emu.control_frames(0) == 1  # GETSTATUS, CLRSTATUS, SET_ADDRESS: one frame each
    assert emu.control_frames(1024) == 1  # 16 packets fit a frame
    assert emu.control_frames(2048) == 2
    # 40 KiB in 64-byte packets: ~37 ms one way at 12 Mbit/s
    assert 0.030 < emu.wire_seconds(40 * 1024) < 0.040
