"""The emulators against avrdude, the third-party peer: avrdude -c avr109 flashes the Caterina
emulator and avrdude -c wiring the Einsy emulator (with a USB chip that passes ';' intact;
through the defect avrdude fails after about a minute of retries, which the naive-writer test
in test_prusa_einsy.py pins faster). avrdude is part of the test bed (bootstrap installs it):
a missing one fails the tests instead of skipping them."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.emulators.caterina_board import CaterinaBoard
from tests.emulators.prusa_einsy import PrusaEinsy
from tests.prusa import samples

AVRDUDE = shutil.which("avrdude")


def avrdude(part: str, programmer: str, port: str, baud: int, hexfile: Path) -> int:
    assert AVRDUDE is not None, "avrdude is missing: run the bootstrap (apt install avrdude)"
    cmd = [str(AVRDUDE), "-p", part, "-c", programmer, "-P", port, "-b", str(baud), "-D"]
    cmd += ["-U", f"flash:w:{hexfile}:i"]
    return subprocess.run(cmd, capture_output=True, timeout=60).returncode


def test_avrdude_avr109_flashes_the_caterina_emulator(tmp_path: Path) -> None:
    app = samples.mmu_app(6000)
    path = tmp_path / "mmu.hex"
    path.write_bytes(samples.ihex(app))
    with CaterinaBoard(mode="bootloader", time_scale=0.1) as b:
        assert b.port is not None
        assert avrdude("m32u4", "avr109", b.port, 57600, path) == 0
        assert bytes(b.flash[: len(app)]) == app


def test_avrdude_wiring_flashes_the_einsy(tmp_path: Path) -> None:
    fw = samples.firmware(3000)
    path = tmp_path / "fw.hex"
    path.write_bytes(samples.ihex(fw))
    with PrusaEinsy(semicolon_defect=False, time_scale=0.1) as b:
        assert avrdude("m2560", "wiring", b.port, 115200, path) == 0
        assert bytes(b.flash[: len(fw)]) == fw
