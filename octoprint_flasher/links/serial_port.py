"""Opening a serial port for flashing: exclusively, with low latency, with errors a user can act on.

A bootloader session fails in confusing ways ("timeout communicating with programmer") when
another program still holds the port, when the device node is missing or when the user lacks
permission. This module turns each of those into a :class:`~octoprint_flasher.errors.ConnectError`
that names the cause *before* the first byte is sent.
"""

from __future__ import annotations

import array
import errno
import fcntl
import os
import struct
import termios
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import serial

from ..errors import ConnectError

# <linux/serial.h>: struct serial_struct starts with 4 ints (type, line, port, irq) then flags.
_TIOCGSERIAL = getattr(termios, "TIOCGSERIAL", 0x541E)
_TIOCSSERIAL = getattr(termios, "TIOCSSERIAL", 0x541F)
_ASYNC_LOW_LATENCY = 1 << 13
_SERIAL_STRUCT_INTS = 18  # generous: the kernel struct is 72 bytes on every Linux ABI

SerialFactory = Callable[..., Any]


@dataclass(frozen=True)
class PortHolder:
    pid: int
    name: str

    def describe(self) -> str:
        return f"{self.name} (pid {self.pid})"


def port_holders(port: str, proc: str = "/proc") -> list[PortHolder]:
    """Processes other than this one that have ``port`` open, found through ``/proc/*/fd``.

    pyserial's ``exclusive=True`` only stops programs that also take the lock; OctoPrint and
    screen do not, so this scan is what catches "OctoPrint is still connected". This process
    counts too: inside OctoPrint, the printer connection lives in the same process."""
    try:
        wanted = os.path.realpath(port)
    except OSError:
        return []
    me = os.getpid()
    found: list[PortHolder] = []
    try:
        pids = [int(p) for p in os.listdir(proc) if p.isdigit()]
    except OSError:
        return []
    for pid in pids:
        fd_dir = f"{proc}/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"{fd_dir}/{fd}") == wanted:
                    name = _process_name(proc, pid)
                    if pid == me:
                        name += " — this process, e.g. OctoPrint's own printer connection"
                    found.append(PortHolder(pid, name))
                    break
            except OSError:
                continue
    return found


def _process_name(proc: str, pid: int) -> str:
    try:
        with open(f"{proc}/{pid}/cmdline", "rb") as fh:
            argv = [a.decode(errors="replace") for a in fh.read().split(b"\0") if a]
    except OSError:
        return "unknown process"
    if not argv:
        return "unknown process"
    text = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(argv[:3]))
    if "octoprint" in " ".join(argv).lower():
        return f"OctoPrint ({text})"
    return text


def busy_error(port: str, holders: list[PortHolder]) -> ConnectError:
    who = ", ".join(h.describe() for h in holders) or "another program"
    octo = any(h.name.startswith("OctoPrint") for h in holders)
    hint = (
        "Disconnect the printer in OctoPrint's Connection panel (the plugin does this for you "
        "when it runs the flash), then try again."
        if octo
        else "Close the program that uses the port (a terminal, Cura, Pronterface, a second "
        "OctoPrint) and try again."
    )
    return ConnectError(
        f"Serial port {port} is in use by {who}.",
        cause="The bootloader can only talk to one program; with two on the line every answer "
        "is lost and avrdude would only report 'timeout communicating with programmer'.",
        hint=hint,
    )


def set_low_latency(ser: Any) -> bool:
    """Ask the driver to deliver received bytes at once (FTDI otherwise waits up to 16 ms).

    Drivers without TIOCSSERIAL (ptys, CDC-ACM on some kernels) refuse; that only costs speed."""
    try:
        fd = ser.fileno()
    except Exception:
        return False
    try:
        buf = array.array("i", [0] * _SERIAL_STRUCT_INTS)
        fcntl.ioctl(fd, _TIOCGSERIAL, buf, True)
        if buf[4] & _ASYNC_LOW_LATENCY:
            return True
        buf[4] |= _ASYNC_LOW_LATENCY
        fcntl.ioctl(fd, _TIOCSSERIAL, buf)
        return True
    except (OSError, ValueError, struct.error):
        return False


def open_port(
    port: str,
    baud: int,
    timeout: float = 0.5,
    *,
    exclusive: bool = True,
    check_holders: bool = True,
    factory: Optional[SerialFactory] = None,
) -> Any:
    """Open ``port`` 8N1 at ``baud`` for a bootloader session and return the pyserial object.

    Opening asserts DTR, which resets an auto-reset board: callers treat the open itself as
    the first reset."""
    if check_holders and factory is None:
        holders = port_holders(port)
        if holders:
            raise busy_error(port, holders)
    make = factory or serial.Serial
    try:
        ser = make(port, baud, timeout=timeout, write_timeout=10.0, exclusive=exclusive)
    except serial.SerialException as exc:
        raise _open_error(port, exc) from exc
    except OSError as exc:
        raise _open_error(port, exc) from exc
    set_low_latency(ser)
    return ser


