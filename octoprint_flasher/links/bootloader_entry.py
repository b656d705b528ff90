"""Getting a board from running Klipper into Katapult, and finding it again afterwards.

Four ways, all followed by *readiness polling* rather than fixed sleeps:

* CAN: REQUEST_BOOTLOADER with the node's UUID, then QUERY_UNASSIGNED until the same UUID
  answers as Katapult (a chip's UUID is the same under both firmwares).
* USB (Klipper ``1d50:614e``): the 1200-baud touch; Katapult re-enumerates as ``1d50:6177``
  on the same USB path with the same serial number.
* UART: Klipper's "Request Serial Bootloader" string, then CONNECT until Katapult answers.
* Klipper USB-CAN bridge (``1d50:606f``): the bridge itself jumps, its ``can0`` disappears and
  Katapult comes up as a USB serial port, which we then follow.

Listing serial ports (with VID:PID) and finding a bridge's netdev are injectable functions, so
the emulator can simulate re-enumeration without real USB.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from ..errors import ConnectError
from ..protocols import klipper_can
from ..protocols.klipper_can import Admin, NodeAnswer

KATAPULT_USB = (0x1D50, 0x6177)
KLIPPER_USB = (0x1D50, 0x614E)
KLIPPER_BRIDGE_USB = (0x1D50, 0x606F)
STM32_DFU_USB = (0x0483, 0xDF11)
RP2040_BOOT_USB = (0x2E8A, 0x0003)

#: what Klipper's serial parser recognises as a bootloader request (34 bytes)
SERIAL_BOOTLOADER_REQUEST = b"~ \x1c Request Serial Bootloader!! ~"


@dataclass(frozen=True)
class UsbPort:
    """A serial port as pyserial's ``list_ports`` describes it (same attribute names)."""

    device: str
    vid: Optional[int] = None
    pid: Optional[int] = None
    serial_number: Optional[str] = None
    manufacturer: Optional[str] = None
    product: Optional[str] = None
    location: Optional[str] = None

    @property
    def usb_id(self) -> Optional[tuple[int, int]]:
        return (self.vid, self.pid) if self.vid is not None and self.pid is not None else None


@dataclass(frozen=True)
class BridgeInfo:
    """A Klipper USB-CAN bridge that owns a CAN netdev."""

    channel: str
    serial_number: str
    location: Optional[str] = None

    @property
    def uuid(self) -> bytes:
        return klipper_can.uuid_from_chip_id(bytes.fromhex(self.serial_number))


PortLister = Callable[[], list[Any]]
BridgeFinder = Callable[[str], Optional[BridgeInfo]]


def list_serial_ports() -> list[Any]:
    """pyserial's port list (objects with ``device, vid, pid, serial_number, location``)."""
    from serial.tools import list_ports

    return list(list_ports.comports())


def find_usb_can_bridge(channel: str, sysfs: Path = Path("/sys")) -> Optional[BridgeInfo]:
    """The Klipper USB-CAN bridge (``1d50:606f``, manufacturer Klipper) that owns ``channel``."""
    netdev = sysfs / "class" / "net" / channel / "device"
    try:
        interface_dir = netdev.resolve()
    except OSError:
        return None
    usb_dir = interface_dir.parent
    try:
        vid = int((usb_dir / "idVendor").read_text().strip(), 16)
        pid = int((usb_dir / "idProduct").read_text().strip(), 16)
        maker = (usb_dir / "manufacturer").read_text().strip().lower()
        serial = (usb_dir / "serial").read_text().strip()
    except (OSError, ValueError):
        return None
    if (vid, pid) != KLIPPER_BRIDGE_USB or maker != "klipper":
        return None
    return BridgeInfo(channel, serial, usb_dir.name)


def _usb_id(port: Any) -> Optional[tuple[int, int]]:
    vid, pid = getattr(port, "vid", None), getattr(port, "pid", None)
    return (vid, pid) if vid is not None and pid is not None else None


def _find_port(ports: list[Any], device: str) -> Optional[Any]:
    for port in ports:
        if getattr(port, "device", None) == device:
            return port
    return None


