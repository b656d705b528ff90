"""Run Debian's avrdude against a simulated board and time it: the peer our AVR flashers are
measured against, and the proof that the board's timing model matches the wire.

    python bench/avrdude_peer.py --config m1284p-optiboot-115200 --size 90868

prints avrdude's own write/verify times next to the line-rate limit of the protocol
(every character on the wire, both directions, at the baud rates really in use) plus the
flash page write time the simulated chip charges.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.emulators.simboard import (  # noqa: E402
    CONFIGS,
    F_CPU,
    BoardConfig,
    SimBoard,
    build_test_firmware,
)

REALTIME_LOCK = Path("/tmp/octoprint-flasher-realtime.lock")
_BAR = re.compile(r"^(Writing|Reading) \|[ #]*\| 100% (\d+(?:\.\d+)?) ?s", re.MULTILINE)


def avrdude_command(
    board: SimBoard, hex_path: Path, *, verify: bool = True, extra: Sequence[str] = ()
) -> list[str]:
    """The command the Arduino IDE would run for this board (``-D``: no chip erase, which
    Debian's stk500v2 bootloader refuses on purpose)."""
    cfg = board.cfg
    cmd = ["avrdude", "-p", cfg.info.avrdude_part, "-c", cfg.avrdude_programmer]
    cmd += ["-P", board.port, "-b", str(cfg.baud), "-D", *extra]
    if not verify:
        cmd.append("-V")
    return cmd + ["-U", f"flash:w:{hex_path}:i"]


def run_avrdude(
    board: SimBoard,
    hex_path: Path,
    *,
    verify: bool = True,
    extra: Sequence[str] = (),
    timeout: float = 600,
) -> Dict[str, Any]:
    """Flash ``hex_path`` with avrdude; return seconds_total (wall, including reset and sync),
    seconds_write / seconds_verify (avrdude's own progress-bar times, None if it did not get
    there), ok (exit status 0) and output (avrdude's stderr)."""
    cmd = avrdude_command(board, hex_path, verify=verify, extra=extra)
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    total = time.monotonic() - start
    output = proc.stdout + proc.stderr
    write: Optional[float] = None
    read: Optional[float] = None
    for kind, seconds in _BAR.findall(output):
        if kind == "Writing":
            write = float(seconds)
        else:
            read = float(seconds)  # the last Reading bar is the verify pass
    return {
        "seconds_total": total,
        "seconds_write": write,
        "seconds_verify": read if verify else None,
        "ok": proc.returncode == 0,
        "output": output,
    }


def avr_baud(nominal: int) -> float:
    """The baud the bootloader really runs at: U2X with optiboot's rounded divisor."""
    ubrr = (F_CPU + nominal * 4) // (nominal * 8) - 1
    return F_CPU / (8 * (ubrr + 1))


def line_limit(cfg: BoardConfig, image_size: int, spm_time_us: int) -> Dict[str, float]:
    """Seconds the wire needs for avrdude's write and verify passes (10-bit characters; the
    host sends at its nominal baud, the AVR answers at its real one), and the same with the
    flash time the chip spends per page (optiboot overlaps the erase of RWW pages with the
    transfer, Debian's stk500v2 erases then writes)."""
    page = cfg.info.page_size
    pages = -(-image_size // page)
    host = 10 / cfg.baud
    avr = 10 / avr_baud(cfg.baud)
    if cfg.protocol == "stk500v1":
        write = (4 + 5 + page) * host + 4 * avr
        verify = (4 + 5) * host + (2 + 2 + page) * avr
        spm_ops = 1
    else:
        write = (11 + 5 + 10 + page + 1) * host + (8 + 8) * avr
        verify = (11 + 10) * host + (8 + 5 + 3 + page + 1) * avr
        spm_ops = 2
    flash = spm_ops * spm_time_us / 1e6
    return {
        "write": pages * write,
        "verify": pages * verify,
        "write_with_flash": pages * (write + flash),
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="m1284p-optiboot-115200", choices=sorted(CONFIGS))
    ap.add_argument("--size", type=int, default=90868, help="image size in bytes")
    ap.add_argument("--spm-us", type=int, default=4000, help="flash page erase/write time")
    ap.add_argument("--latency", default=None, help="None, fixed:<ms> or ftdi16")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    cfg = CONFIGS[args.config]
    hex_path = build_test_firmware(cfg.mcu, "BENCH", size=args.size, baud=cfg.baud)
    REALTIME_LOCK.touch(exist_ok=True)
    with REALTIME_LOCK.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with SimBoard(args.config, spm_time_us=args.spm_us, latency=args.latency) as board:
            result = run_avrdude(board, hex_path)
            app_ok = b"ok crc" in board.read_until(b"crc", 10, baud=cfg.baud)
            lags = [e for e in board.events() if e.startswith("LAG")]
    limit = line_limit(cfg, args.size, args.spm_us)
    report = {
        "config": args.config,
        "image_bytes": args.size,
        "spm_us": args.spm_us,
        "ok": result["ok"],
        "app_crc_ok": app_ok,
        "seconds_total": round(result["seconds_total"], 2),
        "seconds_write": result["seconds_write"],
        "seconds_verify": result["seconds_verify"],
        "line_limit_write": round(limit["write"], 2),
        "line_limit_write_with_flash": round(limit["write_with_flash"], 2),
        "line_limit_verify": round(limit["verify"], 2),
        "lag_events": len(lags),
    }
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key:28} {value}")
    if not result["ok"]:
        print(result["output"], file=sys.stderr)
    return 0 if result["ok"] and app_ok else 1


if __name__ == "__main__":
    sys.exit(main())
