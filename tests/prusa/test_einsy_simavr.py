"""Both passes of the prusa flasher against REAL code on a simulated Einsy RAMBo: Debian's Mega
stk500v2 bootloader built from source with our Prusa patch (0x71), our test firmware with the
MK3's language-flash handshake and handler, and a W25X20CL model on the SPI bus (simavr, real
time, one pty, as on a printer). Firmware and catalogs are read back from the simulated chips.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any, Callable, Iterator, List, Tuple

import pytest

from octoprint_flasher.flasher import FlashResult
from octoprint_flasher.flashers import prusa
from octoprint_flasher.flashers.prusa import LanguagePassError
from octoprint_flasher.image.load import load, load_bytes
from octoprint_flasher.image.model import FirmwareImage
from octoprint_flasher.target import Target
from tests.emulators.simboard import SimBoard, build_test_firmware, serial_read_until
from tests.prusa import samples

pytestmark = pytest.mark.realtime

Factory = Callable[..., SimBoard]
BLANK_SPI = b"\xff" * 0x40000


@pytest.fixture
def einsy(realtime_lock: None) -> Iterator[Factory]:
    """``einsy(**SimBoard kwargs)`` starts a simulated Einsy; all are stopped at teardown."""
    boards: List[SimBoard] = []

    def make(**kwargs: Any) -> SimBoard:
        board = SimBoard("einsy-prusa", **kwargs)
        board.start()
        boards.append(board)
        return board

    yield make
    for board in boards:
        board.stop()


def firmware(name: str, size: int = 12000, mode: str = "prusa") -> bytes:
    path = build_test_firmware(
        "atmega2560", name, size=size, xflash=mode, signature=samples.SIGNATURE
    )
    return load(path).to_bytes()


def multilang(
    fw: bytes, codes: Tuple[str, ...] = ("cs", "de"), lang_size: int = 3000
) -> Tuple[bytes, FirmwareImage]:
    langs = samples.languages(codes, size=lang_size)
    return langs, load_bytes(samples.multilang(fw, langs), "MK3S_MULTILANG.hex")


def flash(board: SimBoard, image: FirmwareImage, **opts: Any) -> Tuple[FlashResult, Any]:
    f = prusa.open_flasher(Target("prusa", port=board.port, options=opts))
    try:
        f.check(image, f.identify())
        result = f.flash(image)
        return result, f
    finally:
        f.close()


def app_boots(board: SimBoard) -> None:
    """Reset by opening the port: bootloader window, ``start``, the handshake window passes
    unanswered, then the firmware's own CRC over its flash."""
    with board.open_serial() as ser:
        out = serial_read_until(ser, b"crc\n", 10)
    assert b"start\n" in out and out.endswith(b"ok crc\n"), out


def test_both_passes_write_and_read_back_firmware_and_catalogs_across_64k(
    einsy: Factory, tmp_path: Path
) -> None:
    fw = firmware("BOTH")
    # two catalogs crossing 0x10000: the second block is entered by extended address
    langs, image = multilang(fw, ("cs", "de"), lang_size=0x8800)
    assert len(langs) > 0x10000
    stale = tmp_path / "stale.bin"
    stale.write_bytes(b"\x00" * 0x40000)  # only a block erase makes this 0xFF again
    board = einsy(spi_bin=stale)

    result, f = flash(board, image)

    assert f.prusa_bootloader is True  # the patched bootloader answered 0x71 with 00
    assert board.flash_dump()[: len(fw)] == fw
    spi = board.spi_flash_dump()
    assert spi[: len(langs)] == langs
    assert spi[len(langs) : 0x20000] == b"\xff" * (0x20000 - len(langs))
    assert spi[0x20000:] == b"\x00" * 0x20000  # block 2 and 3 were never touched
    stats = board.spi_stats()
    assert stats["erase64k"] == 2 and stats["stale"] == 0
    assert "pass 2 languages" in result.confirmation and "2 blocks written" in result.confirmation
    assert not [w for w in board.warnings() if "overrun" in w]
    app_boots(board)


