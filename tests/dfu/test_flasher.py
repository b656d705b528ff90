"""The dfu flasher against the emulated ROM: every path a user can hit."""

from __future__ import annotations

import struct
import zlib
from dataclasses import replace

import pytest

from octoprint_flasher import methods
from octoprint_flasher.errors import (
    BusyError,
    CancelledError,
    ConnectError,
    PreflightError,
    ProtocolError,
    VerifyError,
)
from octoprint_flasher.flasher import STAGE_ERASING, STAGE_VERIFYING, STAGE_WRITING, CancelToken
from octoprint_flasher.image import load as loaders
from octoprint_flasher.image.model import FirmwareImage, Segment
from tests.dfu.conftest import Board, bin_image, klipper_like, make_board, placed
from tests.emulators.dfu_device import F429, F446, H723, DfuBackend, EmulatedDfuDevice, Faults

K = 1024
ERASE, SET_ADDRESS = 0x41, 0x21


def erase_commands(board: Board) -> list[int]:
    return [
        struct.unpack_from("<I", c, 1)[0]
        for c in board.dev.commands
        if c[0] == ERASE and len(c) == 5
    ]


class TestFlashing:
    def test_octopus_f446_klipper_bin_lands_behind_the_bootloader(self, f446: Board) -> None:
        bootloader = f446.dev.read_flash(0x08000000, 32 * K)
        data = klipper_like(0x08008000, 40 * K)
        flasher = f446.flasher(quick=False)
        result = flasher.flash(bin_image(data), f446.progress.append)
        assert f446.dev.read_flash(0x08008000, len(data)) == data
        assert f446.dev.read_flash(0x08000000, 32 * K) == bootloader
        # exactly the sectors the image touches, by their aligned start addresses
        assert erase_commands(f446) == [0x08008000, 0x0800C000, 0x08010000]
        assert f446.dev.mass_erased == 0
        assert (result.bytes_written, result.bytes_verified) == (40 * K, 40 * K)
        flasher.leave()
        assert f446.dev.mode == "app" and f446.dev.left_to == 0x08008000
        assert any("re-enumerated as 1d50:614e" in line for line in f446.log)

    def test_h723_erases_one_128k_sector(self, h723: Board) -> None:
        data = klipper_like(0x08020000, 40 * K)
        flasher = h723.flasher(quick=False)
        info = flasher.identify()
        assert (info.chip, info.app_start, info.page_size) == ("STM32H723", 0x08020000, 128 * K)
        assert info.details["transfer_size"] == 1024
        flasher.flash(bin_image(data))
        assert erase_commands(h723) == [0x08020000]
        assert h723.dev.read_flash(0x08020000, len(data)) == data

    def test_g0b1_erases_2k_pages(self) -> None:
        board = make_board("STM32G0B1", bootloader=8 * K)
        data = klipper_like(0x08002000, 10 * K + 100)
        board.flasher(quick=False).flash(bin_image(data))
        assert erase_commands(board) == [0x08002000 + i * 2 * K for i in range(6)]
        assert board.dev.read_flash(0x08002000, len(data)) == data

    def test_address_from_the_user_wins(self) -> None:
        board = make_board("STM32F446")
        data = klipper_like(0x08000000, 4 * K)
        board.flasher(address=0x08000000).flash(bin_image(data))
        assert board.dev.read_flash(0x08000000, len(data)) == data

    def test_hex_with_two_segments_and_a_gap(self, f446: Board) -> None:
        a = klipper_like(0x08008000, 3000)
        b = bytes(range(256)) * 4
        image = FirmwareImage([Segment(0x08008000, a), Segment(0x08010000, b)], "x.hex", "hex")
        f446.flasher(quick=False).flash(image)
        assert f446.dev.read_flash(0x08008000, len(a)) == a
        assert f446.dev.read_flash(0x08010000, len(b)) == b
        assert erase_commands(f446) == [0x08008000, 0x08010000]

    def test_dfuse_file_through_the_loader(self, h723: Board) -> None:
        data = klipper_like(0x08020000, 5000)
        element = struct.pack("<II", 0x08020000, len(data)) + data
        target = struct.pack("<6sBI255sII", b"Target", 0, 0, b"", len(element), 1) + element
        body = struct.pack("<5sBIB", b"DfuSe", 1, 0, 1) + target
        body += struct.pack("<HHHH3sB", 0xFFFF, 0xDF11, 0x0483, 0x011A, b"UFD", 16)
        raw = body + struct.pack("<I", zlib.crc32(body) ^ 0xFFFFFFFF)
        image = loaders.load_bytes(raw, "klipper.dfu")
        h723.flasher().flash(image)
        assert h723.dev.read_flash(0x08020000, len(data)) == data

    def test_h7_images_are_padded_to_whole_flash_words(self, h723: Board) -> None:
        data = klipper_like(0x08020000, 1000 + 5)
        result = h723.flasher().flash(bin_image(data))
        assert result.bytes_written % 32 == 0
        assert h723.dev.read_flash(0x08020000 + len(data), 27) == b"\xff" * 27

    def test_progress_reports_each_stage_up_to_its_total(self, f446: Board) -> None:
        image = bin_image(klipper_like(0x08008000, 20 * K))
        f446.flasher(quick=False).flash(image, f446.progress.append)
        for stage in (STAGE_ERASING, STAGE_WRITING, STAGE_VERIFYING):
            seen = [p for p in f446.progress if p.stage == stage]
            assert seen and seen[-1].done == seen[-1].total
            assert [p.done for p in seen] == sorted(p.done for p in seen)

    def test_start_in_dfu_error_is_cleared_once(self) -> None:
        board = make_board("STM32F446", faults=Faults(start_in_error=True))
        board.flasher(address=0x08008000).flash(placed(klipper_like(0x08008000, 2 * K), 0x08008000))
        assert len(board.requests(4)) == 1  # CLRSTATUS only while in dfuERROR

    def test_no_clrstatus_outside_dfu_error(self, f446: Board) -> None:
        f446.flasher().flash(bin_image(klipper_like(0x08008000, 8 * K)))
        assert f446.requests(4) == []

    def test_blocking_and_answering_busy_devices_both_work(self) -> None:
        board = make_board("STM32F446", bootloader=32 * K, faults=Faults(busy_mode="answer"))
        data = klipper_like(0x08008000, 8 * K)
        board.flasher().flash(bin_image(data))
        assert board.dev.read_flash(0x08008000, len(data)) == data


