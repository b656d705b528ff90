"""Synthetic firmware files shaped like the real ones, for pre-flight tests and the emulator.

``klipper.bin``: an ARM vector table at the application start, code-like filler and the data
dictionary as zlib-compressed JSON, the way Klipper's build embeds it. ``katapult.bin``
(= ``canboot.bin``): a vector table at the flash start with the "CanBoot!" signature just
before the reset handler. ``deployer.bin``: an application at the bootloader's app offset that
carries a copy of ``katapult.bin``.
"""

from __future__ import annotations

import json
import random
import struct
import zlib
from typing import Any, Optional

KATAPULT_SIGNATURE = struct.pack("<Q", 0x21746F6F426E6143)
STACK_TOP = 0x20024000


def _filler(size: int, seed: int) -> bytes:
    rng = random.Random(seed)
    return bytes(rng.getrandbits(8) for _ in range(size))


def klipper_dictionary(
    mcu: str,
    canbus_frequency: Optional[int] = None,
    serial_baud: Optional[int] = None,
    usb_can_bridge: bool = False,
    version: str = "v0.12.0-302-gabcdef12",
) -> dict[str, Any]:
    config: dict[str, Any] = {"MCU": mcu, "CLOCK_FREQ": 64000000, "STATS_SUMSQ_BASE": 256}
    if canbus_frequency:
        config["CANBUS_FREQUENCY"] = canbus_frequency
        config["RECEIVE_WINDOW"] = 192
    if serial_baud:
        config["SERIAL_BAUD"] = serial_baud
    if usb_can_bridge:
        config["CANBUS_BRIDGE"] = 1
    return {
        "app": "Klipper",
        "license": "GNU GPLv3",
        "version": version,
        "build_versions": "gcc: (15:12.2.rel1-1) 12.2.1 binutils: (2.40-2+18+b1) 2.40",
        "config": config,
        "commands": {"identify offset=%u count=%c": 1, "get_uptime": 2},
        "responses": {"identify_response offset=%u data=%.*s": 0},
        "enumerations": {},
    }


def make_klipper_bin(
    mcu: str = "stm32g0b1xx",
    app_start: int = 0x08002000,
    size: int = 26 * 1024,
    canbus_frequency: Optional[int] = 1000000,
    serial_baud: Optional[int] = None,
    usb_can_bridge: bool = False,
    seed: int = 1,
    linked_at: Optional[int] = None,
) -> bytes:
    """A klipper.bin of ``size`` bytes; ``linked_at`` models a build with the wrong offset."""
    base = app_start if linked_at is None else linked_at
    vectors = struct.pack("<II", STACK_TOP, base + 0x1C1) + struct.pack("<I", base + 0x201) * 46
    blob = zlib.compress(
        json.dumps(
            klipper_dictionary(mcu, canbus_frequency, serial_baud, usb_can_bridge),
            separators=(",", ":"),
        ).encode()
    )
    body_len = size - len(vectors) - len(blob)
    if body_len < 16:
        raise ValueError("image too small for its dictionary")
    half = body_len // 2
    return vectors + _filler(half, seed) + blob + _filler(body_len - half, seed + 1)


def make_katapult_bin(flash_start: int = 0x08000000, size: int = 4096, seed: int = 7) -> bytes:
    """katapult.bin/canboot.bin: linked at the flash start, signature before its reset code."""
    handler = flash_start + 0x400
    vectors = struct.pack("<II", STACK_TOP, handler | 1) + b"\x00" * (0x400 - 8 - 8)
    image = bytearray(vectors + KATAPULT_SIGNATURE + _filler(size - 0x400, seed))
    return bytes(image)


def make_deployer_bin(
    app_start: int = 0x08002000, flash_start: int = 0x08000000, seed: int = 9
) -> bytes:
    """deployer.bin: an application at ``app_start`` carrying a katapult.bin payload."""
    vectors = struct.pack("<II", STACK_TOP, app_start + 0x101) + b"\x00" * (0x100 - 8)
    return vectors + _filler(0x400, seed) + make_katapult_bin(flash_start)
