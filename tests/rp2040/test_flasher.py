"""The picoboot flasher against the emulated boot ROM: every path, every fault."""

from __future__ import annotations

import struct
from typing import Optional

import pytest

from octoprint_flasher.errors import (
    BusyError,
    ConnectError,
    PreflightError,
    ProtocolError,
    VerifyError,
)
from octoprint_flasher.flasher import (
    STAGE_ERASING,
    STAGE_VERIFYING,
    STAGE_WRITING,
    Flasher,
    LogCallback,
)
from octoprint_flasher.flashers import picoboot
from octoprint_flasher.image import uf2
from octoprint_flasher.image.load import load_bytes
from octoprint_flasher.image.model import Segment
from octoprint_flasher.target import Target
from tests.emulators.picoboot_device import RP2350, klipper_like_rp2040
from tests.rp2040.conftest import Board, make_board, uf2_image

NEW = klipper_like_rp2040(60 * 1024, seed=9)
ERASE, WRITE, READ, EXIT_XIP, EXCLUSIVE, REBOOT = 0x03, 0x05, 0x84, 0x06, 0x01, 0x02


def test_flash_from_bootsel_erases_only_touched_sectors_verifies_and_boots_klipper(
    bootsel: Board,
) -> None:
    with bootsel.flasher() as f:
        info = f.identify()
        assert (info.chip, info.app_start, info.flash_size) == ("RP2040", 0x10000000, 2 << 20)
        assert info.details["usb_drive"] and info.details["interface"] == 1
        result = f.flash(uf2_image(NEW), bootsel.progress.append)
        said = f.leave()
    assert bootsel.dev.read_flash(0x10000000, len(NEW)) == NEW
    assert bootsel.dev.erased == [0x10000000 + i * 4096 for i in range(15)]
    assert result.bytes_verified == 15 * 4096 and result.blocks_skipped == 0
    assert said == "Klipper answers again on USB (1d50:614e at 1-1.3)."
    assert bootsel.dev.mode == "app"
    order = [c for c, _, _ in bootsel.dev.commands]
    assert order[:2] == [EXCLUSIVE, EXIT_XIP]
    assert (
        order.index(ERASE) < order.index(WRITE) < max(i for i, c in enumerate(order) if c == READ)
    )
    assert order[-1] == REBOOT
    stages = [p.stage for p in bootsel.progress]
    assert stages.index(STAGE_ERASING) < stages.index(STAGE_WRITING) < stages.index(STAGE_VERIFYING)


def test_writes_are_whole_pages_and_blank_pages_are_not_written(bootsel: Board) -> None:
    data = NEW[:5000] + b"\xff" * 3000 + NEW[:100]
    with bootsel.flasher() as f:
        f.flash(uf2_image(data))
    for args in bootsel.cmds(WRITE):
        address, size = struct.unpack("<II", args)
        assert address % 256 == 0 and size % 256 == 0
    assert 0x10001800 not in bootsel.dev.programmed  # inside the 0xFF run
    assert bootsel.dev.read_flash(0x10000000, len(data)) == data


def test_quick_reflash_of_the_same_image_erases_and_writes_nothing(bootsel: Board) -> None:
    with bootsel.flasher() as f:
        f.flash(uf2_image(NEW))
    bootsel.dev.erased.clear()
    bootsel.dev.commands.clear()
    with bootsel.flasher() as f:
        result = f.flash(uf2_image(NEW), quick=True)
    assert bootsel.dev.erased == [] and bootsel.cmds(WRITE) == []
    assert result.blocks_skipped == 15 and result.bytes_verified == 15 * 4096


def test_quick_reflash_rewrites_only_the_changed_sector(bootsel: Board) -> None:
    with bootsel.flasher() as f:
        f.flash(uf2_image(NEW))
    changed = bytearray(NEW)
    changed[9000] ^= 0xFF
    bootsel.dev.erased.clear()
    with bootsel.flasher() as f:
        f.flash(uf2_image(bytes(changed)), quick=True)
    assert bootsel.dev.erased == [0x10002000]
    assert bootsel.dev.read_flash(0x10000000, len(NEW)) == bytes(changed)


