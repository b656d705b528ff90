"""Benchmark: our STK500 flashers vs avrdude vs the serial link's limit, on the real bootloaders
running in simavr (one board per scenario, both tools on the same board in the same run).

    .venv/bin/python bench/bench_avr.py            # all scenarios, writes bench/results/avr.md
    .venv/bin/python bench/bench_avr.py --only seed-115200

Times: "write+verify" is from the first page written to the last page read back; "end to end"
is from opening the port (the reset) to leaving the bootloader, auto-detection included for us.
The link limit counts every character both tools' protocols put on the wire (framing, answers)
at the baud really in use (the AVR's rounded divisor, e.g. 117,647 for 115200), one character
at a time; "+flash" adds the page program time the simulated chip charges (4 ms per SPM op).
Holds the machine-wide real-time lock for the whole run.
"""

from __future__ import annotations

import argparse
import fcntl
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.avrdude_peer import avr_baud, line_limit, run_avrdude  # noqa: E402
from octoprint_flasher import methods  # noqa: E402
from octoprint_flasher.flasher import STAGE_VERIFYING, STAGE_WRITING, Progress  # noqa: E402
from octoprint_flasher.image.load import load  # noqa: E402
from octoprint_flasher.target import Target  # noqa: E402
from tests.emulators.simboard import (  # noqa: E402
    CONFIGS,
    BoardConfig,
    SimBoard,
    build_test_firmware,  # noqa: E402
)

REALTIME_LOCK = Path("/tmp/octoprint-flasher-realtime.lock")
RESULTS = Path(__file__).resolve().parent / "results" / "avr.md"
SPM_US = 4000


@dataclass(frozen=True)
class Scenario:
    name: str
    config: str
    size: int
    latency: Optional[str] = None


SCENARIOS = [
    Scenario("seed-115200", "m1284p-optiboot-115200", 116_932),
    Scenario("seed-57600", "m1284p-optiboot-57600", 116_932),
    Scenario("mega-240k", "m2560-stk500v2", 240 * 1024),
    Scenario("seed-115200-ftdi16", "m1284p-optiboot-115200", 116_932, "ftdi16"),
    Scenario("mega-240k-ftdi16", "m2560-stk500v2", 240 * 1024, "ftdi16"),
]


def _chunks(length: int, chunk: int) -> int:
    """Read commands for ``length`` bytes from 0 in ``chunk`` pieces, split at 64 KiB."""
    n, addr = 0, 0
    while addr < length:
        addr += min(chunk, length - addr, 0x10000 - (addr & 0xFFFF))
        n += 1
    return n


