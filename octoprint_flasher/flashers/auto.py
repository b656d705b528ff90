"""Method "auto": pick the flashing method from how the board is reached.

The decision uses only what the target says and the port's USB id, never a guess that writes:
a USB DFU id or path means DFU; a CAN UUID (or a CAN-only target) or a Katapult/Klipper USB id
means Katapult; an STM32 serial port running Marlin cannot be flashed over serial at all;
anything else is a serial AVR board, whose bootloader and baud ``avr_auto`` detects.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from typing import Any, Callable, Optional

from .. import chips, methods
from ..errors import UnsupportedError
from ..flasher import Flasher, LogCallback, no_log
from ..target import Target

AVR_AUTO_MODULE = "octoprint_flasher.flashers.avr_auto"
KATAPULT_USB_IDS = {(0x1D50, 0x6177), (0x1D50, 0x614E)}
#: Prusa MK2-family/MK3 (Einsy, miniRAMBo): Prusa's stk500v2 plus the language pass
PRUSA_PRINTER_USB_IDS = {(0x2C99, 0x0001), (0x2C99, 0x0002)}
#: MMU2S/MMU3, CW1, CW1S applications and bootloaders, Leonardo: Caterina's avr109
AVR109_USB_IDS = {(0x2C99, pid) for pid in (0x0003, 0x0004, 0x0007, 0x0008, 0x000E, 0x000F)} | {
    (0x2341, 0x8036),
    (0x2341, 0x0036),
}
RP2040_ROM_IDS = ("2e8a:0003", "2e8a:000f")


def _pyserial_ports() -> list[Any]:
    from serial.tools import list_ports

    return list(list_ports.comports())


#: Injectable for tests and emulators: returns objects with ``device``, ``vid``, ``pid``.
list_serial_ports: Callable[[], list[Any]] = _pyserial_ports


def port_usb_id(port: str) -> Optional[tuple[int, int]]:
    """The USB VID:PID behind a serial port (symlinks resolved), None if not USB/unknown."""
    try:
        real = os.path.realpath(port)
        infos = list_serial_ports()
    except Exception:  # listing ports is a hint only; auto still falls back to AVR probing
        return None
    for info in infos:
        dev = str(getattr(info, "device", ""))
        if dev in (port, real) or os.path.realpath(dev) == real:
            vid, pid = getattr(info, "vid", None), getattr(info, "pid", None)
            if vid is not None and pid is not None:
                return int(vid), int(pid)
    return None


def choose_method(target: Target) -> tuple[str, str]:
    """``(method, reason)`` for a target; UnsupportedError when nothing can flash it."""
    if target.usb and target.usb.lower() in RP2040_ROM_IDS:
        return "picoboot", f"{target.usb} is an RP2040/RP2350 boot ROM"
    if target.usb or target.usb_path:
        return "dfu", "a USB DFU device was given"
    if target.uuid:
        return "katapult", "a CAN UUID was given"
    if not target.port:
        if target.can_bus_factory is not None:
            return "katapult", "only a CAN bus was given"
        raise UnsupportedError(
            "Nothing to flash: no serial port, USB device or CAN UUID was given.",
            hint="Run 'octoprint-flasher detect' and pass --port, --usb or --uuid.",
        )
    usb_id = port_usb_id(target.port)
    if usb_id in KATAPULT_USB_IDS:
        row = chips.lookup_usb(*usb_id)
        return "katapult", f"{target.port} is {row.description if row else 'Katapult/Klipper'}"
    if usb_id in PRUSA_PRINTER_USB_IDS or usb_id in AVR109_USB_IDS:
        row = chips.lookup_usb(*usb_id)
        method = "prusa" if usb_id in PRUSA_PRINTER_USB_IDS else "avr109"
        return method, f"{target.port} is a {row.description if row else 'Prusa device'}"
    if usb_id == (0x0483, 0x5740):
        row = chips.lookup_usb(*usb_id)
        raise UnsupportedError(
            f"{target.port} is an STM32 virtual serial port; its firmware cannot be replaced "
            "over serial.",
            cause="STM32 boards running Marlin have no serial bootloader.",
            hint=row.hint if row else "Use DFU (BOOT0 jumper) or the SD card.",
        )
    return "avr", f"{target.port} is a serial port: detecting the AVR bootloader"


def open_flasher(target: Target, log: Optional[LogCallback] = None) -> Flasher:
    """Choose the method and open that method's flasher for ``target``."""
    say = log or no_log
    method, reason = choose_method(target)
    say(f"auto: {reason}")
    if method == "avr":
        return _avr_opener()(target, log)
    say(f"auto: using the {method} method")
    chosen = dataclasses.replace(target, method=method)
    return methods.get_opener(method)(chosen, log)


def _avr_opener() -> methods.Opener:
    try:
        module = importlib.import_module(AVR_AUTO_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name == AVR_AUTO_MODULE:
            raise UnsupportedError(
                "AVR bootloader auto-detection is not available in this version.",
                hint="Choose the method yourself: --method stk500v1 (optiboot, Uno, Anet A8) or "
                "--method stk500v2 (Mega 2560), with --baud.",
            ) from exc
        raise UnsupportedError(
            f"AVR auto-detection needs the Python package {exc.name!r}, which is missing.",
            hint=f"Install it into OctoPrint's environment: pip install {exc.name}",
        ) from exc
    opener: methods.Opener = module.open_flasher
    return opener
