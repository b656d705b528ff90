"""DFU flashing speed against the emulated STM32 ROM running in real time.

For each case the table compares our full flash (erase touched sectors, write, read-back
verify) with the device bound — the time the chip and the USB link need no matter how clever
the host is: touched-sector erase + flash-word programming + the image's bytes moved down and
back up at full-speed USB (64-byte packets, 1 ms frames) — and with a pydfu-like strategy
(mass erase, then SET_ADDRESS + DNLOAD for every chunk, no verify) built on the same protocol
layer. A quick re-flash of the identical image shows what reading before erasing saves.
Every board holds its vendor bootloader and an older build in the application area, so a new
build must erase (quick, the DFU default, would otherwise skip the erase of blank flash).
The stuck-busy case runs the H723 with the rev V ROM quirk (dfuDNBUSY for ever after an
erase) and times the flash plus the leave until the application has re-enumerated.

Times are the emulator's datasheet-typical figures (see tests/emulators/dfu_device.py), not
measurements of real silicon. Run: ``.venv/bin/python bench/bench_dfu.py`` (about a minute;
holds the machine-wide real-time lock).
"""

from __future__ import annotations

import argparse
import fcntl
import math
import os
import platform
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from contextlib import contextmanager  # noqa: E402

from octoprint_flasher.flashers.dfu import DfuFlasher  # noqa: E402
from octoprint_flasher.image.model import FirmwareImage, Segment  # noqa: E402
from octoprint_flasher.protocols.dfuse import DfuSession, Timeouts  # noqa: E402
from octoprint_flasher.target import Target  # noqa: E402
from tests.emulators.dfu_device import (  # noqa: E402
    MODELS,
    ChipModel,
    DfuBackend,
    EmulatedDfuDevice,
    Faults,
    control_frames,
    wire_seconds,
)

LOCK = Path(os.environ.get("FLASHER_REALTIME_LOCK", "/tmp/octoprint-flasher-realtime.lock"))
KIB = 1024


@contextmanager
def realtime_lock() -> Iterator[None]:
    LOCK.touch(exist_ok=True)
    with LOCK.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@dataclass
class Case:
    model: str
    address: int
    size: int

    @property
    def label(self) -> str:
        return f"{self.model}, {self.size // KIB} KiB at 0x{self.address:08X}"


def image_bytes(address: int, size: int, seed: int = 7) -> bytes:
    """Klipper-like: a vector table linked for ``address`` then incompressible code."""
    head = struct.pack("<II", 0x20001000, address + 0x201)
    return head + os.urandom(size - len(head)) if seed else head


class VirtualClock:
    """Model time only: the emulator and the host share a clock that only sleeping advances,
    so the figure is what the algorithm costs on the device, free of this machine's load."""

    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += max(0.0, seconds)


def board(
    model: ChipModel,
    bootloader: int,
    faults: Faults | None = None,
    old: int = 0,
    clock: VirtualClock | None = None,
) -> tuple[DfuBackend, EmulatedDfuDevice]:
    """A board with its vendor bootloader and ``old`` bytes of an older build behind it."""
    if clock is None:
        dev = EmulatedDfuDevice(model, time_scale=1.0, faults=faults)
    else:
        dev = EmulatedDfuDevice(
            model, time_scale=1.0, faults=faults, clock=clock.now, sleep=clock.sleep
        )
    if bootloader:
        dev.install_bootloader(bootloader)
    if old:
        start = model.flash_start + bootloader
        dev.load_flash(start, image_bytes(start, old))
    return DfuBackend([dev]), dev


def device_bound(model: ChipModel, address: int, size: int) -> tuple[float, float, float, float]:
    """(erase, program, transfer, total) seconds the device itself needs."""
    end = address + size
    erase = 0.0
    for start, sector, count in model.sectors:
        for i in range(count):
            s = start + i * sector
            if s < end and s + sector > address:
                erase += model.erase_s[sector]
    padded = math.ceil(size / 32) * 32
    program = padded / model.flash_word * model.program_word_s
    transfer = 2 * wire_seconds(padded)  # down, and back up for the verify
    return erase, program, transfer, erase + program + transfer


