"""How to reach a board: the user's choice of method and link, protocol-neutral.

Front ends fill a :class:`Target` from CLI flags or plugin settings; :mod:`methods` turns it
into an opened :class:`~octoprint_flasher.flasher.Flasher`. Tests and the demo inject
emulated transports through ``usb_backend`` and ``can_bus_factory``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

METHODS = (
    "auto",
    "stk500v1",
    "stk500v2",
    "dfu",
    "katapult",
    "marlin-sd",
    "picoboot",
    "prusa",
    "avr109",
)


@dataclass
class Target:
    method: str = "auto"
    port: Optional[str] = None
    baud: Optional[int] = None
    mcu: Optional[str] = None
    address: Optional[int] = None
    # USB DFU
    usb: Optional[str] = None  # "VID:PID"
    usb_path: Optional[str] = None  # "BUS-PORT[.PORT...]"
    usb_backend: Any = None  # a pyusb IBackend; None means libusb
    # Katapult over CAN
    can_interface: str = "socketcan"
    can_channel: str = "can0"
    can_bitrate: Optional[int] = None
    uuid: Optional[str] = None
    can_bus_factory: Optional[Callable[[], Any]] = None  # returns a python-can BusABC
    # behaviour
    # skip blocks that are already identical; None is the method's default (on for DFU, where
    # reading costs a fraction of erasing; off elsewhere), False forces a full write
    quick: Optional[bool] = None
    allow_bootloader_erase: bool = False  # explicit confirmation for dangerous writes
    # the board is the printer's own (its port, or the user said so): only then is OctoPrint
    # disconnected (and heaters switched off) for the flash
    printer_port: bool = False
    options: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        if self.method == "dfu" or (self.usb and not self.port):
            return f"USB {self.usb or self.usb_path or 'DFU device'}"
        if self.method == "katapult" and not self.port:
            return f"CAN {self.can_channel} {self.uuid or ''}".strip()
        return self.port or "auto"
