"""Both passes on the emulated Einsy (Prusa stk500v2 bootloader, the 32U2's ';' defect, the
MK3 firmware's XFLASH handler over a W25X20CL), and each way pass 2 can fail: the firmware is
then verified, running English, and the error says so."""

from __future__ import annotations

from typing import Any, Iterator

import pytest

from octoprint_flasher.errors import FlashError, ProtocolError
from octoprint_flasher.flasher import FlashResult
from octoprint_flasher.flashers import prusa, stk500v2
from octoprint_flasher.flashers.prusa import LanguagePassError
from octoprint_flasher.image.load import load_bytes
from octoprint_flasher.image.model import FirmwareImage, image_from_bytes
from octoprint_flasher.target import Target
from tests.emulators.prusa_einsy import W25X20CL, PrusaEinsy
from tests.prusa import samples

FAST = {"start_timeout": 2.0, "handshake_timeout": 0.5, "drain_quiet": 0.05}


@pytest.fixture
def boards() -> Iterator[list[PrusaEinsy]]:
    made: list[PrusaEinsy] = []
    yield made
    for b in made:
        b.close()


def einsy(made: list[PrusaEinsy], **kw: Any) -> PrusaEinsy:
    kw.setdefault("time_scale", 0.1)
    b = PrusaEinsy(**kw)
    made.append(b)
    return b


def multilang(fw_size: int = 20000, lang_size: int = 8000, **kw: Any) -> tuple[bytes, bytes, Any]:
    fw, langs = samples.firmware(fw_size), samples.languages(size=lang_size, **kw)
    return fw, langs, load_bytes(samples.multilang(fw, langs), "MK3S_MULTILANG.hex")


def flash(b: PrusaEinsy, image: FirmwareImage, **opts: Any) -> FlashResult:
    f = prusa.open_flasher(Target("prusa", port=b.port, options={**FAST, **opts}))
    try:
        f.check(image, f.identify())
        result = f.flash(image)
        back = f.leave()
        assert back is not None and "printer restarted" in back
        assert f.leave() is None  # said once
        return result
    finally:
        f.close()


def test_multilang_writes_firmware_and_catalogs_and_both_read_back(
    boards: list[PrusaEinsy],
) -> None:
    b = einsy(boards)
    fw, langs, image = multilang()
    result = flash(b, image)
    assert bytes(b.flash[: len(fw)]) == fw
    assert bytes(b.xflash.data[: len(langs)]) == langs
    assert result.verified_by == "read-back"
    assert "Pass 1 firmware" in result.confirmation and "pass 2 languages" in result.confirmation
    assert b.lcd_upload_size == len(fw)  # 0x71 announced the real size: LCD progress
    assert b.events[-1] == "start" and "xflash leave" in b.events  # the printer restarted
    # the only ';' that ever went out is the probe that found the defect
    assert sum("extra 0xFF" in line for line in b.stats.log) == 1