def protocol_floor(model: ChipModel, address: int, size: int) -> float:
    """The fastest any host that honours bwPollTimeout can be on this device: every control
    transfer costs at least one 1 ms frame (completion is reported at frame end), each command
    waits max(bwPollTimeout, operation time), verify reads every byte back."""
    frame = 0.001

    def xfer(n: int) -> float:
        return control_frames(n) * frame

    def op(poll_ms: int, seconds: float) -> float:
        # DNLOAD, first GETSTATUS (starts it), wait, second GETSTATUS
        return 2 * frame + max(poll_ms / 1000.0, seconds) + frame

    end = address + size
    total = op(model.set_address_poll_ms, 0.0)  # one SET_ADDRESS for the write run
    for start, sector, count in model.sectors:
        for i in range(count):
            s = start + i * sector
            if s < end and s + sector > address:
                total += op(model.erase_poll_ms, model.erase_s[sector])
    padded = math.ceil(size / 32) * 32
    chunk = model.transfer_size
    for pos in range(0, padded, chunk):
        n = min(chunk, padded - pos)
        program = math.ceil(n / model.flash_word) * model.program_word_s
        total += xfer(n) - frame + op(model.write_poll_ms, program)
    total += op(model.set_address_poll_ms, 0.0) + 2 * frame  # verify: SET_ADDRESS, 2 ABORTs
    for pos in range(0, padded, chunk):
        total += xfer(min(chunk, padded - pos))
    return total


def stuck_busy(case: Case, virtual: bool = False) -> tuple[float, float, float]:
    """The H7 rev V ROM that stays in dfuDNBUSY after every erase: (flash, flash + leave until
    the application enumerated, the board's re-enumeration time), in real or model time."""
    model = MODELS[case.model]
    faults = Faults(stuck_busy_on_erase=True)
    clock = VirtualClock() if virtual else None
    now = clock.now if clock else time.monotonic
    backend, dev = board(model, case.address - model.flash_start, faults, case.size, clock)
    data = image_bytes(case.address, case.size)
    image = FirmwareImage([Segment(case.address, data)], "bench.bin", "bin")
    flasher = DfuFlasher(Target(method="dfu", usb_backend=backend), None)
    if clock:
        flasher.sleep = clock.sleep
    flasher.identify()
    if clock and flasher.session:
        flasher.session.clock, flasher.session.sleep = clock.now, clock.sleep
    t0 = now()
    flasher.flash(image)
    flashed = now() - t0
    assert dev.read_flash(case.address, len(data)) == data
    assert "stuck-dnbusy" in (flasher.session.quirks_used if flasher.session else [])
    flasher.leave()
    total = now() - t0
    assert dev.mode == "app"
    flasher.close()
    return flashed, total, dev.reenumerate_s


def ours(case: Case) -> tuple[float, float, int, float]:
    """First flash, quick re-flash of the same image, and a forced full flash (--full) of it;
    returns (first, quick, skipped, full)."""
    model = MODELS[case.model]
    backend, dev = board(model, case.address - model.flash_start, old=case.size)
    data = image_bytes(case.address, case.size)
    image = FirmwareImage([Segment(case.address, data)], "bench.bin", "bin")
    flasher = DfuFlasher(Target(method="dfu", usb_backend=backend), None)
    flasher.identify()
    t0 = time.monotonic()
    flasher.flash(image)
    first = time.monotonic() - t0
    assert dev.read_flash(case.address, len(data)) == data
    t0 = time.monotonic()
    result = flasher.flash(image)  # quick is the DFU default
    quick = time.monotonic() - t0
    flasher.target.quick = False  # --full: erase and write every touched sector
    t0 = time.monotonic()
    flasher.flash(image)
    full = time.monotonic() - t0
    flasher.close()
    return first, quick, result.blocks_skipped, full


