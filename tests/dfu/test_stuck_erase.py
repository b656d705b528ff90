"""The STM32H7 rev V ROM that never leaves dfuDNBUSY after a sector erase.

The host must recover as soon as the erase is over (the datasheet's typical time), not at
the multi-second deadline, and must not take the erase on trust: it reads the sector back and
erases again when it is not blank. Timing is pinned on a virtual clock shared by the emulator
and the session, so load on the machine cannot make these tests flaky.
"""

from __future__ import annotations

import struct

import pytest
import usb.core

from octoprint_flasher.errors import ProtocolError
from octoprint_flasher.protocols import dfuse
from octoprint_flasher.protocols.dfuse import DfuSession, Timeouts
from tests.dfu.conftest import Board, bin_image, klipper_like
from tests.emulators.dfu_device import H723, DfuBackend, EmulatedDfuDevice, Faults, wire_seconds

K = 1024
SECTOR = 0x08020000
TYPICAL, LONGEST = 1.0, 4.0  # what the flasher passes for a 128 KiB H7 sector
CLRSTATUS, ERASE = 4, 0x41


class VirtualClock:
    """Device and host share one clock that only sleeping advances."""

    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += max(0.0, seconds)


def stuck_h723(clock: VirtualClock, **faults: object) -> tuple[EmulatedDfuDevice, DfuSession]:
    dev = EmulatedDfuDevice(
        H723,
        time_scale=1.0,
        faults=Faults(stuck_busy_on_erase=True, **faults),  # type: ignore[arg-type]
        clock=clock.now,
        sleep=clock.sleep,
    )
    dev.load_flash(SECTOR, klipper_like(SECTOR, 40 * K, seed=3))  # an older build
    usb_dev = usb.core.find(backend=DfuBackend([dev]), idVendor=0x0483, idProduct=0xDF11)
    usb_dev.set_interface_altsetting(0, 0)
    session = DfuSession(usb_dev, 0, 1024, Timeouts(), sleep=clock.sleep, clock=clock.now)
    session.recover()
    return dev, session


def erase_count(dev: EmulatedDfuDevice) -> int:
    return sum(1 for c in dev.commands if c[0] == ERASE and len(c) == 5)


def clrstatus_count(dev: EmulatedDfuDevice) -> int:
    return sum(1 for r in dev.requests if r[0] == 0x21 and r[1] == CLRSTATUS)


@pytest.mark.parametrize("busy_mode", ["block", "answer"])
def test_recovers_right_after_the_typical_erase_time_and_confirms_blank(busy_mode: str) -> None:
    clock = VirtualClock()
    dev, session = stuck_h723(clock, busy_mode=busy_mode)
    began = clock.now()
    assert session.erase_sector(SECTOR, 128 * K, typical_s=TYPICAL, max_s=LONGEST) == 1
    spent = clock.now() - began
    assert clrstatus_count(dev) == 2
    assert session.quirks_used == ["stuck-dnbusy"]
    assert dev.read_flash(SECTOR, 128 * K) == b"\xff" * (128 * K)
    # the erase itself (1.0 s) plus reading 128 KiB back (~0.15 s at full speed), not the
    # 4 s deadline the recovery used to wait for
    assert TYPICAL <= spent <= 1.3 * TYPICAL
    assert spent < Timeouts().erase_deadline(128 * K) / 3


def test_the_sector_is_read_back_after_the_recovery() -> None:
    clock = VirtualClock()
    dev, session = stuck_h723(clock)
    session.erase_sector(SECTOR, 128 * K, typical_s=TYPICAL, max_s=LONGEST)
    uploads = sum(1 for r in dev.requests if r[0] == 0xA1 and r[1] == 2 and r[2] >= 2)
    assert uploads == 128  # every 1 KiB block of the sector


def test_a_sector_that_is_not_blank_is_erased_again() -> None:
    clock = VirtualClock()
    dev, session = stuck_h723(clock, erase_incomplete=1)
    lines: list[str] = []
    session.log = lines.append
    assert session.erase_sector(SECTOR, 128 * K, typical_s=TYPICAL, max_s=LONGEST) == 2
    assert erase_count(dev) == 2 and clrstatus_count(dev) == 4
    assert dev.read_flash(SECTOR, 128 * K) == b"\xff" * (128 * K)
    assert any("not blank after the H7 recovery" in line for line in lines)