def test_bytes_of_a_partly_covered_sector_outside_the_image_are_kept(bootsel: Board) -> None:
    before = bootsel.dev.read_flash(0x10004000, 4096)
    image = load_bytes(b"\x12" * 512, "patch.bin", base_address=0x10004400)
    with bootsel.flasher() as f:
        f.flash(image)
    after = bootsel.dev.read_flash(0x10004000, 4096)
    assert after[:0x400] == before[:0x400] and after[0x600:] == before[0x600:]
    assert after[0x400:0x600] == b"\x12" * 512


def test_from_running_klipper_by_the_1200_baud_touch(klipper: Board) -> None:
    with klipper.flasher(port="/dev/ttyACM0") as f:
        info = f.identify()
        assert f.entered_from_app and klipper.dev.touches == 1
        assert info.details["usb_path"] == "1-1.3"
        f.flash(uf2_image(NEW))
        assert f.leave() == "Klipper answers again on USB (1d50:614e at 1-1.3)."
    assert klipper.dev.read_flash(0x10000000, len(NEW)) == NEW


def test_klipper_found_by_usb_path_without_naming_the_port(klipper: Board) -> None:
    with klipper.flasher(usb_path="1-1.3") as f:
        f.identify()
        assert f.entered_from_app


def test_a_refused_image_on_an_entered_board_goes_back_to_klipper(klipper: Board) -> None:
    pico2 = load_bytes(
        uf2.write_uf2(
            [Segment(0x10000000, NEW)],
            0xE48BFF59,
        ),
        "pico2.uf2",
    )
    with klipper.flasher(port="/dev/ttyACM0") as f:
        info = f.identify()
        with pytest.raises(PreflightError, match="RP2350"):
            f.check(pico2, info)
        assert f.leave() == "Klipper answers again on USB (1d50:614e at 1-1.3)."
    assert klipper.dev.erased == [] and klipper.dev.mode == "app"


def test_klipper_that_jumps_to_katapult_is_handed_to_the_katapult_flasher(
    klipper: Board, monkeypatch: pytest.MonkeyPatch
) -> None:
    from octoprint_flasher.flashers import katapult

    klipper.dev.katapult = True
    opened: list[str] = []

    def fake_open(target: Target, log: Optional[LogCallback] = None) -> Flasher:
        opened.append(str(target.port))
        return katapult.KatapultFlasher(target, log)

    monkeypatch.setattr(katapult, "open_flasher", fake_open)
    f = klipper.flasher(port="/dev/ttyACM0")
    f._connect()
    assert opened == ["/dev/ttyACM0"] and klipper.dev.mode == "katapult"
    assert isinstance(f.delegate, katapult.KatapultFlasher)
    assert f.delegate.entered_from_app and f.entered_from_app


def test_nothing_comes_back_gives_the_bootsel_steps(klipper: Board) -> None:
    klipper.dev.faults.no_app_after_reboot = True
    klipper.dev.reenumerate_s = 1000.0  # never within the entry timeout
    with pytest.raises(ConnectError) as info:
        klipper.flasher(port="/dev/ttyACM0", options={"entry_timeout": 2.0}).identify()
    assert "BOOTSEL" in info.value.hint and "hold" in info.value.hint


def test_no_board_at_all_says_how_to_enter_bootsel() -> None:
    board = make_board(mode="gone")
    with pytest.raises(ConnectError) as info:
        board.flasher().identify()
    assert "2e8a:0003" in info.value.message and "BOOTSEL" in info.value.hint


def test_rom_without_the_usb_drive_interface_is_flashed_on_interface_0() -> None:
    board = make_board(msc=False)
    with board.flasher() as f:
        assert f.identify().details["interface"] == 0
        f.flash(uf2_image(NEW[:8192]))
    assert board.dev.read_flash(0x10000000, 8192) == NEW[:8192]