def our_limit(cfg: BoardConfig, size: int) -> dict[str, float]:
    """Seconds our own protocol use needs on the wire (and with the chip's flash time)."""
    page = cfg.info.page_size
    pages = -(-size // page)
    span = pages * page
    host = 10 / cfg.baud
    avr = 10 / avr_baud(cfg.baud)
    if cfg.protocol == "stk500v1":
        # LOAD_ADDRESS + PROG_PAGE sent together, two answers; reads of 244 bytes likewise
        write = pages * ((4 + 4 + page + 1) * host + 4 * avr)
        reads = _chunks(span, 244)
        verify = reads * ((4 + 5) * host + 4 * avr) + span * avr
        spm = 1
    else:
        # one LOAD_ADDRESS, then PROGRAM_FLASH_ISP frames (page+16) / answers (8); page 0 is
        # written twice (once blank, once last in its own session with its own LOAD_ADDRESS)
        write = 2 * (11 * host + 8 * avr) + (pages + 1) * ((page + 16) * host + 8 * avr)
        reads = _chunks(span, 280)
        verify = (11 * host + 8 * avr) + reads * (10 * host + 9 * avr) + span * avr
        spm = 2
        pages += 1
    return {
        "write": write,
        "verify": verify,
        "write_with_flash": write + pages * spm * SPM_US / 1e6,
    }


def ours(board: SimBoard, image: Any, quick: bool = False) -> dict[str, float]:
    marks: dict[str, float] = {}

    def progress(p: Progress) -> None:
        now = time.monotonic()
        if p.stage == STAGE_WRITING:
            marks.setdefault("write_start", now)
            marks["write_end"] = now
        elif p.stage == STAGE_VERIFYING:
            marks.setdefault("verify_start", now)
            marks["verify_end"] = now
        else:
            marks.setdefault(f"{p.stage}_start", now)
            marks[f"{p.stage}_end"] = now

    start = time.monotonic()
    f = methods.open_flasher(Target(method="auto", port=board.port))
    try:
        f.identify()
        result = f.flash(image, progress, quick=quick)
        f.leave()
    finally:
        f.close()
    end = time.monotonic()
    first = marks.get("write_start", marks.get("reading_start", end))
    last = marks.get("verify_end", marks.get("reading_end", end))
    return {
        "total": end - start,
        "write_verify": last - first,
        "write": marks.get("write_end", first) - first,
        "verify": marks.get("verify_end", last) - marks.get("verify_start", last),
        "blocks_written": result.blocks_written,
    }


def run(sc: Scenario) -> dict[str, Any]:
    cfg = CONFIGS[sc.config]
    fw = build_test_firmware(cfg.mcu, "BENCH", size=sc.size, baud=cfg.baud)
    image = load(fw)
    with SimBoard(sc.config, latency=sc.latency, spm_time_us=SPM_US) as board:
        mine = ours(board, image)
        dump = board.flash_dump()
        assert all(dump[s.address : s.end] == s.data for s in image.segments), "bad flash"
        dude = run_avrdude(board, fw)
        assert dude["ok"], dude["output"][-2000:]
        again = ours(board, image, quick=True)
        assert again["blocks_written"] == 0
    return {
        "scenario": sc,
        "ours": mine,
        "avrdude": dude,
        "quick": again,
        "limit_ours": our_limit(cfg, sc.size),
        "limit_avrdude": line_limit(cfg, sc.size, SPM_US),
    }


def report(rows: list[dict[str, Any]]) -> str:
    out = [
        "# AVR flashing benchmark",
        "",
        "Produced by `.venv/bin/python bench/bench_avr.py` (real optiboot 4.4 / Debian stk500v2 "
        "bootloaders in simavr, real-time, 4 ms per flash page operation; avrdude 7.1 on the "
        "same board in the same run). Seconds.",
        "",
        "| scenario | bytes | ours w+v | link limit (ours, +flash) | ratio to limit (+flash) "
        "| avrdude w+v | ours e2e | avrdude e2e | e2e ratio | quick re-flash "
        "| quick / avrdude e2e |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sc: Scenario = r["scenario"]
        o, d, q, lim = r["ours"], r["avrdude"], r["quick"], r["limit_ours"]
        lim_wv = lim["write"] + lim["verify"]
        lim_wvf = lim["write_with_flash"] + lim["verify"]
        d_wv = (d["seconds_write"] or 0) + (d["seconds_verify"] or 0)
        out.append(
            f"| {sc.name} ({sc.config}{', ' + sc.latency if sc.latency else ''}) | {sc.size:,} "
            f"| {o['write_verify']:.2f} | {lim_wv:.2f} ({lim_wvf:.2f}) "
            f"| {o['write_verify'] / lim_wv:.3f} ({o['write_verify'] / lim_wvf:.3f}) "
            f"| {d_wv:.2f} | {o['total']:.2f} | {d['seconds_total']:.2f} "
            f"| {o['total'] / d['seconds_total']:.3f} | {q['total']:.2f} "
            f"| {q['total'] / d['seconds_total']:.3f} |"
        )
    out += [
        "",
        "- *w+v*: write + verify (read-back of every written page).",
        "- *e2e*: open/reset → bootloader found → written → verified → application started. "
        "Ours includes auto-detection of protocol and baud.",
        "- *link limit*: every character our protocol use puts on the wire, at the AVR's real "
        "baud, sent back to back; *+flash* adds 4 ms per SPM page operation, which the "
        "bootloaders do while the line is idle (optiboot busy-waits; 1 op per page for RWW "
        "pages, stk500v2 erases then writes: 2 ops).",
        "- *quick re-flash*: the same image again with `quick=True`: every page read and "
        "compared, nothing written.",
    ]
    return "\n".join(out) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append", help="scenario name (repeatable)")
    ap.add_argument("--no-write", action="store_true", help="do not write bench/results/avr.md")
    ap.add_argument(
        "--lock-held", action="store_true", help="the caller already holds the real-time lock"
    )
    args = ap.parse_args(argv)
    chosen = [s for s in SCENARIOS if not args.only or s.name in args.only]
    REALTIME_LOCK.touch(exist_ok=True)
    rows = []
    with REALTIME_LOCK.open("w") as lock:
        if not args.lock_held:
            fcntl.flock(lock, fcntl.LOCK_EX)
        for sc in chosen:
            t = time.monotonic()
            row = run(sc)
            rows.append(row)
            print(report([row]).splitlines()[6], f"[{time.monotonic() - t:.0f} s]", flush=True)
    text = report(rows)
    print(text)
    if not args.no_write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
