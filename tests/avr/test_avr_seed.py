"""The seed report (Anet A8, ATmega1284P): avrdude inside OctoPrint only said "timeout
communicating with programmer". Each of its real causes must get a message that names the
cause and the fix, before anything is written. Plus the CLI end to end on an emulated board."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
from intelhex import IntelHex

from octoprint_flasher.errors import ConnectError
from octoprint_flasher.flashers import avr_auto, stk500v1, stk500v2
from octoprint_flasher.image.model import image_from_bytes
from octoprint_flasher.target import Target
from tests.emulators.stk500_board import Stk500Board

REPO = Path(__file__).resolve().parents[2]


def payload(n: int, seed: int = 7) -> bytes:
    return bytes(random.Random(seed).randrange(256) for _ in range(n))


@pytest.fixture
def anet_57600() -> Iterator[Stk500Board]:
    """An Anet A8 with optiboot built for 57600 (one of the two stock variants)."""
    b = Stk500Board("optiboot", "m1284p", 57600)
    yield b
    b.close()


def test_port_held_by_octoprint_is_named_before_any_byte_is_sent(
    anet_57600: Stk500Board,
) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys,time; f=open(sys.argv[1],'rb'); time.sleep(30)",
            anet_57600.port,
            "octoprint",
            "serve",
        ],
    )
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not _holds(holder.pid, anet_57600.port):
            time.sleep(0.02)
        with pytest.raises(ConnectError) as err:
            stk500v1.open_flasher(Target(method="stk500v1", port=anet_57600.port, baud=57600))
    finally:
        holder.kill()
        holder.wait()
    assert "in use by OctoPrint" in err.value.message
    assert f"pid {holder.pid}" in err.value.message
    assert "Disconnect" in err.value.hint
    assert anet_57600.stats.rx == 0  # not one byte was sent


def _holds(pid: int, port: str) -> bool:
    try:
        return any(
            os.readlink(f"/proc/{pid}/fd/{fd}") == port for fd in os.listdir(f"/proc/{pid}/fd")
        )
    except OSError:
        return False


def test_forced_wrong_baud_names_the_baud_the_bootloader_answers_at(
    anet_57600: Stk500Board,
) -> None:
    f = stk500v1.open_flasher(Target(method="stk500v1", port=anet_57600.port, baud=115200))
    try:
        with pytest.raises(ConnectError) as err:
            f.identify()
    finally:
        f.close()
    assert "No answer at 115200 baud" in err.value.message
    assert "answered at 57600 baud" in err.value.message
    assert "--baud 57600" in err.value.hint
    assert anet_57600.flash[:0x1E000] == b"\xff" * 0x1E000


def test_auto_finds_the_57600_bootloader_and_flashes(anet_57600: Stk500Board) -> None:
    f = avr_auto.open_flasher(Target(method="auto", port=anet_57600.port))
    try:
        info = f.identify()
        f.flash(image_from_bytes(payload(3000), 0))
        f.leave()
    finally:
        f.close()
    assert (info.chip, info.details["baud"]) == ("ATmega1284P", 57600)
    assert anet_57600.flash[:3000] == payload(3000)


def test_board_without_auto_reset_asks_for_the_reset_button() -> None:
    with Stk500Board("optiboot", "m1284p", 115200, auto_reset=False) as b:
        f = stk500v1.open_flasher(Target(method="stk500v1", port=b.port))
        try:
            with pytest.raises(ConnectError) as err:
                f.identify()
        finally:
            f.close()
        assert "reset button" in err.value.hint

        prompts: list[str] = []

        def press(text: str) -> None:
            prompts.append(text)
            b.press_reset()  # the user does as asked

        f = stk500v1.open_flasher(Target(method="stk500v1", port=b.port, options={"prompt": press}))
        try:
            f.identify()
            f.flash(image_from_bytes(payload(1000), 0))
        finally:
            f.close()
        assert prompts and "Press the board's reset button now" in prompts[0]
        assert b.flash[:1000] == payload(1000)


@pytest.mark.parametrize(
    "kind,mcu,wrong,right",
    [("stk500v2", "m2560", stk500v1, "STK500v2"), ("optiboot", "m1284p", stk500v2, "STK500v1")],
)
def test_wrong_protocol_says_which_protocol_answered(
    kind: str, mcu: str, wrong: object, right: str
) -> None:
    with Stk500Board(kind, mcu) as b:
        method = wrong.__name__.rsplit(".", 1)[1]  # type: ignore[attr-defined]
        f = wrong.open_flasher(Target(method=method, port=b.port))  # type: ignore[attr-defined]
        try:
            with pytest.raises(ConnectError) as err:
                f.identify()
        finally:
            f.close()
        assert f"an {right} bootloader" in err.value.message
        assert "--method" in err.value.hint


# --- the CLI, end to end -------------------------------------------------------------------


def run_cli(*args: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "octoprint_flasher", "--data-dir", str(tmp / "data"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )


def write_hex(path: Path, data: bytes) -> None:
    ih = IntelHex()
    ih.frombytes(data, 0)
    ih.write_hex_file(str(path))


@pytest.mark.parametrize(
    "kind,mcu,extra",
    [
        ("optiboot", "m1284p", []),
        ("optiboot", "m328p", ["--method", "stk500v1", "--baud", "115200"]),
        ("stk500v2", "m2560", ["--method", "stk500v2"]),
    ],
)
def test_cli_flash_and_read_back(tmp_path: Path, kind: str, mcu: str, extra: list[str]) -> None:
    data = payload(2500)
    fw = tmp_path / "fw.hex"
    write_hex(fw, data)
    with Stk500Board(kind, mcu) as b:
        done = run_cli("flash", str(fw), "--port", b.port, *extra, tmp=tmp_path)
        assert done.returncode == 0, done.stderr + done.stdout
        assert b.flash[:2500] == data
        back = tmp_path / "backup.hex"
        done = run_cli("read", "--port", b.port, "--out", str(back), *extra, tmp=tmp_path)
        assert done.returncode == 0, done.stderr + done.stdout
    ih = IntelHex(str(back))
    assert bytes(ih.tobinarray(start=0, size=2500)) == data
