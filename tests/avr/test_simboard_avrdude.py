"""The simulated boards behave like real ones, proven with Debian's avrdude as the client.

If avrdude can write and verify through a board, the flash dump equals the image and the
flashed application runs, the board (real bootloader + simboard's UART, reset and flash
models) is a fair stand-in for hardware for our own flashers.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pytest
import serial

from bench.avrdude_peer import avrdude_command, line_limit, run_avrdude
from tests.emulators.simboard import CONFIGS, SimBoard, serial_read_until

pytestmark = pytest.mark.realtime

Factory = Callable[..., SimBoard]
FwBuilder = Callable[..., Path]

# -c arduino retries sync 10 times (about 20 s); two attempts are enough to see a failure
FEW_SYNC_ATTEMPTS = ["-x", "attempts=2"]


def hex_bytes(path: Path) -> Dict[int, int]:
    """address -> byte of an Intel HEX file (records 00, 02 and 04; others carry no data)."""
    data: Dict[int, int] = {}
    upper = 0
    for line in path.read_text().split():
        rec = bytes.fromhex(line[1:])
        n, addr, kind = rec[0], (rec[1] << 8) | rec[2], rec[3]
        if kind == 2:
            upper = ((rec[4] << 8) | rec[5]) << 4
        elif kind == 4:
            upper = ((rec[4] << 8) | rec[5]) << 16
        elif kind == 0:
            for i, b in enumerate(rec[4 : 4 + n]):
                data[upper + addr + i] = b
    return data


def assert_flash_holds(dump: bytes, image: Dict[int, int]) -> None:
    wrong = [a for a, b in image.items() if dump[a] != b]
    assert not wrong, f"{len(wrong)} bytes differ, first at 0x{wrong[0]:05x}"


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_avrdude_writes_verifies_and_the_app_runs(
    config: str, simboard_factory: Factory, testfw_hex: FwBuilder
) -> None:
    cfg = CONFIGS[config]
    fw = testfw_hex(cfg.mcu, "AVRDUDE", size=4096, baud=cfg.baud)
    board = simboard_factory(config)

    result = run_avrdude(board, fw)

    assert result["ok"], result["output"]
    assert "4096 bytes of flash verified" in result["output"]
    # the avrdude timing must respect the wire: nothing may arrive faster than the line allows
    limit = line_limit(cfg, 4096, board.spm_time_us)
    assert result["seconds_write"] >= 0.97 * limit["write_with_flash"]
    assert result["seconds_verify"] >= 0.97 * limit["verify"]
    dump = board.flash_dump()
    assert len(dump) == cfg.info.flash_size
    assert_flash_holds(dump, hex_bytes(fw))
    assert dump[4096 : cfg.boot_start] == b"\xff" * (cfg.boot_start - 4096)
    assert_flash_holds(dump, hex_bytes(cfg.bootloader))
    assert not [w for w in board.warnings() if "without erase" in w]

    with board.open_serial() as ser:  # opening resets: bootloader times out, app starts
        banner = serial_read_until(ser, b"ok crc\n", 10)
        assert banner.startswith(b"start\necho: Flasher Test Firmware AVRDUDE\n")
        ser.write(b"N0 M110 N0*125\n")
        assert serial_read_until(ser, b"ok\n", 2) == b"ok\n"
        ser.write(b"M115\n")
        reply = serial_read_until(ser, b"ok\n", 2)
        assert reply.startswith(b"FIRMWARE_NAME:Flasher Test Firmware AVRDUDE ")
        ser.write(b"M105\n")
        assert serial_read_until(ser, b"\n", 2) == b"ok T:21.0 /0.0 B:21.0 /0.0\n"
    assert board.resets() == ["open", "open"]  # every open pulses reset, as DTR does


def test_images_above_64k_verify(simboard_factory: Factory, testfw_hex: FwBuilder) -> None:
    """Above 64 KiB optiboot must read with ELPM (our patch) and take RAMPZ from the address."""
    fw = testfw_hex("atmega2560", "BIG", size=70_000)
    board = simboard_factory("m2560-optiboot")

    result = run_avrdude(board, fw)

    assert result["ok"], result["output"]
    assert_flash_holds(board.flash_dump(), hex_bytes(fw))
    assert b"ok crc" in board.read_until(b"crc", 10)


def test_a_burst_while_optiboot_blinks_overruns_the_uart(simboard_factory: Factory) -> None:
    """Optiboot does not read the UART during its start-up LED flashes: the 2-byte FIFO plus
    the shift register hold three characters and the rest is lost, as on silicon."""
    board = simboard_factory("m328p-optiboot")
    with board.open_serial() as ser:
        ser.write(b"0123456789")
        time.sleep(0.2)
    overruns = [w for w in board.warnings() if w.startswith("uart overrun")]
    assert len(overruns) == 7


def round_trips(ser: serial.Serial, n: int) -> List[float]:
    times = []
    for _ in range(n):
        start = time.monotonic()
        ser.write(b"M105\n")
        serial_read_until(ser, b"ok T:21.0 /0.0 B:21.0 /0.0\n", 2)
        times.append(time.monotonic() - start)
    return times


@pytest.mark.parametrize(
    "latency, low, high",
    [(None, 0.0025, 0.010), ("fixed:20", 0.0425, 0.055), ("ftdi16", 0.010, 0.025)],
)
def test_usb_serial_latency_models(
    latency: Optional[str],
    low: float,
    high: float,
    simboard_factory: Factory,
    testfw_hex: FwBuilder,
) -> None:
    """M105 round trip: 5 + 27 characters on the wire (2.8 ms), plus 2 x 20 ms for a fixed
    20 ms adapter, or up to the 16 ms FTDI latency timer for a reply shorter than 62 bytes."""
    fw = testfw_hex("atmega328p", "LATENCY", size=2048)
    board = simboard_factory("m328p-optiboot", app_hex=fw, latency=latency)
    with board.open_serial() as ser:
        serial_read_until(ser, b"ok crc\n", 10)
        times = sorted(round_trips(ser, 15))
    median = times[len(times) // 2]
    assert low <= median <= high, times


def test_a_corrupted_image_reports_bad_crc(
    simboard_factory: Factory, testfw_hex: FwBuilder, tmp_path: Path
) -> None:
    """The app's self-check is what tells a good flash from a bad one: flip one byte."""
    fw = testfw_hex("atmega328p", "CORRUPT", size=2048)
    data = hex_bytes(fw)
    dump = bytearray(b"\xff" * 32768)
    for addr, b in data.items():
        dump[addr] = b
    dump[1500] ^= 0x01
    image = tmp_path / "corrupt-flash.bin"
    image.write_bytes(bytes(dump[:0x7C00]))
    board = simboard_factory("m328p-optiboot", flash_bin=image)
    assert b"bad crc" in board.read_until(b"crc", 10)


