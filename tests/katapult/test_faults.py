"""Fault matrix: every injected fault ends in a verified flash or a clear error, and the board
never starts an application that was not verified (0 silent corruptions)."""

from __future__ import annotations

from typing import Any, Callable

import pytest

from octoprint_flasher import methods
from octoprint_flasher.errors import ConnectError, FlashError
from tests.emulators.katapult_node import EmulatedBoard, Faults, UsbWorld
from tests.emulators.klipper_firmware import make_klipper_bin

from .conftest import as_bin, can_target, serial_target
from .test_flash_can import wait_until

MakeBoard = Callable[..., EmulatedBoard]
SIZE = 4096  # 64 blocks: SEND_BLOCK = 10 frames, so frame 1 is CONNECT, 2..641 the writes

CASES: list[tuple[str, dict[str, Any], str]] = [
    # a lost one-frame command leaves nothing partial behind: the resend works
    ("drop-in-connect", {"drop_in": {1}}, "ok"),
    ("drop-in-get-id", {"drop_in": {2}}, "ok"),
    # losing part of a multi-frame command wedges Katapult's parser: the error must say so
    ("drop-in-mid-block", {"drop_in": {45}}, "fail:wedged"),
    ("drop-in-first-frame-of-block", {"drop_in": {43}}, "fail:wedged"),
    ("corrupt-in-mid-block", {"corrupt_in": {100}}, "fail:wedged"),
    # node->host losses are recovered by resending (writes are idempotent)
    ("drop-out-connect-ack", {"drop_out": {3}}, "ok"),
    ("drop-out-block-ack", {"drop_out": {30}}, "ok"),
    ("corrupt-out-block-ack", {"corrupt_out": {31}}, "ok"),
    ("corrupt-out-verify-data", {"corrupt_out": {200}}, "ok"),
    ("delay-out-past-timeout", {"delay_out": {40: 0.4}}, "ok"),
    ("many-out-losses", {"drop_out": {10, 50, 90, 130, 170}}, "ok"),
    # the node reboots mid-write: the flasher reconnects and writes again
    ("reset-mid-write", {"reset_at_in": {300}}, "ok"),
    ("reset-during-verify", {"reset_at_in": {660}}, "ok"),
    ("bus-off-mid-write", {"bus_off_at_in": {200}}, "any"),
]


def check_outcome(board: EmulatedBoard, data: bytes, run: Callable[[], None], expect: str) -> str:
    try:
        run()
        outcome = "ok"
    except FlashError as exc:
        outcome = "fail"
        error = exc
    if outcome == "ok":
        # success is only ever reported after the data is really there
        assert board.app_bytes(len(data)) == data
        assert wait_until(lambda: board.mode == "klipper")
    else:
        # a failure never starts the (unverified) application
        assert "reboot -> app" not in board.events
        assert "COMPLETE was not sent" in error.hint or isinstance(error, ConnectError)
    if expect == "ok":
        assert outcome == "ok", board.faults.fired
    elif expect.startswith("fail"):
        assert outcome == "fail", board.faults.fired
        if expect == "fail:wedged":
            assert "parser" in error.cause and "reset" in error.hint.lower()
    return outcome


@pytest.mark.parametrize(("name", "faults", "expect"), CASES, ids=[c[0] for c in CASES])
def test_can_fault(
    make_board: MakeBoard, world: UsbWorld, name: str, faults: dict[str, Any], expect: str
) -> None:
    board = make_board(firmware="katapult", faults=Faults(**faults)).start()
    data = make_klipper_bin(size=SIZE, seed=hash(name) & 0xFFFF)

    def run() -> None:
        flasher = methods.open_flasher(can_target(board, world, confirm_seconds=0.3))
        try:
            flasher.flash(as_bin(data))
            flasher.leave()
        finally:
            flasher.close()

    check_outcome(board, data, run, expect)
    assert board.faults.fired, "the fault never fired: the case tests nothing"


def test_fixed_parser_recovers_from_a_lost_frame(make_board: MakeBoard, world: UsbWorld) -> None:
    """Against a parser that skips a byte after an error (not Katapult's), the same loss is
    recovered by the retry: the failure above is the firmware's, not the host's."""
    board = make_board(firmware="katapult", faithful=False, faults=Faults(drop_in={45})).start()
    data = make_klipper_bin(size=SIZE)
    flasher = methods.open_flasher(can_target(board, world))
    flasher.flash(as_bin(data))
    flasher.close()
    assert board.app_bytes(SIZE) == data and "parser stalled" not in board.events


def test_faithful_parser_stalls_on_a_lost_frame(make_board: MakeBoard, world: UsbWorld) -> None:
    board = make_board(firmware="katapult", faults=Faults(drop_in={45})).start()
    flasher = methods.open_flasher(can_target(board, world))
    with pytest.raises(ConnectError, match="still on the bus"):
        flasher.flash(as_bin(make_klipper_bin(size=SIZE)))
    flasher.leave()
    flasher.close()
    assert "parser stalled" in board.events and board.mode == "katapult"


SERIAL_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("uart-corrupt-in", {"corrupt_in": {20}}, "fail"),
    ("uart-drop-out", {"drop_out": {12}}, "ok"),
    ("uart-corrupt-out", {"corrupt_out": {12}}, "ok"),
]


@pytest.mark.parametrize(
    ("name", "faults", "expect"), SERIAL_CASES, ids=[c[0] for c in SERIAL_CASES]
)
def test_uart_fault(
    make_board: MakeBoard, world: UsbWorld, name: str, faults: dict[str, Any], expect: str
) -> None:
    board = make_board(interface="uart", firmware="katapult", faults=Faults(**faults)).start()
    assert board.port is not None
    data = make_klipper_bin(size=SIZE, canbus_frequency=None, serial_baud=250000)

    def run() -> None:
        flasher = methods.open_flasher(serial_target(board.port or "", world))
        try:
            flasher.flash(as_bin(data))
            flasher.leave()
        finally:
            flasher.close()

    check_outcome(board, data, run, expect)
    assert board.faults.fired


def random_faults(seed: int) -> dict[str, Any]:
    import random

    rng = random.Random(seed)
    kinds = ["drop_in", "corrupt_in", "drop_out", "corrupt_out", "delay_out", "reset_at_in"]
    chosen: dict[str, Any] = {}
    for kind in rng.sample(kinds, rng.randint(1, 3)):
        n = rng.randint(1, 700)
        chosen[kind] = {n: 0.4} if kind == "delay_out" else {n}
    return chosen


@pytest.mark.parametrize("seed", range(12))
def test_random_fault_mix_never_corrupts_silently(
    make_board: MakeBoard, world: UsbWorld, seed: int
) -> None:
    """Seeded random combinations: the only allowed outcomes are a verified flash or an
    error that leaves the application unstarted."""
    board = make_board(firmware="katapult", faults=Faults(**random_faults(seed))).start()
    data = make_klipper_bin(size=SIZE, seed=seed)

    def run() -> None:
        flasher = methods.open_flasher(can_target(board, world, confirm_seconds=0.3))
        try:
            flasher.flash(as_bin(data))
            flasher.leave()
        finally:
            flasher.close()

    check_outcome(board, data, run, "any")
