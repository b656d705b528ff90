"""AVR109 ("butterfly") as Prusa's Caterina bootloader speaks it on the MMU2S/MMU3 and CW1/CW1S
(ATmega32U4, USB CDC; ``research/prusa.md`` §2.3).

Single-letter commands; most answer ``\\r``. Addresses are **word** addresses, big-endian, and
auto-increment after every block. ``B hi lo 'F' data`` erases the page at the current address
(only when page-aligned and below 0x7000), fills it and writes it; ``g hi lo 'F'`` reads any
length. Throughput is bounded by USB round trips, not by the nominal baud rate.
"""

from __future__ import annotations

from typing import Any

from ..errors import ProtocolError
from ..links.serial_port import Wire

CR = b"\r"


class Avr109Error(ProtocolError):
    def __init__(self, message: str) -> None:
        super().__init__(
            message,
            cause="The bootloader timed out (it leaves after 8 s without a command), the USB "
            "device re-enumerated, or bytes were lost.",
            hint="Flash again: the bootloader starts on every reset, so the device can always "
            "be recovered (press its reset button if the touch does not work).",
        )


class Avr109:
    """Commands over an open port to a Caterina-style avr109 bootloader."""

    def __init__(self, ser: Any, *, timeout: float = 1.0) -> None:
        self.wire = Wire(ser)
        self.timeout = timeout

    def _expect(self, command: bytes, n: int, what: str) -> bytes:
        self.wire.write(command)
        answer = self.wire.read(n, self.timeout)
        if len(answer) != n:
            raise Avr109Error(
                f"No complete answer to avr109 '{what}' ({len(answer)} of {n} bytes: "
                f"{answer.hex(' ') or 'nothing'})."
            )
        return answer

    def _ok(self, command: bytes, what: str) -> None:
        answer = self._expect(command, 1, what)
        if answer != CR:
            raise Avr109Error(f"avr109 '{what}' answered 0x{answer[0]:02X} instead of CR.")

    def identifier(self) -> str:
        """``S``: seven characters, ``CATERIN`` for Caterina."""
        self.wire.write(b"\x1b")  # ESC, as avrdude sends first; never answered
        return self._expect(b"S", 7, "S").decode("ascii", "replace")

    def software_version(self) -> str:
        return self._expect(b"V", 2, "V").decode("ascii", "replace")

    def auto_increment(self) -> bool:
        return self._expect(b"a", 1, "a") == b"Y"

    def block_size(self) -> int:
        """``b``: ``Y`` and the 16-bit buffer size (0 when block mode is missing)."""
        answer = self._expect(b"b", 3, "b")
        return int.from_bytes(answer[1:], "big") if answer[:1] == b"Y" else 0

    def signature(self) -> bytes:
        """``s``: the three signature bytes, sent last byte first."""
        return bytes(reversed(self._expect(b"s", 3, "s")))

    def enter_progmode(self) -> None:
        self._ok(b"P", "P")

    def set_address(self, byte_address: int) -> None:
        word = byte_address >> 1
        self._ok(b"A" + word.to_bytes(2, "big"), "A")

    def write_block(self, data: bytes) -> None:
        """``B``: one flash page at the current address (which then advances)."""
        self._ok(b"B" + len(data).to_bytes(2, "big") + b"F" + data, "B")

    def read_block(self, length: int) -> bytes:
        """``g``: ``length`` bytes from the current address (which then advances)."""
        return self._expect(b"g" + length.to_bytes(2, "big") + b"F", length, "g")

    def exit(self) -> None:
        """``E``: the bootloader starts the application about 0.5 s later."""
        self._ok(b"E", "E")
