"""One flash, start to finish, for any front end: the FlashJob state machine.

idle -> preflight -> disconnecting -> entering_bootloader -> (backing_up) -> erasing ->
writing -> verifying -> leaving_bootloader -> reconnecting -> done | failed | cancelled

The order is the safety argument, in two kinds of checks:

* *Image checks* need no board (file format, where the image is linked, the vector table, the
  embedded Klipper dictionary, the chip the user named): they run before the printer is
  disconnected or any board is entered, so a wrong file changes nothing anywhere.
* *Board checks* (fits the layout, overlaps the bootloader by the board's actual content, chip
  signature) run after ``identify()``, before anything is written.

Where the board was found decides where it is left. A board the flasher rebooted out of a
running application (``Flasher.entered_from_app``) is sent home after a refusal; a board found
waiting in its bootloader stays there, so the next Flash works without touching it. Once
writing has begun, a failure leaves the board in its bootloader -- starting a half-written
application is worse. The printer is disconnected only when the board is the printer's
(``Target.printer_port``), and reconnected unless the board was left in its bootloader
(connecting a printer host to a bootloader resets or confuses it). The transport is always
closed.

No OctoPrint imports: the host is reached through :class:`HostHooks`, events go to a listener.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
import traceback
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Deque, Optional, Protocol

from . import methods, preflight
from .errors import BusyError, CancelledError, FlashError
from .flasher import (
    NOT_CONFIRMED,
    STAGE_ENTERING,
    STAGE_ERASING,
    STAGE_LEAVING,
    STAGE_READING,
    STAGE_VERIFYING,
    STAGE_WRITING,
    VERIFIED_FIRMWARE_REPORT,
    CancelToken,
    Flasher,
    FlashResult,
    LogCallback,
    Progress,
    TargetInfo,
)
from .image import cortex_m
from .image.model import FirmwareImage
from .store import Store, StoredImage
from .target import Target

_LOG = logging.getLogger(__name__)

STATE_IDLE = "idle"
STATE_PREFLIGHT = "preflight"
STATE_DISCONNECTING = "disconnecting"
STATE_ENTERING = STAGE_ENTERING
STATE_BACKING_UP = "backing_up"
STATE_LEAVING = STAGE_LEAVING
STATE_RECONNECTING = "reconnecting"
STATE_DONE = "done"
STATE_FAILED = "failed"
STATE_CANCELLED = "cancelled"
FINAL_STATES = (STATE_DONE, STATE_FAILED, STATE_CANCELLED)
FLASH_STAGES = (STAGE_ERASING, STAGE_WRITING, STAGE_VERIFYING)

RESULT_SUCCESS = "success"
RESULT_UNCONFIRMED = "unconfirmed"  # written, but the path could neither read back nor confirm
RESULT_FAILED = "failed"
RESULT_CANCELLED = "cancelled"

#: where the job left the board (JobResult.board_state)
BOARD_UNTOUCHED = "untouched"  # refused before any board was talked to
BOARD_APPLICATION = "application"  # running its (old or new) firmware
BOARD_BOOTLOADER = "bootloader"  # waiting in its bootloader for the next Flash

LOG_LINES = 200

IN_BOOTLOADER_HINT = (
    "The board is in its bootloader; flash again (the file is kept) or reset/power-cycle it."
)
FOUND_IN_BOOTLOADER = (
    "The board is still waiting in its bootloader, as it was found: choose the right file and "
    "press Flash."
)
SENT_HOME = "Nothing was written; the board was sent back to its application."
UNTOUCHED = "Nothing was written and no board was touched."


class HostHooks(Protocol):
    """What the job needs from its front end (OctoPrint, or nothing for the CLI)."""

    def is_printing(self) -> bool: ...

    def disconnect(self) -> None:
        """Release the printer's serial port."""

    def reconnect(self) -> None:
        """Reconnect the printer (the plugin: same port, baud and profile id)."""


class NoHost:
    """The CLI's host: nothing is printing, nothing to disconnect."""

    def is_printing(self) -> bool:
        return False

    def disconnect(self) -> None:
        pass

    def reconnect(self) -> None:
        pass


