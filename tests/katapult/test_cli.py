"""The command line against emulated CAN nodes: in-process (python-can's virtual interface is
per process) and in a child process through the bus-factory environment hook."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

from octoprint_flasher.cli import main
from tests.emulators.katapult_node import EmulatedBoard
from tests.emulators.klipper_firmware import make_klipper_bin

MakeBoard = Callable[..., EmulatedBoard]
REPO = Path(__file__).resolve().parents[2]


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out, err)
    return code, out.getvalue(), err.getvalue()


def test_detect_can_lists_nodes(make_board: MakeBoard) -> None:
    board = make_board(firmware="katapult").start()
    code, out, _err = run_cli(
        "detect", "--can", "--can-interface", "virtual", "--can-channel", board.channel, "--json"
    )
    assert code == 0
    devices = [d for d in json.loads(out)["devices"] if d["kind"] == "can"]
    assert [(d["uuid"], d["details"]["app"]) for d in devices] == [(board.uuid_text, "Katapult")]


def test_flash_over_can_from_klipper(make_board: MakeBoard, tmp_path: Path) -> None:
    board = make_board(firmware="klipper")
    board.install_app(make_klipper_bin(seed=2))
    board.start()
    data = make_klipper_bin(size=8192, seed=3)
    firmware = tmp_path / "klipper.bin"
    firmware.write_bytes(data)
    code, out, err = run_cli(
        "--data-dir", str(tmp_path / "home"),
        "flash", str(firmware),
        "--method", "katapult",
        "--can-interface", "virtual",
        "--can-channel", board.channel,
        "--uuid", board.uuid_text,
    )  # fmt: skip
    assert code == 0, err
    assert "8192 bytes verified" in out
    assert board.app_bytes(8192) == data and board.mode == "klipper"


def test_canboot_bin_is_refused_with_exit_code_4(make_board: MakeBoard, tmp_path: Path) -> None:
    from tests.emulators.klipper_firmware import make_katapult_bin

    board = make_board(firmware="katapult").start()
    firmware = tmp_path / "canboot.bin"
    firmware.write_bytes(make_katapult_bin())
    code, _out, err = run_cli(
        "--data-dir", str(tmp_path / "home"),
        "flash", str(firmware),
        "--method", "katapult",
        "--can-interface", "virtual",
        "--can-channel", board.channel,
        "--uuid", board.uuid_text,
    )  # fmt: skip
    assert code == 4, err
    # the protocol's specific story, not only the generic "outside the application area"
    assert "is the Katapult bootloader itself" in err
    assert board.flash.programs == 0 and board.mode in ("katapult", "rebooting", "app", "bootloop")


def test_read_backup(make_board: MakeBoard, tmp_path: Path) -> None:
    board = make_board(firmware="katapult", time_scale=0.0).start()
    data = make_klipper_bin(size=4096)
    board.install_app(data)
    backup = tmp_path / "backup.bin"
    code, _out, err = run_cli(
        "read", "--method", "katapult", "--can-interface", "virtual",
        "--can-channel", board.channel, "--uuid", board.uuid_text, "--out", str(backup),
    )  # fmt: skip
    assert code == 0, err
    content = backup.read_bytes()
    assert len(content) == 512 * 1024 - 8 * 1024 and content[:4096] == data


def test_child_process_reaches_the_demo_node_through_the_env_hook(tmp_path: Path) -> None:
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO),
        OCTOPRINT_FLASHER_CAN_BUS_FACTORY="tests.emulators.katapult_node:demo_bus",
        OCTOPRINT_FLASHER_DEMO_TIME_SCALE="0.05",
    )
    firmware = tmp_path / "klipper.bin"
    firmware.write_bytes(make_klipper_bin(size=4096, seed=21))
    script = (
        "import sys, json\n"
        "from octoprint_flasher.cli import main\n"
        "from tests.emulators import katapult_node as kn\n"
        "assert main(['detect', '--can', '--json']) == 0\n"
        "uuid = next(iter(kn._DEMO.values())).uuid_text\n"
        f"code = main(['--data-dir', {str(tmp_path)!r}, 'flash', {str(firmware)!r},"
        " '--method', 'katapult', '--uuid', uuid])\n"
        "board = next(iter(kn._DEMO.values()))\n"
        f"ok = board.app_bytes(4096) == open({str(firmware)!r}, 'rb').read()\n"
        "print('RESULT', code, ok)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert "RESULT 0 True" in proc.stdout, proc.stderr
    detected = json.loads(proc.stdout.splitlines()[0])
    assert any(d["kind"] == "can" and d["details"]["app"] == "Klipper" for d in detected["devices"])


# -- issue 10: refuse before touching, leave the node where it was found ---------------------


def _flash(board: EmulatedBoard, firmware: Path, home: Path) -> tuple[int, str, str]:
    return run_cli(
        "--data-dir", str(home),
        "flash", str(firmware),
        "--method", "katapult",
        "--can-interface", "virtual",
        "--can-channel", board.channel,
        "--uuid", board.uuid_text,
    )  # fmt: skip


def test_canboot_bin_for_a_node_running_klipper_is_refused_before_the_node_is_rebooted(
    make_board: MakeBoard, tmp_path: Path
) -> None:
    """Seed 001: the file alone says it is the bootloader, so Klipper keeps running (a
    printer's klippy would shut down if its toolhead rebooted)."""
    from tests.emulators.klipper_firmware import make_katapult_bin

    board = make_board(firmware="klipper")
    board.install_app(make_klipper_bin(seed=2))
    board.start()
    firmware = tmp_path / "canboot.bin"
    firmware.write_bytes(make_katapult_bin())
    code, _out, err = _flash(board, firmware, tmp_path / "home")
    assert code == 4, err
    assert "is the Katapult bootloader itself" in err and "Nothing was sent to the board" in err
    assert board.mode == "klipper" and not any("reboot" in e for e in board.events)
    assert board.flash.programs == 0


def test_a_node_found_in_katapult_without_an_application_stays_there_after_a_refusal(
    make_board: MakeBoard, tmp_path: Path
) -> None:
    """The seed board after canboot.bin went in through DFU: Katapult with an empty application
    area. A refused file must not send COMPLETE (it would jump into blank flash); the right file
    then flashes with nothing restarted."""
    board = make_board(firmware="katapult").start()
    wrong = tmp_path / "klipper-32k.bin"
    wrong.write_bytes(make_klipper_bin(linked_at=0x08008000, size=8192))
    code, _out, err = _flash(board, wrong, tmp_path / "home")
    assert code == 4, err
    assert "linked for 0x08008000" in err and "still waiting in its bootloader" in err
    assert board.mode == "katapult" and not any("reboot" in e for e in board.events)
    right = tmp_path / "klipper.bin"
    data = make_klipper_bin(size=8192, seed=5)
    right.write_bytes(data)
    code, out, err = _flash(board, right, tmp_path / "home")
    assert code == 0, err
    assert board.app_bytes(8192) == data and board.mode == "klipper"
    assert "Klipper answers on the CAN bus" in out


def test_a_node_entered_from_klipper_is_sent_home_after_a_board_check_refusal(
    make_board: MakeBoard, tmp_path: Path
) -> None:
    board = make_board(firmware="klipper")
    board.install_app(make_klipper_bin(seed=2))
    board.start()
    wrong = tmp_path / "klipper-for-f446.bin"
    wrong.write_bytes(make_klipper_bin(linked_at=0x08008000, size=8192))
    code, _out, err = _flash(board, wrong, tmp_path / "home")
    assert code == 4, err
    assert "sent back to its application" in err
    assert "reboot -> app" in board.events and board.flash.programs == 0
