"""Registry from method name to the flasher that implements it.

Each protocol's flasher module exposes ``open_flasher(target, log) -> Flasher``. Modules are
imported lazily so a missing optional dependency (python-can, libusb) only affects its own
method, and a method whose module does not exist yet fails with a clear "not available".
"""

from __future__ import annotations

import importlib
from typing import Callable, Optional

from .errors import UnsupportedError
from .flasher import Flasher, LogCallback
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


def get_opener(method: str) -> Opener:
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
    opener: Opener = module.open_flasher
    return opener


def open_flasher(target: Target, log: Optional[LogCallback] = None) -> Flasher:
    """Open the transport described by ``target`` and return a ready flasher."""
    return get_opener(target.method)(target, log)
