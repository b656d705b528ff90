"""Find which AVR bootloader listens on a port, at which baud, and on which chip.

One reset per baud rate: after the reset we send a single STK500v1 GET_SYNC and wait for
optiboot's LED flashes to end; if nothing answers we send an STK500v2 SIGN_ON in the *same*
bootloader window, because the Mega bootloader ignores bytes before a 0x1B (while optiboot would
take a stray SIGN_ON as a framing error and leave, so the order matters). Boards whose USB id
says "Arduino Mega" get the SIGN_ON first. ``!!!`` is never sent: three of them start the Mega
bootloader's monitor.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

from ..errors import ConnectError, FlashError
from ..flasher import LogCallback, no_log
from ..links.reset import DtrPulse, NoModemLines
from ..links.serial_port import SerialLink
from ..protocols.stk500v1 import FIRST_SYNC_WAIT, Stk500v1, Stk500v1Error
from ..protocols.stk500v2 import SIGN_ON_WAIT, Stk500v2, Stk500v2Error
from .avr_chip import chip_for_signature

if TYPE_CHECKING:
    from .avr_base import AvrSerialFlasher

#: the bauds AVR bootloaders on printer boards use, most common first
BAUDS = (115200, 57600, 19200, 38400, 250000)
#: USB ids of boards that carry the stk500v2 Mega bootloader (Arduino/Genuino Mega, clones)
MEGA_USB_IDS = {
    (0x2341, 0x0010),
    (0x2341, 0x0042),
    (0x2A03, 0x0010),
    (0x2A03, 0x0042),
    (0x2341, 0x0242),
}


@dataclass
class Found:
    method: str
    baud: int
    signature: bytes
    chip: str
    bootloader: str
    version: Union[tuple[int, int], str]

    def as_dict(self, port: Optional[str]) -> dict[str, Any]:
        return {
            "method": self.method,
            "baud": self.baud,
            "chip": self.chip,
            "signature": self.signature.hex(),
            "bootloader": self.bootloader,
            "port": port,
        }


def _usb_prefers_v2(port: Optional[str]) -> bool:
    if not port:
        return False
    try:
        from serial.tools import list_ports

        for info in list_ports.comports():
            if info.device == port and (info.vid, info.pid) in MEGA_USB_IDS:
                return True
    except Exception:
        return False
    return False


def _reset(
    link: SerialLink, baud: int, sleep: Callable[[float], None], reopen: bool = True
) -> None:
    """Reopen at ``baud`` (a reset on auto-reset boards) and pulse DTR where possible."""
    if reopen and link.can_reopen:
        link.reopen(baud)
    else:
        link.set_baud(baud)
    try:
        DtrPulse(0.1, 0.05, "probe", sleep)(link)
    except NoModemLines:
        pass


def _try_v1(link: SerialLink, baud: int, wait: float) -> Optional[Found]:
    proto = Stk500v1(link.ser)
    if not proto.sync_once(wait):
        return None
    try:
        version = proto.version()
        proto.enter_progmode()
        signature = proto.read_signature()
    except Stk500v1Error:
        return None
    chip = chip_for_signature(signature)
    return Found("stk500v1", baud, signature, chip.name, "optiboot/STK500v1", version)


def _try_v2(link: SerialLink, baud: int, attempts: int) -> Optional[Found]:
    proto = Stk500v2(link.ser)
    for _ in range(attempts):
        name = proto.sign_on(SIGN_ON_WAIT)
        if name is None:
            continue
        try:
            proto.enter_progmode()
            signature = proto.read_signature()
        except Stk500v2Error:
            return None
        chip = chip_for_signature(signature)
        return Found("stk500v2", baud, signature, chip.name, f"stk500v2 ({name})", name)
    return None


def detect(
    link: SerialLink,
    *,
    bauds: tuple[int, ...] = BAUDS,
    methods: tuple[str, ...] = ("stk500v1", "stk500v2"),
    v2_first: Optional[bool] = None,
    fresh: bool = False,
    log: LogCallback = no_log,
    sleep: Callable[[float], None] = time.sleep,
) -> Optional[Found]:
    """Reset once per baud and ask each protocol; the bootloader is left in programming mode.

    ``fresh``: the link was opened just now at its baud, and that open was the first reset.
    That reset can be missed (the port was closed and reopened within milliseconds, e.g. right
    after another probe), so when nothing answers anywhere, the first baud gets one more try
    after a real reopen; a board that answers is never slowed down by it."""
    if v2_first is None:
        v2_first = _usb_prefers_v2(link.port)
    order = [m for m in (("stk500v2", "stk500v1") if v2_first else methods) if m in methods]
    for i, baud in enumerate(bauds):
        _reset(link, baud, sleep, reopen=bool(i) or not fresh or baud != link.baud)
        found = _ask(link, baud, order, v2_first, sleep)
        if found is not None:
            log(f"auto: {found.bootloader} on {found.chip} answered at {baud} baud")
            return found
        log(f"auto: no AVR bootloader answered at {baud} baud")
    if fresh and bauds:
        _reset(link, bauds[0], sleep, reopen=True)
        found = _ask(link, bauds[0], order, v2_first, sleep)
        if found is not None:
            log(f"auto: {found.bootloader} on {found.chip} answered at {bauds[0]} baud")
            return found
    return None


def _ask(
    link: SerialLink,
    baud: int,
    order: list[str],
    v2_first: bool,
    sleep: Callable[[float], None],
) -> Optional[Found]:
    """Ask each protocol in ``order`` within one reset window."""
    for method in order:
        if method == "stk500v1":
            found = _try_v1(link, baud, FIRST_SYNC_WAIT)
        else:
            found = _try_v2(link, baud, 2)
        if found is not None:
            return found
        if method == "stk500v2" and v2_first and "stk500v1" in order:
            # a SIGN_ON sent to optiboot made it leave: the next try needs a new reset
            _reset(link, baud, sleep)
    return None


def explain_silence(flasher: AvrSerialFlasher, tried: list[str]) -> Optional[FlashError]:
    """After a forced method/baud stayed silent, find what *does* answer and say so."""
    link = flasher.link
    if not link.can_reopen:
        return None
    asked_baud = link.baud
    found = detect(link, log=flasher.log, sleep=flasher.sleep)
    if found is None:
        link.baud = asked_baud
        return ConnectError(
            f"No AVR bootloader answered on {link.port}: not at {asked_baud} baud with "
            f"{flasher.protocol_name}, nor at any of {', '.join(map(str, BAUDS))} with "
            "STK500v1 or STK500v2.",
            cause="The board has no auto-reset (or it is disabled), the port belongs to another "
            "device, or the board runs a bootloader this flasher does not speak (e.g. "
            "Caterina/AVR109 on 32U4 boards).",
            hint="Press the board's reset button right after starting the flash (the flasher "
            "asks you to when it runs interactively), or check the port.",
        )
    # leave the bootloader we woke so the board is usable; the user retries with the fix
    leave_quietly(link, found)
    link.baud = asked_baud
    proto = "STK500v1" if found.method == "stk500v1" else "STK500v2"
    if found.method == flasher.method:
        return ConnectError(
            f"No answer at {asked_baud} baud; the {found.bootloader} bootloader answered at "
            f"{found.baud} baud ({found.chip}).",
            cause=f"The baud rate is wrong: this board's bootloader runs at {found.baud}.",
            hint=f"Use --baud {found.baud} (or leave the baud on auto).",
        )
    return ConnectError(
        f"No {flasher.protocol_name} bootloader answered at {asked_baud} baud, but an {proto} "
        f"bootloader ({found.bootloader}, {found.chip}) answered at {found.baud} baud.",
        cause=f"The wrong protocol was chosen: this board speaks {proto}.",
        hint=f"Use --method {found.method} --baud {found.baud} (or method 'auto').",
    )


def leave_quietly(link: SerialLink, found: Found) -> None:
    try:
        if found.method == "stk500v1":
            Stk500v1(link.ser).leave_progmode()
        else:
            Stk500v2(link.ser).leave_progmode()
    except FlashError:
        pass


def probe(port: str, *, serial_factory: Any = None) -> Optional[dict[str, Any]]:
    """Which bootloader, baud and chip answer on ``port`` (resets the board, then lets the
    application start again). ``None`` when no AVR bootloader answered."""
    link = SerialLink(port, BAUDS[0], factory=serial_factory)
    try:
        link.open()
        found = detect(link, fresh=True)
        if found is None:
            return None
        leave_quietly(link, found)
        return found.as_dict(port)
    finally:
        link.close()