class TestQuick:
    def test_identical_image_is_not_erased_or_written(self, f446: Board) -> None:
        data = klipper_like(0x08008000, 40 * K)
        f446.flasher().flash(bin_image(data))
        erased = len(f446.dev.erased)
        result = f446.flasher().flash(bin_image(data), quick=True)
        assert len(f446.dev.erased) == erased
        assert (result.bytes_written, result.blocks_skipped) == (0, 3)

    def test_only_changed_sectors_are_rewritten(self, f446: Board) -> None:
        data = klipper_like(0x08008000, 40 * K)
        f446.flasher().flash(bin_image(data))
        changed = bytearray(data)
        changed[20 * K] ^= 0xFF  # inside the second 16 KiB sector
        f446.dev.erased.clear()
        result = f446.flasher(quick=True).flash(bin_image(bytes(changed)))
        assert f446.dev.erased == [0x0800C000]
        assert result.bytes_written == 16 * K
        assert f446.dev.read_flash(0x08008000, len(data)) == bytes(changed)

    def test_quick_is_the_default_for_dfu(self, f446: Board) -> None:
        data = klipper_like(0x08008000, 40 * K)
        f446.flasher().flash(bin_image(data))
        erased = len(f446.dev.erased)
        result = f446.flasher().flash(bin_image(data))  # no quick asked for, none refused
        assert len(f446.dev.erased) == erased
        assert (result.bytes_written, result.blocks_skipped) == (0, 3)
        assert any("3 already hold the image" in line for line in f446.log)

    def test_quick_false_forces_a_full_write(self, f446: Board) -> None:
        data = klipper_like(0x08008000, 40 * K)
        f446.flasher().flash(bin_image(data))
        f446.dev.erased.clear()
        f446.log.clear()
        result = f446.flasher(quick=False).flash(bin_image(data))
        assert f446.dev.erased == [0x08008000, 0x0800C000, 0x08010000]
        assert (result.bytes_written, result.bytes_verified) == (40 * K, 40 * K)
        assert not any("dfu: quick:" in line for line in f446.log)

    def test_blank_flash_is_written_without_erasing(self, f446: Board) -> None:
        data = klipper_like(0x08008000, 40 * K)  # the app area behind the bootloader is blank
        result = f446.flasher().flash(bin_image(data))
        assert f446.dev.erased == []
        assert f446.dev.read_flash(0x08008000, len(data)) == data
        assert result.bytes_written == result.bytes_verified == 40 * K
        assert result.blocks_skipped == 0

    def test_only_the_words_that_differ_are_written_into_blank_flash(self, f446: Board) -> None:
        data = klipper_like(0x08008000, 40 * K)
        f446.flasher().flash(bin_image(data))
        longer = data + klipper_like(0x08008000, 1000, seed=5)  # appends into blank flash
        f446.dev.erased.clear()
        result = f446.flasher().flash(bin_image(longer))
        assert f446.dev.erased == []
        assert result.bytes_written == result.bytes_verified == 1024  # 1000 padded to 32
        assert f446.dev.read_flash(0x08008000, len(longer)) == longer

    def test_a_new_build_reads_little_before_erasing(self, f446: Board) -> None:
        f446.flasher().flash(bin_image(klipper_like(0x08008000, 40 * K)))
        f446.dev.requests.clear()
        f446.flasher().flash(bin_image(klipper_like(0x08008000, 40 * K, seed=2)))
        read_before_erase = []
        for r in f446.dev.requests:
            if r[1] == 1 and r[2] == 0 and r[3] == 5 and f446.dev.erased:
                break
            if r[0] == 0xA1 and r[1] == 2 and r[2] >= 2:
                read_before_erase.append(r[3])
        # one 2 KiB piece per sector: the first flash word already differs and is programmed
        assert sum(read_before_erase) <= 3 * 2 * K

    def test_leftovers_in_a_sector_count_as_different(self, f446: Board) -> None:
        data = klipper_like(0x08008000, 8 * K)
        f446.flasher().flash(bin_image(data))
        f446.dev.load_flash(0x0800A000, b"\x00" * 16)  # an older, longer build's tail
        f446.dev.erased.clear()
        f446.flasher().flash(bin_image(data), quick=True)
        assert f446.dev.erased == [0x08008000]
        assert f446.dev.read_flash(0x0800A000, 16) == b"\xff" * 16


