"""Naming an AVR chip from the signature its bootloader reports."""

from __future__ import annotations

from dataclasses import dataclass

from .. import chips
from ..errors import ProtocolError


@dataclass
class Chip:
    """What the bootloader told us, plus the table facts for that signature."""

    signature: bytes
    name: str
    flash_size: int
    page_size: int
    boot_sizes: tuple[int, ...]


def chip_for_signature(signature: bytes) -> Chip:
    known = chips.avr_by_signature(signature)
    if known is None:
        raise ProtocolError(
            f"The bootloader reports an unknown chip signature {signature.hex(' ')}.",
            cause="Either the chip is not an AVR this flasher knows, or the serial line garbles "
            "bytes (wrong baud rate).",
            hint="Check --baud; if the chip is new, flash it with avrdude and report the "
            "signature so it can be added.",
        )
    return Chip(signature, known.name, known.flash_size, known.page_size, known.boot_sizes)
