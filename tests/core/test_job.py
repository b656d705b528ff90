"""The flash job: what happens to the board and the printer connection on every path."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Optional

import pytest

from octoprint_flasher.errors import BusyError
from octoprint_flasher.flasher import (
    CancelToken,
    Flasher,
    FlashResult,
    LogCallback,
    Progress,
    ProgressCallback,
    no_progress,
)
from octoprint_flasher.image.model import FirmwareImage
from octoprint_flasher.job import FlashJob, JobEvent, JobResult, NoHost
from octoprint_flasher.store import Store
from octoprint_flasher.target import Target
from tests.core.fakes import FakeBoard, FakeFlasher, opener_for
from tests.data import make_bad_corpus as corpus

APP = corpus.payload(3000, 42)


class FakeHost:
    def __init__(self, printing: bool = False) -> None:
        self.printing = printing
        self.calls: list[str] = []
        self.fail_reconnect = False
        self.fail_disconnect = False
        self.gate: Optional[threading.Event] = None  # disconnect waits on it

    def is_printing(self) -> bool:
        return self.printing

    def disconnect(self) -> None:
        self.calls.append("disconnect")
        if self.gate is not None:
            assert self.gate.wait(5)
        if self.fail_disconnect:
            raise RuntimeError("printer connection is stuck")

    def reconnect(self) -> None:
        self.calls.append("reconnect")
        if self.fail_reconnect:
            raise RuntimeError("port not found")


class Recorder:
    def __init__(self) -> None:
        self.events: list[JobEvent] = []

    def __call__(self, event: JobEvent) -> None:
        self.events.append(event)

    def states(self) -> list[str]:
        return [e.data["state"] for e in self.events if e.type == "state"]

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e.data for e in self.events if e.type == kind]


def write_hex(path: Path, data: bytes = APP, address: int = 0) -> Path:
    path.write_bytes(corpus.hex_text(corpus.hex_lines(data, address) + [corpus.EOF_RECORD]))
    return path


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "data")


@pytest.fixture
def image_id(store: Store, tmp_path: Path) -> str:
    return store.add_image(write_hex(tmp_path / "upload.tmp"), "Marlin.hex").id


def make_job(
    store: Store, board: FakeBoard, host: Optional[FakeHost] = None, **kw: Any
) -> tuple[FlashJob, FakeHost, Recorder]:
    host = host or FakeHost()
    rec = Recorder()
    return FlashJob(store, host, rec, opener=opener_for(board), **kw), host, rec


TARGET = Target(method="stk500v1", port="/dev/ttyUSB0", mcu="atmega1284p", printer_port=True)


def test_success_writes_verifies_reconnects_and_forgets_the_upload(
    store: Store, image_id: str
) -> None:
    board = FakeBoard()
    job, host, rec = make_job(store, board)
    result = job.run(image_id, TARGET)

    assert result.ok and result.status == "success"
    assert board.content(0, len(APP)) == APP
    assert not board.in_bootloader
    assert host.calls == ["disconnect", "reconnect"] and result.reconnected is True
    assert rec.states() == [
        "preflight",
        "disconnecting",
        "entering_bootloader",
        "erasing",
        "writing",
        "verifying",
        "leaving_bootloader",
        "reconnecting",
        "done",
    ]
    assert board.calls == ["open", "identify", "check", "flash", "leave", "close"]
    assert result.bytes_verified >= len(APP) and result.blocks_written == 12
    assert "fake flasher warning" in result.warnings
    assert result.image_id is None  # removed after success
    assert store.images() == []
    assert rec.of("result")[-1]["status"] == "success"
    assert job.status()["state"] == "done" and not job.running


def test_port_is_released_before_the_printer_reconnects(store: Store, image_id: str) -> None:
    board = FakeBoard()
    seen_at_reconnect: list[list[str]] = []

    class PortCheckingHost(FakeHost):
        def reconnect(self) -> None:
            seen_at_reconnect.append(list(board.calls))
            super().reconnect()

    job, _, _ = make_job(store, board, host=PortCheckingHost())
    assert job.run(image_id, TARGET).ok
    assert seen_at_reconnect and seen_at_reconnect[0][-1] == "close"
    assert board.calls.count("close") == 1


@pytest.mark.parametrize(
    "fault, kind, board_state",
    [
        ("fail_open", "connect", "untouched"),
        ("fail_identify", "connect", "untouched"),
        ("fail_check", "preflight", "untouched"),
    ],
)
def test_failure_before_writing_leaves_board_untouched_and_reconnects(
    store: Store, image_id: str, fault: str, kind: str, board_state: str
) -> None:
    board = FakeBoard()
    setattr(board, fault, True)
    job, host, _ = make_job(store, board)
    result = job.run(image_id, TARGET)

    assert result.status == "failed" and result.error is not None
    assert result.error["kind"] == kind
    assert board.flash == bytearray(b"\xff" * board.flash_size)
    assert "flash" not in board.calls
    assert host.calls == ["disconnect", "reconnect"] and result.reconnected
    assert not result.board_in_bootloader
    if fault != "fail_open":
        assert "leave" in board.calls and board.calls[-1] == "close"
        assert not board.in_bootloader  # sent back to its application
    assert result.image_id == image_id and store.get_image(image_id)


def test_preflight_refusal_over_the_bootloader_touches_nothing(
    store: Store, tmp_path: Path
) -> None:
    # fits the chip (offline check passes) but not below this board's 8 KiB bootloader
    big = store.add_image(write_hex(tmp_path / "big.tmp", bytes(121 * 1024)), "big.hex")
    board = FakeBoard(app_end=120 * 1024, bootloader="ATmegaBOOT 8K")
    job, host, _ = make_job(store, board)
    result = job.run(big.id, TARGET)

    assert result.status == "failed" and result.error and result.error["kind"] == "preflight"
    assert "overlaps the bootloader area 0x0001E000-0x0001FFFF" in result.error["message"]
    assert "flash" not in board.calls and "leave" in board.calls
    assert board.flash == bytearray(b"\xff" * board.flash_size)
    assert host.calls == ["disconnect", "reconnect"]


def test_image_too_big_for_the_chip_is_refused_before_disconnecting(
    store: Store, tmp_path: Path
) -> None:
    big = store.add_image(write_hex(tmp_path / "big.tmp", bytes(127 * 1024 + 10)), "big.hex")
    board = FakeBoard()
    job, host, _ = make_job(store, board)
    result = job.run(big.id, TARGET)
    assert result.status == "failed" and result.error and result.error["kind"] == "preflight"
    assert host.calls == [] and board.calls == []


def test_offline_refusal_happens_before_the_printer_is_disconnected(
    store: Store, tmp_path: Path
) -> None:
    arm = store.add_image(write_hex(tmp_path / "arm.tmp", APP, 0x08008000), "klipper.hex")
    board = FakeBoard()
    job, host, _ = make_job(store, board)
    result = job.run(arm.id, TARGET)

    assert result.status == "failed" and result.error and "STM32" in result.error["message"]
    assert host.calls == [] and board.calls == []
    assert result.reconnected is None


@pytest.mark.parametrize("fault", [{"fail_write_at_block": 3}, {"corrupt_block": 5}])
def test_failure_while_writing_leaves_board_in_bootloader_without_reconnect(
    store: Store, image_id: str, fault: dict[str, int]
) -> None:
    board = FakeBoard(**fault)  # type: ignore[arg-type]
    job, host, rec = make_job(store, board)
    result = job.run(image_id, TARGET)

    assert result.status == "failed"
    assert result.board_in_bootloader and board.in_bootloader
    assert host.calls == ["disconnect"] and result.reconnected is None
    assert "leave" not in board.calls and board.calls[-1] == "close"
    assert result.error and "bootloader" in result.error["hint"]
    assert "flash again" in result.message
    assert result.image_id == image_id  # kept for the retry
    assert rec.states()[-1] == "failed" and "reconnecting" not in rec.states()


def test_retry_after_a_failed_write_succeeds_with_the_kept_image(
    store: Store, image_id: str
) -> None:
    board = FakeBoard(fail_write_at_block=2)
    job, _, _ = make_job(store, board)
    assert job.run(image_id, TARGET).status == "failed"
    board.fail_write_at_block = None
    assert job.run(image_id, TARGET).ok
    assert board.content(0, len(APP)) == APP


def test_cancel_between_blocks(store: Store, image_id: str) -> None:
    board = FakeBoard(cancel_at_block=4)  # the user presses Cancel while block 4 is due
    job, host, _ = make_job(store, board)
    result = job.run(image_id, TARGET)
    assert result.status == "cancelled"
    assert result.error and result.error["kind"] == "cancelled"
    assert result.board_in_bootloader and host.calls == ["disconnect"]
    assert board.content(0, 4 * 256) == APP[: 4 * 256]  # blocks before the cancel were written
    assert board.content(4 * 256, 256) == b"\xff" * 256
    assert job.status()["state"] == "cancelled"


def test_cancel_before_the_board_is_touched_reconnects(store: Store, image_id: str) -> None:
    board = FakeBoard()
    host = FakeHost()
    host.gate = threading.Event()
    job, _, _ = make_job(store, board, host)
    job.start(image_id, TARGET)
    while "disconnect" not in host.calls:
        time.sleep(0.005)
    job.cancel()
    host.gate.set()
    result = job.wait(5)
    assert result is not None and result.status == "cancelled"
    assert board.calls == [] and host.calls == ["disconnect", "reconnect"]
    assert not result.board_in_bootloader


def test_a_second_flash_while_one_runs_is_refused(store: Store, image_id: str) -> None:
    board = FakeBoard()
    host = FakeHost()
    host.gate = threading.Event()
    job, _, _ = make_job(store, board, host)
    job.start(image_id, TARGET)
    assert job.running
    with pytest.raises(BusyError, match="already running"):
        job.start(image_id, TARGET)
    host.gate.set()
    result = job.wait(5)
    assert result is not None and result.ok and not job.running


def test_refused_while_printing(store: Store, image_id: str) -> None:
    board = FakeBoard()
    job, host, _ = make_job(store, board, FakeHost(printing=True))
    with pytest.raises(BusyError, match="printing"):
        job.start(image_id, TARGET)
    assert host.calls == [] and board.calls == [] and not job.running


def test_leave_failure_after_verify_is_still_a_success_with_a_warning(
    store: Store, image_id: str
) -> None:
    board = FakeBoard(fail_leave=True)
    job, host, _ = make_job(store, board)
    result = job.run(image_id, TARGET)
    assert result.ok and any("reset button" in w for w in result.warnings)
    assert host.calls == ["disconnect", "reconnect"]


def test_reconnect_failure_is_reported_not_fatal(store: Store, image_id: str) -> None:
    host = FakeHost()
    host.fail_reconnect = True
    job, _, _ = make_job(store, FakeBoard(), host)
    result = job.run(image_id, TARGET)
    assert result.ok and result.reconnected is False
    assert any("did not reconnect" in w for w in result.warnings)


def test_disconnect_failure_fails_without_touching_anything(store: Store, image_id: str) -> None:
    host = FakeHost()
    host.fail_disconnect = True
    board = FakeBoard()
    job, _, _ = make_job(store, board, host)
    result = job.run(image_id, TARGET)
    assert result.status == "failed" and "Unexpected error" in result.message
    assert board.calls == [] and host.calls == ["disconnect"]


def test_unexpected_exception_in_the_flasher_becomes_a_failed_result(
    store: Store, image_id: str
) -> None:
    board = FakeBoard()

    class Exploding(FakeFlasher):
        def flash(self, *a: Any, **kw: Any) -> Any:
            raise ZeroDivisionError("boom")

    def opener(target: Target, log: Optional[LogCallback] = None) -> Flasher:
        return Exploding(board, log)

    job = FlashJob(store, FakeHost(), Recorder(), opener=opener)
    result = job.run(image_id, TARGET)
    assert result.status == "failed" and "ZeroDivisionError: boom" in result.message
    assert result.board_in_bootloader and not job.running
    assert board.calls[-1] == "close"
    assert any("Traceback" in line for line in job.status()["log"])


def test_history_is_written_and_survives_a_restart(
    store: Store, image_id: str, tmp_path: Path
) -> None:
    board = FakeBoard(fail_write_at_block=1)
    job, _, _ = make_job(store, board)
    job.run(image_id, TARGET)
    board.fail_write_at_block = None
    job.run(image_id, TARGET)

    reopened = Store(tmp_path / "data")
    hist = reopened.history()
    assert [h["result"] for h in hist] == ["success", "failed"]  # newest first
    failed = hist[1]
    assert failed["filename"] == "Marlin.hex" and failed["image_id"] == image_id
    assert failed["error"]["kind"] == "protocol" and failed["method"] == "stk500v1"
    assert failed["sha256"] == hist[0]["sha256"] and failed["size"] == len(APP)
    assert hist[0]["image_id"] is None and hist[0]["duration"] >= 0
    assert failed["target"] == "/dev/ttyUSB0" and failed["chip"] == "ATmega1284P"


def test_backup_is_read_before_writing_and_kept(store: Store, image_id: str) -> None:
    board = FakeBoard()
    old = corpus.payload(1000, 7)
    board.flash[: len(old)] = old
    job, _, rec = make_job(store, board)
    result = job.run(image_id, TARGET, backup=True)

    assert result.ok and result.backup_id
    assert board.calls.index("read") < board.calls.index("flash")
    assert "backing_up" in rec.states()
    backup = store.load_image(result.backup_id)
    assert backup.read(0, len(old)) == old
    assert store.get_image(result.backup_id).backup
    # rolling back to the backup keeps the backup
    assert job.run(result.backup_id, TARGET).ok
    assert board.content(0, len(old)) == old
    assert store.get_image(result.backup_id)


class SlowFlasher(FakeFlasher):
    """Reports 2000 tiny progress steps over ~0.35 s."""

    def flash(
        self,
        image: FirmwareImage,
        progress: ProgressCallback = no_progress,
        cancel: Optional[CancelToken] = None,
        quick: bool = False,
    ) -> FlashResult:
        for i in range(1, 2001):
            progress(Progress("writing", i, 2000))
            if i % 100 == 0:
                time.sleep(0.0175)
        for i in range(1, 11):
            progress(Progress("verifying", i * 200, 2000))
        return FlashResult(2000, 2000, 2000)


def test_progress_is_throttled_but_each_stage_ends_at_100_percent(
    store: Store, image_id: str
) -> None:
    board = FakeBoard()

    def opener(target: Target, log: Optional[LogCallback] = None) -> Flasher:
        return SlowFlasher(board, log)

    rec = Recorder()
    job = FlashJob(store, FakeHost(), rec, opener=opener, progress_interval=0.1)
    t0 = time.monotonic()
    assert job.run(image_id, TARGET).ok
    elapsed = time.monotonic() - t0
    writing = [p for p in rec.of("progress") if p["stage"] == "writing"]
    assert 2 <= len(writing) <= elapsed * 10 + 2
    assert writing[-1]["done"] == 2000 and writing[-1]["percent"] == 100.0
    assert writing[-1]["rate"] > 0
    mid = writing[len(writing) // 2]
    assert mid["eta"] is not None and mid["eta"] >= 0
    verifying = [p for p in rec.of("progress") if p["stage"] == "verifying"]
    assert verifying[-1]["done"] == 2000
    assert job.status()["progress"]["stage"] == "verifying"


def test_a_broken_listener_does_not_break_the_flash(store: Store, image_id: str) -> None:
    def listener(event: JobEvent) -> None:
        raise RuntimeError("websocket closed")

    job = FlashJob(store, NoHost(), listener, opener=opener_for(FakeBoard()))
    assert job.run(image_id, TARGET).ok


def test_bin_without_address_goes_to_the_target_address(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "k.bin"
    src.write_bytes(APP)
    stored = store.add_image(src, "klipper.bin")
    board = FakeBoard(
        chip="STM32F446",
        flash_start=0x08000000,
        flash_size=512 * 1024,
        app_start=0x08008000,
        app_end=0x08080000,
        method="dfu",
    )
    job, _, _ = make_job(store, board)
    result = job.run(stored.id, Target(method="dfu", usb="0483:df11"))
    assert result.ok
    assert board.content(0x08008000, len(APP)) == APP


def test_status_reports_image_target_and_log(store: Store, image_id: str) -> None:
    job, _, _ = make_job(store, FakeBoard())
    result: JobResult = job.run(image_id, TARGET)
    st = job.status()
    assert st["image"]["filename"] == "Marlin.hex" and st["target"] == "/dev/ttyUSB0"
    assert st["result"]["status"] == result.status and len(st["log"]) <= 200
    assert any("Found ATmega1284P" in line for line in st["log"])


def test_status_and_events_are_json_even_with_odd_flasher_details(
    store: Store, image_id: str
) -> None:
    import json

    board = FakeBoard()
    orig = board.info

    def info() -> Any:
        t = orig()
        t.details = {"signature": b"\x1e\x97\x05", "obj": object(), "sizes": (1, 2)}
        return t

    board.info = info  # type: ignore[method-assign]
    job, _, rec = make_job(store, board)
    assert job.run(image_id, TARGET).ok
    doc = json.loads(json.dumps(job.status()))
    assert doc["result"]["target_info"]["details"]["signature"] == "1e9705"
    json.dumps([e.data for e in rec.events])


# -- issue 10: who is touched, and where the board is left -----------------------------------


def test_flashing_another_board_leaves_the_printer_connected(store: Store, image_id: str) -> None:
    board = FakeBoard()
    job, host, _ = make_job(store, board)
    other = Target(method="stk500v1", port="/dev/ttyACM1", mcu="atmega1284p")
    result = job.run(image_id, other)
    assert result.ok and host.calls == [] and result.reconnected is None


def test_an_image_refused_by_its_own_checks_touches_neither_printer_nor_board(
    store: Store, tmp_path: Path
) -> None:
    arm = store.add_image(write_hex(tmp_path / "arm.tmp", APP, 0x08008000), "klipper.hex")
    board = FakeBoard()
    job, host, _ = make_job(store, board)
    result = job.run(arm.id, TARGET)
    assert result.status == "failed" and result.board_state == "untouched"
    assert host.calls == [] and board.calls == []
    assert "no board was touched" in result.message


def test_a_board_found_in_its_bootloader_stays_there_after_a_refusal(
    store: Store, image_id: str
) -> None:
    board = FakeBoard(found_in_bootloader=True, fail_check=True)
    job, _, _ = make_job(store, board)
    result = job.run(image_id, TARGET)
    assert result.status == "failed" and result.board_state == "bootloader"
    assert "leave" not in board.calls and board.in_bootloader
    assert "still waiting in its bootloader" in result.message
    assert result.reconnected is None  # a printer host would reset or confuse the bootloader


def test_a_board_entered_from_its_application_is_sent_home_after_a_refusal(
    store: Store, image_id: str
) -> None:
    board = FakeBoard(fail_check=True)
    job, host, _ = make_job(store, board)
    result = job.run(image_id, TARGET)
    assert result.board_state == "application" and "leave" in board.calls
    assert "sent back to its application" in result.message
    assert host.calls == ["disconnect", "reconnect"]


def test_a_failed_second_pass_after_a_verified_firmware_keeps_the_printer(
    store: Store, image_id: str
) -> None:
    """Prusa's languages: pass 2 fails after pass 1 wrote and verified the firmware. The board
    runs the new firmware (in English), so it is not "left in its bootloader", and the printer
    is reconnected."""
    from octoprint_flasher.errors import FlashError

    class SecondPassFails(FakeFlasher):
        def flash(
            self, image: Any, progress: Any = None, cancel: Any = None, quick: bool = False
        ) -> FlashResult:
            firmware = super().flash(image, progress or (lambda p: None), cancel, quick)
            self.board.in_bootloader = False
            err = FlashError("The languages were NOT installed.", hint="Flash again.")
            err.firmware = firmware  # type: ignore[attr-defined]
            raise err

    board = FakeBoard()
    host = FakeHost()
    job = FlashJob(store, host, Recorder(), opener=lambda t, log: SecondPassFails(board, log))
    result = job.run(image_id, TARGET)
    assert result.status == "failed" and result.board_state == "application"
    assert result.bytes_verified > 0 and "languages were NOT installed" in result.message
    assert host.calls == ["disconnect", "reconnect"] and "leave" not in board.calls


def test_a_failed_upload_through_the_running_firmware_reconnects_the_printer(
    store: Store, image_id: str
) -> None:
    """marlin-sd writes through the printer's own firmware until it resets the board: a failed
    upload leaves the old firmware running, not a bootloader, so the printer comes back."""
    from octoprint_flasher.errors import ProtocolError

    class UploadFails(FakeFlasher):
        def flash(
            self, image: Any, progress: Any = None, cancel: Any = None, quick: bool = False
        ) -> FlashResult:
            self.application_runs = True
            self.board.in_bootloader = False
            raise ProtocolError("The printer stopped answering during the upload.")

    board = FakeBoard()
    host = FakeHost()
    job = FlashJob(store, host, Recorder(), opener=lambda t, log: UploadFails(board, log))
    result = job.run(image_id, TARGET)
    assert result.status == "failed" and result.board_state == "application"
    assert "still runs its old firmware" in result.message
    assert host.calls == ["disconnect", "reconnect"] and result.reconnected is True
