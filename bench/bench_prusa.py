"""Benchmark: Prusa MK3 MULTILANG (both passes) and the MMU via avr109, against each link's
limit, on the project's emulators running in real time, with avrdude as the peer where it can
run (pass 1 with ``-c wiring``; the MMU with ``-c avr109``).

    .venv/bin/python bench/bench_prusa.py              # writes bench/results/prusa.md
    .venv/bin/python bench/bench_prusa.py --only mmu

Link limits are counted from what really crossed the emulated wire, both directions:
Einsy: every character at the AVR's real 117,647 baud (10 bits), plus the busy time the
emulator charges while the line is idle (4.5 ms per SPM erase and per write in the bootloader;
150 ms per 64 KB XFLASH block erase and 0.8 ms per page program in the firmware).
MMU (USB CDC, the baud is irrelevant): one 1 ms USB frame per command round trip plus 8.5 ms
per page erase+write, the emulator's model of Caterina.
Holds the machine-wide real-time lock for the whole run.
"""

from __future__ import annotations

import argparse
import fcntl
import random
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from octoprint_flasher.flasher import Progress  # noqa: E402
from octoprint_flasher.flashers import avr109, prusa  # noqa: E402
from octoprint_flasher.image.load import load_bytes  # noqa: E402
from octoprint_flasher.target import Target  # noqa: E402
from tests.emulators.caterina_board import CaterinaBoard  # noqa: E402
from tests.emulators.prusa_einsy import PrusaEinsy  # noqa: E402
from tests.emulators.stk500_board import real_baud  # noqa: E402
from tests.prusa import samples  # noqa: E402

REALTIME_LOCK = Path("/tmp/octoprint-flasher-realtime.lock")
RESULTS = Path(__file__).resolve().parent / "results" / "prusa.md"
CHAR = 10 / real_baud(115200)


def firmware(size: int, seed: int = 11) -> bytes:
    """Compiled-code-like bytes: random, so ~63 % of 256-byte pages hold a ';' as in real
    firmware; the catalogs' signature embedded."""
    rnd = random.Random(seed)
    body = bytearray(rnd.randrange(256) for _ in range(size))
    body[-64:-60] = struct.pack("<I", samples.SIGNATURE)
    return bytes(body)


class Stages:
    """First/last progress time per stage."""

    def __init__(self) -> None:
        self.seen: dict[str, list[float]] = {}

    def __call__(self, p: Progress) -> None:
        now = time.monotonic()
        span = self.seen.setdefault(p.stage, [now, now])
        span[1] = now

    def seconds(self, *stages: str) -> float:
        spans = [self.seen[s] for s in stages if s in self.seen]
        return max(e for _, e in spans) - min(s for s, _ in spans) if spans else 0.0


