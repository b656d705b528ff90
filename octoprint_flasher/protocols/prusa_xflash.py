"""The MK3 firmware's external-flash (XFLASH) handler: a Prusa-modified STK500v1 subset that
the firmware itself serves for ~1.75 s after printing ``start`` (``optiboot_xflash.cpp``;
``research/prusa.md`` §1.6).

Entry is a text handshake: ``w25x20cl_enter\\n`` → ``w25x20cl_cfm\\n``. After it every command
ends with 0x20 and every answer is ``14 … 10``. Prusa split each address and length byte into
its low and high nibble (the device ORs them back) so that no byte of either can be 0x3B, the
character the Einsy's USB chip mishandles; page data is protected by the flasher (two rounds).
The handler never auto-increments: LOAD_ADDRESS goes before every page. Byte address =
(E << 17) | (W << 1), with E from UNIVERSAL 0x4D.
"""

from __future__ import annotations

import time
from typing import Any

from ..errors import ProtocolError
from ..links.serial_port import Wire

ENTER = b"w25x20cl_enter\n"
CONFIRM = b"w25x20cl_cfm\n"
START = b"start"

INSYNC = 0x14
OK = 0x10
EOP = 0x20


def split_word(word: int) -> bytes:
    """LOAD_ADDRESS's 16-bit word address: lo&0F, lo&F0, hi&0F, hi&F0."""
    lo, hi = word & 0xFF, (word >> 8) & 0xFF
    return bytes([lo & 0x0F, lo & 0xF0, hi & 0x0F, hi & 0xF0])


def split_length(n: int) -> bytes:
    """PROG_PAGE/READ_PAGE length: (n>>8)&F0, (n>>8)&0F, n&F0, n&0F."""
    hi, lo = (n >> 8) & 0xFF, n & 0xFF
    return bytes([hi & 0xF0, hi & 0x0F, lo & 0xF0, lo & 0x0F])


class XflashError(ProtocolError):
    def __init__(self, message: str) -> None:
        super().__init__(
            message,
            cause="Bytes were lost on the serial line, or the printer rebooted.",
            hint="The firmware itself is already written and verified; flash again to "
            "install the languages.",
        )


class Xflash:
    """Commands to the firmware's XFLASH handler over an open port."""

    def __init__(self, ser: Any, *, timeout: float = 0.5, erase_timeout: float = 2.0) -> None:
        self.wire = Wire(ser)
        self.timeout = timeout
        #: a page that starts a 64 KB block waits for the block erase (typ. 150 ms, max 1 s)
        self.erase_timeout = erase_timeout
        self._ext = -1

    # --- handshake ---------------------------------------------------------------------------

    def wait_for_start(self, timeout: float) -> bytes:
        """Read lines until one is ``start``; returns what came before (for the log). Sends
        nothing: the firmware flushes its input and any stray byte spoils the handshake."""
        seen = bytearray()
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(bytes(seen))
            b = self.wire.read(1, left)
            if not b:
                continue
            seen += b
            if b == b"\n":
                line = seen[seen.rfind(b"\n", 0, len(seen) - 1) + 1 :]
                # a reboot may be preceded by the handler's 0x11 or other stray bytes
                if bytes(c for c in line if 32 <= c < 127).strip() == START:
                    return bytes(seen)

    def enter(self, timeout: float = 1.0, quiet: float = 0.25) -> bool:
        """Send the magic; True when the confirmation came. Then drain until ``quiet``
        seconds of silence: firmware before 3.10 sends stray bytes after it."""
        self.wire.write(ENTER)
        got = bytearray()
        deadline = time.monotonic() + timeout
        while CONFIRM not in got:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            got += self.wire.read(1, left)
        self.wire.drain(quiet)
        return True

    # --- commands ----------------------------------------------------------------------------

    def _cmd(self, body: bytes, reply_len: int = 0, timeout: float = 0.0) -> bytes:
        self.wire.write(body + bytes([EOP]))
        answer = self.wire.read(reply_len + 2, timeout or self.timeout)
        if len(answer) < reply_len + 2:
            raise XflashError(
                f"No complete answer to XFLASH command 0x{body[0]:02X} "
                f"({len(answer)} of {reply_len + 2} bytes)."
            )
        if answer[0] != INSYNC or answer[-1] != OK:
            raise XflashError(
                f"XFLASH command 0x{body[0]:02X} answered {answer[:8].hex(' ')}, not 14 … 10."
            )
        return answer[1:-1]

    def sync(self, tries: int = 5) -> None:
        for _ in range(tries):
            try:
                self._cmd(b"\x30")
                return
            except XflashError:
                self.wire.drain(0.05)
        raise XflashError("The XFLASH handler does not answer GET_SYNC.")

    def read_signature(self) -> bytes:
        return self._cmd(b"\x75", 3)

    def _ext_address(self, address: int) -> None:
        ext = (address >> 17) & 0xFF
        if ext != self._ext:
            self._cmd(bytes([0x56, 0x4D, 0x00, ext, 0x00]), 1)
            self._ext = ext

    def load_address(self, address: int) -> None:
        self._ext_address(address)
        self._cmd(b"\x55" + split_word((address >> 1) & 0xFFFF))

    def program_page(self, address: int, data: bytes) -> None:
        """LOAD_ADDRESS + PROG_PAGE; the answer's 0x10 comes after the (erase and) program."""
        self.load_address(address)
        slow = self.erase_timeout if address & 0xFFFF == 0 else self.timeout
        self._cmd(b"\x64" + split_length(len(data)) + b"F" + data, 0, slow)

    def read_page(self, address: int, length: int) -> bytes:
        self.load_address(address)
        return self._cmd(b"\x74" + split_length(length) + b"F", length)

    def leave(self) -> None:
        self._cmd(b"\x51")