class TestRefusals:
    def test_offset_build_at_0x08000000_would_erase_the_bootloader(self, f446: Board) -> None:
        data = klipper_like(0x08008000, 8 * K)
        with pytest.raises(PreflightError, match="bootloader"):
            f446.flasher(address=0x08000000).flash(bin_image(data))
        assert f446.dev.erased == []

    def test_bootloader_erase_goes_ahead_when_confirmed(self, f446: Board) -> None:
        data = klipper_like(0x08000000, 8 * K)
        flasher = f446.flasher(address=0x08000000, allow_bootloader_erase=True)
        warnings = flasher.check(bin_image(data), flasher.identify())
        assert any("WARNING" in w and "bootloader" in w for w in warnings)
        flasher.flash(bin_image(data))
        assert f446.dev.read_flash(0x08000000, len(data)) == data

    def test_image_sharing_a_sector_with_a_bootloader_is_refused(self, h723: Board) -> None:
        # 0x08010000 lies inside the H7's first 128 KiB sector, which holds the bootloader
        with pytest.raises(PreflightError, match="0x08000000-0x0800FFFF"):
            h723.flasher(address=0x08010000).flash(bin_image(klipper_like(0x08010000, 4 * K)))
        assert h723.dev.erased == []

    def test_image_larger_than_flash_is_refused_before_erasing(self, f446: Board) -> None:
        with pytest.raises(PreflightError, match="not writable flash"):
            f446.flasher().flash(placed(bytes(600 * K), 0x08008000))
        assert f446.dev.erased == []

    def test_wrongly_linked_image_is_warned_about(self) -> None:
        board = make_board("STM32F446")
        flasher = board.flasher(address=0x08000000)
        data = klipper_like(0x08008000, 4 * K)
        warnings = flasher.check(placed(data, 0x08000000), flasher.identify())
        assert any("built for 0x08008000" in w for w in warnings)

    def test_mass_erase_only_on_request_and_never_over_a_bootloader(self, f446: Board) -> None:
        data = klipper_like(0x08008000, 4 * K)
        with pytest.raises(PreflightError, match="mass erase"):
            f446.flasher(options={"mass_erase": True}).flash(bin_image(data))
        f446.flasher(options={"mass_erase": True}, allow_bootloader_erase=True).flash(
            bin_image(data)
        )
        assert f446.dev.mass_erased == 1 and f446.dev.erased == []


