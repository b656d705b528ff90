"""One error hierarchy for every front end.

Each error carries three parts so a user can act on it: what happened (``message``), why it
most likely happened (``cause``) and what to do next (``hint``). Front ends show all three.
"""

from __future__ import annotations

from typing import Any


class FlashError(Exception):
    """Base of every error the flasher reports to a user."""

    kind = "error"

    def __init__(self, message: str, cause: str = "", hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.cause = cause
        self.hint = hint

    def __str__(self) -> str:
        parts = [self.message]
        if self.cause:
            parts.append(f"Likely cause: {self.cause}")
        if self.hint:
            parts.append(f"What to do: {self.hint}")
        return "\n".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "message": self.message, "cause": self.cause, "hint": self.hint}


class ImageError(FlashError):
    """The firmware file cannot be used: malformed, wrong type, too large."""

    kind = "image"


class PreflightError(ImageError):
    """The image is well formed but does not suit this board (wrong chip, over the bootloader)."""

    kind = "preflight"


class ConnectError(FlashError):
    """The board or its bootloader could not be reached (port busy, no answer, no permission)."""

    kind = "connect"


class ProtocolError(FlashError):
    """The bootloader answered, but not as the protocol says (bad frame, refused command)."""

    kind = "protocol"


class VerifyError(FlashError):
    """Read-back after writing did not match the image."""

    kind = "verify"


class CancelledError(FlashError):
    """The user cancelled the flash between two blocks."""

    kind = "cancelled"


class BusyError(FlashError):
    """A flash is already running, or the printer is printing."""

    kind = "busy"


class UnsupportedError(FlashError):
    """The requested method or operation is not available (yet) for this board."""

    kind = "unsupported"
