"""The command line, run in-process: what a user sees and which exit code a script gets."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from octoprint_flasher import cli, methods
from octoprint_flasher.errors import UnsupportedError
from octoprint_flasher.image import load as loaders
from tests.core.fakes import FakeBoard, opener_for
from tests.data import make_bad_corpus as corpus

DATA = Path(__file__).resolve().parent.parent / "data"
MARLIN = DATA / "marlin_like_116932.hex"
DFU = DATA / "two_elements.dfu"
REPO = Path(__file__).resolve().parent.parent.parent


def run(argv: list[str], home: Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(["--data-dir", str(home), *argv], out, err)
    return code, out.getvalue(), err.getvalue()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_info_on_the_marlin_sized_hex(tmp_path: Path) -> None:
    code, out, _ = run(["info", str(MARLIN), "--mcu", "m1284p"], tmp_path)
    assert code == 0
    assert "Intel HEX" in out and sha(MARLIN) in out
    assert "Range:    0x00000000-0x0001C8C3" in out and "116932 bytes in 1 segment" in out
    assert "Checks (ATmega1284P): OK" in out


def test_info_on_the_dfuse_file(tmp_path: Path) -> None:
    code, out, _ = run(["info", str(DFU)], tmp_path)
    assert code == 0 and "DfuSe" in out and sha(DFU) in out
    assert "0x08008000-0x08008BB7  3000 bytes" in out
    assert "0x08020000-0x080203E7  1000 bytes" in out
    assert "Range:    0x08008000-0x080203E7" in out


def test_info_json_parses_and_carries_the_checks(tmp_path: Path) -> None:
    code, out, _ = run(["info", str(MARLIN), "--json", "--mcu", "atmega328p"], tmp_path)
    doc = json.loads(out)
    assert code == cli.EXIT_REFUSED and doc["ok"] is False
    assert doc["image"]["sha256"] == sha(MARLIN) and doc["image"]["end"] == 116932
    assert "too big" in doc["preflight"]["errors"][0]["message"].lower()


def test_info_on_a_bad_file_names_it_and_exits_4(tmp_path: Path) -> None:
    code, _, err = run(["info", str(DATA / "bad" / "bad_checksum.hex")], tmp_path)
    assert code == cli.EXIT_REFUSED
    assert "line 3" in err and "What to do:" in err


def test_flash_with_an_unavailable_method_exits_nonzero_with_not_available(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(methods.FLASHER_MODULES, "stk500v1", ".flashers.not_built_yet")
    code, _, err = run(
        ["flash", str(MARLIN), "--port", "/dev/ttyFAKE", "--method", "stk500v1"], tmp_path
    )
    assert code == cli.EXIT_UNSUPPORTED
    assert "not available" in err


def test_full_flash_through_a_fake_board_exits_0_and_shows_progress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    board = FakeBoard()
    monkeypatch.setattr(methods, "open_flasher", opener_for(board))
    code, out, err = run(
        ["flash", str(MARLIN), "--port", "/dev/ttyFAKE", "--mcu", "m1284p"], tmp_path
    )
    assert code == 0, err
    assert "Firmware written and verified by reading it back. 116992 bytes verified in" in out
    assert "writing" in err and "100.0%" in err
    assert board.content(0, 116932) == loaders.load(MARLIN).to_bytes()
    # the CLI keeps history but not the uploaded copy
    code, out, _ = run(["history", "--json"], tmp_path)
    hist = json.loads(out)["history"]
    assert hist[0]["result"] == "success" and hist[0]["sha256"] == sha(MARLIN)
    assert not list((tmp_path / "images").iterdir())


def test_flash_json_emits_one_event_per_line_and_a_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(methods, "open_flasher", opener_for(FakeBoard()))
    code, out, _ = run(["flash", str(MARLIN), "--port", "/dev/ttyFAKE", "--json"], tmp_path)
    events = [json.loads(line) for line in out.splitlines()]
    assert code == 0
    assert {e["type"] for e in events} >= {"state", "progress", "log", "result"}
    assert events[-1]["type"] == "result" and events[-1]["status"] == "success"
    assert any(e["type"] == "progress" and e["percent"] == 100.0 for e in events)


def test_a_failed_flash_exits_1_with_message_cause_and_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(methods, "open_flasher", opener_for(FakeBoard(corrupt_block=3)))
    code, _, err = run(["flash", str(MARLIN), "--port", "/dev/ttyFAKE"], tmp_path)
    assert code == cli.EXIT_FAILED
    assert "Error: Verify failed" in err and "What to do:" in err and "bootloader" in err


def test_a_refused_image_exits_4_before_opening_the_board(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    board = FakeBoard()
    monkeypatch.setattr(methods, "open_flasher", opener_for(board))
    code, _, err = run(
        ["flash", str(DFU), "--port", "/dev/ttyFAKE", "--method", "stk500v1"], tmp_path
    )
    assert code == cli.EXIT_REFUSED and "STM32" in err and board.calls == []


def test_backup_and_read_write_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    board = FakeBoard()
    old = corpus.payload(4096, 99)
    board.flash[: len(old)] = old
    monkeypatch.setattr(methods, "open_flasher", opener_for(board))
    backup = tmp_path / "old.hex"
    code, _, err = run(
        ["flash", str(MARLIN), "--port", "/dev/ttyFAKE", "--backup", str(backup)], tmp_path
    )
    assert code == 0, err
    assert loaders.load(backup).read(0, len(old)) == old

    out_bin = tmp_path / "now.bin"
    code, out, err = run(["read", "--port", "/dev/ttyFAKE", "--out", str(out_bin)], tmp_path)
    assert code == 0, err
    assert out_bin.read_bytes()[:116932] == loaders.load(MARLIN).to_bytes()
    assert "Read 130048 bytes" in out and board.calls[-2:] == ["leave", "close"]


def test_bad_arguments_exit_2(tmp_path: Path) -> None:
    code, _, _ = run(["flash", str(MARLIN), "--usb", "not-an-id"], tmp_path)
    assert code == cli.EXIT_USAGE


def test_target_from_flags() -> None:
    args = cli.build_parser().parse_args(
        [
            "flash",
            "fw.bin",
            "--usb",
            "0483:DF11",
            "--address",
            "0x08008000",
            "--quick",
            "--uuid",
            "4220D6E9E9F9",
            "--can-channel",
            "can1",
            "--allow-bootloader-erase",
        ]
    )
    t = cli.target_from_args(args)
    assert (t.usb, t.address, t.quick, t.uuid, t.can_channel) == (
        "0483:df11",
        0x08008000,
        True,
        "4220d6e9e9f9",
        "can1",
    )
    assert t.allow_bootloader_erase and t.method == "auto"


def test_detect_json_lists_extra_ports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from octoprint_flasher import discovery

    monkeypatch.setattr(discovery, "_pyserial_ports", lambda: [])
    monkeypatch.setattr(discovery, "_provider", lambda module, func: None)
    pty = tmp_path / "ttyFLASHER0"
    pty.touch()
    code, out, _ = run(["detect", "--json", "--extra-port", str(tmp_path / "ttyFLASH*")], tmp_path)
    doc = json.loads(out)
    assert code == 0 and [d["port"] for d in doc["devices"]] == [str(pty)]


def test_python_dash_m_runs_the_same_cli(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "octoprint_flasher", "info", str(MARLIN), "--json"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["image"]["sha256"] == sha(MARLIN)


def test_unsupported_error_maps_to_exit_3() -> None:
    assert cli.exit_code_for(UnsupportedError("x").to_dict()) == cli.EXIT_UNSUPPORTED


def test_info_refuses_data_at_an_address_that_is_flash_on_no_chip(tmp_path: Path) -> None:
    """A record at 0x40000000 (peripherals) cannot be written to any board, target or not."""
    peripheral = tmp_path / "ram.hex"
    peripheral.write_text(":020000044000BA\n:04000000DEADBEEFC4\n:00000001FF\n")
    code, out, err = run(["info", str(peripheral)], tmp_path)
    assert code == 4
    assert "0x40000000-0x40000003, which is program flash on no supported chip" in out + err


def test_info_shows_where_a_bin_will_really_be_written(tmp_path: Path) -> None:
    code, out, _err = run(["info", str(DATA / "small_stm32.bin")], tmp_path)
    assert code == 0
    assert "Range:    0x08008000-0x080087FF" in out and "vector table was linked for" in out