def test_rp2350_is_rebooted_with_reboot2_and_needs_an_image_def() -> None:
    board = make_board(chip=RP2350)
    with board.flasher() as f:
        assert f.identify().chip == "RP2350"
        with pytest.raises(PreflightError, match="IMAGE_DEF"):
            f.flash(load_bytes(NEW, "klipper.bin"))
        image = bytes(struct.pack("<II", 0x20082000, 0x10000101)) + b"\x00" * 248
        image += struct.pack("<I", 0xFFFFDED3) + b"\x42" * 16 + struct.pack("<I", 0xAB123579)
        f.flash(
            load_bytes(
                uf2.write_uf2(
                    [Segment(0x10000000, image)],
                    0xE48BFF59,
                ),
                "pico2.uf2",
            )
        )
        assert "Klipper" in (f.leave() or "")
    assert [c for c, _, _ in board.dev.commands][-1] == 0x0A


# --- faults --------------------------------------------------------------------------------
def test_a_stalled_write_is_reported_with_the_status_name(bootsel: Board) -> None:
    bootsel.dev.faults.stall = {WRITE: 1}
    with pytest.raises(ProtocolError) as info:
        bootsel.flasher().flash(uf2_image(NEW))
    assert "PICOBOOT_UNKNOWN_ERROR" in info.value.message


def test_the_board_vanishing_mid_write_says_the_firmware_is_incomplete(bootsel: Board) -> None:
    bootsel.dev.faults.vanish_after_bytes = 8192
    with pytest.raises(ConnectError) as info:
        bootsel.flasher().flash(uf2_image(NEW))
    assert "disappeared" in info.value.message and "incomplete" in info.value.hint


def test_a_command_that_never_completes_times_out_with_advice(bootsel: Board) -> None:
    bootsel.dev.faults.hang_command = ERASE
    with pytest.raises(ConnectError) as info:
        bootsel.flasher().flash(uf2_image(NEW))
    assert "did not finish" in info.value.message and "in progress" in info.value.message
    assert "Unplug" in info.value.hint


def test_a_weak_flash_cell_fails_the_verify(bootsel: Board) -> None:
    bootsel.dev.faults.weak_bit_at = 0x10003005
    with pytest.raises(VerifyError, match="0x10003005"):
        bootsel.flasher().flash(uf2_image(NEW))


def test_no_udev_rule_prints_the_rule_for_2e8a(bootsel: Board) -> None:
    bootsel.dev.faults.access_denied = True
    with pytest.raises(ConnectError) as info:
        bootsel.flasher().identify()
    assert picoboot.UDEV_RULE in info.value.hint and "sudo" not in info.value.message


def test_a_busy_interface_names_the_programs_that_hold_it(bootsel: Board) -> None:
    bootsel.dev.faults.busy = True
    with pytest.raises(BusyError) as info:
        bootsel.flasher().identify()
    assert "picotool" in info.value.cause


def test_a_drive_write_is_locked_out_during_the_flash(bootsel: Board) -> None:
    with bootsel.flasher() as f:
        f.identify()
        assert bootsel.dev.msc_write(0x10000000) is False  # exclusive access is held


def test_read_backs_up_the_used_flash(bootsel: Board) -> None:
    with bootsel.flasher() as f:
        backup = f.read()
    assert backup.start == 0x10000000 and backup.size == 40 * 1024
    assert backup.to_bytes() == klipper_like_rp2040(40 * 1024, seed=2)


def test_check_image_settles_the_image_alone() -> None:
    stm32 = load_bytes(struct.pack("<II", 0x20001000, 0x08008201) * 64, "klipper.bin")
    with pytest.raises(PreflightError, match="boot2"):
        picoboot.check_image(stm32, Target(method="picoboot"))
    with pytest.raises(PreflightError, match="not stm32f446"):
        picoboot.check_image(uf2_image(NEW), Target(method="picoboot", mcu="stm32f446"))
    assert picoboot.check_image(uf2_image(NEW), Target(method="picoboot", mcu="rp2040")) == []


def test_discover_lists_bootsel_boards_and_klipper_rp2040s(bootsel: Board, klipper: Board) -> None:
    klipper.dev.port_numbers = (1, 4)
    backend = bootsel.backend
    backend.devices.append(klipper.dev)
    found = {d.usb_path: d for d in picoboot.discover(backend)}
    assert found["1-1.3"].method == "picoboot" and found["1-1.3"].chip == "RP2040"
    assert found["1-1.4"].description == "Klipper on an RP2040 (USB)"
