"""The emulated boot ROM against an independent client: pypicoboot (PyPI, AGPL-3.0, a test
dependency only). pypicoboot finds devices with ``usb.core.find`` and no backend argument, so
the least invasive way in is to patch ``usb.core.find`` to add ours (its own code is unchanged).
"""

from __future__ import annotations

import functools
import struct
from typing import Iterator

import picoboot.picoboot as picoboot_peer  # noqa: E402  (a develop extra: fails, not skips, if missing)
import pytest
import usb.core

from octoprint_flasher.protocols import picoboot as pb
from tests.emulators.picoboot_device import EmulatedRp2040, PicobootBackend, klipper_like_rp2040


@pytest.fixture
def rom(monkeypatch: pytest.MonkeyPatch) -> Iterator[EmulatedRp2040]:
    dev = EmulatedRp2040(time_scale=0.01)
    backend = PicobootBackend([dev])
    monkeypatch.setattr(usb.core, "find", functools.partial(usb.core.find, backend=backend))
    yield dev


def test_pypicoboot_reads_and_writes_the_emulated_flash(rom: EmulatedRp2040) -> None:
    rom.load_flash(0x10000000, klipper_like_rp2040(8192))
    peer = picoboot_peer.PicoBoot.open()
    try:
        assert peer.platform.name == "RP2040"
        assert peer.memory == 2 * 1024 * 1024  # found by the XIP mirror, as on hardware
        peer.exclusive_access()
        peer.exit_xip()
        peer.flash_erase(0x10010000, 4096)
        peer.flash_write(0x10010000, bytes(range(256)) * 2)
        assert rom.read_flash(0x10010000, 512) == bytes(range(256)) * 2
        assert peer.flash_read(0x10000000, 8192) == klipper_like_rp2040(8192)
        with pytest.raises(ValueError):
            peer.flash_write(0x10010080, bytes(256))  # pypicoboot checks alignment itself
    finally:
        peer.close()


def test_pypicoboot_writes_a_page_into_blank_flash_on_open(rom: EmulatedRp2040) -> None:
    """What the research file reports of pypicoboot: on a board whose first two pages are
    blank, opening it writes a 'PICO' page at 0x10000000 (why it is not shipped)."""
    peer = picoboot_peer.PicoBoot.open()
    peer.close()
    assert rom.read_flash(0x10000000, 4) == b"PICO"


def test_what_pypicoboot_wrote_our_client_reads_back(rom: EmulatedRp2040) -> None:
    peer = picoboot_peer.PicoBoot.open()
    try:
        peer.exclusive_access()
        peer.exit_xip()
        peer.flash_erase(0x10020000, 4096)
        peer.flash_write(0x10020000, b"\xa5" * 4096)
    finally:
        peer.close()
    dev = usb.core.find(idVendor=0x2E8A)
    eps = pb.find_interface(dev)
    assert eps is not None
    session = pb.PicobootSession(dev, eps)
    session.interface_reset()
    assert session.read(0x10020000, 4096) == b"\xa5" * 4096
    # and the ROM's refusals reach both clients the same way: a stall plus a status
    with pytest.raises(pb.PicobootError) as info:
        session.flash_erase(0x10020100, 4096)
    assert info.value.status is not None
    assert info.value.status.status == pb.Status.BAD_ALIGNMENT
    assert struct.unpack("<II", rom.commands[-1][2]) == (0x10020100, 4096)
