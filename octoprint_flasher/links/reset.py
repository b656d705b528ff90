"""Ways to put an AVR board into its bootloader, as small interchangeable strategies.

Like esptool's reset classes: each strategy knows one way to make the chip restart and how long
the bootloader then needs before it listens. A flasher tries them in order and stops at the first
that gets an answer from the bootloader.

On USB-serial boards DTR is wired through a capacitor to /RESET, so asserting DTR (also done by
opening the port) restarts the chip. Ptys and GPIO UARTs have no modem lines; pyserial then raises
``OSError(ENOTTY)`` when DTR is set, and only reset-at-open or the reset button remain.
"""

from __future__ import annotations

import abc
import time
from typing import Callable, Optional

import serial

from .serial_port import SerialLink

Sleep = Callable[[float], None]
Prompt = Callable[[str], None]


class NoModemLines(Exception):
    """The port cannot drive DTR/RTS (pty, Raspberry Pi GPIO UART)."""


class ResetStrategy(abc.ABC):
    """One way to restart the board into its bootloader."""

    name = "none"
    #: how the reset looks in the log and in error messages
    describe = "no reset"

    @abc.abstractmethod
    def __call__(self, link: SerialLink) -> None:
        """Restart the board (or raise :class:`NoModemLines` when this way is impossible)."""


class DtrPulse(ResetStrategy):
    """Drop DTR/RTS for ``off`` seconds, raise them (the reset edge), wait ``on`` seconds.

    ``arduino`` timings (250 ms, 50 ms) let the 100 nF auto-reset capacitor recharge fully;
    ``wiring`` timings (50 ms, 50 ms) are what the Mega's stk500v2 bootloader needs."""

    def __init__(self, off: float, on: float, name: str, sleep: Sleep = time.sleep) -> None:
        self.off = off
        self.on = on
        self.name = name
        self.describe = f"DTR/RTS pulse ({name}: {off * 1000:.0f} ms off, {on * 1000:.0f} ms)"
        self.sleep = sleep

    def __call__(self, link: SerialLink) -> None:
        ser = link.open()
        try:
            ser.dtr = False
            ser.rts = False
        except (OSError, serial.SerialException, ValueError) as exc:
            raise NoModemLines(str(exc)) from exc
        self.sleep(self.off)
        ser.reset_input_buffer()
        ser.dtr = True
        ser.rts = True
        self.sleep(self.on)


def arduino_reset(sleep: Sleep = time.sleep) -> DtrPulse:
    return DtrPulse(0.25, 0.05, "arduino", sleep)


def wiring_reset(sleep: Sleep = time.sleep) -> DtrPulse:
    return DtrPulse(0.05, 0.05, "wiring", sleep)


class ReopenReset(ResetStrategy):
    """Close and reopen the port: opening asserts DTR, and a board (or the simulator) that
    resets on open restarts. ``settle`` covers the oscillator start-up after the edge."""

    name = "reopen"
    describe = "reset by reopening the port"

    def __init__(self, settle: float = 0.0, sleep: Sleep = time.sleep) -> None:
        self.settle = settle
        self.sleep = sleep

    def __call__(self, link: SerialLink) -> None:
        if not link.can_reopen:
            raise NoModemLines("the transport cannot be reopened")
        link.reopen()
        if self.settle:
            self.sleep(self.settle)


class OpenedReset(ResetStrategy):
    """The open that just happened was the reset; nothing to do but remember it."""

    name = "open"
    describe = "reset when the port was opened"

    def __call__(self, link: SerialLink) -> None:
        link.open()


class ManualReset(ResetStrategy):
    """Ask the user to press the board's reset button; the caller then polls for the
    bootloader over ``window`` seconds. Boards on a GPIO UART or without the auto-reset
    capacitor (or with it cut for printing) can only be entered this way."""

    name = "manual"
    describe = "reset button pressed by the user"

    def __init__(self, prompt: Prompt, window: float = 15.0) -> None:
        self.prompt = prompt
        self.window = window

    def __call__(self, link: SerialLink) -> None:
        ser = link.open()
        ser.reset_input_buffer()
        self.prompt(
            f"Press the board's reset button now (waiting {self.window:.0f} s for the bootloader)."
        )


class NoReset(ResetStrategy):
    """The board is already in its bootloader (a previous failed flash left it there)."""

    name = "none"
    describe = "no reset (bootloader already running)"

    def __call__(self, link: SerialLink) -> None:
        link.open()


def reset_chain(
    pulse: DtrPulse,
    prompt: Optional[Prompt] = None,
    *,
    manual_window: float = 15.0,
    sleep: Sleep = time.sleep,
) -> list[ResetStrategy]:
    """The order a flasher tries: the open's own reset, a DTR pulse, a reopen, the button.

    A strategy that raises :class:`NoModemLines` is skipped, so on a pty the chain is
    open → reopen → button."""
    chain: list[ResetStrategy] = [pulse, OpenedReset(), ReopenReset(sleep=sleep)]
    if prompt is not None:
        chain.append(ManualReset(prompt, manual_window))
    return chain
