"""Registry from method name to the flasher that implements it.

Each protocol's flasher module exposes ``open_flasher(target, log) -> Flasher`` and may expose
``check_image(image, target) -> list[str]``: the checks that need no board (they run before the
printer is disconnected or any board is entered). Modules are imported lazily so a missing
optional dependency (python-can, libusb) only affects its own method, and a method whose module
does not exist yet fails with a clear "not available".
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Optional

from .errors import PreflightError, UnsupportedError
from .flasher import Flasher, LogCallback
from .image.model import FirmwareImage
from .target import Target

# method -> module path (relative to this package) exposing open_flasher()
FLASHER_MODULES: dict[str, str] = {
    "stk500v1": ".flashers.stk500v1",
    "stk500v2": ".flashers.stk500v2",
    "dfu": ".flashers.dfu",
    "katapult": ".flashers.katapult",
    "marlin-sd": ".flashers.marlin_sd",
    "picoboot": ".flashers.picoboot",
    "prusa": ".flashers.prusa",
    "avr109": ".flashers.avr109",
    "auto": ".flashers.auto",
}

Opener = Callable[[Target, Optional[LogCallback]], Flasher]
ImageCheck = Callable[[FirmwareImage, Target], list[str]]


def get_opener(method: str) -> Opener:
    opener: Opener = _module(method).open_flasher
    return opener


#: what a Prusa file's header says it is for (FirmwareImage.extra["prusa"]["kind"]) -> method
FILE_KIND_METHODS = {
    "mk3-multilang": "prusa",
    "avr-printer": "prusa",
    "mmu": "avr109",
    "cw1": "avr109",
    "cw1s": "avr109",
}


def resolve_method(target: Target, image: FirmwareImage) -> Target:
    """``auto`` with a file that names the board it is for (a Prusa header): that method, so a
    MULTILANG file on a port without Prusa's USB id still gets both passes."""
    if target.method != "auto":
        return target
    method = FILE_KIND_METHODS.get(str((image.extra.get("prusa") or {}).get("kind")))
    return dataclasses.replace(target, method=method) if method else target


def check_image(target: Target, image: FirmwareImage) -> list[str]:
    """The method's image checks (no I/O with any board); PreflightError/ImageError refuse.

    For ``auto`` the method is the one :func:`~.flashers.auto.choose_method` would pick; a
    target that names nothing yet has no method-specific checks."""
    method = target.method
    if image.external and method in ("stk500v1", "stk500v2"):
        raise PreflightError(
            f"{image.filename or 'This file'} also carries data for the printer's external "
            f"language flash, which the {method} method cannot write.",
            cause="It is a Prusa MULTILANG firmware: the languages are written by the firmware "
            "itself in a second pass, after the bootloader has written the program.",
            hint="Use the prusa method (or auto on the printer's USB port); it writes both.",
        )
    if method == "auto":
        from .flashers.auto import choose_method

        try:
            method = choose_method(target)[0]
        except UnsupportedError:
            return []
        if method not in FLASHER_MODULES:  # "avr": detection picks stk500v1/v2 on the board
            if image.external:
                raise PreflightError(
                    f"{image.filename or 'This file'} is a Prusa MULTILANG firmware, but "
                    f"{target.port} does not look like a Prusa printer.",
                    cause="Only the prusa method writes the language catalogs; plain AVR "
                    "detection would write the program alone.",
                    hint="Choose the prusa method for an Einsy board (MK3/MK3S/MK2.5).",
                )
            return []
    check: Optional[ImageCheck] = getattr(_module(method), "check_image", None)
    return check(image, target) if check is not None else []


def _module(method: str) -> Any:
    if method not in FLASHER_MODULES:
        raise UnsupportedError(
            f"Unknown flashing method {method!r}.",
            hint="Choose one of: " + ", ".join(sorted(FLASHER_MODULES)),
        )
    try:
        module = importlib.import_module(FLASHER_MODULES[method], __package__)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith(__package__ or "octoprint_flasher"):
            raise UnsupportedError(
                f"The {method} method is not available in this version.",
                cause="Support for this protocol has not been built yet.",
                hint="Use another method, or update the plugin.",
            ) from exc
        raise UnsupportedError(
            f"The {method} method needs the Python package {exc.name!r}, which is missing.",
            hint=f"Install it into OctoPrint's environment: pip install {exc.name}",
        ) from exc
    return module


def open_flasher(target: Target, log: Optional[LogCallback] = None) -> Flasher:
    """Open the transport described by ``target`` and return a ready flasher."""
    return get_opener(target.method)(target, log)
