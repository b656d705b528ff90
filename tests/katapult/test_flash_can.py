"""Whole flashes over CAN against emulated boards: entry from Klipper, write, verify, leave,
and the pre-flight refusals that protect a board before anything is written."""

from __future__ import annotations

import threading
from typing import Callable

import pytest

from octoprint_flasher import methods
from octoprint_flasher.errors import CancelledError, ConnectError, PreflightError, ProtocolError
from octoprint_flasher.flasher import CancelToken, FlashResult, Progress
from octoprint_flasher.flashers.katapult import KatapultFlasher, discover
from tests.emulators.katapult_node import EmulatedBoard, UsbWorld, virtual_bus_factory
from tests.emulators.klipper_firmware import make_deployer_bin, make_katapult_bin, make_klipper_bin

from .conftest import as_bin, can_target

MakeBoard = Callable[..., EmulatedBoard]
SMALL = 8 * 1024


def flash_over_can(
    board: EmulatedBoard, world: UsbWorld, data: bytes, quick: bool = False, **options: object
) -> tuple[FlashResult, list[str], list[str]]:
    log: list[str] = []
    flasher = methods.open_flasher(can_target(board, world, **options), log.append)
    try:
        info = flasher.identify()
        warnings = flasher.check(as_bin(data), info)
        result = flasher.flash(as_bin(data), quick=quick)
        flasher.leave()
    finally:
        flasher.close()
    return result, warnings, log


def test_flash_from_running_klipper_writes_verifies_and_starts_klipper(
    make_board: MakeBoard, world: UsbWorld
) -> None:
    board = make_board(firmware="klipper")
    board.install_app(make_klipper_bin(seed=3))
    board.start()
    new = make_klipper_bin(size=26 * 1024, seed=4)
    stages: list[str] = []
    flasher = methods.open_flasher(can_target(board, world))
    info = flasher.identify()
    assert (info.chip, info.app_start, info.page_size) == ("stm32g0b1xx", 0x08002000, 2048)
    assert flasher.check(as_bin(new), info) == []
    result = flasher.flash(as_bin(new), lambda p: stages.append(p.stage))
    flasher.leave()
    flasher.close()
    assert board.app_bytes(len(new)) == new
    assert result.blocks_written == 416 and result.bytes_verified == 416 * 64
    assert stages.index("verifying") > stages.index("writing")
    assert board.events[:2] == ["reboot -> katapult", "katapult running"]
    assert board.mode == "klipper"


def test_node_already_in_katapult_is_not_asked_to_reboot(
    make_board: MakeBoard, world: UsbWorld
) -> None:
    board = make_board(firmware="katapult").start()
    data = make_klipper_bin(size=SMALL)
    _result, _warnings, log = flash_over_can(board, world, data)
    assert "already in Katapult" in " ".join(log)
    assert board.events[0] == "reboot -> app"
    assert board.app_bytes(SMALL) == data


def test_klipper_with_an_id_from_klippy_still_enters_katapult(
    make_board: MakeBoard, world: UsbWorld
) -> None:
    board = make_board(firmware="klipper", klipper_assigned=True)
    board.install_app(make_klipper_bin())
    board.start()
    assert discover(virtual_bus_factory(board.channel), "virtual", board.channel) == []
    data = make_klipper_bin(size=SMALL, seed=8)
    flash_over_can(board, world, data)
    assert board.app_bytes(SMALL) == data


def test_quick_reflash_sends_only_pages_that_change(make_board: MakeBoard, world: UsbWorld) -> None:
    board = make_board(firmware="katapult").start()
    old = make_klipper_bin(size=SMALL, seed=1)
    flash_over_can(board, world, old)
    board.double_reset()
    new = bytearray(old)
    new[5000] ^= 0xFF  # page 2 (0x08003000-0x080037FF): 32 blocks
    erases = board.flash.erases
    result, _w, _log = flash_over_can(board, world, bytes(new), quick=True)
    assert result.blocks_written == 32
    assert result.blocks_skipped == SMALL // 64 - 32
    assert board.flash.erases == erases + 1
    assert board.app_bytes(SMALL) == bytes(new)