def test_identical_catalogs_are_skipped_the_second_time(einsy: Factory) -> None:
    fw = firmware("SAME")
    langs, image = multilang(fw)
    board = einsy()
    flash(board, image)
    programs = board.spi_stats()["programs"]
    result, _ = flash(board, image)
    assert "0 blocks written, 1 already identical" in result.confirmation
    assert board.spi_stats()["programs"] == programs
    assert board.spi_flash_dump()[: len(langs)] == langs


def test_avrdude_wiring_writes_and_verifies_pass_1_on_the_same_board(
    einsy: Factory, tmp_path: Path
) -> None:
    fw = firmware("PEER")
    hexfile = tmp_path / "fw.hex"
    hexfile.write_bytes(samples.ihex(fw))
    board = einsy()
    cmd = ["avrdude", "-p", "m2560", "-c", "wiring", "-P", board.port, "-b", "115200", "-D"]
    done = subprocess.run(
        [*cmd, "-U", f"flash:w:{hexfile}:i"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "bytes of flash verified" in done.stderr
    assert board.flash_dump()[: len(fw)] == fw
    app_boots(board)


def test_the_semicolon_defect_is_detected_and_both_passes_still_verify(einsy: Factory) -> None:
    fw = firmware("SEMI")
    langs, image = multilang(fw)
    assert fw.count(b";") and langs.count(b";")
    board = einsy(semicolon_defect=True)
    result, f = flash(board, image)
    assert f.semicolon_rounds is True and f.rounds > 0
    assert board.flash_dump()[: len(fw)] == fw
    assert board.spi_flash_dump()[: len(langs)] == langs
    app_boots(board)


def test_a_lost_byte_in_pass_1_is_recovered(einsy: Factory) -> None:
    fw = firmware("LOST1")
    langs, image = multilang(fw)
    board = einsy()
    f = prusa.open_flasher(Target("prusa", port=board.port))
    try:
        f.check(image, f.identify())
        board.drop_host_byte(4000)  # inside a PROGRAM_FLASH_ISP frame
        f.flash(image)
    finally:
        f.close()
    assert board.faults()
    assert board.flash_dump()[: len(fw)] == fw
    assert board.spi_flash_dump()[: len(langs)] == langs


def test_a_lost_byte_in_pass_2_is_recovered(einsy: Factory) -> None:
    fw = firmware("LOST2")
    langs, image = multilang(fw, ("cs", "de", "fr"))
    board = einsy()
    log: List[str] = []
    f = prusa.open_flasher(Target("prusa", port=board.port), log=log.append)
    original = f._enter_handler

    def enter_then_arm(first: FlashResult) -> Any:
        x = original(first)
        if not board.faults():  # once: the recovery enters the handler again
            board.drop_host_byte(10 * 270 + 100)  # inside the 11th PROG_PAGE
        return x

    f._enter_handler = enter_then_arm  # type: ignore[method-assign]
    try:
        f.check(image, f.identify())
        f.flash(image)
    finally:
        f.close()
    assert board.faults()
    assert any("restarting the language handler" in line for line in log)
    assert board.spi_flash_dump()[: len(langs)] == langs


@pytest.mark.parametrize(
    "mode,words",
    [
        ("old", "did not confirm the language-flash handshake"),
        ("silent", "did not print 'start'"),
    ],
)
def test_a_pass_2_that_cannot_start_leaves_the_verified_firmware(
    einsy: Factory, mode: str, words: str
) -> None:
    fw = firmware(f"NO{mode.upper()}", mode=mode)
    langs, image = multilang(fw)
    board = einsy()
    with pytest.raises(LanguagePassError) as err:
        flash(board, image, start_timeout=3.0)
    assert "written and verified" in err.value.message and words in err.value.message
    assert err.value.firmware.bytes_verified >= len(fw)
    assert board.flash_dump()[: len(fw)] == fw
    assert board.spi_flash_dump() == BLANK_SPI
    assert board.spi_stats()["programs"] == 0
