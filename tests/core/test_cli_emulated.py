"""The CLI through the real method registry, auto-detection and STK500 protocol code,
against the pure-Python optiboot emulator (timing model off: fast, not real time)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from octoprint_flasher import cli
from octoprint_flasher.image import load as loaders

stk500_board = pytest.importorskip("tests.emulators.stk500_board")

MARLIN = Path(__file__).resolve().parent.parent / "data" / "marlin_like_116932.hex"


def run(argv: list[str], home: Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    return cli.main(["--data-dir", str(home), *argv], out, err), out.getvalue(), err.getvalue()


def test_flash_then_read_back_a_marlin_sized_image(tmp_path: Path) -> None:
    expected = loaders.load(MARLIN).to_bytes()
    with stk500_board.Stk500Board("optiboot", "m1284p", 115200) as board:
        code, out, err = run(
            ["flash", str(MARLIN), "--port", board.port, "--mcu", "m1284p"], tmp_path
        )
        assert code == 0, err
        assert "optiboot" in err and "verified" in out
        assert board.app_bytes(len(expected)) == expected

        backup = tmp_path / "readback.hex"
        code, out, err = run(["read", "--port", board.port, "--out", str(backup)], tmp_path)
        assert code == 0, err
        assert loaders.load(backup).read(0, len(expected)) == expected


def test_wrong_chip_is_refused_before_writing(tmp_path: Path) -> None:
    with stk500_board.Stk500Board("optiboot", "m1284p", 115200) as board:
        before = bytes(board.flash)
        code, _, err = run(
            [
                "flash",
                str(MARLIN),
                "--port",
                board.port,
                "--method",
                "stk500v1",
                "--mcu",
                "atmega2560",
            ],
            tmp_path,
        )
        assert code == cli.EXIT_REFUSED, err
        assert "ATmega1284P" in err and bytes(board.flash) == before