def test_quick_flash_flag_comes_from_the_call(make_board: MakeBoard, world: UsbWorld) -> None:
    board = make_board(firmware="katapult").start()
    data = make_klipper_bin(size=SMALL)
    flasher = methods.open_flasher(can_target(board, world))
    flasher.flash(as_bin(data))
    again = flasher.flash(as_bin(data), quick=True)
    flasher.close()
    assert (again.blocks_written, again.blocks_skipped) == (0, SMALL // 64)


def test_h723_sector_erase_and_block_size(make_board: MakeBoard, world: UsbWorld) -> None:
    board = make_board(chip="stm32h723xx", firmware="katapult").start()
    data = make_klipper_bin("stm32h723xx", app_start=0x08020000, size=SMALL)
    flash_over_can(board, world, data)
    assert board.flash.erases == 0  # a fresh sector is already erased
    assert board.app_bytes(SMALL) == data


# -- the seed: canboot.bin flashed through Katapult ----------------------------------------


def test_seed_canboot_bin_is_refused_before_the_running_node_is_touched(
    make_board: MakeBoard, world: UsbWorld
) -> None:
    """The seed's mistake: canboot.bin for a node that runs Klipper. The file alone says it is
    the bootloader, so the node is never asked to reboot (klippy would shut down on that)."""
    board = make_board(firmware="klipper").start()
    with pytest.raises(PreflightError) as err:
        methods.check_image(can_target(board, world), as_bin(make_katapult_bin(), "canboot.bin"))
    text = str(err.value)
    assert "Katapult bootloader itself" in text
    assert "reboot in a loop" in text and "deployer.bin" in text
    assert board.mode == "klipper" and "katapult running" not in board.events
    assert board.flash.programs == 0


def test_seed_board_boot_looping_after_canboot_bin_explains_the_silence(
    make_board: MakeBoard, world: UsbWorld
) -> None:
    """What happened to the seed's user: an old tool wrote canboot.bin through Katapult and sent
    COMPLETE. The node now boot-loops, silent on the bus; the next attempt must say why."""
    board = make_board(firmware="katapult").start()
    raw = KatapultFlasher(can_target(board, world))
    raw.identify()
    client = raw.client
    assert client is not None
    bootloader = make_katapult_bin()
    for addr in range(0, len(bootloader), 64):
        client.send_block(0x08002000 + addr, bootloader[addr : addr + 64])
    client.send_eof()
    client.complete()
    raw.close()
    board.tick()
    assert wait_until(lambda: board.mode == "bootloop")

    flasher = methods.open_flasher(can_target(board, world, entry_timeout=0.5))
    with pytest.raises(ConnectError) as err:
        flasher.identify()
    flasher.close()
    assert "boot-looping after a bootloader was flashed through Katapult" in err.value.cause
    assert "double-tap reset" in err.value.hint

    board.double_reset()  # the recovery the message describes
    data = make_klipper_bin(size=SMALL)
    flash_over_can(board, world, data)
    assert board.mode == "klipper" and board.app_bytes(SMALL) == data


def test_deployer_bin_passes_with_a_warning(make_board: MakeBoard, world: UsbWorld) -> None:
    board = make_board(firmware="katapult").start()
    target = can_target(board, world)
    warnings = methods.check_image(target, as_bin(make_deployer_bin(), "deployer.bin"))
    assert any("deployer" in w for w in warnings)
    flasher = methods.open_flasher(target)
    assert flasher.check(as_bin(make_deployer_bin(), "deployer.bin"), flasher.identify()) == []
    flasher.close()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (make_klipper_bin(linked_at=0x08000000), "linked for 0x08000000"),  # no bootloader
        (make_klipper_bin(linked_at=0x08008000, size=SMALL), "linked for 0x08008000"),  # 32 KiB
        (make_klipper_bin("stm32f446xx"), "for stm32f446xx, but the board is stm32g0b1xx"),
    ],
    ids=["no-bootloader-build", "32k-offset-build", "wrong-mcu"],
)
def test_board_check_refusals_leave_nothing_written(
    make_board: MakeBoard, world: UsbWorld, data: bytes, message: str
) -> None:
    board = make_board(firmware="katapult").start()
    target = can_target(board, world)
    methods.check_image(target, as_bin(data))  # the file alone cannot tell
    flasher = methods.open_flasher(target)
    with pytest.raises(PreflightError, match=message):
        flasher.check(as_bin(data), flasher.identify())
    flasher.close()
    assert board.flash.programs == 0