def test_a_sector_that_never_erases_is_a_clear_error() -> None:
    clock = VirtualClock()
    dev, session = stuck_h723(clock, erase_incomplete=2)
    with pytest.raises(ProtocolError, match="still not blank after erasing it 2 times") as info:
        session.erase_sector(SECTOR, 128 * K, typical_s=TYPICAL, max_s=LONGEST)
    assert "BOOT0" in info.value.hint
    assert erase_count(dev) == 2
    # the second try waited the datasheet maximum, the whole thing stays bounded
    assert clock.now() < 2 * (LONGEST + 0.5)


def test_a_device_that_reports_completion_is_not_read_back() -> None:
    clock = VirtualClock()
    dev, session = stuck_h723(clock)
    dev.faults.stuck_busy_on_erase = False
    assert session.erase_sector(SECTOR, 128 * K, typical_s=TYPICAL, max_s=LONGEST) == 1
    assert clrstatus_count(dev) == 0
    assert not any(r[0] == 0xA1 and r[1] == 2 for r in dev.requests)


def test_flasher_on_an_h7_recovers_each_erase_and_verifies(h723: Board) -> None:
    h723.dev.faults.stuck_busy_on_erase = True
    old = klipper_like(0x08020000, 200 * K, seed=9)  # an older build over two sectors
    h723.dev.load_flash(0x08020000, old)
    data = klipper_like(0x08020000, 140 * K)
    result = h723.flasher(quick=False).flash(bin_image(data))
    assert h723.dev.read_flash(0x08020000, len(data)) == data
    assert h723.dev.read_flash(0x08020000 + len(data), 256 * K - len(data)) == b"\xff" * (
        256 * K - len(data)
    )
    assert len(h723.requests(CLRSTATUS)) == 4  # two per stuck erase
    assert result.bytes_verified == len(data)
    assert any("H7 quirk" in line for line in h723.log)


def test_flasher_erases_a_non_blank_sector_again(h723: Board) -> None:
    h723.dev.faults.stuck_busy_on_erase = True
    h723.dev.faults.erase_incomplete = 1
    h723.dev.load_flash(0x08020000, klipper_like(0x08020000, 40 * K, seed=9))
    data = klipper_like(0x08020000, 40 * K)
    h723.flasher(quick=False).flash(bin_image(data))
    assert h723.dev.read_flash(0x08020000, len(data)) == data
    erases = [struct.unpack_from("<I", c, 1)[0] for c in h723.dev.commands if c[0] == ERASE]
    assert erases == [0x08020000, 0x08020000]
    assert any("erasing it again" in line for line in h723.log)


def test_erase_command_bytes_are_the_aligned_sector_start() -> None:
    assert dfuse.cmd_erase(SECTOR) == b"\x41\x00\x00\x02\x08"


def test_flasher_time_with_the_stuck_rom_stays_within_1_3x_the_device_bound() -> None:
    """Model time (virtual clock): erase + programming + the bytes down and back up is what
    the device needs; the recovery may add its read-back, not the 4 s deadline."""
    clock = VirtualClock()
    faults = Faults(stuck_busy_on_erase=True)
    dev = EmulatedDfuDevice(H723, time_scale=1.0, faults=faults, clock=clock.now, sleep=clock.sleep)
    dev.install_bootloader(128 * K)
    dev.load_flash(SECTOR, klipper_like(SECTOR, 40 * K, seed=3))
    board = Board(DfuBackend([dev]), dev)
    flasher = board.flasher(options={"dfu_time_scale": 1.0})
    flasher.sleep = clock.sleep
    flasher.identify()
    assert flasher.session is not None
    flasher.session.clock, flasher.session.sleep = clock.now, clock.sleep
    data = klipper_like(SECTOR, 40 * K)
    began = clock.now()
    flasher.flash(bin_image(data))
    spent = clock.now() - began
    assert dev.read_flash(SECTOR, len(data)) == data
    assert "stuck-dnbusy" in flasher.session.quirks_used
    bound = (
        H723.erase_s[128 * K] + len(data) // 32 * H723.program_word_s + 2 * wire_seconds(len(data))
    )
    assert spent <= 1.3 * bound, f"{spent:.3f} s against a device bound of {bound:.3f} s"
