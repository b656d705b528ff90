"""The command line against the emulated Einsy and MMU: a MULTILANG flash writes both memories,
a wrong file is refused before the board is reset, the MMU flashes through avr109."""

from __future__ import annotations

import io
from pathlib import Path

from octoprint_flasher.cli import main
from tests.emulators.caterina_board import CaterinaBoard
from tests.emulators.prusa_einsy import PrusaEinsy
from tests.prusa import samples


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out, err)
    return code, out.getvalue(), err.getvalue()


def test_multilang_through_the_cli(tmp_path: Path) -> None:
    fw, langs = samples.firmware(9000), samples.languages()
    path = tmp_path / "MK3S_MK3S+_FW_3.13.3_MULTILANG.hex"
    path.write_bytes(samples.multilang(fw, langs))
    with PrusaEinsy(time_scale=0.1) as b:
        code, out, err = run_cli(
            "--data-dir", str(tmp_path), "flash", "--method", "prusa", "--port", b.port, str(path)
        )
        assert code == 0, out + err
        assert bytes(b.flash[: len(fw)]) == fw and bytes(b.xflash.data[: len(langs)]) == langs
    assert "writing_languages" in err and "verifying_languages" in err


def test_mmu_file_for_the_printer_is_refused_before_the_reset(tmp_path: Path) -> None:
    path = tmp_path / "MMU2S_MMU3_FW3.0.3.hex"
    path.write_bytes(samples.device_file("mm-control", samples.mmu_app()))
    with PrusaEinsy(time_scale=0.1) as b:
        code, out, err = run_cli(
            "--data-dir", str(tmp_path), "flash", "--method", "prusa", "--port", b.port, str(path)
        )
        assert code != 0 and "not printer firmware" in out + err
        assert b.stats.resets == 0  # the port was never opened


def test_mmu_through_the_cli(tmp_path: Path) -> None:
    app = samples.mmu_app()
    path = tmp_path / "MMU2S_MMU3_FW3.0.3.hex"
    path.write_bytes(samples.device_file("mm-control", app))
    with CaterinaBoard(mode="bootloader", time_scale=0.1) as b:
        assert b.port is not None
        code, out, err = run_cli(
            "--data-dir", str(tmp_path), "flash", "--method", "avr109", "--port", b.port, str(path)
        )
        assert code == 0, out + err
        assert bytes(b.flash[: len(app)]) == app
