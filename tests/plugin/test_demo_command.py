"""The README's first command, as a newcomer runs it (minus the bootstrap, which the test
command has already done): the demo starts OctoPrint with the simulated boards and stops."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.e2e
@pytest.mark.realtime  # the demo takes the real-time lock itself for its simulated printer
def test_demo_starts_octoprint_with_the_boards_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    run = subprocess.run(
        [
            sys.executable,
            str(REPO / "demo" / "run_demo.py"),
            "--check",
            "--port",
            str(port),
            "--data",
            str(tmp_path / "demo-data"),
            "--port-link",
            str(tmp_path / "ttyFLASHER0"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    assert f"http://127.0.0.1:{port}" in out
    assert "password:" in out
    for sample in (
        "printer-demo2-atmega1284p.hex",
        "klipper-stm32f446-dfu.bin",
        "klipper-stm32g0b1-katapult.bin",
        "wrong-chip-atmega2560.hex",
    ):
        assert (tmp_path / "demo-data" / "samples" / sample).is_file(), sample
    assert "== stopping" in out
