"""Whole flashes against the pure-Python optiboot and Mega-bootloader boards: writes, verifies,
refusals before writing, quick re-flash, and every injected fault (no run may end in success with
wrong flash; transient faults are recovered; fatal ones name their cause)."""

from __future__ import annotations

import random
import threading
import time
from typing import Any, Iterator

import pytest

from octoprint_flasher.errors import ConnectError, FlashError, PreflightError
from octoprint_flasher.flashers import avr_auto, stk500v1, stk500v2
from octoprint_flasher.flashers.avr_base import AvrSerialFlasher
from octoprint_flasher.image.model import FirmwareImage, Segment, image_from_bytes
from octoprint_flasher.links.serial_port import SerialLink
from octoprint_flasher.target import Target
from tests.emulators.stk500_board import Stk500Board

KIB = 1024


def payload(n: int, seed: int = 1) -> bytes:
    return bytes(random.Random(seed).randrange(256) for _ in range(n))


@pytest.fixture
def boards() -> Iterator[list[Stk500Board]]:
    made: list[Stk500Board] = []
    yield made
    for b in made:
        b.close()


def board(made: list[Stk500Board], kind: str, mcu: str, **kw: Any) -> Stk500Board:
    b = Stk500Board(kind, mcu, **kw)
    made.append(b)
    return b


def open_for(b: Stk500Board, **target: Any) -> AvrSerialFlasher:
    mod = stk500v1 if b.kind == "optiboot" else stk500v2
    return mod.open_flasher(Target(method=mod.__name__.rsplit(".", 1)[1], port=b.port, **target))


def flash(b: Stk500Board, image: FirmwareImage, **kw: Any) -> Any:
    f = open_for(b)
    try:
        f.identify()
        result = f.flash(image, **kw)
        f.leave()
        return result
    finally:
        f.close()


KINDS = [("optiboot", "m328p"), ("optiboot", "m1284p"), ("stk500v2", "m2560")]


@pytest.mark.parametrize("kind,mcu", KINDS)
def test_full_flash_writes_verifies_and_starts_the_application(
    boards: list[Stk500Board], kind: str, mcu: str
) -> None:
    b = board(boards, kind, mcu)
    data = payload(5000)
    result = flash(b, image_from_bytes(data, 0))
    assert b.flash[: len(data)] == data
    assert result.bytes_verified == result.bytes_written >= len(data)
    assert b.wait_for_state("app"), f"the board is still in {b.state!r}"
    assert b.stats.unerased_writes == 0 and b.stats.bootloader_overwrites == 0


def test_stk500v2_writes_holes_as_a_contiguous_run_from_page_0(
    boards: list[Stk500Board],
) -> None:
    b = board(boards, "stk500v2", "m2560", app=payload(8 * KIB, seed=9))
    img = FirmwareImage([Segment(0x1000, payload(300)), Segment(0x1800, payload(10, 2))])
    flash(b, img)
    # the bootloader erases at its own pointer: every page up to the last one is written,
    # in order, so nothing lands in unerased flash, and holes read 0xFF
    assert b.stats.unerased_writes == 0
    assert b.stats.pages_written == 0x1900 // 256
    assert b.flash[0x1000:0x112C] == img.read(0x1000, 300)
    assert b.flash[0:0x1000] == b"\xff" * 0x1000
    assert b.flash[0x1200:0x1800] == b"\xff" * 0x600


def test_optiboot_writes_only_the_pages_of_the_image(boards: list[Stk500Board]) -> None:
    old = payload(8 * KIB, seed=9)
    b = board(boards, "optiboot", "m328p", app=old)
    img = FirmwareImage([Segment(0x1000, payload(300))])
    flash(b, img)
    assert b.flash[:0x1000] == old[:0x1000]
    assert b.flash[0x1000:0x112C] == img.read(0x1000, 300)
    assert b.flash[0x112C:0x1180] == b"\xff" * (0x1180 - 0x112C)  # page padded with 0xFF
    assert b.stats.pages_written == 3


