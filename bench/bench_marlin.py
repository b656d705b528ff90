"""marlin-sd upload throughput against the stop-and-wait bound of the printer's buffer.

Runs the emulated printer of ``tests/emulators/marlin_printer.py`` in real time (time scale 1)
under the machine-wide real-time lock, flashes a 250 KB Marlin ``.bin`` through the real
flasher (identify, BFT upload, M997, come-back, M115) and writes ``bench/results/marlin.md``.

The bound is what an infinitely fast host and printer would need with the same link, buffer
and card: for every packet (SYNC, OPEN, WRITEs of the ``ss`` buffer size, CLOSE, control
CLOSE) the host's bytes, then the printer's ``ok<n>`` line, one after the other
(stop-and-wait); the printer answers ``ok`` *before* writing to the card, so a card write
only costs time where it outlasts the next packet's arrival. UART: 10 bits per byte. Native
USB (full speed): a 0.25 ms frame slot per transfer plus 12 Mbit/s with 20 % overhead. It
is computed here from the packets, independently of the emulator's code.

Usage: ``nice .venv/bin/python bench/bench_marlin.py [--quick]``.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from octoprint_flasher.flasher import Progress  # noqa: E402
from octoprint_flasher.flashers.marlin_sd import open_flasher  # noqa: E402
from octoprint_flasher.image.model import image_from_bytes  # noqa: E402
from octoprint_flasher.target import Target  # noqa: E402
from tests.emulators.marlin_printer import MarlinPrinter, make_marlin_bin  # noqa: E402

LOCK = Path(os.environ.get("FLASHER_REALTIME_LOCK", "/tmp/octoprint-flasher-realtime.lock"))
SIZE = 250_000
BUFFER = 96


def card_seconds(sector: int) -> float:
    """The emulator's card model, restated: 1.5 ms per 512-byte sector, 12 ms on every 16th
    (FAT and cluster allocation)."""
    return 0.012 if sector % 16 == 0 else 0.0015


def link_seconds(transport: str, baud: int, n: int) -> float:
    if transport == "uart":
        return n * 10 / baud
    return 0.00025 + n * 8 * 1.2 / 12e6


def bound(transport: str, baud: int, packets: list[tuple[int, bytes]]) -> tuple[float, float]:
    """(stop-and-wait bound with the card, link-only bound) for ``packets``: (payload size,
    bytes the card stores when the printer handles it)."""
    t = link_only = busy_end = 0.0
    stored = sector = sync = 0
    for size, to_card in packets:
        wire = link_seconds(transport, baud, 8 + size + (2 if size else 0))
        ok = link_seconds(transport, baud, len(f"ok{sync}\n"))
        t = max(t + wire, busy_end) + ok  # received (after the last card write), answered
        link_only += wire + ok
        sync = (sync + 1) & 0xFF
        sectors = (stored + len(to_card)) // 512 - stored // 512
        stored += len(to_card)
        busy_end = t + sum(card_seconds(sector + 1 + k) for k in range(sectors))
        sector += sectors
    return t, link_only


@dataclass
class Row:
    link: str
    compressed: bool
    sent: int
    upload: float
    bound: float
    link_bound: float
    total: float
    resends: int

    @property
    def ratio(self) -> float:
        return self.upload / self.bound


def run(transport: str, baud: int, compress: bool, data: bytes) -> Optional[Row]:
    folder = tempfile.mkdtemp(prefix="bench-marlin-")
    printer = MarlinPrinter(
        family="btt",
        transport=transport,
        baud=baud,
        time_scale=1.0,
        boot_seconds=0.3,
        flash_seconds_per_kib=0.002,
        port_dir=folder,
    ).start()
    marks: list[float] = []

    def progress(p: Progress) -> None:
        if p.stage == "writing":
            marks.append(time.perf_counter())

    log: list[str] = []
    target = Target(
        method="marlin-sd", port=printer.port, baud=baud, options={"compress": compress}
    )
    flasher = open_flasher(target, log.append)
    t0 = time.perf_counter()
    try:
        info = flasher.identify()
        image = image_from_bytes(data, 0, filename="firmware.bin")
        image.address_given = False
        flasher.check(image, info)
        result = flasher.flash(image, progress)
    finally:
        flasher.close()
        printer.stop()
    total = time.perf_counter() - t0
    assert printer.file("/FIRMWARE.CUR") == data, "the card does not hold the image"
    assert result.verified_by == "firmware-report", result.confirmation
    session = [line for line in log if line.startswith("Uploaded ")]
    resends = int(session[0].split(" resends")[0].rsplit(" ", 1)[-1]) if session else 0
    sent_bytes = data
    if compress:
        import heatshrink2

        sent_bytes = bytes(heatshrink2.compress(data, window_sz2=8, lookahead_sz2=4))
        if not any(line.startswith("Compressed ") for line in log):
            return None
    packets: list[tuple[int, bytes]] = [(0, b"")]  # SYNC
    if compress:
        packets.append((0, b""))  # QUERY
    packets.append((2 + len("/firmware.bin") + 1, b""))  # OPEN
    # WRITEs; with compression the card gets the decoded bytes in proportion
    for pos in range(0, len(sent_bytes), BUFFER):
        chunk = sent_bytes[pos : pos + BUFFER]
        lo = pos * len(data) // len(sent_bytes)
        hi = (pos + len(chunk)) * len(data) // len(sent_bytes)
        packets.append((len(chunk), data[lo:hi]))
    b, lb = bound(transport, baud, packets)
    # measured: from just before M28 B1 (the first progress report) to the last WRITE's ok
    upload = marks[-1] - marks[0]
    sent = len(sent_bytes)
    name = {"uart": f"UART {baud} baud", "usb": "native USB (full speed)"}[transport]
    return Row(name, compress, sent, upload, b, lb, total, resends)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="USB and 250000 baud only")
    args = parser.parse_args()
    try:
        import heatshrink2  # noqa: F401

        have_heatshrink = True
    except ImportError:
        have_heatshrink = False
    data = make_marlin_bin("Marlin 2.1.2.7 (Dec  7 2026 10:11:12)", size=SIZE, seed=21)
    links = (
        [("usb", 115200), ("uart", 250000)]
        if args.quick
        else [
            ("uart", 115200),
            ("uart", 250000),
            ("usb", 115200),
        ]
    )
    rows: list[Row] = []
    LOCK.touch(exist_ok=True)
    with LOCK.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        for transport, baud in links:
            for compress in [False, True] if have_heatshrink else [False]:
                row = run(transport, baud, compress, data)
                if row is None:
                    continue
                rows.append(row)
                print(
                    f"{row.link:24} {'heatshrink' if row.compressed else 'plain':10} "
                    f"upload {row.upload:7.2f} s  bound {row.bound:7.2f} s  ratio "
                    f"{row.ratio:5.3f}  {SIZE / row.upload / 1024:6.1f} KiB/s  "
                    f"total {row.total:6.2f} s  resends {row.resends}",
                    flush=True,
                )
    write_results(rows, have_heatshrink)
    return 0


def write_results(rows: list[Row], have_heatshrink: bool) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    stamp += f" (load average {os.getloadavg()[0]:.2f} at the end)"
    lines = [
        "# marlin-sd: upload throughput vs the stop-and-wait bound",
        "",
        f"Measured {stamp} with `nice .venv/bin/python bench/bench_marlin.py` on this machine "
        "(2 shared cores), against the emulated printer of `tests/emulators/marlin_printer.py` "
        f"in real time: a {SIZE // 1000} KB Marlin `.bin`, the printer's 96-byte buffer "
        "(Marlin's default MAX_CMD_SIZE), a card model of 1.5 ms per 512-byte sector and "
        "12 ms on every 16th. *Bound* = every packet's bytes and its `ok<n>` one after the "
        "other, plus card time where it outlasts the next packet's arrival (the printer "
        "answers `ok` before writing), with zero host and printer overhead. *Link only* "
        "leaves the card out. *Upload* = from M28 B1 to the last WRITE's `ok` (the bound covers "
        "SYNC, QUERY, OPEN and the WRITEs); *total* = the whole flash "
        "(M115, M21, M27, deletes, upload, M21/M23 size check, M997, the emulated "
        "bootloader and boot, M115 and the FIRMWARE.CUR probe).",
        "",
        "| Link | Data | Sent | Upload | Bound | Link only | Ratio | Throughput | Total "
        "| Resends |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.link} | {'heatshrink 8,4' if r.compressed else 'plain'} | "
            f"{r.sent / 1000:.0f} KB | {r.upload:.2f} s | {r.bound:.2f} s | "
            f"{r.link_bound:.2f} s | {r.ratio:.3f} | {SIZE / r.upload / 1024:.1f} KiB/s | "
            f"{r.total:.2f} s | {r.resends} |"
        )
    if not have_heatshrink:
        lines += ["", "heatshrink2 was not installed: no compressed rows."]
    out = REPO / "bench" / "results" / "marlin.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
