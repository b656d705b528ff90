"""PICOBOOT flashing speed against the emulated RP2040 running in real time (time_scale 1.0).

End to end, as a user runs it: an SKR Pico runs Klipper over USB; we send the 1200-baud touch,
follow the board to the boot ROM, erase the touched 4 KiB sectors, write 256-byte pages, read
every touched sector back, reboot and wait until Klipper (1d50:614e) is back. The figure is
compared with the device bound: sector erase (W25Q16JV typical 45 ms) + page programming
(0.4 ms) + the image's bytes down and back up at full-speed USB (64-byte packets, 13 bytes of
packet overhead, 1350 usable bytes per 1 ms frame) — what any host needs — and, separately,
with that bound plus the two re-enumerations the emulator models (0.6 s each, an assumption,
not a measurement) and the 100 ms reboot delay we ask the ROM for. A quick re-flash of the
same image shows what reading before erasing saves.

Times are the emulator's datasheet-typical figures, not real silicon. Run:
``.venv/bin/python bench/bench_picoboot.py`` (about 15 s; holds the machine-wide real-time lock).
"""

from __future__ import annotations

import fcntl
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from octoprint_flasher.flashers.picoboot import REBOOT_DELAY_MS, PicobootFlasher  # noqa: E402
from octoprint_flasher.image import uf2  # noqa: E402
from octoprint_flasher.image.load import load_bytes  # noqa: E402
from octoprint_flasher.image.model import Segment  # noqa: E402
from octoprint_flasher.target import Target  # noqa: E402
from tests.emulators.picoboot_device import (  # noqa: E402
    ERASE_S,
    PAGE,
    PROGRAM_S,
    SECTOR,
    PicobootBackend,
    bulk_seconds,
    klipper_like_rp2040,
    skr_pico,
)

LOCK = Path(os.environ.get("FLASHER_REALTIME_LOCK", "/tmp/octoprint-flasher-realtime.lock"))
SIZE = 60 * 1024


def device_bound(size: int) -> float:
    sectors = -(-size // SECTOR)
    pages = -(-size // PAGE)
    usb = bulk_seconds(size) * 2  # written once, read back once
    return sectors * ERASE_S + pages * PROGRAM_S + usb


def run(quick: bool, board: object = None) -> tuple[float, float, object, str]:
    dev = board or skr_pico(time_scale=1.0)
    backend = PicobootBackend([dev])  # type: ignore[list-item]
    image = load_bytes(
        uf2.write_uf2([Segment(0x10000000, klipper_like_rp2040(SIZE, seed=11))]), "klipper.uf2"
    )
    target = Target(method="picoboot", usb_backend=backend, port="/dev/ttyACM0")
    began = time.monotonic()
    with PicobootFlasher(target) as f:
        f.identify()
        entered = time.monotonic()
        f.flash(image, quick=quick)
        flashed = time.monotonic()
        said = f.leave() or ""
    done = time.monotonic()
    return done - began, flashed - entered, dev, said


def main() -> None:
    LOCK.touch(exist_ok=True)
    with LOCK.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        total, flash, dev, said = run(quick=False)
        q_total, q_flash, _, _ = run(quick=True, board=dev)
    bound = device_bound(SIZE)
    reenum = 2 * 0.6 + REBOOT_DELAY_MS / 1000  # two re-enumerations + the ROM's reboot delay
    print(f"# PICOBOOT, {SIZE // 1024} KiB Klipper image, emulated RP2040 at time_scale 1.0")
    print(f"python {platform.python_version()}, {platform.machine()}")
    print("| case | ours | device bound | ratio |")
    print("|---|---|---|---|")
    print(f"| erase+write+verify | {flash:.3f} s | {bound:.3f} s | {flash / bound:.2f}x |")
    print(
        f"| end to end from Klipper (touch, ROM, flash, verify, reboot, Klipper back) | "
        f"{total:.3f} s | {bound + reenum:.3f} s "
        "(+2 x 0.6 s re-enumeration, +0.1 s reboot delay) | "
        f"{total / (bound + reenum):.2f}x |"
    )
    print(
        f"| identical quick re-flash, end to end | {q_total:.3f} s (flash part {q_flash:.3f} s)"
        f" | {bulk_seconds(SIZE) + reenum:.3f} s (read only) | "
        f"{q_total / (bulk_seconds(SIZE) + reenum):.2f}x |"
    )
    print(f"confirmation: {said}")


if __name__ == "__main__":
    main()