@pytest.mark.parametrize("kind,mcu", KINDS)
def test_quick_reflash_of_an_identical_image_writes_nothing(
    boards: list[Stk500Board], kind: str, mcu: str
) -> None:
    data = payload(4096)
    b = board(boards, kind, mcu, app=data)
    result = flash(b, image_from_bytes(data, 0), quick=True)
    assert result.blocks_written == 0 and result.blocks_skipped > 0
    assert b.stats.pages_written == 0


def test_quick_reflash_optiboot_writes_only_the_changed_page(boards: list[Stk500Board]) -> None:
    data = bytearray(payload(4096))
    b = board(boards, "optiboot", "m328p", app=bytes(data))
    data[1000] ^= 0xFF
    result = flash(b, image_from_bytes(bytes(data), 0), quick=True)
    assert result.blocks_written == 1
    assert b.flash[:4096] == data


def test_quick_reflash_stk500v2_writes_from_page_0_to_the_last_changed_page(
    boards: list[Stk500Board],
) -> None:
    data = bytearray(payload(8192))
    b = board(boards, "stk500v2", "m2560", app=bytes(data))
    data[0x900] ^= 0xFF  # page 9 of 32
    result = flash(b, image_from_bytes(bytes(data), 0), quick=True)
    assert result.blocks_written == 10 and result.blocks_skipped == 22
    assert b.stats.unerased_writes == 0
    assert b.flash[:8192] == data


def test_read_returns_the_application_area(boards: list[Stk500Board]) -> None:
    data = payload(3000)
    b = board(boards, "optiboot", "m328p", app=data)
    f = open_for(b)
    try:
        image = f.read()
    finally:
        f.close()
    assert image.start == 0
    assert image.read(0, 3000) == data
    assert image.end <= 0x7C00  # never the bootloader


# --- refusals before anything is written ---------------------------------------------------


def test_wrong_chip_is_refused_before_writing(boards: list[Stk500Board]) -> None:
    b = board(boards, "optiboot", "m328p")
    before = bytes(b.flash)
    f = open_for(b, mcu="atmega1284p")
    try:
        info = f.identify()
        with pytest.raises(PreflightError) as err:
            f.flash(image_from_bytes(payload(1000), 0))
    finally:
        f.close()
    assert "ATmega328P" in err.value.message and "atmega1284p" in err.value.message
    assert info.chip == "ATmega328P"
    assert bytes(b.flash) == before


def test_image_overlapping_the_bootloader_is_refused(boards: list[Stk500Board]) -> None:
    # optiboot built for a 1 KiB section (as the simboard's 328p): app ends at 0x7C00
    b = board(boards, "optiboot", "m328p", boot_size=1024)
    before = bytes(b.flash)
    f = open_for(b)
    try:
        info = f.identify()
        assert info.app_end == 0x7E00  # the smallest optiboot, until the flash is read
        with pytest.raises(PreflightError) as err:
            f.flash(image_from_bytes(payload(0x7C00 + 2), 0))
    finally:
        f.close()
    assert (info.app_end, info.details["bootloader_found_by"]) == (0x7C00, "read")
    assert "0x07C00" in err.value.message and "bootloader" in err.value.message
    assert bytes(b.flash) == before


def test_optiboot_4_on_a_2560_refuses_images_above_128k(boards: list[Stk500Board]) -> None:
    b = board(boards, "optiboot", "m2560", version=(4, 4))
    before = bytes(b.flash)
    f = open_for(b)
    try:
        f.identify()
        with pytest.raises(PreflightError) as err:
            f.flash(image_from_bytes(payload(130 * KIB), 0))
    finally:
        f.close()
    assert "128 KiB" in err.value.message
    assert bytes(b.flash) == before


def test_optiboot_8_on_a_2560_reaches_above_128k_with_the_extended_address(
    boards: list[Stk500Board],
) -> None:
    b = board(boards, "optiboot", "m2560", version=(8, 0))
    img = FirmwareImage([Segment(0, payload(512)), Segment(0x20000, payload(600, 3))])
    flash(b, img)
    assert b.flash[0x20000 : 0x20000 + 600] == payload(600, 3)
    assert b.flash[:512] == payload(512)


# --- faults ----------------------------------------------------------------------------------

# (fault kind, byte offset into the write) — the page data of page 3 or so
TRANSIENT = ["drop", "corrupt", "reset"]