def test_a_build_for_another_can_bitrate_is_refused_from_the_file_alone(
    make_board: MakeBoard, world: UsbWorld
) -> None:
    board = make_board(firmware="klipper").start()
    with pytest.raises(PreflightError, match="500000 bit/s"):
        methods.check_image(
            can_target(board, world), as_bin(make_klipper_bin(canbus_frequency=500000))
        )
    assert board.mode == "klipper" and "katapult running" not in board.events


def test_usb_build_onto_a_can_node_warns(make_board: MakeBoard, world: UsbWorld) -> None:
    board = make_board(firmware="katapult").start()
    target = can_target(board, world)
    warnings = methods.check_image(target, as_bin(make_klipper_bin(canbus_frequency=None)))
    assert any("leaves the CAN bus" in w for w in warnings)


def test_connect_silence_at_the_wrong_bitrate(make_board: MakeBoard, world: UsbWorld) -> None:
    board = make_board(firmware="klipper", bitrate=500000, bus_bitrate=1000000).start()
    flasher = methods.open_flasher(can_target(board, world, entry_timeout=0.3))
    with pytest.raises(ConnectError) as err:
        flasher.identify()
    flasher.close()
    assert "different CAN bitrate" in err.value.cause


def test_without_katapult_klipper_falls_back_to_rom_dfu(
    make_board: MakeBoard, world: UsbWorld
) -> None:
    board = make_board(firmware="klipper", katapult_installed=False).start()
    flasher = methods.open_flasher(can_target(board, world, entry_timeout=0.4))
    with pytest.raises(ConnectError, match="did not answer as Katapult"):
        flasher.identify()
    flasher.close()
    assert wait_until(lambda: board.mode == "dfu")


# -- failures leave the board in Katapult ----------------------------------------------------


def test_a_refused_write_never_sends_complete(make_board: MakeBoard, world: UsbWorld) -> None:
    board = make_board(firmware="katapult").start()
    data = make_klipper_bin(size=SMALL)
    board.flash.load(0x08002000 + 2048 + 64, b"\x00" * 64)  # dirty flash in page 1, block 1
    board.flash.erased = lambda address, length: (  # type: ignore[method-assign]
        bytes(board.flash.read(address, length)) == b"\xff" * length
        if address != 0x08002000 + 2048
        else True  # page 1 looks erased, so its later dirty block is "out of order"
    )
    flasher = methods.open_flasher(can_target(board, world))
    with pytest.raises(ProtocolError) as err:
        flasher.flash(as_bin(data))
    flasher.leave()
    flasher.close()
    assert "refused SEND_BLOCK" in err.value.message
    assert "COMPLETE was not sent" in err.value.hint
    assert board.mode == "katapult" and "reboot -> app" not in board.events


def test_cancel_between_blocks_leaves_the_board_in_katapult(
    make_board: MakeBoard, world: UsbWorld
) -> None:
    board = make_board(firmware="katapult").start()
    token = CancelToken()

    def progress(p: Progress) -> None:
        if p.stage == "writing" and p.done >= 1024:
            token.cancel()

    flasher = methods.open_flasher(can_target(board, world))
    with pytest.raises(CancelledError):
        flasher.flash(as_bin(make_klipper_bin(size=SMALL)), progress, token)
    flasher.leave()
    flasher.close()
    assert board.mode == "katapult" and board.flash.programs == 1024 // 64