class TestFaults:
    def test_stalled_chunk_is_retried(self, f446: Board) -> None:
        f446.dev.faults.stall_write_block_at = 0x08008000 + 2048 * 3
        data = klipper_like(0x08008000, 16 * K)
        f446.flasher().flash(bin_image(data))
        assert f446.dev.read_flash(0x08008000, len(data)) == data
        assert any("retrying chunk at 0x08009800" in line for line in f446.log)

    @pytest.mark.parametrize("request_code", [1, 2, 3, 6])
    def test_one_stall_of_any_request_is_survived(self, f446: Board, request_code: int) -> None:
        f446.dev.faults.stall = {request_code: 1}
        data = klipper_like(0x08008000, 8 * K)
        f446.flasher().flash(bin_image(data))
        assert f446.dev.read_flash(0x08008000, len(data)) == data
        assert f446.dev.faults.stall[request_code] == 0  # the stall really happened

    def test_always_stalling_device_fails_with_advice(self, f446: Board) -> None:
        f446.dev.faults.stall_write_block_at = 0x08008000
        f446.dev.faults.stall_write_count = -1
        with pytest.raises(ConnectError, match="cable"):
            f446.flasher().flash(bin_image(klipper_like(0x08008000, 4 * K)))
        assert f446.dev.mode == "dfu"

    def test_one_timeout_is_survived_and_a_dead_device_is_reported(self, f446: Board) -> None:
        f446.dev.faults.timeout = {1: 1}
        data = klipper_like(0x08008000, 4 * K)
        f446.flasher().flash(bin_image(data))
        assert f446.dev.read_flash(0x08008000, len(data)) == data
        f446.dev.faults.timeout = {3: -1}
        with pytest.raises(ConnectError, match="stopped answering"):
            f446.flasher().flash(bin_image(data))

    def test_chunk_that_arrived_but_lost_its_ack_is_not_written_twice(self, h723: Board) -> None:
        h723.dev.faults.lost_ack_at = 0x08020000 + 3 * 1024
        data = klipper_like(0x08020000, 8 * K)
        h723.flasher().flash(bin_image(data))
        assert h723.dev.read_flash(0x08020000, len(data)) == data
        assert any("0x08020C00 was already written" in line for line in h723.log)

    def test_h7_stuck_busy_erase_is_cleared_and_verified(self, h723: Board) -> None:
        h723.dev.faults.stuck_busy_on_erase = True
        data = klipper_like(0x08020000, 4 * K)
        h723.flasher(quick=False).flash(bin_image(data))
        assert len(h723.requests(4)) == 2
        assert h723.dev.read_flash(0x08020000, len(data)) == data
        assert any("H7 quirk" in line for line in h723.log)

    def test_read_protection_is_explained_and_nothing_is_touched(self, f446: Board) -> None:
        f446.dev.faults.read_protected = True
        with pytest.raises(PreflightError) as info:
            f446.flasher().flash(bin_image(klipper_like(0x08008000, 4 * K)))
        assert "read-out protection" in info.value.message
        assert "including a vendor bootloader" in info.value.hint
        assert f446.dev.erased == [] and f446.dev.mass_erased == 0

    def test_unprotect_on_request_erases_everything_then_flashes(self, f446: Board) -> None:
        f446.dev.faults.read_protected = True
        data = klipper_like(0x08000000, 4 * K)
        flasher = f446.flasher(address=0x08000000, options={"unprotect": True})
        flasher.flash(bin_image(data))
        assert f446.dev.mass_erased == 1
        assert f446.dev.read_flash(0x08000000, len(data)) == data

    def test_unprotect_on_an_unprotected_chip_erases_nothing_extra(self, f446: Board) -> None:
        bootloader = f446.dev.read_flash(0x08000000, 32 * K)
        data = klipper_like(0x08008000, 4 * K)
        f446.flasher(options={"unprotect": True}).flash(bin_image(data))
        assert f446.dev.mass_erased == 0
        assert f446.dev.read_flash(0x08000000, 32 * K) == bootloader
        assert any("not read-protected" in line for line in f446.log)

    def test_address_the_rom_refuses_is_explained(self) -> None:
        # a ROM whose layout string promises more flash than the chip accepts
        model = replace(F446, alt_names=(F429.alt_names[0],) + F446.alt_names[1:])
        dev = EmulatedDfuDevice(model, time_scale=0.01)
        board = Board(DfuBackend([dev]), dev)
        with pytest.raises(PreflightError, match="does not accept that address") as info:
            board.flasher().flash(placed(klipper_like(0x08080000, 4 * K), 0x08080000))
        assert "start address" in info.value.hint

    def test_unplugged_mid_write(self, f446: Board) -> None:
        f446.dev.faults.disappear_after_bytes = 10 * K
        with pytest.raises(ConnectError) as info:
            f446.flasher().flash(bin_image(klipper_like(0x08008000, 40 * K)))
        assert "disappeared" in info.value.message
        assert "BOOT0" in info.value.hint

    def test_program_failure_is_reported_with_recovery(self, f446: Board) -> None:
        f446.dev.faults.weak_bit_at = 0x08008000 + 1000
        with pytest.raises(VerifyError) as info:
            f446.flasher().flash(bin_image(klipper_like(0x08008000, 4 * K)))
        assert "0x080083E8" in info.value.message
        assert "stays in DFU mode" in info.value.hint

    def test_cancel_between_blocks_leaves_the_board_in_dfu(self, f446: Board) -> None:
        token = CancelToken()

        def cancel_while_writing(p: object) -> None:
            if getattr(p, "stage", "") == STAGE_WRITING and getattr(p, "done", 0) > 0:
                token.cancel()

        with pytest.raises(CancelledError):
            f446.flasher().flash(
                bin_image(klipper_like(0x08008000, 16 * K)), cancel_while_writing, token
            )
        assert f446.dev.mode == "dfu"