@dataclass
class JobEvent:
    type: str  # "state" | "progress" | "log" | "result"
    data: dict[str, Any]


JobListener = Callable[[JobEvent], None]
Opener = Callable[[Target, Optional[LogCallback]], Flasher]


@dataclass
class JobResult:
    """How a job ended. ``status`` is success only after the flasher's verified flash."""

    status: str  # success | unconfirmed | failed | cancelled
    message: str
    error: Optional[dict[str, Any]] = None
    board_in_bootloader: bool = False
    board_state: str = BOARD_UNTOUCHED
    board_message: str = ""
    verified_by: str = ""
    confirmation: str = ""
    reconnected: Optional[bool] = None  # None: not attempted
    duration: float = 0.0
    bytes_written: int = 0
    bytes_verified: int = 0
    blocks_written: int = 0
    blocks_skipped: int = 0
    warnings: list[str] = field(default_factory=list)
    image_id: Optional[str] = None
    backup_id: Optional[str] = None
    target_info: Optional[dict[str, Any]] = None
    job_id: str = ""

    @property
    def ok(self) -> bool:
        return self.status == RESULT_SUCCESS

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        return d


class _Throttle:
    """Progress events at most every ``interval`` s, but always a stage's first and last."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.stage = ""
        self.stage_started = 0.0
        self.last_emit = 0.0

    def start(self, stage: str, now: float) -> None:
        self.stage = stage
        self.stage_started = now
        self.last_emit = 0.0

    def due(self, p: Progress, now: float) -> bool:
        if p.done >= p.total or self.last_emit == 0.0:
            return True
        return now - self.last_emit >= self.interval


class FlashJob:
    """Runs one flash at a time in a worker thread (or synchronously with :meth:`run`)."""

    def __init__(
        self,
        store: Store,
        host: HostHooks,
        listener: JobListener,
        opener: Opener = methods.open_flasher,
        progress_interval: float = 0.1,
    ) -> None:
        self.store = store
        self.host = host
        self.listener = listener
        self.opener = opener
        self.progress_interval = progress_interval
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._running = False
        self._cancel = CancelToken()
        self._done = threading.Event()
        self._done.set()
        self._state = STATE_IDLE
        self._stage = ""
        self._progress: dict[str, Any] = _empty_progress()
        self._log: Deque[str] = deque(maxlen=LOG_LINES)
        self._log_lock = threading.Lock()
        self._result: Optional[JobResult] = None
        self._image_summary: Optional[dict[str, Any]] = None
        self._target_desc = ""
        self._throttle = _Throttle(progress_interval)

    # --- public API --------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._running

    def start(self, image_id: str, target: Target, *, backup: bool = False) -> None:
        """Begin a flash in a worker thread. BusyError if one runs or the printer prints."""
        self._begin(image_id, target)
        self._thread = threading.Thread(
            target=self._worker, args=(image_id, target, backup), name="flasher-job", daemon=True
        )
        self._thread.start()

    def run(self, image_id: str, target: Target, *, backup: bool = False) -> JobResult:
        """The same flash, in the calling thread (the CLI)."""
        self._begin(image_id, target)
        self._worker(image_id, target, backup)
        assert self._result is not None
        return self._result

    def cancel(self) -> None:
        """Stop at the next block boundary (or before the next step)."""
        if self._running:
            self._cancel.cancel()
            self._emit_log("Cancel requested; stopping at the next block boundary.")

    def wait(self, timeout: Optional[float] = None) -> Optional[JobResult]:
        """The result once the job ends (None on timeout or if none ever ran)."""
        if not self._done.wait(timeout):
            return None
        return self._result

    def status(self) -> dict[str, Any]:
        return {
            "state": self._state,
            "stage": self._stage,
            "progress": dict(self._progress),
            "log": self._log_snapshot(),
            "result": self._result.to_dict() if self._result else None,
            "image": self._image_summary,
            "target": self._target_desc,
            "running": self._running,
        }

    # --- the job -----------------------------------------------------------------------

    def _begin(self, image_id: str, target: Target) -> None:
        with self._lock:
            if self._running:
                raise BusyError(
                    "A flash is already running.",
                    hint="Wait for it to finish or cancel it first.",
                )
            if self.host.is_printing():
                raise _printing_error()
            self._running = True
            self._done.clear()
        self._cancel = CancelToken()
        self._result = None
        with self._log_lock:
            self._log.clear()
        self._progress = _empty_progress()
        self._stage = ""
        self._image_summary = None
        self._target_desc = target.describe()
        self._emit_log(f"Flash job for image {image_id} on {self._target_desc}")

    def _worker(self, image_id: str, target: Target, backup: bool) -> None:
        try:
            result = self._execute(image_id, target, backup)
        except Exception as exc:  # never leave a stuck job, whatever happened
            _LOG.exception("flash job crashed")
            result = JobResult(
                RESULT_FAILED,
                f"Internal error: {type(exc).__name__}: {exc}",
                error=_internal_error(exc).to_dict(),
                image_id=image_id,
            )
        except BaseException:  # KeyboardInterrupt/SystemExit: end the job, then let it go
            self._finish(
                JobResult(
                    RESULT_FAILED,
                    "Interrupted. If the board is in its bootloader, flash again or reset it.",
                    error=FlashError(
                        "Interrupted.", hint="Flash again, or reset the board."
                    ).to_dict(),
                    image_id=image_id,
                )
            )
            raise
        self._finish(result)

    def _execute(self, image_id: str, target: Target, backup: bool) -> JobResult:
        t0 = time.monotonic()
        ctx = _Run(job_id=secrets.token_hex(6), image_id=image_id, target=target)
        try:
            self._set_state(STATE_PREFLIGHT)
            ctx.stored = self.store.get_image(image_id)
            image = self.store.load_image(image_id)
            # image checks: no board is touched and the printer stays connected
            image = cortex_m.place(image, target.address)
            target = ctx.target = methods.resolve_method(target, image)
            ctx.image = image
            self._image_summary = dict(image.summary(), id=image_id)
            method = None if target.method == "auto" else target.method
            offline = preflight.check_offline(image, target.mcu, method)
            for w in offline.warnings:
                self._warn(ctx, w)
            preflight.raise_for(offline)
            for w in methods.check_image(target, image):
                self._warn(ctx, w)
            self._cancel.check()
            if self.host.is_printing():
                raise _printing_error()

            if target.printer_port:
                self._set_state(STATE_DISCONNECTING)
                self.host.disconnect()
                ctx.disconnected = True
                self._cancel.check()

            # board checks: identify must not change what the board runs unless it must
            self._set_state(STATE_ENTERING)
            ctx.flasher = self.opener(target, self._emit_log)
            info = ctx.flasher.identify()
            ctx.info = info
            self._emit_log(f"Found {info.describe()}")
            # The protocol's own check first: it knows the specific story, where the generic
            # check can only say "outside the application area".
            for w in ctx.flasher.check(image, info):
                self._warn(ctx, w)
            report = preflight.check(
                image, info, mcu=target.mcu, allow_bootloader_erase=target.allow_bootloader_erase
            )
            for w in report.warnings:
                self._warn(ctx, w)
            preflight.raise_for(report)
            self._cancel.check()

            if backup:
                self._set_state(STATE_BACKING_UP)
                read_back = ctx.flasher.read(self._on_progress, self._cancel)
                ctx.backup_id = self.store.add_backup(read_back, info.describe()).id
                self._emit_log(f"Backup saved as image {ctx.backup_id}")
                self._cancel.check()

            ctx.writing = True
            result = ctx.flasher.flash(
                image, self._on_progress, self._cancel, quick=bool(target.quick)
            )
            ctx.flash_result = result
            ctx.writing = False
            self._emit_log(
                f"Wrote {result.bytes_written} bytes in {result.blocks_written} blocks "
                f"({result.blocks_skipped} unchanged), verified {result.bytes_verified} bytes."
            )
            if result.confirmation:
                self._emit_log(result.confirmation)
            self._leave(ctx)
            return self._conclude(ctx, None, t0)
        except FlashError as exc:
            firmware = getattr(exc, "firmware", None)
            if isinstance(firmware, FlashResult):
                # a second pass failed (e.g. Prusa's languages) after the firmware itself was
                # written and verified: the board runs the new firmware
                ctx.flash_result = firmware
                ctx.writing = False
                ctx.firmware_runs = True
            return self._conclude(ctx, exc, t0)
        except Exception as exc:
            _LOG.exception("unexpected error during flash")
            self._emit_log(traceback.format_exc().rstrip())
            return self._conclude(ctx, _internal_error(exc), t0)
        finally:
            self._close(ctx)

    def _close(self, ctx: _Run) -> None:
        """Close the flasher once; closing must never mask the real outcome."""
        if ctx.flasher is None or ctx.closed:
            return
        ctx.closed = True
        try:
            ctx.flasher.close()
        except Exception as exc:
            self._emit_log(f"Closing the connection failed: {exc}")

    def _leave(self, ctx: _Run) -> None:
        self._set_state(STATE_LEAVING)
        assert ctx.flasher is not None
        try:
            came_back = ctx.flasher.leave()
            if came_back:
                ctx.came_back = came_back
                self._emit_log(came_back)
        except Exception as exc:
            self._warn(
                ctx,
                f"The firmware is written and verified, but the board did not leave its "
                f"bootloader ({exc}); press its reset button.",
            )

    def _board_after_error(self, ctx: _Run) -> tuple[str, str]:
        """Where the board stays after a refusal, a cancel or a failure, and why."""
        if ctx.firmware_runs:
            return BOARD_APPLICATION, "The new firmware is written, verified and running."
        if ctx.flasher is not None and ctx.flasher.application_runs:
            return BOARD_APPLICATION, "The board still runs its old firmware; nothing was flashed."
        if ctx.writing:
            return BOARD_BOOTLOADER, IN_BOOTLOADER_HINT
        if ctx.flasher is None:
            return BOARD_UNTOUCHED, UNTOUCHED
        if ctx.info is None and not ctx.flasher.entered_from_app:
            return BOARD_UNTOUCHED, "Nothing was written."
        if not ctx.flasher.entered_from_app:
            # found in its bootloader (ROM DFU by BOOT0, Katapult without a valid application):
            # starting it would jump into a blank or unverified application area
            return BOARD_BOOTLOADER, FOUND_IN_BOOTLOADER
        try:
            self._set_state(STATE_LEAVING)
            ctx.flasher.leave()
        except Exception as exc:
            self._emit_log(f"Could not return the board to its application: {exc}")
            return BOARD_BOOTLOADER, IN_BOOTLOADER_HINT
        return BOARD_APPLICATION, SENT_HOME

    def _conclude(self, ctx: _Run, error: Optional[FlashError], t0: float) -> JobResult:
        """Decide where the board stays and whether to reconnect, record history, build the
        result."""
        fr = ctx.flash_result
        if error is None:
            board_state, board_message = BOARD_APPLICATION, ctx.came_back
        else:
            board_state, board_message = self._board_after_error(ctx)
        in_bootloader = board_state == BOARD_BOOTLOADER
        if error is not None and not ctx.writing:
            self._emit_log(board_message)
        # Release the port before the host reopens it: a printer connection to a port we
        # still hold would sit in "Opening serial connection" until it times out.
        self._close(ctx)
        reconnected: Optional[bool] = None
        if ctx.disconnected and not in_bootloader:
            self._set_state(STATE_RECONNECTING)
            try:
                self.host.reconnect()
                reconnected = True
            except Exception as exc:
                reconnected = False
                reason = str(exc).rstrip(". ")
                self._warn(ctx, f"The printer did not reconnect: {reason}. Connect it manually.")
        elif in_bootloader and ctx.disconnected:
            self._emit_log("Not reconnecting the printer: the board is in its bootloader.")

        if error is None and fr is not None and fr.verified_by == NOT_CONFIRMED:
            status = RESULT_UNCONFIRMED
            why = _without_prefix(fr.confirmation, "Not confirmed:")
            message = "Firmware written, but NOT confirmed" + (f": {why}" if why else ".")
        elif error is None and fr is not None and fr.verified_by == VERIFIED_FIRMWARE_REPORT:
            # the headline; how it was confirmed is in `confirmation`, which front ends show
            status, message = RESULT_SUCCESS, "Firmware updated."
        elif error is None:
            status, message = RESULT_SUCCESS, "Firmware written and verified by reading it back."
            if ctx.came_back:
                message += " " + ctx.came_back
        elif isinstance(error, CancelledError):
            status, message = RESULT_CANCELLED, error.message
        else:
            status, message = RESULT_FAILED, error.message
        err_dict = error.to_dict() if error else None
        if error is not None and err_dict is not None and board_message:
            err_dict["hint"] = (err_dict["hint"] + " " if err_dict["hint"] else "") + board_message
            message = f"{message} {board_message}"
        if error is not None:
            self._emit_log(f"{status.upper()}: {error}")

        image_kept = True
        if status == RESULT_SUCCESS and ctx.stored is not None and not ctx.stored.backup:
            try:
                self.store.remove_image(ctx.image_id)
                image_kept = False
            except OSError as exc:  # the flash succeeded; a stale upload is only clutter
                self._emit_log(f"Could not remove the uploaded file: {exc}")
        result = JobResult(
            status=status,
            message=message,
            error=err_dict,
            board_in_bootloader=in_bootloader,
            board_state=board_state,
            board_message=board_message,
            verified_by=fr.verified_by if fr and error is None else "",
            confirmation=(fr.confirmation if fr and fr.confirmation else ctx.came_back)
            if error is None
            else "",
            reconnected=reconnected,
            duration=round(time.monotonic() - t0, 3),
            bytes_written=fr.bytes_written if fr else 0,
            bytes_verified=fr.bytes_verified if fr else 0,
            blocks_written=fr.blocks_written if fr else 0,
            blocks_skipped=fr.blocks_skipped if fr else 0,
            warnings=list(ctx.warnings),
            image_id=ctx.image_id if image_kept and ctx.stored is not None else None,
            backup_id=ctx.backup_id,
            target_info=_info_dict(ctx.info),
            job_id=ctx.job_id,
        )
        self._record_history(ctx, result)
        return result

    def _record_history(self, ctx: _Run, result: JobResult) -> None:
        stored = ctx.stored
        method = ctx.target.method
        if ctx.info is not None and ctx.info.method:
            method = ctx.info.method
        elif ctx.flasher is not None and ctx.flasher.method:
            method = ctx.flasher.method
        record = {
            "time": time.time(),
            "id": ctx.job_id,
            "filename": stored.filename if stored else "",
            "sha256": stored.sha256 if stored else "",
            "size": stored.size if stored else 0,
            "target": ctx.target.describe(),
            "chip": ctx.info.chip if ctx.info else None,
            "method": method,
            "duration": result.duration,
            "result": result.status,
            "error": result.error,
            "image_id": result.image_id,
            "backup_id": result.backup_id,
            "board_in_bootloader": result.board_in_bootloader,
            "board_state": result.board_state,
            "verified_by": result.verified_by,
            "confirmation": result.confirmation,
        }
        try:
            self.store.append_history(record)
        except OSError as exc:
            result.warnings.append(f"Could not write the flash history: {exc}")

    def _finish(self, result: JobResult) -> None:
        self._result = result
        final = {
            RESULT_SUCCESS: STATE_DONE,
            RESULT_UNCONFIRMED: STATE_DONE,
            RESULT_FAILED: STATE_FAILED,
            RESULT_CANCELLED: STATE_CANCELLED,
        }[result.status]
        self._set_state(final)
        self._emit(JobEvent("result", result.to_dict()))
        with self._lock:
            self._running = False
            self._done.set()

    # --- events ------------------------------------------------------------------------

    def _emit(self, event: JobEvent) -> None:
        try:
            self.listener(event)
        except Exception:  # a broken front end must not break the flash
            _LOG.exception("job listener failed")

    def _emit_log(self, line: str) -> None:
        for part in str(line).splitlines() or [""]:
            with self._log_lock:
                self._log.append(part)
            self._emit(JobEvent("log", {"line": part}))

    def _log_snapshot(self) -> list[str]:
        with self._log_lock:  # status() runs in front-end threads while the worker logs
            return list(self._log)

    def _warn(self, ctx: _Run, text: str) -> None:
        ctx.warnings.append(text)
        self._emit_log(f"Warning: {text}")

    def _set_state(self, state: str) -> None:
        if state == self._state and state not in FINAL_STATES:
            return
        self._state = state
        if state in FLASH_STAGES or state == STATE_BACKING_UP:
            self._stage = state
        elif state not in FINAL_STATES:  # a final state keeps the stage it ended in
            self._stage = ""
        self._emit(JobEvent("state", {"state": state, "stage": self._stage}))

    def _on_progress(self, p: Progress) -> None:
        now = time.monotonic()
        if p.stage != self._throttle.stage:
            if p.stage in FLASH_STAGES:
                self._set_state(p.stage)
            elif p.stage == STAGE_READING and self._state != STATE_BACKING_UP:
                self._set_state(STATE_BACKING_UP)
            self._stage = p.stage
            self._throttle.start(p.stage, now)
        elapsed = now - self._throttle.stage_started
        rate = p.done / elapsed if elapsed > 0 and p.done > 0 else 0.0
        eta = (p.total - p.done) / rate if rate > 0 else None
        self._progress = {
            "stage": p.stage,
            "done": p.done,
            "total": p.total,
            "percent": round(100.0 * p.done / p.total, 1) if p.total else 0.0,
            "rate": round(rate, 1),
            "eta": round(eta, 1) if eta is not None else None,
        }
        if self._throttle.due(p, now):
            self._throttle.last_emit = now
            self._emit(JobEvent("progress", dict(self._progress)))


@dataclass
class _Run:
    """What one execution has done so far; decides cleanup."""

    job_id: str
    image_id: str
    target: Target
    stored: Optional[StoredImage] = None
    image: Optional[FirmwareImage] = None
    flasher: Optional[Flasher] = None
    closed: bool = False
    info: Optional[TargetInfo] = None
    disconnected: bool = False
    writing: bool = False  # flash() was entered: a failure now leaves the board in its bootloader
    came_back: str = ""  # how the application was seen to come back after leave()
    firmware_runs: bool = False  # the main image is verified and running despite the error
    flash_result: Optional[FlashResult] = None
    backup_id: Optional[str] = None
    warnings: list[str] = field(default_factory=list)


def _empty_progress() -> dict[str, Any]:
    return {"stage": "", "done": 0, "total": 0, "percent": 0.0, "rate": 0.0, "eta": None}


def _without_prefix(text: str, prefix: str) -> str:
    text = text.strip()
    return text[len(prefix) :].strip() if text.startswith(prefix) else text


def _printing_error() -> BusyError:
    return BusyError(
        "The printer is printing.",
        cause="Flashing would stop the print half way.",
        hint="Wait for the print to finish (or cancel it), then flash.",
    )


def _internal_error(exc: BaseException) -> FlashError:
    return FlashError(
        f"Unexpected error: {type(exc).__name__}: {exc}",
        cause="An internal error in the flasher (a bug), or an unusual system problem.",
        hint="Check the log; if the board is in its bootloader, flash again or reset it. "
        "Please report this with the log.",
    )


def _info_dict(info: Optional[TargetInfo]) -> Optional[dict[str, Any]]:
    if info is None:
        return None
    d = asdict(info)
    d["description"] = info.describe()
    safe: dict[str, Any] = _json_safe(d)
    return safe


def _json_safe(value: Any) -> Any:
    """Flashers may put bytes or objects in ``details``; events and history must be JSON."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).hex()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)