def wait_for_katapult_port(
    lister: PortLister,
    location: Optional[str],
    serial_number: Optional[str],
    before: set[str],
    timeout: float,
    interval: float = 0.02,
) -> Any:
    """Poll the port list until Katapult (``1d50:6177``) shows up for the same board.

    Same USB path first, then the same serial number (Klipper and Katapult both report the
    chip id), then a single new Katapult port. A ROM DFU or BOOTSEL device appearing instead
    means Klipper found no Katapult to jump to.
    """
    deadline = time.monotonic() + timeout
    while True:
        ports = lister()
        katapults = [p for p in ports if _usb_id(p) == KATAPULT_USB]
        for port in katapults:
            if location and getattr(port, "location", None) == location:
                return port
        for port in katapults:
            if serial_number and getattr(port, "serial_number", None) == serial_number:
                return port
        fresh = [p for p in katapults if p.device not in before]
        if len(fresh) == 1 and not location and not serial_number:
            return fresh[0]
        for port in ports:
            if _usb_id(port) in (STM32_DFU_USB, RP2040_BOOT_USB) and port.device not in before:
                raise ConnectError(
                    "The board rebooted into its ROM bootloader instead of Katapult.",
                    cause="Klipper found no Katapult to jump to (not installed, or Klipper "
                    "older than v0.11), so it fell back to the chip's DFU/BOOTSEL mode.",
                    hint="Flash with the dfu method now, or install Katapult first.",
                )
        if time.monotonic() >= deadline:
            raise ConnectError(
                "The board did not come back as Katapult (USB 1d50:6177) after the request.",
                cause="Katapult is not installed, the firmware ignored the request, or the "
                "USB device re-enumerated somewhere we could not match.",
                hint="Double-tap the reset button to enter Katapult, then flash again.",
            )
        time.sleep(interval)


def touch_1200(port: str, open_serial: Optional[Callable[..., Any]] = None) -> None:
    """Klipper reboots into its bootloader when the line is set to 1200 baud and DTR drops."""
    if open_serial is None:
        import serial

        open_serial = serial.Serial
    try:
        ser = open_serial(port, 1200, timeout=0.1)
    except Exception as exc:
        raise ConnectError(
            f"Cannot open {port} for the 1200-baud bootloader request: {exc}",
            cause="The port is held by another program (OctoPrint or klippy) or has gone.",
            hint="Disconnect the printer in OctoPrint and stop klippy, then try again.",
        ) from exc
    try:
        for level in (True, False):
            try:
                ser.dtr = level
            except OSError:
                pass  # ptys and some adapters have no modem lines; the baud change suffices
    finally:
        ser.close()


def enter_from_usb_klipper(
    port: str, lister: PortLister, timeout: float = 5.0, open_serial: Any = None
) -> Any:
    """1200-baud touch on a Klipper USB port and follow the re-enumeration."""
    ports = lister()
    me = _find_port(ports, port)
    before = {p.device for p in ports}
    touch_1200(port, open_serial)
    return wait_for_katapult_port(
        lister,
        getattr(me, "location", None),
        getattr(me, "serial_number", None),
        before - {port},
        timeout,
    )


@dataclass
class CanEntry:
    """Where the Katapult node is after entry: on CAN (``answer``) or as a serial port."""

    answer: Optional[NodeAnswer] = None
    serial_port: Any = None
    requested: bool = False


def enter_from_can(
    admin: Admin,
    uuid: bytes,
    log: Callable[[str], None],
    timeout: float = 5.0,
    bridge: Optional[BridgeInfo] = None,
    lister: Optional[PortLister] = None,
    query_window: float = 0.05,
) -> CanEntry:
    """Bring node ``uuid`` into Katapult and leave it unassigned, ready for an id.

    If it already answers as Katapult nothing is sent to it. Otherwise REQUEST_BOOTLOADER goes
    out (Klipper honours it whether or not klippy assigned it an id) and we poll.
    """
    admin.clear_katapult()
    for answer in admin.query(query_window):
        if answer.uuid == uuid.hex() and answer.app == klipper_can.APP_KATAPULT:
            log(f"Node {uuid.hex()} is already in Katapult.")
            return CanEntry(answer=answer)
    before = {p.device for p in lister()} if lister and bridge else set()
    log(f"Asking node {uuid.hex()} to reboot into Katapult.")
    admin.request_bootloader(uuid)
    if bridge is not None and lister is not None:
        log(
            f"{bridge.channel} is a Klipper USB-CAN bridge: it will leave the bus and come "
            "back as a Katapult USB serial port."
        )
        port = wait_for_katapult_port(
            lister, bridge.location, bridge.serial_number, before, timeout
        )
        log(f"Katapult is up on {port.device}.")
        return CanEntry(serial_port=port, requested=True)
    found = admin.wait_for(uuid, klipper_can.APP_KATAPULT, timeout)
    if found is None:
        raise ConnectError(
            f"Node {uuid.hex()} did not answer as Katapult after the bootloader request.",
            cause="Katapult is not installed, Klipper is older than v0.11 (no CAN request), "
            "the node rebooted into ROM DFU instead, Katapult runs at a different CAN "
            "bitrate than the interface, or the board is boot-looping after a bootloader "
            "was flashed through Katapult.",
            hint="Run the CAN diagnostics; double-tap reset to force Katapult; check the "
            "bitrate in Katapult's build against `ip -details link show`.",
        )
    log(f"Node {uuid.hex()} answers as Katapult.")
    return CanEntry(answer=found, requested=True)