class TestConnecting:
    def test_permission_denied_gives_the_udev_rule(self) -> None:
        board = make_board("STM32F446", faults=Faults(access_denied=True))
        with pytest.raises(ConnectError) as info:
            board.flasher().identify()
        assert (
            'ATTRS{idVendor}=="0483", ATTRS{idProduct}=="df11", MODE="0660", GROUP="plugdev"'
            in info.value.hint
        )
        assert "udevadm control --reload-rules && sudo udevadm trigger" in info.value.hint

    def test_busy_device(self) -> None:
        board = make_board("STM32F446", faults=Faults(busy=True))
        with pytest.raises(BusyError, match="busy"):
            board.flasher().identify()

    def test_two_boards_need_a_usb_path(self) -> None:
        a = EmulatedDfuDevice(F446, time_scale=0.01, port_numbers=(1,))
        b = EmulatedDfuDevice(H723, time_scale=0.01, port_numbers=(3, 2))
        board = Board(DfuBackend([a, b]), a)
        with pytest.raises(ConnectError, match="--usb-path"):
            board.flasher().identify()
        assert board.flasher(usb_path="1-3.2").identify().chip == "STM32H723"

    def test_f429_with_truncated_layout_still_identifies(self) -> None:
        board = make_board("STM32F429")
        info = board.flasher().identify()
        assert info.flash_size == 1024 * K
        assert info.chip == "STM32F407/F429"
        # a blank board in ROM DFU: no bootloader, so the application area is all of flash
        assert info.app_start == 0x08000000

    def test_through_the_method_registry(self, f446: Board) -> None:
        flasher = methods.open_flasher(f446.target())
        assert flasher.identify().chip == "STM32F446"


class TestLeaving:
    def test_boot0_still_fitted_is_diagnosed(self) -> None:
        board = make_board("STM32F446", bootloader=32 * K, faults=Faults(boot0_held=True))
        flasher = board.flasher()
        flasher.flash(bin_image(klipper_like(0x08008000, 4 * K)))
        with pytest.raises(ProtocolError) as info:
            flasher.leave()
        assert "written and verified" in info.value.message
        assert "BOOT0" in info.value.cause

    def test_error_on_the_leave_request_is_a_normal_disconnect(self, h723: Board) -> None:
        import errno

        h723.dev.faults.leave_error = errno.EPIPE
        flasher = h723.flasher()
        flasher.flash(bin_image(klipper_like(0x08020000, 4 * K)))
        flasher.leave()
        assert any("left during the leave request" in line for line in h723.log)


class TestReading:
    def test_backup_stops_at_the_last_programmed_block(self, f446: Board) -> None:
        data = klipper_like(0x08008000, 5000)
        f446.flasher().flash(bin_image(data))
        backup = f446.flasher().read()
        assert backup.start == 0x08008000
        assert backup.size == 6144  # whole 2 KiB transfer blocks
        assert backup.read(0x08008000, len(data)) == data

    def test_empty_application_area(self, f446: Board) -> None:
        backup = f446.flasher().read()
        assert backup.segments == [] and "empty" in backup.notes[0]


def test_reflashing_a_no_bootloader_build_is_not_mistaken_for_a_bootloader() -> None:
    board = make_board("STM32F446")
    old = klipper_like(0x08000000, 48 * K, seed=2)  # runs through 0x08008000
    board.dev.load_flash(0x08000000, old)
    new = klipper_like(0x08000000, 48 * K, seed=3)
    board.flasher(address=0x08000000).flash(bin_image(new))
    assert board.dev.read_flash(0x08000000, len(new)) == new
