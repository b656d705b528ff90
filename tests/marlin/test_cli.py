"""The command line against the emulated printer: flash, the reset prompt, refusals, rescue."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import serial

from octoprint_flasher.cli import main
from tests.emulators.marlin_printer import make_marlin_bin

from .conftest import MakePrinter

NEW = "Marlin 2.1.2.7 (Dec  7 2026 10:11:12)"


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out, err)
    return code, out.getvalue(), err.getvalue()


def test_flash_firmware_bin_over_the_printer_port(
    make_printer: MakePrinter, tmp_path: Path
) -> None:
    printer = make_printer(family="btt", transport="usb")
    firmware = tmp_path / "firmware.bin"
    firmware.write_bytes(make_marlin_bin(NEW, size=16 * 1024, seed=4))
    code, out, err = run_cli(
        "--data-dir", str(tmp_path / "home"),
        "flash", str(firmware), "--method", "marlin-sd", "--port", printer.port,
    )  # fmt: skip
    assert code == 0, err
    assert printer.firmware_name == NEW
    assert printer.file("/FIRMWARE.CUR") == firmware.read_bytes()
    # nothing was read back, so nothing may be called verified: the firmware's report is named
    assert out.startswith("Firmware updated. Confirmed: the board reports the new build"), out
    assert "cannot be read back" in out and "bytes verified" not in out


def test_cli_prompts_for_the_reset_button_when_the_firmware_has_no_m997(
    make_printer: MakePrinter, tmp_path: Path
) -> None:
    printer = make_printer(family="creality", machine="Ender-3 V2", m997=False)
    firmware = tmp_path / "firmware.bin"
    firmware.write_bytes(make_marlin_bin(NEW, size=8 * 1024, seed=4))
    done = threading.Event()

    def press_when_asked() -> None:  # the user reads the prompt, then presses the button
        if printer.wait_for(lambda: "M997" in printer.stats.unknown_commands, 20):
            printer.press_reset()
        done.set()

    threading.Thread(target=press_when_asked, daemon=True).start()
    code, _out, err = run_cli(
        "--data-dir", str(tmp_path / "home"),
        "flash", str(firmware), "--method", "marlin-sd", "--port", printer.port,
    )  # fmt: skip
    done.wait(5)
    assert code == 0, err
    assert ">>> Press the printer board's reset button now" in err
    assert printer.firmware_name == NEW
    # Creality names are remembered in the data directory for the next flash
    assert (tmp_path / "home" / "marlin-sd-names.json").exists()


def test_hex_file_is_refused_before_the_printer_is_touched(
    make_printer: MakePrinter, tmp_path: Path
) -> None:
    printer = make_printer()
    firmware = tmp_path / "firmware.hex"
    firmware.write_text(":0400000000200020BC\n:00000001FF\n")
    code, _out, err = run_cli(
        "--data-dir", str(tmp_path / "home"),
        "flash", str(firmware), "--method", "marlin-sd", "--port", printer.port,
    )  # fmt: skip
    assert code != 0 and "only a .bin" in err
    assert printer.card.files == {} and printer.stats.resets == 0


def test_rescue_bft_brings_a_stuck_printer_back_to_g_code(make_printer: MakePrinter) -> None:
    printer = make_printer()
    ser = serial.Serial(printer.port, 115200, timeout=0.1)
    ser.write(b"M28 B1\n")
    assert printer.wait_for(lambda: printer.binary, 1.0)
    ser.close()
    code, out, _err = run_cli("rescue-bft", "--port", printer.port)
    assert code == 0 and "stuck in binary mode" in out and not printer.binary