def run_mk3(fw_size: int, lang_size: int, defect: bool) -> dict[str, Any]:
    fw = firmware(fw_size)
    codes = ("cs", "de", "es", "fr", "it", "pl")
    langs = samples.languages(codes, lang_size // 6) if lang_size else b""
    hexfile = samples.multilang(fw, langs) if langs else samples.ihex(fw)
    image = load_bytes(hexfile, "MK3S_MULTILANG.hex" if langs else "MK3S_ENGLISH.hex")
    board = PrusaEinsy(timing=True, time_scale=1.0, semicolon_defect=defect)
    stages = Stages()
    try:
        start = time.monotonic()
        f = prusa.open_flasher(Target("prusa", port=board.port))
        try:
            f.check(image, f.identify())
            result = f.flash(image, stages)
        finally:
            f.close()
        total = time.monotonic() - start
        assert bytes(board.flash[: len(fw)]) == fw
        assert bytes(board.xflash.data[: len(langs)]) == langs
        pass1 = stages.seconds("writing", "verifying")
        pass2 = stages.seconds("reading_languages", "writing_languages", "verifying_languages")
        chars = board.stats.rx + board.stats.tx
        busy = 2 * board.stats.pages_written * board.page_time
        busy += board.xflash.block_erases * board.erase_time
        busy += board.xflash.page_programs * board.program_time
        return {
            "fw": len(fw),
            "langs": len(langs),
            "defect": defect,
            "rounds": f.rounds,
            "total": total,
            "pass1": pass1,
            "pass2": pass2,
            "limit": chars * CHAR + busy,
            "limit_chars": chars * CHAR,
            "confirmation": result.confirmation,
        }
    finally:
        board.close()


def avrdude_pass1(fw_size: int) -> Optional[float]:
    """avrdude -c wiring writing the same firmware (pass 1 only) to an Einsy without the ';'
    defect (avrdude has no workaround for it)."""
    fw = firmware(fw_size)
    board = PrusaEinsy(timing=True, time_scale=1.0, semicolon_defect=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "fw.hex"
            path.write_bytes(samples.ihex(fw))
            cmd = ["avrdude", "-p", "m2560", "-c", "wiring", "-P", str(board.port)]
            cmd += ["-b", "115200", "-D", "-U", f"flash:w:{path}:i"]
            start = time.monotonic()
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            seconds = time.monotonic() - start
        if proc.returncode != 0 or bytes(board.flash[: len(fw)]) != fw:
            print(proc.stderr[-800:], file=sys.stderr)
            return None
        return seconds
    finally:
        board.close()


def run_mmu() -> dict[str, Any]:
    app = samples.mmu_app(28 * 1024 - 256)
    image = load_bytes(samples.device_file("mm-control", app), "MMU2S_MMU3_FW3.0.3.hex")
    board = CaterinaBoard(app=samples.mmu_app(seed=9), time_scale=1.0)
    stages = Stages()
    try:
        start = time.monotonic()
        opts = {"list_ports": board.world.list_ports}
        f = avr109.open_flasher(Target("avr109", port=board.port, usb="2c99:0004", options=opts))
        try:
            f.check(image, f.identify())
            entered = time.monotonic() - start
            result = f.flash(image, stages)
            back = f.leave()
        finally:
            f.close()
        total = time.monotonic() - start
        assert bytes(board.flash[: len(app)]) == app
        pages = result.blocks_written
        reads = -(-pages * 128 // avr109.READ_CHUNK)
        write_limit = pages * (0.001 + 0.0085) + 0.001
        verify_limit = reads * 0.001 * 2  # A + g per read
        return {
            "bytes": result.bytes_written,
            "total": total,
            "entry": entered,
            "wv": stages.seconds("writing", "verifying"),
            "limit": write_limit + verify_limit,
            "back": back,
        }
    finally:
        board.close()


def avrdude_mmu() -> Optional[float]:
    app = samples.mmu_app(28 * 1024 - 256)
    board = CaterinaBoard(app=samples.mmu_app(seed=9), time_scale=1.0, mode="bootloader")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "mmu.hex"
            path.write_bytes(samples.ihex(app))
            cmd = ["avrdude", "-p", "m32u4", "-c", "avr109", "-P", str(board.port)]
            cmd += ["-b", "57600", "-D", "-U", f"flash:w:{path}:i"]
            start = time.monotonic()
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            seconds = time.monotonic() - start
        if proc.returncode != 0 or bytes(board.flash[: len(app)]) != app:
            print(proc.stderr[-800:], file=sys.stderr)
            return None
        return seconds
    finally:
        board.close()


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["mk3", "mk3-defect", "peer", "mmu"], action="append")
    args = ap.parse_args(argv)
    only = set(args.only or ["mk3", "mk3-defect", "peer", "mmu"])
    REALTIME_LOCK.touch(exist_ok=True)
    lines: list[str] = []
    with REALTIME_LOCK.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if "mk3" in only:
            r = run_mk3(248_000, 128 * 1024, defect=False)
            lines.append(_mk3_row("MK3 MULTILANG, current 32U2 (no ';' defect)", r, None))
        if "peer" in only:
            r = run_mk3(64 * 1024, 0, defect=False)
            peer = avrdude_pass1(64 * 1024)
            lines.append(_mk3_row("MK3 ENGLISH (pass 1 only) vs avrdude -c wiring", r, peer))
        if "mk3-defect" in only:
            r = run_mk3(64 * 1024, 32 * 1024, defect=True)
            lines.append(_mk3_row("MK3 MULTILANG, old 32U2 with the ';' defect", r, None))
        if "mmu" in only:
            m = run_mmu()
            peer = avrdude_mmu()
            lines.append(
                f"| MMU3 via avr109 (touch, re-enumeration, write, verify, exit) | "
                f"{m['bytes']:,} | {m['wv']:.2f} | {m['limit']:.2f} | {m['wv'] / m['limit']:.3f} "
                f"| {m['total']:.2f} (entry {m['entry']:.2f}) | "
                + (f"{peer:.2f}" if peer else "failed")
                + " |"
            )
            print(m["back"])
    for line in lines:
        print(line)
    return 0


def _mk3_row(name: str, r: dict[str, Any], peer: Optional[float]) -> str:
    wv = r["pass1"] + r["pass2"]
    return (
        f"| {name} | {r['fw']:,} + {r['langs']:,} | {r['pass1']:.2f} + {r['pass2']:.2f} | "
        f"{r['limit']:.2f} ({r['limit_chars']:.2f} chars only) | {wv / r['limit']:.3f} | "
        f"{r['total']:.2f} | {f'{peer:.2f} (pass 1 only)' if peer else '–'} | {r['rounds']} |"
    )


if __name__ == "__main__":
    sys.exit(main())