def test_avrdude_at_the_wrong_baud_does_not_sync(
    simboard_factory: Factory, testfw_hex: FwBuilder
) -> None:
    board = simboard_factory("m328p-optiboot")
    fw = testfw_hex("atmega328p", "BAUD", size=2048)
    cmd = avrdude_command(board, fw, extra=FEW_SYNC_ATTEMPTS)
    cmd[cmd.index("-b") + 1] = "57600"

    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)

    assert proc.returncode != 0
    assert "not in sync" in proc.stderr
    assert board.flash_dump()[:2048] == b"\xff" * 2048


def test_without_auto_reset_avrdude_needs_a_manual_reset(
    simboard_factory: Factory, testfw_hex: FwBuilder
) -> None:
    """A board whose DTR is not wired to /RESET (the seed's GPIO UART case): opening the
    port does not start the bootloader; pressing reset as avrdude starts does."""
    board = simboard_factory("m328p-optiboot", auto_reset=False)
    fw = testfw_hex("atmega328p", "NORESET", size=2048)

    failed = run_avrdude(board, fw, extra=FEW_SYNC_ATTEMPTS)
    assert not failed["ok"]
    assert "not in sync" in failed["output"]
    assert "open" not in board.resets()

    cmd = avrdude_command(board, fw)
    mark = board.mark()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        board.wait_for("OPEN", 10, after=mark)  # avrdude opened the port: press reset
        board.reset()
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    assert "2048 bytes of flash verified" in out
    assert board.resets() == ["signal"]


def test_stk500v2_writes_without_erase_when_pages_come_out_of_order(
    simboard_factory: Factory, testfw_hex: FwBuilder, tmp_path: Path
) -> None:
    """Debian's stk500v2 bootloader erases the page at its own counter (0, 256, ...), not the
    page being written: a session that starts at 0x1000 erases page 0 and writes 0x1000 over
    old data. The board's flash model must show exactly that."""
    board = simboard_factory("m2560-stk500v2")
    fw = testfw_hex("atmega2560", "ORDER", size=8192)
    first = run_avrdude(board, fw)
    assert first["ok"], first["output"]
    before = board.flash_dump()

    patch = tmp_path / "page-0x1000.hex"
    record = bytes([16, 0, 0, 0]) + b"\x55" * 16
    lines = []
    for i in range(16):  # one 256-byte page of 0x55 at 0x1000
        rec = bytearray(record)
        rec[1], rec[2] = 0x10 + (i * 16 >> 8), (i * 16) & 0xFF
        lines.append(":" + (bytes(rec) + bytes([-sum(rec) & 0xFF])).hex().upper())
    patch.write_text("\n".join(lines + [":00000001FF"]) + "\n")
    second = run_avrdude(board, patch)

    assert not second["ok"]
    assert "verification mismatch" in second["output"] or "!=" in second["output"]
    assert any("page 0x01000 written without erase" in w for w in board.warnings())
    after = board.flash_dump()
    assert after[:256] == b"\xff" * 256  # page 0 erased by the sequential pointer
    assert after[0x1000:0x1100] == bytes(a & 0x55 for a in before[0x1000:0x1100])