@pytest.mark.parametrize("kind,mcu", [("optiboot", "m328p"), ("stk500v2", "m2560")])
@pytest.mark.parametrize("fault", TRANSIENT)
def test_transient_line_faults_are_recovered(
    boards: list[Stk500Board], kind: str, mcu: str, fault: str
) -> None:
    b = board(boards, kind, mcu)
    data = payload(4000)
    f = open_for(b)
    try:
        f.identify()
        b.inject(fault, after=700)
        f.flash(image_from_bytes(data, 0))
        f.leave()
    finally:
        f.close()
    assert b.flash[: len(data)] == data
    assert any(entry.startswith("fault") for entry in b.stats.log)


@pytest.mark.parametrize(
    "kind,mcu,command", [("optiboot", "m328p", 0x64), ("stk500v2", "m2560", 0x13)]
)
@pytest.mark.parametrize("fault", ["mute", "lose_reply"])
def test_unanswered_program_commands_are_recovered(
    boards: list[Stk500Board], kind: str, mcu: str, command: int, fault: str
) -> None:
    b = board(boards, kind, mcu)
    data = payload(4000)
    f = open_for(b)
    try:
        f.identify()
        b.inject(fault, after=3, command=command)
        f.flash(image_from_bytes(data, 0))
    finally:
        f.close()
    assert b.flash[: len(data)] == data
    assert b.stats.unerased_writes == 0


def test_lost_program_answer_in_quick_mode_still_ends_with_every_page_right(
    boards: list[Stk500Board],
) -> None:
    """After a lost PROGRAM_FLASH_ISP answer the erase pointer is unknown: the run is redone
    from page 0 in a new session, and pages the quick re-flash skipped are left intact."""
    data = bytearray(payload(8192))
    b = board(boards, "stk500v2", "m2560", app=bytes(data))
    data[0x300] ^= 0xFF
    f = open_for(b)
    try:
        f.identify()
        b.inject("lose_reply", after=4, command=0x13)  # the last page of the run (page 3)
        f.flash(image_from_bytes(bytes(data), 0), quick=True)
    finally:
        f.close()
    assert b.flash[:8192] == data


@pytest.mark.parametrize("kind,mcu", [("optiboot", "m328p"), ("stk500v2", "m2560")])
def test_port_vanishing_mid_write_is_a_connect_error_that_says_how_to_recover(
    boards: list[Stk500Board], kind: str, mcu: str
) -> None:
    b = board(boards, kind, mcu)
    f = open_for(b)
    try:
        f.identify()
        b.inject("vanish", after=1500)
        with pytest.raises(ConnectError) as err:
            f.flash(image_from_bytes(payload(4000), 0))
    finally:
        f.close()
    assert "Lost the serial port" in err.value.message
    assert "bootloader" in err.value.hint and "flash again" in err.value.hint


def test_a_line_that_keeps_failing_gives_up_without_claiming_success(
    boards: list[Stk500Board],
) -> None:
    b = board(boards, "optiboot", "m328p")
    f = open_for(b)
    try:
        f.identify()
        for i in range(40):
            b.inject("drop", after=300 + 50 * i)
            b.inject("mute", after=2 + i, command=0x64)
        with pytest.raises(FlashError) as err:
            f.flash(image_from_bytes(payload(4000), 0))
    finally:
        f.close()
    assert err.value.message.startswith("Gave up")
    assert "flash again" in err.value.hint


# --- timing model: what may be pipelined ------------------------------------------------------


def test_pipelining_a_whole_page_during_spm_overruns_the_avr_fifo(
    boards: list[Stk500Board],
) -> None:
    """Why the flasher waits for each page's OK: optiboot busy-waits during SPM and the UART
    keeps 3 characters, so a host that streams the next page at once loses bytes."""
    import serial

    from octoprint_flasher.protocols import stk500v1 as v1

    b = board(boards, "optiboot", "m1284p", timing=True)
    with serial.Serial(b.port, 115200, timeout=1.5) as s:
        s.write(v1.get_sync())
        assert s.read(2) == b"\x14\x10"
        burst = b"".join(
            v1.load_address(a) + v1.prog_page(bytes([a >> 8]) * 256) for a in (0, 256, 512)
        )
        s.write(burst)
        s.read(100)
    assert b.stats.overruns > 0


