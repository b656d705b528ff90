"""What a Klipper/Katapult binary says about itself, read before anything is written.

A ``klipper.bin`` embeds its data dictionary as zlib-compressed JSON (``"app": "Klipper"``);
its ``config`` names the MCU and, for CAN builds, ``CANBUS_FREQUENCY``. An ARM image starts
with its vector table, whose second word (the reset handler) must point into the application
area Katapult reported: that single rule rejects ``katapult.bin``/``canboot.bin`` (linked at
the flash start) and Klipper builds with the wrong bootloader offset, and accepts
``deployer.bin``.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any, Optional

#: 8 bytes Katapult places before its reset handler (``CANBOOT_SIGNATURE``, "CanBoot!")
KATAPULT_SIGNATURE = struct.pack("<Q", 0x21746F6F426E6143)

_ZLIB_HEADERS = (b"\x78\x01", b"\x78\x5e", b"\x78\x9c", b"\x78\xda")


@dataclass(frozen=True)
class KlipperBuild:
    """Facts from the embedded dictionary."""

    mcu: str
    version: str
    canbus_frequency: Optional[int]
    serial_baud: Optional[int]
    usb_can_bridge: bool
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def interface(self) -> str:
        """``can``, ``usb-can-bridge``, ``serial`` or ``usb``: how this build talks to the host."""
        if self.usb_can_bridge:
            return "usb-can-bridge"
        if self.canbus_frequency:
            return "can"
        if self.serial_baud:
            return "serial"
        return "usb"


def find_dictionary(data: bytes) -> Optional[dict[str, Any]]:
    """Locate and decode the zlib-compressed JSON data dictionary, if the image has one."""
    candidates = sorted({pos for header in _ZLIB_HEADERS for pos in _find_all(data, header)})
    for pos in candidates:
        try:
            raw = zlib.decompressobj().decompress(data[pos:], 1 << 20)
        except zlib.error:
            continue
        if not raw.startswith(b"{"):
            continue
        try:
            parsed = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            continue
        if isinstance(parsed, dict) and ("config" in parsed or parsed.get("app") == "Klipper"):
            return parsed
    return None


def _find_all(data: bytes, needle: bytes) -> list[int]:
    out = []
    pos = data.find(needle)
    while pos >= 0:
        out.append(pos)
        pos = data.find(needle, pos + 1)
    return out


def klipper_build(data: bytes) -> Optional[KlipperBuild]:
    """The Klipper build facts of ``data``, or None if it carries no Klipper dictionary."""
    dictionary = find_dictionary(data)
    if dictionary is None:
        return None
    config = dictionary.get("config") or {}
    return KlipperBuild(
        mcu=str(config.get("MCU", "")),
        version=str(dictionary.get("version", "")),
        canbus_frequency=_int_or_none(config.get("CANBUS_FREQUENCY")),
        serial_baud=_int_or_none(config.get("SERIAL_BAUD")),
        usb_can_bridge=bool(_int_or_none(config.get("CANBUS_BRIDGE"))),
        config=dict(config),
    )


def _int_or_none(value: Any) -> Optional[int]:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class VectorCheck:
    """Reset-vector verdict for an image placed at ``image_start``."""

    ok: bool
    stack_pointer: int
    reset_handler: int

    def describe(self) -> str:
        return f"initial SP 0x{self.stack_pointer:08X}, reset handler 0x{self.reset_handler:08X}"


def check_reset_vector(first_words: bytes, app_start: int, app_end: int) -> VectorCheck:
    """Apply the rule to the first 8 bytes of the image (SP, reset handler)."""
    if len(first_words) < 8:
        return VectorCheck(False, 0, 0)
    sp, reset = struct.unpack_from("<II", first_words)
    handler = reset & ~1
    return VectorCheck(app_start <= handler < app_end, sp, reset)


def looks_like_katapult(data: bytes) -> bool:
    """True if the image contains Katapult's entry signature (katapult.bin, canboot.bin and
    deployer.bin, which embeds the bootloader, all do)."""
    return KATAPULT_SIGNATURE in data
