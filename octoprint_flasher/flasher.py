"""The small interface every protocol's flasher implements, and the types it reports with.

Modelled on esptool's loaders: a flasher owns one open transport, identifies the chip, writes,
verifies by reading back, and leaves the bootloader. It reports :class:`Progress` through a
callback and checks a cancel flag between blocks (never inside one). It knows nothing of
OctoPrint and starts no threads.
"""

from __future__ import annotations

import abc
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .errors import CancelledError
from .image.model import FirmwareImage

# Stage names shared by flashers, the job and the front ends.
STAGE_ENTERING = "entering_bootloader"
STAGE_ERASING = "erasing"
STAGE_WRITING = "writing"
STAGE_VERIFYING = "verifying"
STAGE_READING = "reading"
STAGE_LEAVING = "leaving_bootloader"


@dataclass(frozen=True)
class Progress:
    """Bytes done of total within one stage."""

    stage: str
    done: int
    total: int


ProgressCallback = Callable[[Progress], None]
LogCallback = Callable[[str], None]


def no_progress(_progress: Progress) -> None:
    """Progress sink for callers that do not display progress."""


def no_log(_line: str) -> None:
    """Log sink for callers that do not keep a log."""


class CancelToken:
    """A thread-safe cancel flag; flashers call :meth:`check` between blocks."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise CancelledError(
                "Flash cancelled.",
                cause="You pressed Cancel.",
                hint="The board stays in its bootloader; flash again to finish.",
            )


@dataclass
class TargetInfo:
    """What a bootloader told us about the board, in protocol-neutral terms.

    ``app_start``/``app_end`` bound the region the application may occupy (end exclusive):
    everything outside it belongs to a bootloader or does not exist.
    """

    method: str
    chip: str
    flash_start: int
    flash_size: int
    app_start: int
    app_end: int
    page_size: int
    bootloader: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        return (
            f"{self.chip} via {self.bootloader or self.method}: application area "
            f"0x{self.app_start:08X}-0x{self.app_end - 1:08X}"
        )


#: how a flash was confirmed (FlashResult.verified_by)
VERIFIED_READ_BACK = "read-back"
VERIFIED_FIRMWARE_REPORT = "firmware-report"
NOT_CONFIRMED = "not-confirmed"


@dataclass
class FlashResult:
    """What a completed flash did.

    ``verified_by`` says how the flash was confirmed: by reading the flash back (the normal
    case), by the new firmware's own report where a path cannot read back (an SD-card
    bootloader), or not at all; ``confirmation`` says it in one sentence for the user.
    """

    bytes_written: int
    bytes_verified: int
    blocks_written: int
    blocks_skipped: int = 0
    seconds: float = 0.0
    verified_by: str = VERIFIED_READ_BACK
    confirmation: str = ""


class Flasher(abc.ABC):
    """One protocol's whole-flash algorithm over an already-opened transport."""

    #: method name used on the CLI, in settings and in history ("stk500v1", "dfu", ...)
    method: str = ""
    #: whether :meth:`read` is implemented for this protocol
    can_read: bool = True
    #: set by :meth:`identify` when it rebooted a running application into the bootloader
    #: (a board found waiting in its bootloader is left there after a refusal or failure)
    entered_from_app: bool = False
    #: True while a failure would still leave the board running its (old) application: a method
    #: that writes through the running firmware (an SD-card upload) until it resets the board
    application_runs: bool = False

    def __init__(self, log: Optional[LogCallback] = None) -> None:
        self.log: LogCallback = log or no_log

    @abc.abstractmethod
    def identify(self) -> TargetInfo:
        """Enter the bootloader if needed, talk to it and describe the chip.

        Everything the image alone can tell has been checked before this is called (the
        module's ``check_image``), because entering a bootloader changes what the board runs.
        """

    def check(self, image: FirmwareImage, target: TargetInfo) -> list[str]:
        """Board checks: the image against what :meth:`identify` found (layout, the board's
        actual content, the chip). Raise PreflightError to refuse; return warnings to show.
        """
        return []

    @abc.abstractmethod
    def flash(
        self,
        image: FirmwareImage,
        progress: ProgressCallback = no_progress,
        cancel: Optional[CancelToken] = None,
        quick: bool = False,
    ) -> FlashResult:
        """Erase as needed, write and verify by reading back. ``quick`` skips identical blocks."""

    @abc.abstractmethod
    def read(
        self, progress: ProgressCallback = no_progress, cancel: Optional[CancelToken] = None
    ) -> FirmwareImage:
        """Read the application area back (a backup)."""

    @abc.abstractmethod
    def leave(self) -> Optional[str]:
        """Leave the bootloader and start the application; return a sentence saying how the
        application was seen to come back, or None when that cannot be observed."""

    def close(self) -> None:  # noqa: B027 - optional hook, most flashers need nothing
        """Release the transport. Safe to call twice."""

    def __enter__(self) -> Flasher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