def test_our_flasher_never_overruns_with_the_timing_model(boards: list[Stk500Board]) -> None:
    b = board(boards, "optiboot", "m1284p", timing=True)
    data = payload(3 * 256)
    flash(b, image_from_bytes(data, 0))
    assert b.stats.overruns == 0
    assert b.flash[: len(data)] == data


def test_auto_detects_each_bootloader_and_flashes_in_the_same_session(
    boards: list[Stk500Board],
) -> None:
    for kind, mcu in KINDS:
        b = board(boards, kind, mcu)
        f = avr_auto.open_flasher(Target(method="auto", port=b.port))
        try:
            assert f.in_bootloader
            info = f.identify()
            f.flash(image_from_bytes(payload(600), 0))
        finally:
            f.close()
        # one reset to detect and flash; the Mega bootloader gets a second, one-page
        # session for page 0 (written last, see the next test)
        assert b.stats.resets == (1 if kind == "optiboot" else 2)
        assert info.method == ("stk500v1" if kind == "optiboot" else "stk500v2")
        assert b.flash[:600] == payload(600)


def test_probe_names_bootloader_baud_and_chip_and_lets_the_app_run(
    boards: list[Stk500Board],
) -> None:
    b = board(boards, "stk500v2", "m2560", app=payload(512))
    found = avr_auto.probe(b.port)
    assert found == {
        "method": "stk500v2",
        "baud": 115200,
        "chip": "ATmega2560",
        "signature": "1e9801",
        "bootloader": "stk500v2 (AVRISP_2)",
        "port": b.port,
    }
    assert b.wait_for_state("app"), f"the board is still in {b.state!r}"
    assert "monitor entered (!!!)" not in b.stats.log


def test_stk500v2_keeps_word_0_blank_until_the_end_so_a_failed_flash_stays_in_the_bootloader(
    boards: list[Stk500Board],
) -> None:
    """The Mega bootloader only leaves for an application whose word 0 is not 0xFFFF: page 0
    is written as 0xFF first and gets its content in a last one-page session."""
    from octoprint_flasher.errors import CancelledError
    from octoprint_flasher.flasher import STAGE_WRITING, CancelToken, Progress

    b = board(boards, "stk500v2", "m2560", app=payload(4096, seed=3))
    cancel = CancelToken()

    def progress(p: Progress) -> None:
        if p.stage == STAGE_WRITING and p.done >= 2048:
            cancel.cancel()

    f = open_for(b)
    try:
        f.identify()
        with pytest.raises(CancelledError):
            f.flash(image_from_bytes(payload(4096), 0), progress, cancel)
    finally:
        f.close()
    assert b.flash[0:256] == b"\xff" * 256
    assert b.flash[256:2048] == payload(4096)[256:2048]
    assert b.state == "bootloader"


def test_stk500v2_next_frame_goes_out_only_once_the_bootloader_listens(
    boards: list[Stk500Board],
) -> None:
    """With the timing model (SPM busy-wait, polled sending, 3-character UART buffer) not one
    character may be lost while writing."""
    b = board(boards, "stk500v2", "m2560", timing=True)
    data = payload(6 * 256)
    flash(b, image_from_bytes(data, 0))
    assert b.stats.overruns == 0
    assert b.flash[: len(data)] == data


def test_auto_detect_survives_a_missed_reset_on_open(boards: list[Stk500Board]) -> None:
    """A port closed and reopened within milliseconds (a probe right before) can miss the
    reset of the open; detection then resets once more at the first baud instead of failing."""
    b = board(boards, "stk500v2", "m2560", app=payload(512))
    time.sleep(1.2)  # past the bootloader's window: the application runs
    b.auto_reset = False  # the next open resets nothing: the app keeps running
    threading.Timer(0.3, lambda: setattr(b, "auto_reset", True)).start()
    link = SerialLink(b.port, 115200)
    link.open()
    try:
        found = avr_auto.detect(link, bauds=(115200, 57600), fresh=True)
        assert found is not None and (found.method, found.baud) == ("stk500v2", 115200)
    finally:
        link.close()