def test_languages_across_64k_blocks_and_the_extended_address(boards: list[PrusaEinsy]) -> None:
    b = einsy(boards)
    # stale bytes everywhere: only a block erase at each block's first page makes them go
    b.xflash.data[:] = b"\x00" * len(b.xflash.data)
    fw, langs, image = multilang(6000, 0x21000 // 3 + 1000)
    assert len(langs) > 0x20000
    flash(b, image)
    assert bytes(b.xflash.data[: len(langs)]) == langs
    assert b.xflash.block_erases == 3


def test_identical_catalogs_are_not_written_again(boards: list[PrusaEinsy]) -> None:
    b = einsy(boards)
    fw, langs, image = multilang(lang_size=30000)
    flash(b, image)
    erases, programs = b.xflash.block_erases, b.xflash.page_programs
    result = flash(b, image)
    assert (b.xflash.block_erases, b.xflash.page_programs) == (erases, programs)
    assert "0 blocks written, 2 already identical" in result.confirmation


def test_the_semicolon_defect_breaks_a_naive_writer_but_not_ours(boards: list[PrusaEinsy]) -> None:
    fw = samples.firmware(3000)
    assert b";" in fw
    naive_board = einsy(boards)
    naive = stk500v2.open_flasher(Target("stk500v2", port=naive_board.port))
    naive.retries = 1
    try:
        with pytest.raises(ProtocolError):
            naive.identify()
            naive.flash(image_from_bytes(fw, 0))
    finally:
        naive.close()
    assert any("extra 0xFF" in line for line in naive_board.stats.log)
    assert bytes(naive_board.flash[: len(fw)]) != fw

    b = einsy(boards)
    flash(b, load_bytes(samples.ihex(fw), "MK3S_ENGLISH.hex"))
    assert bytes(b.flash[: len(fw)]) == fw


def test_the_address_whose_load_frame_holds_0x3b_is_reached_from_the_page_before(
    boards: list[PrusaEinsy],
) -> None:
    # pages 0x7600/0x7700 have word addresses 0x3B00/0x3B80: their LOAD_ADDRESS carries 0x3B
    b = einsy(boards)
    fw = bytearray(samples.firmware(0x7800))
    fw[0x7600] = fw[0x7700] = 0x3B
    flash(b, load_bytes(samples.ihex(bytes(fw)), "fw.hex"))
    assert bytes(b.flash[: len(fw)]) == fw
    assert sum("extra 0xFF" in line for line in b.stats.log) == 1  # the probe only


def test_english_build_writes_only_the_firmware_and_sees_the_printer_start(
    boards: list[PrusaEinsy],
) -> None:
    b = einsy(boards)
    fw = samples.firmware(5000)
    result = flash(b, load_bytes(samples.ihex(fw), "MK3S_ENGLISH.hex"))
    assert bytes(b.flash[: len(fw)]) == fw
    assert "languages: none in this file" in result.confirmation
    assert "printer restarted" in result.confirmation
    assert b.xflash.page_programs == 0


def test_stock_mega_bootloader_gets_the_firmware_and_no_languages(
    boards: list[PrusaEinsy],
) -> None:
    b = einsy(boards, prusa_bootloader=False)
    fw, langs, image = multilang()
    f = prusa.open_flasher(Target("prusa", port=b.port, options=FAST))
    try:
        warnings = f.check(image, f.identify())
        result = f.flash(image)
    finally:
        f.close()
    assert any("not Prusa's" in w for w in warnings)
    assert bytes(b.flash[: len(fw)]) == fw and b.xflash.page_programs == 0
    assert "skipped (not a Prusa bootloader" in result.confirmation


@pytest.mark.parametrize(
    "firmware,words",
    [
        ("old", "did not confirm the language-flash handshake"),
        ("silent", "did not print 'start'"),
    ],
)
def test_a_pass_2_that_cannot_start_leaves_verified_english_firmware(
    boards: list[PrusaEinsy], firmware: str, words: str
) -> None:
    b = einsy(boards, firmware=firmware)
    fw, langs, image = multilang()
    with pytest.raises(LanguagePassError) as err:
        flash(b, image, start_timeout=0.5)
    assert "written and verified" in err.value.message and "English" in err.value.message
    assert words in err.value.message
    assert err.value.firmware.bytes_verified >= len(fw)
    assert bytes(b.flash[: len(fw)]) == fw and b.xflash.page_programs == 0


def test_pre_3_10_junk_after_the_confirmation_is_drained(boards: list[PrusaEinsy]) -> None:
    b = einsy(boards, firmware="junk")
    fw, langs, image = multilang()
    flash(b, image)
    assert bytes(b.xflash.data[: len(langs)]) == langs


@pytest.mark.parametrize("kind", ["drop", "corrupt"])
def test_a_lost_or_garbled_byte_in_pass_2_is_recovered(boards: list[PrusaEinsy], kind: str) -> None:
    b = einsy(boards)
    fw, langs, image = multilang(lang_size=9000)
    f = prusa.open_flasher(Target("prusa", port=b.port, options=FAST))
    try:
        f.identify()
        # arm the fault once pass 2 runs: on the 20th PROG_PAGE of the handler
        original = f._enter_handler

        def enter_then_arm(first: FlashResult) -> Any:
            x = original(first)
            if not b.faults:  # once: the recovery enters the handler again
                b.inject(kind, after=20 * 270 + 100)
            return x

        f._enter_handler = enter_then_arm  # type: ignore[method-assign]
        f.flash(image)
    finally:
        f.close()
    assert any(flt.fired for flt in b.faults)
    assert bytes(b.xflash.data[: len(langs)]) == langs


def test_unplugged_during_pass_2_says_the_firmware_is_fine(boards: list[PrusaEinsy]) -> None:
    b = einsy(boards)
    fw, langs, image = multilang(lang_size=9000)
    f = prusa.open_flasher(Target("prusa", port=b.port, options=FAST))
    try:
        f.identify()
        original = f._enter_handler

        def enter_then_arm(first: FlashResult) -> Any:
            x = original(first)
            b.inject("vanish", after=3000)
            return x

        f._enter_handler = enter_then_arm  # type: ignore[method-assign]
        with pytest.raises(LanguagePassError) as err:
            f.flash(image)
    finally:
        f.close()
    assert "written and verified" in err.value.message
    assert bytes(b.flash[: len(fw)]) == fw


def test_a_lost_byte_in_pass_1_is_recovered(boards: list[PrusaEinsy]) -> None:
    b = einsy(boards)
    fw, langs, image = multilang(fw_size=12000)
    b.inject("drop", after=4000)
    flash(b, image)
    assert bytes(b.flash[: len(fw)]) == fw
    assert bytes(b.xflash.data[: len(langs)]) == langs


def test_the_xflash_model_ands_and_erases_only_at_block_starts() -> None:
    chip = W25X20CL()
    chip.data[0x10100:0x10200] = b"\x0f" * 256
    chip.program(0x10100, b"\xf0" * 256)  # never erased: ANDed into stale data
    assert chip.read(0x10100, 1) == b"\x00" and chip.stale_programs == 1
    chip.program(0x100F0, b"\x00" * 32)  # wraps inside the 256-byte page
    assert chip.read(0x10000, 16) == b"\x00" * 16


def test_gpio_header_without_a_prompt_is_refused_before_opening() -> None:
    with pytest.raises(FlashError, match="Raspberry Pi header"):
        prusa.open_flasher(Target("prusa", port="/dev/ttyAMA0"))


def test_a_usb_chip_without_the_defect_gets_one_round_per_page(boards: list[PrusaEinsy]) -> None:
    b = einsy(boards, semicolon_defect=False)
    fw, langs, image = multilang()
    f = prusa.open_flasher(Target("prusa", port=b.port, options=FAST))
    try:
        f.identify()
        f.flash(image)
    finally:
        f.close()
    assert f.semicolon_rounds is False and f.rounds == 0
    assert bytes(b.flash[: len(fw)]) == fw and bytes(b.xflash.data[: len(langs)]) == langs


def test_the_defect_is_detected_and_every_page_with_a_semicolon_takes_two_rounds(
    boards: list[PrusaEinsy],
) -> None:
    b = einsy(boards)
    fw, langs, image = multilang(fw_size=5000)
    f = prusa.open_flasher(Target("prusa", port=b.port, options=FAST))
    try:
        f.identify()
        f.flash(image)
    finally:
        f.close()
    with_semicolon = sum(1 for a in range(0, len(fw), 256) if b";" in fw[a : a + 256])
    assert f.semicolon_rounds is True and f.rounds == with_semicolon


def test_flashing_the_same_file_again_quickly_writes_nothing(boards: list[PrusaEinsy]) -> None:
    b = einsy(boards, semicolon_defect=False)
    fw, langs, image = multilang()
    flash(b, image)
    pages, programs = b.stats.pages_written, b.xflash.page_programs
    f = prusa.open_flasher(Target("prusa", port=b.port, options=FAST))
    try:
        f.identify()
        result = f.flash(image, quick=True)
    finally:
        f.close()
    assert result.blocks_written == 0 and result.blocks_skipped == -(-len(fw) // 256)
    assert (b.stats.pages_written, b.xflash.page_programs) == (pages, programs)
    assert "0 blocks written, 1 already identical" in result.confirmation
