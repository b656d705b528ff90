"""Our STK500 flashers against the REAL bootloaders (optiboot 4.4, Debian's stk500v2) running in
simavr behind a pty: write, verify, and the flashed application boots and names itself."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

from octoprint_flasher import methods
from octoprint_flasher.errors import PreflightError
from octoprint_flasher.flashers.avr_auto import probe
from octoprint_flasher.image.load import load
from octoprint_flasher.image.model import FirmwareImage, Segment
from octoprint_flasher.target import Target
from tests.emulators.simboard import CONFIGS, SimBoard, serial_read_until

pytestmark = pytest.mark.realtime

Factory = Callable[..., SimBoard]
FwBuilder = Callable[..., Path]
REPO = Path(__file__).resolve().parents[2]


def flash(board: SimBoard, image: FirmwareImage, method: str = "auto", **kw: Any) -> Any:
    f = methods.open_flasher(Target(method=method, port=board.port, mcu=kw.pop("mcu", None)))
    try:
        info = f.identify()
        f.check(image, info)
        result = f.flash(image, **kw)
        f.leave()
        return result
    finally:
        f.close()


def holds(dump: bytes, image: FirmwareImage) -> bool:
    return all(dump[s.address : s.end] == s.data for s in image.segments)


def app_says(board: SimBoard, name: str) -> None:
    with board.open_serial() as ser:  # opening resets: the bootloader times out, the app runs
        banner = serial_read_until(ser, b"crc\n", 10)
        assert banner.endswith(b"ok crc\n"), banner
        ser.write(b"M115\n")
        assert serial_read_until(ser, b"ok\n", 2).startswith(
            f"FIRMWARE_NAME:Flasher Test Firmware {name} ".encode()
        )


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_auto_flash_verify_and_the_new_app_boots(
    config: str, simboard_factory: Factory, testfw_hex: FwBuilder
) -> None:
    cfg = CONFIGS[config]
    old = testfw_hex(cfg.mcu, "OLD", size=3000, baud=cfg.baud)
    new = load(testfw_hex(cfg.mcu, "NEW", size=4098, baud=cfg.baud))
    board = simboard_factory(config, app_hex=old)
    found = probe(board.port)
    assert found is not None
    assert (found["method"], found["baud"]) == (cfg.protocol, cfg.baud)
    assert found["signature"] == cfg.info.signature.hex()

    result = flash(board, new)

    assert result.bytes_verified >= new.size
    dump = board.flash_dump()
    assert holds(dump, new)
    assert not [w for w in board.warnings() if "without erase" in w]
    if cfg.baud == 115200:  # (at 57600, detection's 115200 try garbles bytes on purpose)
        assert not [w for w in board.warnings() if "overrun" in w]
    app_says(board, "NEW")


def test_stk500v2_image_above_128k_on_the_2560(
    simboard_factory: Factory, testfw_hex: FwBuilder
) -> None:
    image = load(testfw_hex("atmega2560", "BIG", size=136 * 1024 + 2))
    board = simboard_factory("m2560-stk500v2")
    flash(board, image, method="stk500v2")
    assert holds(board.flash_dump(), image)
    assert not [w for w in board.warnings() if "overrun" in w or "without erase" in w]
    app_says(board, "BIG")


def test_optiboot_on_the_2560_refuses_above_128k_before_writing(
    simboard_factory: Factory, testfw_hex: FwBuilder
) -> None:
    board = simboard_factory("m2560-optiboot")
    before = board.flash_dump()
    image = FirmwareImage([Segment(0, bytes(130 * 1024))])
    with pytest.raises(PreflightError) as err:
        flash(board, image)
    assert "128 KiB" in err.value.message and "optiboot 4.4" in err.value.message
    assert board.flash_dump() == before


@pytest.mark.parametrize("config", ["m328p-optiboot", "m2560-stk500v2"])
def test_images_with_holes_and_odd_sizes(
    config: str, simboard_factory: Factory, testfw_hex: FwBuilder
) -> None:
    cfg = CONFIGS[config]
    app = load(testfw_hex(cfg.mcu, "HOLES", size=2050, baud=cfg.baud))
    blob = bytes(random.Random(5).randrange(256) for _ in range(333))
    image = FirmwareImage([*app.segments, Segment(0x1F02, blob)])
    board = simboard_factory(config)
    flash(board, image)
    dump = board.flash_dump()
    assert holds(dump, image)
    assert not [w for w in board.warnings() if "without erase" in w]
    app_says(board, "HOLES")


def test_wrong_chip_and_bootloader_overlap_are_refused_before_writing(
    simboard_factory: Factory, testfw_hex: FwBuilder
) -> None:
    board = simboard_factory("m328p-optiboot")
    before = board.flash_dump()
    small = load(testfw_hex("atmega328p", "CHIP", size=2048))
    with pytest.raises(PreflightError) as err:
        flash(board, small, mcu="atmega1284p")
    assert "ATmega328P" in err.value.message
    # the real optiboot here sits in a 1 KiB section at 0x7C00: found by reading the flash
    big = FirmwareImage([Segment(0, bytes(0x7C00 + 0x80))])
    with pytest.raises(PreflightError) as err:
        flash(board, big)
    assert "0x07C00" in err.value.message
    assert board.flash_dump() == before


@pytest.mark.parametrize("config", ["m1284p-optiboot-115200", "m2560-stk500v2"])
def test_quick_reflash_skips_identical_pages(
    config: str, simboard_factory: Factory, testfw_hex: FwBuilder
) -> None:
    cfg = CONFIGS[config]
    path = testfw_hex(cfg.mcu, "QUICK", size=6000, baud=cfg.baud)
    image = load(path)
    board = simboard_factory(config, app_hex=path)
    result = flash(board, image, quick=True)
    assert result.blocks_written == 0 and result.blocks_skipped == -(-6000 // 256)
    changed = load(testfw_hex(cfg.mcu, "QUICK2", size=6000, baud=cfg.baud))
    result = flash(board, changed, quick=True)
    assert result.blocks_written > 0
    assert holds(board.flash_dump(), changed)
    app_says(board, "QUICK2")


def test_avrdude_reads_back_exactly_what_we_wrote(
    simboard_factory: Factory, testfw_hex: FwBuilder, tmp_path: Path
) -> None:
    image = load(testfw_hex("atmega1284p", "PEER", size=5000))
    board = simboard_factory("m1284p-optiboot-115200")
    flash(board, image, method="stk500v1")
    out = tmp_path / "read.bin"
    cmd = ["avrdude", "-p", "m1284p", "-c", "arduino", "-P", board.port, "-b", "115200"]
    proc = subprocess.run(
        [*cmd, "-U", f"flash:r:{out}:r"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    data = out.read_bytes()
    assert holds(data + b"\xff" * (0x20000 - len(data)), image)


def test_cli_flash_and_read_on_a_simulated_board(
    simboard_factory: Factory, testfw_hex: FwBuilder, tmp_path: Path
) -> None:
    fw = testfw_hex("atmega328p", "CLI", size=3000)
    board = simboard_factory("m328p-optiboot")
    base = [sys.executable, "-m", "octoprint_flasher", "--data-dir", str(tmp_path / "d")]
    done = subprocess.run(
        [*base, "flash", str(fw), "--port", board.port],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    app_says(board, "CLI")
    back = tmp_path / "back.hex"
    done = subprocess.run(
        [*base, "read", "--port", board.port, "--method", "stk500v1", "--out", str(back)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    assert holds(load(back).to_bytes().ljust(0x8000, b"\xff"), load(fw))


def test_seed_anet_a8_forced_115200_names_57600(
    simboard_factory: Factory, testfw_hex: FwBuilder
) -> None:
    """The seed: 115200 configured, the board's optiboot runs at 57600."""
    from octoprint_flasher.errors import ConnectError

    board = simboard_factory("m1284p-optiboot-57600")
    before = board.flash_dump()
    f = methods.open_flasher(Target(method="stk500v1", port=board.port, baud=115200))
    try:
        with pytest.raises(ConnectError) as err:
            f.identify()
    finally:
        f.close()
    assert "No answer at 115200 baud" in err.value.message
    assert "answered at 57600 baud" in err.value.message
    assert board.flash_dump() == before


def test_board_without_auto_reset_flashes_after_the_reset_button(
    simboard_factory: Factory, testfw_hex: FwBuilder
) -> None:
    fw = testfw_hex("atmega328p", "BUTTON", size=2048)
    board = simboard_factory("m328p-optiboot", auto_reset=False)
    asked: list[str] = []

    def press(text: str) -> None:
        asked.append(text)
        board.reset()

    target = Target(method="stk500v1", port=board.port, options={"prompt": press})
    f = methods.open_flasher(target)
    try:
        f.identify()
        f.flash(load(fw))
        f.leave()
    finally:
        f.close()
    assert asked
    with board.open_serial() as ser:  # no auto-reset: opening does not restart the app
        board.reset()
        assert serial_read_until(ser, b"crc\n", 10).endswith(b"ok crc\n")