def pydfu_like(case: Case) -> float:
    """Mass erase, then SET_ADDRESS + DNLOAD(2) per chunk, no read-back (as pydfu does)."""
    import usb.core

    model = MODELS[case.model]
    backend, dev = board(model, 0)
    data = image_bytes(case.address, case.size)
    usb_dev = usb.core.find(backend=backend, idVendor=0x0483, idProduct=0xDF11)
    usb_dev.set_interface_altsetting(0, 0)
    session = DfuSession(usb_dev, 0, model.transfer_size, Timeouts())
    session.recover()
    padded = data + b"\xff" * (-len(data) % 32)
    t0 = time.monotonic()
    session.mass_erase()
    size = model.transfer_size
    for pos in range(0, len(padded), size):
        session.set_address(case.address + pos)
        session.dnload(2, padded[pos : pos + size])
        session.poll("write", 5.0)
    elapsed = time.monotonic() - t0
    assert dev.read_flash(case.address, len(data)) == data
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "dfu.md")
    args = parser.parse_args()
    cases = [
        Case("STM32H723", 0x08020000, 40 * KIB),
        Case("STM32F446", 0x08008000, 40 * KIB),
        Case("STM32F446", 0x08008000, 400 * KIB),
    ]
    rows = []
    with realtime_lock():
        for case in cases:
            model = MODELS[case.model]
            erase, program, transfer, bound = device_bound(model, case.address, case.size)
            floor = protocol_floor(model, case.address, case.size)
            first, quick, skipped, full = ours(case)
            mass = pydfu_like(case)
            rows.append(
                (case, erase, program, transfer, bound, floor, first, quick, skipped, mass, full)
            )
            print(
                f"{case.label}: ours {first:.3f} s (bound {bound:.3f} s, x{first / bound:.3f}; "
                f"--full {full:.3f} s, x{full / bound:.3f}; "
                f"protocol floor {floor:.3f} s, x{first / floor:.3f}); quick {quick:.3f} s "
                f"(x{first / quick:.1f} faster); pydfu-like {mass:.3f} s",
                flush=True,
            )
        stuck_case = cases[0]
        s_bound = device_bound(MODELS[stuck_case.model], stuck_case.address, stuck_case.size)[3]
        s_flash, s_total, s_reenum = stuck_busy(stuck_case)
        v_flash, v_total, _ = stuck_busy(stuck_case, virtual=True)
        s_target = 1.3 * s_bound + s_reenum
        print(
            f"{stuck_case.label}, stuck-busy ROM: flash {s_flash:.3f} s "
            f"(x{s_flash / s_bound:.3f} the bound), flash + leave {s_total:.3f} s "
            f"(target 1.3 x {s_bound:.3f} + {s_reenum:.1f} s re-enumeration = {s_target:.3f} s); "
            f"model time: flash {v_flash:.3f} s, flash + leave {v_total:.3f} s",
            flush=True,
        )
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [
        "# DFU flashing benchmark (emulated STM32 ROM, real-time model)",
        "",
        f"Command: `.venv/bin/python bench/bench_dfu.py` — {stamp}, "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs (shared with other jobs).",
        "",
        "Device bound = erase of the touched sectors + flash-word programming + the image moved "
        "down and read back up at USB full speed (64-byte packets, 1350 usable bytes per 1 ms "
        "frame). Chip times are datasheet-typical figures in the emulator (F4: 16/64/128 KiB "
        "sector 0.25/0.55/1.0 s, 16 µs per 32-bit word, mass erase 8 s; H723: 128 KiB sector "
        "1.0 s, 100 µs per 256-bit word, mass erase 8 s), not measurements of real silicon. "
        "`ours` is a flash of a new build over an older one with the default settings "
        "(quick: a short read per sector finds the difference), preflight reads, erase, "
        "write and read-back verify of every byte written; `--full` is the same flash with "
        "quick off (no reads first; the image already in flash, so it is the full cost). "
        "`pydfu-like` is mass erase + SET_ADDRESS/DNLOAD per chunk with no verify, on the same "
        "protocol layer (it also wipes the bootloader, which ours never does). The protocol "
        "floor is the fastest any host honouring the device's bwPollTimeout can be (reported "
        "poll times: 5 ms per write/SET_ADDRESS as an STM32F745 ROM log shows, 100 ms per erase "
        "as an F405 reports; each control transfer completes at the end of a 1 ms frame).",
        "",
        "| case | erase | program | transfer | device bound | protocol floor | ours "
        "| ours / bound | ours / floor | `--full` / bound | pydfu-like "
        "| quick re-flash (identical) | first / quick |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case, erase, program, transfer, bound, floor, first, quick, skipped, mass, full in rows:
        lines.append(
            f"| {case.label} | {erase:.3f} s | {program:.3f} s | {transfer:.3f} s | {bound:.3f} s "
            f"| {floor:.3f} s | {first:.3f} s | {first / bound:.3f} | {first / floor:.3f} "
            f"| {full / bound:.3f} | {mass:.3f} s | {quick:.3f} s ({skipped} sectors unchanged) "
            f"| {first / quick:.1f}× |"
        )
    lines += [
        "",
        "Targets: ours ≤ 1.1 × device bound; identical re-flash ≥ 5 × faster than the first.",
        "",
    ]
    for case, _e, _p, _t, bound, floor, first, quick, _s, _m, _f in rows:
        verdict = "meets" if first <= 1.1 * bound else "misses"
        lines.append(
            f"- {case.label}: {verdict} the 1.1× target ({first / bound:.3f}×; "
            f"{first / floor:.3f}× the protocol floor); re-flash {first / quick:.1f}× faster."
        )
    s_verdict = "meets" if s_total <= s_target else "misses"
    v_verdict = "meets" if v_total <= s_target else "misses"
    lines += [
        "",
        "## STM32H7 stuck-busy erase (rev V ROM quirk switched on)",
        "",
        "The ROM never leaves dfuDNBUSY after an erase. We recover (CLRSTATUS x2) once the "
        "datasheet's typical sector-erase time is over, read the sector back to confirm it is "
        "blank, then write and verify; then leave and wait until the application enumerates. "
        "Target: flash + leave ≤ 1.3 × the device bound + the board's re-enumeration time "
        f"({s_reenum:.1f} s in the emulator).",
        "",
        "| case | clock | device bound | flash | flash / bound | flash + leave | target "
        "| verdict |",
        "|---|---|---|---|---|---|---|---|",
        f"| {stuck_case.label} | real time | {s_bound:.3f} s | {s_flash:.3f} s "
        f"| {s_flash / s_bound:.3f} | {s_total:.3f} s | {s_target:.3f} s | {s_verdict} |",
        f"| {stuck_case.label} | model time | {s_bound:.3f} s | {v_flash:.3f} s "
        f"| {v_flash / s_bound:.3f} | {v_total:.3f} s | {s_target:.3f} s | {v_verdict} |",
        "",
        "Model time runs the same code with the emulator and the host on one virtual clock "
        "that only sleeping advances: what the algorithm costs on the device, without the "
        "Python overhead of this (shared, loaded) machine, which the real-time row includes.",
        "",
        f"In model time the flash alone takes {v_flash / s_bound:.3f}× the device bound and the "
        f"leave {v_total - v_flash:.3f} s ({s_reenum:.1f} s of it the board re-enumerating; "
        "the rest the leave requests and the 50 ms steps in which we look for the "
        "application on the bus). The recovery itself costs the 128 KiB read-back that "
        "confirms the erase (128 UPLOADs of 1 KiB, each completing at a frame end: about "
        "0.14 s); before, the host waited for the 4 s erase deadline. In real time every "
        "request that Python delays past a frame start costs one more 1 ms frame, which is "
        "most of the gap between the two rows.",
    ]
    lines += [
        "",
        "Where the gap to the device bound comes from: every chunk costs a DNLOAD, a first "
        "GETSTATUS that starts the programming, the device's bwPollTimeout and a second "
        "GETSTATUS, each control transfer completing at a frame end. On the H723 model a 1 KiB "
        "chunk programs in 3.2 ms but the ROM asks for 5 ms, so no host that honours "
        "bwPollTimeout can reach 1.1× there; our time stays within a few percent of the "
        "protocol floor in every case.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
