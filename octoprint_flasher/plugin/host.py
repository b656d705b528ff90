"""The flash job's view of OctoPrint's printer connection (the job's ``HostHooks``).

A flash needs the serial port to itself, so the host remembers the connection (port, baud rate
and printer profile *id* — ``connect()`` wants the id, not the dict ``get_current_connection``
returns), optionally sends heaters-off G-code, disconnects and then holds the port: OctoPrint's
``handle_connect`` hook asks :meth:`OctoPrintHost.veto_connect` and is refused while a flash
runs. Afterwards it reconnects with the same triple and waits until the printer is Operational,
or says why it is not. The job decides *whether* to reconnect (never into a bootloader).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ..diagnostics import port_holders
from ..errors import ConnectError
from .settings import gcode_lines

# Printer states in which waiting longer for "Operational" cannot help.
_FAILED_STATES = ("ERROR", "CLOSED_WITH_ERROR")
_OPERATIONAL_STATES = ("OPERATIONAL", "PRINTING", "PAUSED", "PAUSING", "RESUMING", "FINISHING")


@dataclass
class HostOptions:
    """What the user chose in settings; read once per flash."""

    reconnect: bool = True
    reconnect_timeout: float = 30.0
    settle_delay: float = 2.0
    pre_gcode: str = ""
    post_gcode: str = ""


@dataclass(frozen=True)
class Connection:
    """The connection to restore after a flash."""

    port: str
    baudrate: Optional[int]
    profile_id: Optional[str]


class OctoPrintHost:
    """HostHooks over OctoPrint's ``PrinterInterface``."""

    def __init__(
        self,
        printer: Any,
        options: Optional[HostOptions] = None,
        log: Optional[Callable[[str], None]] = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._printer = printer
        self.options = options or HostOptions()
        self._log = log or (lambda _line: None)
        self._sleep = sleep
        self._clock = clock
        self._lock = threading.Lock()
        self._holding = False
        self._reconnecting = False
        self.remembered: Optional[Connection] = None

    # -- HostHooks --------------------------------------------------------------------------

    def is_printing(self) -> bool:
        return bool(self._printer.is_printing() or self._printer.is_paused())

    def disconnect(self) -> None:
        """Remember the connection, switch heaters off if asked, disconnect and hold the port."""
        state, port, baudrate, profile = self._printer.get_current_connection()
        with self._lock:
            self._holding = True
        if not port or str(state).lower() in ("closed", "offline"):
            self.remembered = None
            self._log("Printer is not connected; nothing to disconnect.")
            return
        profile_id = profile.get("id") if isinstance(profile, dict) else profile
        self.remembered = Connection(str(port), baudrate, profile_id)
        pre = gcode_lines(self.options.pre_gcode)
        if pre and self._printer.is_operational():
            self._log("Sending G-code before flashing: " + "; ".join(pre))
            self._printer.commands(pre)
        self._log(f"Disconnecting the printer from {port} (will reconnect at {baudrate} baud).")
        # OctoPrint's disconnect waits for the send queue, so the pre G-code goes out first.
        self._printer.disconnect()
        if self.options.settle_delay > 0:
            self._sleep(self.options.settle_delay)

    def reconnect(self) -> None:
        """Reconnect with the remembered triple and wait until Operational.

        Raises :class:`ConnectError` with the printer's own error when it does not come back,
        so the job can show it next to the (successful) flash result.
        """
        conn = self.remembered
        try:
            if not self.options.reconnect:
                self._log("Not reconnecting the printer: switched off in the settings.")
                return
            if conn is None:
                self._log("The printer was not connected before the flash; not connecting.")
                return
            if self.options.settle_delay > 0:
                # give the new firmware time to boot (and a USB device time to re-enumerate)
                self._sleep(self.options.settle_delay)
            with self._lock:
                self._holding = False
                self._reconnecting = True
            self._log(
                f"Reconnecting the printer on {conn.port} at {conn.baudrate} baud "
                f"(profile {conn.profile_id})."
            )
            self._printer.connect(port=conn.port, baudrate=conn.baudrate, profile=conn.profile_id)
            self._wait_operational(conn)
            post = gcode_lines(self.options.post_gcode)
            if post:
                self._log("Sending G-code after flashing: " + "; ".join(post))
                self._printer.commands(post)
        finally:
            self.release()

    # -- plugin side ------------------------------------------------------------------------

    def release(self) -> None:
        """Stop holding the port (called when a job ends without reconnecting)."""
        with self._lock:
            self._holding = False
            self._reconnecting = False

    @property
    def holding(self) -> bool:
        with self._lock:
            return self._holding

    @property
    def reconnecting(self) -> bool:
        """Our own reconnect after a flash is under way: the one connect never to veto."""
        with self._lock:
            return self._reconnecting

    def veto_connect(self) -> bool:
        """True while a flash holds the port and the connect is not our own reconnect."""
        with self._lock:
            return self._holding and not self._reconnecting

    def _wait_operational(self, conn: Connection) -> None:
        deadline = self._clock() + self.options.reconnect_timeout
        seen_connecting = False
        while True:
            state = str(self._printer.get_state_id() or "")
            if state in _OPERATIONAL_STATES:
                self._log("Printer is Operational again.")
                return
            if state in _FAILED_STATES or (seen_connecting and state in ("OFFLINE", "CLOSED")):
                error = self._printer.get_error() or self._printer.get_state_string()
                raise ConnectError(
                    f"The printer did not come back on {conn.port}: {error}",
                    cause="The new firmware may use another baud rate, or it did not start.",
                    hint="Check the firmware's BAUDRATE, then connect from the Connection "
                    "panel; if the board stays silent, flash it again.",
                )
            if state not in ("OFFLINE", "CLOSED", ""):
                seen_connecting = True
            if self._clock() >= deadline:
                error = self._printer.get_error()
                cause = "The firmware is slow to boot, or it does not answer like a printer."
                if state == "OPEN_SERIAL":  # never got the port open: who holds it?
                    others = [h for h in port_holders(conn.port) if h.pid != os.getpid()]
                    cause = (
                        f"OctoPrint could not open {conn.port}: it is held by "
                        + ", ".join(h.describe() for h in others)
                        + "."
                        if others
                        else f"OctoPrint is still trying to open {conn.port}."
                    )
                raise ConnectError(
                    f"The printer was not Operational {self.options.reconnect_timeout:.0f} s "
                    f"after reconnecting on {conn.port} (state: "
                    f"{self._printer.get_state_string()}{'; ' + error if error else ''}).",
                    cause=cause,
                    hint="Wait a moment and connect from the Connection panel; raise the "
                    "reconnect timeout in the settings if this board boots slowly.",
                )
            self._sleep(0.2)
