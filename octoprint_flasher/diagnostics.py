"""Turn low-level facts about a serial port into advice a user can act on.

"Timeout communicating with programmer" (seed report) usually meant "OctoPrint still had the
port" or "wrong baud". Here an OS error on a port becomes a :class:`ConnectError` that names
the real cause: who holds the port (found by scanning ``/proc/*/fd``), which group grants
access, which ports exist instead. Protocol modules add their own protocol-specific advice.
"""

from __future__ import annotations

import errno
import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

from .errors import ConnectError

PROC = Path("/proc")


@dataclass(frozen=True)
class PortHolder:
    pid: int
    name: str
    cmdline: str

    def describe(self) -> str:
        what = _known_program(self)
        return f"{what} (pid {self.pid})" if what else f"{self.name} (pid {self.pid})"


def _known_program(holder: PortHolder) -> str:
    text = (holder.name + " " + holder.cmdline).lower()
    if "octoprint" in text:
        return "OctoPrint"
    if "klippy" in text or "klipper" in text:
        return "Klipper"
    if "moonraker" in text:
        return "Moonraker"
    for tool in ("avrdude", "dfu-util", "screen", "minicom", "picocom", "cura", "pronterface"):
        if tool in text:
            return tool
    if "modemmanager" in text:
        return "ModemManager"
    return ""


def port_holders(port: str, proc: Path = PROC) -> list[PortHolder]:
    """Processes with ``port`` open (symlinks such as /dev/serial/by-id resolved).
    Processes we may not inspect are skipped: the answer can be incomplete, never wrong."""
    try:
        target = os.path.realpath(port)
    except OSError:
        return []
    holders: list[PortHolder] = []
    for pid_dir in proc.glob("[0-9]*"):
        try:
            fds = list((pid_dir / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(fd)
            except OSError:
                continue
            if link == target or link == port:
                holders.append(_describe_pid(pid_dir))
                break
    return holders


def _describe_pid(pid_dir: Path) -> PortHolder:
    try:
        name = (pid_dir / "comm").read_text().strip()
    except OSError:
        name = "?"
    try:
        cmdline = (pid_dir / "cmdline").read_bytes().replace(b"\x00", b" ").decode().strip()
    except (OSError, UnicodeDecodeError):
        cmdline = ""
    return PortHolder(int(pid_dir.name), name, cmdline)


def existing_ports() -> list[str]:
    """Serial ports that exist now (pyserial's list plus common pty/USB names)."""
    names: set[str] = set()
    try:
        from serial.tools import list_ports

        names.update(p.device for p in list_ports.comports())
    except Exception:  # listing is advice only; never fail the diagnosis over it
        pass
    for pattern in ("/dev/ttyUSB*", "/dev/ttyACM*", "/dev/serial/by-id/*"):
        names.update(glob.glob(pattern))
    return sorted(names)


def port_busy(
    port: str, holders: Optional[Iterable[PortHolder]] = None, own_pid: Optional[int] = None
) -> ConnectError:
    """EBUSY or an exclusive lock: someone else has the port. Say who and what to do."""
    found = list(port_holders(port) if holders is None else holders)
    me = os.getpid() if own_pid is None else own_pid
    others = [h for h in found if h.pid != me]
    ours = [h for h in found if h.pid == me]
    if any(_known_program(h) == "OctoPrint" for h in others) or (ours and not others):
        return ConnectError(
            f"{port} is busy: OctoPrint is still connected to the printer on it.",
            cause="The printer connection holds the port, so the bootloader cannot be reached.",
            hint="Disconnect the printer in OctoPrint's Connection panel, then flash again.",
        )
    if others:
        names = ", ".join(h.describe() for h in others)
        hint = "Close it, then flash again."
        if any(_known_program(h) == "Klipper" for h in others):
            hint = "Stop Klipper first (sudo systemctl stop klipper), then flash again."
        elif any(_known_program(h) == "ModemManager" for h in others):
            hint = "ModemManager probes new serial ports; disable it (sudo systemctl disable "
            "--now ModemManager) and flash again."
        return ConnectError(
            f"{port} is busy: it is open in {names}.",
            cause="Only one program can talk to the board at a time.",
            hint=hint,
        )
    return ConnectError(
        f"{port} is busy (held by another program).",
        cause="Another program has the port open; it could not be identified (it may run as "
        "another user).",
        hint="Disconnect OctoPrint and close other serial programs (Klipper, screen, Cura), "
        "then flash again.",
    )


def port_access_denied(port: str) -> ConnectError:
    group = _owner_group(port)
    user = _current_user()
    return ConnectError(
        f"Permission denied opening {port}.",
        cause=f"The user {user!r} is not allowed to use the port"
        + (f" (it belongs to the group {group!r})." if group else "."),
        hint=f"Add the user to the {group or 'dialout'} group: sudo usermod -a -G "
        f"{group or 'dialout'} {user}, then restart OctoPrint (log out and in for a shell).",
    )


def port_missing(port: str, ports: Optional[list[str]] = None) -> ConnectError:
    available = existing_ports() if ports is None else ports
    listing = ", ".join(available) if available else "none"
    return ConnectError(
        f"There is no serial port {port}.",
        cause="The board is unplugged or off, or it appears under another name.",
        hint=f"Ports that exist now: {listing}. Pick one of them (or check the USB cable).",
    )


def port_vanished(port: str) -> ConnectError:
    return ConnectError(
        f"{port} disappeared during the operation.",
        cause="The board was unplugged, lost power, or re-enumerated (reset into another "
        "mode); a weak USB cable or supply can do this too.",
        hint="Check the cable and power, reconnect the board and flash again; if the board "
        "now shows up in its bootloader, flash it there.",
    )


def from_os_error(
    port: str,
    exc: BaseException,
    *,
    holders_finder: Optional[Callable[[str], list[PortHolder]]] = None,
) -> ConnectError:
    """Map an error from opening or using a serial port (OSError or pyserial's
    SerialException, which carries the errno) to advice."""
    code = getattr(exc, "errno", None)
    text = str(exc)
    if code is None:
        if "Permission denied" in text:
            code = errno.EACCES
        elif "No such file" in text or "could not open port" in text and "[Errno 2]" in text:
            code = errno.ENOENT
        elif "busy" in text.lower() or "[Errno 16]" in text or "exclusively lock" in text:
            code = errno.EBUSY
    if code in (errno.EBUSY, errno.EAGAIN, errno.EWOULDBLOCK):
        finder = holders_finder or port_holders
        err = port_busy(port, finder(port))
    elif code in (errno.EACCES, errno.EPERM):
        err = port_access_denied(port)
    elif code in (errno.ENOENT, errno.ENXIO, errno.ENODEV):
        err = port_missing(port) if not os.path.exists(port) else port_vanished(port)
    elif code == errno.EIO:
        err = port_vanished(port)
    else:
        err = ConnectError(
            f"Cannot use {port}: {text}",
            cause="The operating system refused the serial port.",
            hint="Reconnect the board and try again; check the kernel log (dmesg) if it repeats.",
        )
    err.__cause__ = exc
    return err


def _owner_group(port: str) -> str:
    try:
        import grp

        return grp.getgrgid(os.stat(port).st_gid).gr_name
    except (OSError, KeyError, ImportError):
        return ""


def _current_user() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name
    except (KeyError, ImportError):
        return os.environ.get("USER", "octoprint")
