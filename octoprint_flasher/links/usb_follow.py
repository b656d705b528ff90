"""Following a USB device across re-enumeration (application ⇄ bootloader).

A board that reboots into its bootloader drops off the bus and comes back with another product
id, often under another tty name. What stays is its place on the bus (the USB *location*, e.g.
``1-1.4``) and usually its serial number, so the new port is matched by those, never by "the
first port with that id" (a second MMU or printer on the same host would be taken instead).
The port lister is injectable (pyserial's ``list_ports`` by default) so emulators can model it.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Optional

PortLister = Callable[[], list[Any]]


def usb_id_of(port: Any) -> Optional[tuple[int, int]]:
    vid, pid = getattr(port, "vid", None), getattr(port, "pid", None)
    return (vid, pid) if vid is not None and pid is not None else None


def find_port(lister: PortLister, device: Optional[str]) -> Optional[Any]:
    """The lister's entry for ``device`` (None when it is not a listed USB port)."""
    if not device:
        return None
    for port in lister():
        if getattr(port, "device", None) == device:
            return port
    return None


def match_port(
    ports: Iterable[Any],
    ids: Iterable[tuple[int, int]],
    location: Optional[str],
    serial_number: Optional[str],
    exclude: Iterable[str] = (),
) -> Optional[Any]:
    """The port with one of ``ids`` at ``location``, else with ``serial_number``; when
    neither is known, the only such port not in ``exclude``."""
    wanted = set(ids)
    skip = set(exclude)
    found = [p for p in ports if usb_id_of(p) in wanted]
    for port in found:
        if location and getattr(port, "location", None) == location:
            return port
    for port in found:
        if serial_number and getattr(port, "serial_number", None) == serial_number:
            return port
    fresh = [p for p in found if getattr(p, "device", None) not in skip]
    if not location and not serial_number and len(fresh) == 1:
        return fresh[0]
    return None


def wait_for_port(
    lister: PortLister,
    ids: Iterable[tuple[int, int]],
    location: Optional[str],
    serial_number: Optional[str],
    timeout: float,
    exclude: Iterable[str] = (),
    interval: float = 0.05,
) -> Optional[Any]:
    """Poll until :func:`match_port` finds the device; None after ``timeout`` seconds."""
    ids = list(ids)
    exclude = list(exclude)
    deadline = time.monotonic() + timeout
    while True:
        port = match_port(lister(), ids, location, serial_number, exclude)
        if port is not None:
            return port
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval)