def test_read_back_a_backup(make_board: MakeBoard, world: UsbWorld) -> None:
    board = make_board(firmware="katapult").start()
    data = make_klipper_bin(size=4096)
    board.install_app(data)
    flasher = methods.open_flasher(can_target(board, world, read_size=4096))
    image = flasher.read()
    flasher.close()
    assert image.start == 0x08002000 and image.to_bytes() == data


def test_discover_lists_unassigned_nodes_with_their_firmware(
    make_board: MakeBoard, world: UsbWorld
) -> None:
    katapult = make_board(firmware="katapult").start()
    klipper = make_board(
        firmware="klipper",
        channel=katapult.channel,
        chip_id=bytes.fromhex("0E0022001750425938323120"),
    ).start()
    found = discover(virtual_bus_factory(katapult.channel), "virtual", katapult.channel)
    apps = {d.uuid: d.details["app"] for d in found}
    assert apps == {katapult.uuid_text: "Katapult", klipper.uuid_text: "Klipper"}
    assert all(d.kind == "can" and d.method == "katapult" for d in found)


def test_the_wire_uses_stop_and_wait(make_board: MakeBoard, world: UsbWorld) -> None:
    """Every command frame goes out only after the previous reply: watch the bus."""
    board = make_board(firmware="katapult").start()
    import can

    spy = can.Bus(interface="virtual", channel=board.channel)
    order: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            msg = spy.recv(0.05)
            if msg is not None and msg.arbitration_id in (0x202, 0x203):
                order.append("h" if msg.arbitration_id == 0x202 else "n")

    thread = threading.Thread(target=watch)
    thread.start()
    flash_over_can(board, world, make_klipper_bin(size=2048), confirm_seconds=0)
    stop.set()
    thread.join()
    spy.shutdown()
    # Collapse runs of frames: a command is one run of host frames, its reply one run of node
    # frames. Two commands in flight would merge into one host run, so there must be at least
    # one host run per block written and per block read back. The spy may stop before it hears
    # the reply to the very last command (COMPLETE, answered while the node resets), so the
    # tail is not checked.
    runs = [c for i, c in enumerate(order) if i == 0 or order[i - 1] != c]
    assert runs[0] == "h"
    blocks = 2048 // 64
    assert runs.count("h") >= 2 * blocks, runs


def wait_until(cond: Callable[[], bool], timeout: float = 3.0) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def test_seed_silence_carries_the_interface_advice(make_board: MakeBoard, world: UsbWorld) -> None:
    """The seed's can0 showed "RX errors 8 frame 8": when the node stays silent, the error
    names what the interface saw, not just "no answer"."""
    import json
    from pathlib import Path

    row = json.loads(
        (Path(__file__).parent / "fixtures" / "seed_can0_frame_errors.json").read_text()
    )[0]
    board = make_board(firmware="katapult", bitrate=500000, bus_bitrate=1000000).start()
    target = can_target(board, world, entry_timeout=0.3, can_facts=lambda _channel: row)
    target.can_interface = "socketcan"  # the facts come from the injected reader
    flasher = methods.open_flasher(target)
    with pytest.raises(ConnectError) as err:
        flasher.identify()
    flasher.close()
    assert "8 receive errors" in err.value.cause and "termination" in err.value.cause


def test_a_hex_with_a_hole_is_written_contiguously(make_board: MakeBoard, world: UsbWorld) -> None:
    """Old firmware sits in the hole: it must be erased with its page, not left between."""
    from octoprint_flasher.image.model import FirmwareImage, Segment

    board = make_board(firmware="katapult").start()
    board.install_app(b"\x00" * 4096)
    head = make_klipper_bin(size=1024)
    # the hole covers the first block of the second page (0x08002800)
    image = FirmwareImage(
        [Segment(0x08002000, head), Segment(0x08002800 + 64, b"\x5a" * 64)], kind="hex"
    )
    flasher = methods.open_flasher(can_target(board, world))
    result = flasher.flash(image)
    flasher.close()
    assert result.blocks_written == (2048 + 128) // 64
    assert board.app_bytes(2048 + 128) == head + b"\xff" * 1088 + b"\x5a" * 64