def _open_error(port: str, exc: BaseException) -> ConnectError:
    code = getattr(exc, "errno", None)
    text = str(exc)
    if (
        code == errno.ENOENT
        or "No such file" in text
        or "could not open port" in text
        and ("Errno 2]" in text)
    ):
        return ConnectError(
            f"Serial port {port} does not exist.",
            cause="The board is unplugged, was renumbered after a reset (ttyUSB0 → ttyUSB1), "
            "or the name is mistyped.",
            hint="Plug the board in and pick the port again (octoprint-flasher detect lists them).",
        )
    if code in (errno.EACCES, errno.EPERM) or "Permission denied" in text or "Errno 13]" in text:
        return ConnectError(
            f"No permission to open serial port {port}.",
            cause="The user running the flasher is not in the 'dialout' group.",
            hint="Run: sudo usermod -aG dialout $USER, then log out and in again "
            "(or restart OctoPrint).",
        )
    if code in (errno.EBUSY, errno.EAGAIN) or "exclusively lock" in text or "busy" in text:
        return busy_error(port, port_holders(port))
    return ConnectError(
        f"Could not open serial port {port}: {text}",
        cause="The operating system refused the port.",
        hint="Check the cable and that the port is the printer's board, then try again.",
    )


def modem_lines_work(ser: Any) -> bool:
    """True when DTR/RTS can be driven; ptys and GPIO UARTs answer ENOTTY/EINVAL."""
    try:
        ser.dtr = ser.dtr
        return True
    except (OSError, serial.SerialException, ValueError):
        return False


class SerialLink:
    """An open port plus what is needed to open it again.

    Reopening is itself a reset on auto-reset boards (and in the simulator), so reset
    strategies work on a link rather than on a bare ``Serial``. A link built around an
    existing transport (``SerialLink.wrap``) cannot reopen."""

    def __init__(
        self,
        port: Optional[str],
        baud: int,
        ser: Any = None,
        *,
        timeout: float = 0.5,
        factory: Optional[SerialFactory] = None,
        exclusive: bool = True,
    ) -> None:
        self.port = port
        self.baud = baud
        self.timeout = timeout
        self.factory = factory
        self.exclusive = exclusive
        self.ser: Any = ser
        #: monotonic time of the last open (the reset edge on auto-reset boards)
        self.opened_at = 0.0

        self._wrapped = False

    @classmethod
    def wrap(cls, ser: Any, baud: Optional[int] = None) -> SerialLink:
        """A link around a transport someone else opened (tests, an emulator object)."""
        link = cls(getattr(ser, "port", None), baud or int(getattr(ser, "baudrate", 115200)), ser)
        link._wrapped = True
        return link

    @property
    def can_reopen(self) -> bool:
        return self.port is not None and not self._wrapped

    def open(self) -> Any:
        if self.ser is not None and getattr(self.ser, "is_open", True):
            return self.ser
        if self.port is None:
            raise ConnectError("No serial port given.", hint="Pass --port, e.g. /dev/ttyUSB0.")
        self.ser = open_port(
            self.port,
            self.baud,
            self.timeout,
            exclusive=self.exclusive,
            factory=self.factory,
        )
        self.opened_at = time.monotonic()
        return self.ser

    def reopen(self, baud: Optional[int] = None, closed_for: float = 0.1) -> Any:
        """Close, stay closed ``closed_for`` seconds (DTR low: the auto-reset capacitor
        recharges and the other end sees the hang-up), open again: a reset."""
        if baud is not None:
            self.baud = baud
        self.close()
        if closed_for > 0:
            time.sleep(closed_for)
        return self.open()

    def set_baud(self, baud: int) -> None:
        self.baud = baud
        if self.ser is not None:
            self.ser.baudrate = baud

    def close(self) -> None:
        ser, self.ser = self.ser, None
        if ser is not None:
            try:
                ser.close()
            except Exception:
                pass


def link_lost(port: Optional[str], exc: BaseException) -> ConnectError:
    """The port vanished mid-session (cable pulled, USB re-enumeration, board lost power)."""
    return ConnectError(
        f"Lost the serial port {port or ''} during the flash: {exc}".replace("  ", " "),
        cause="The USB cable was unplugged, the board lost power, or the USB-serial chip "
        "re-enumerated after a brown-out.",
        hint="Reconnect the board and flash again: the bootloader is still on the chip and "
        "starts after every reset, so the board can be recovered.",
    )


class Wire:
    """Deadline-based reads and writes over a pyserial-like object.

    pyserial's ``timeout`` is per call; a reply is complete only after several calls, so this
    keeps an absolute deadline and changes ``timeout`` only when it has to (each change is a
    tcsetattr)."""

    def __init__(self, ser: Any, port: Optional[str] = None) -> None:
        self.ser = ser
        self.port = port or getattr(ser, "port", None)
        self._timeout: Optional[float] = None

    def write(self, data: bytes) -> None:
        try:
            self.ser.write(data)
        except (OSError, serial.SerialException) as exc:
            raise link_lost(self.port, exc) from exc

    def read(self, n: int, timeout: float) -> bytes:
        """Up to ``n`` bytes, returning early only when ``timeout`` seconds have passed."""
        out = bytearray()
        deadline = time.monotonic() + timeout
        while len(out) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                self._set_timeout(left)  # a tcsetattr: fails with EIO on a vanished port too
                chunk = self.ser.read(n - len(out))
            except (OSError, serial.SerialException) as exc:
                raise link_lost(self.port, exc) from exc
            if chunk:
                out += chunk
        return bytes(out)

    def _set_timeout(self, value: float) -> None:
        # within 20 ms of the current setting is close enough: no tcsetattr per reply
        if self._timeout is None or abs(self._timeout - value) > 0.02:
            self.ser.timeout = value
            self._timeout = value

    def drain(self, quiet: float) -> bytes:
        """Read and discard until the line has been quiet for ``quiet`` seconds."""
        junk = bytearray()
        while True:
            got = self.read(4096, quiet)
            if not got:
                return bytes(junk)
            junk += got

    def discard_input(self) -> None:
        try:
            self.ser.reset_input_buffer()
        except (OSError, serial.SerialException) as exc:
            raise link_lost(self.port, exc) from exc
