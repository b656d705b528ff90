"""Method ``auto`` for AVR serial boards: detect the bootloader (:mod:`.avr_detect`) and return the
matching STK500v1 or STK500v2 flasher, already in its bootloader."""

from __future__ import annotations

from typing import Optional

from ..errors import ConnectError
from ..flasher import LogCallback, no_log
from ..links.reset import reset_chain
from ..links.serial_port import SerialLink
from ..target import Target
from .avr_base import AvrSerialFlasher, link_for, prompt_or_none
from .avr_detect import BAUDS, detect, probe
from .stk500v1 import Stk500v1Flasher
from .stk500v2 import Stk500v2Flasher

__all__ = ["BAUDS", "detect", "open_flasher", "probe"]


def open_flasher(target: Target, log: Optional[LogCallback] = None) -> AvrSerialFlasher:
    """Detect the bootloader on ``target.port`` and return the matching flasher, already in
    the bootloader. ``target.baud`` (if given) is tried first."""
    link_for(target, BAUDS[0])  # checks that a port was given
    opts = target.options
    sink = log or no_log
    bauds = BAUDS if not target.baud else (target.baud, *(b for b in BAUDS if b != target.baud))
    link = SerialLink(target.port or "", bauds[0], factory=opts.get("serial_factory"))
    link.open()
    found = detect(link, bauds=bauds, log=sink, fresh=True)
    if found is None:
        link.close()
        raise ConnectError(
            f"No AVR bootloader answered on {target.port} at {', '.join(map(str, bauds))} baud.",
            cause="The board has no auto-reset (or it is disabled), it is not an AVR board, or "
            "another program holds the port.",
            hint="Press the board's reset button right after starting the flash, or choose the "
            "method and baud rate by hand.",
        )
    prompt = prompt_or_none(opts)
    settle = float(opts.get("settle", 0.0))
    flasher: AvrSerialFlasher
    if found.method == "stk500v1":
        from ..links.reset import arduino_reset

        v1 = Stk500v1Flasher(
            link,
            resets=reset_chain(arduino_reset(), prompt),
            log=log,
            mcu=target.mcu,
            settle=settle,
        )
        assert isinstance(found.version, tuple)
        v1.adopt(found.signature, found.version)
        flasher = v1
    else:
        from ..links.reset import wiring_reset

        v2 = Stk500v2Flasher(
            link,
            resets=reset_chain(wiring_reset(), prompt),
            log=log,
            mcu=target.mcu,
            settle=settle,
        )
        v2.adopt(found.signature, str(found.version))
        flasher = v2
    return flasher
