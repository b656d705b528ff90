"""The ``octoprint-flasher`` command: inspect, detect, flash and read back, without OctoPrint.

Flashing goes through the same :class:`FlashJob` and :class:`Store` as the plugin (with
:class:`NoHost`), so the CLI exercises the plugin's path. Exit codes: 0 only after a verified
flash (or a successful info/detect/read); 1 failed; 2 bad usage; 3 method not available;
4 image or preflight refused (board untouched); 5 cancelled; 6 busy.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any, Callable, Optional, TextIO

from . import chips, discovery, methods, preflight
from .errors import (
    BusyError,
    CancelledError,
    FlashError,
    ImageError,
    UnsupportedError,
)
from .flasher import Flasher, LogCallback, Progress
from .flashers.marlin_sd import FAMILIES as SD_FAMILIES
from .image import load as loaders
from .job import FlashJob, JobEvent, JobResult, NoHost
from .store import Store, write_image_file
from .target import METHODS, Target

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNSUPPORTED = 3
EXIT_REFUSED = 4
EXIT_CANCELLED = 5
EXIT_BUSY = 6

#: Test and demo hooks: "module:callable" returning a pyusb backend / a python-can bus.
ENV_USB_BACKEND = "OCTOPRINT_FLASHER_USB_BACKEND"
ENV_CAN_BUS_FACTORY = "OCTOPRINT_FLASHER_CAN_BUS_FACTORY"
ENV_HOME = "OCTOPRINT_FLASHER_HOME"


def exit_code_for(error: Optional[dict[str, Any]]) -> int:
    kind = (error or {}).get("kind", "error")
    return {
        "image": EXIT_REFUSED,
        "preflight": EXIT_REFUSED,
        "unsupported": EXIT_UNSUPPORTED,
        "cancelled": EXIT_CANCELLED,
        "busy": EXIT_BUSY,
    }.get(kind, EXIT_FAILED)


# --- argument parsing ------------------------------------------------------------------


def _int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (e.g. 0x08008000)") from None


def _usb(text: str) -> str:
    try:
        vid, pid = chips.parse_usb_id(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return f"{vid:04x}:{pid:04x}"


def _uuid(text: str) -> str:
    cleaned = text.strip().lower().removeprefix("0x")
    if len(cleaned) != 12 or any(c not in "0123456789abcdef" for c in cleaned):
        raise argparse.ArgumentTypeError(f"{text!r} is not a 12-digit CAN UUID (4220d6e9e9f9)")
    return cleaned


def _add_target_args(p: argparse.ArgumentParser, *, with_method: bool = True) -> None:
    g = p.add_argument_group("board")
    g.add_argument("--port", help="serial port, e.g. /dev/ttyUSB0")
    if with_method:
        g.add_argument("--method", choices=METHODS, default="auto", help="default: auto")
    g.add_argument("--baud", type=int, help="serial baud rate (default: per bootloader)")
    g.add_argument("--mcu", help="expected chip, e.g. atmega1284p, stm32f446xx")
    g.add_argument("--usb", type=_usb, metavar="VID:PID", help="USB DFU device, e.g. 0483:df11")
    g.add_argument("--usb-path", metavar="BUS-PORT", help="USB DFU device by path, e.g. 1-1.3")
    g.add_argument("--can-interface", default="socketcan", help="python-can interface")
    g.add_argument("--can-channel", default="can0", help="CAN channel (default can0)")
    g.add_argument("--can-bitrate", type=int, help="CAN bitrate (for adapters that need it)")
    g.add_argument("--uuid", type=_uuid, help="Katapult/Klipper CAN node UUID")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="octoprint-flasher",
        description="Flash 3D-printer mainboard firmware (AVR STK500, STM32 DFU, Katapult).",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        help=f"where history and backups are kept (default ${ENV_HOME} or ~/.octoprint-flasher)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="print protocol log lines")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="describe a firmware file and check it offline")
    p.add_argument("file", type=Path)
    p.add_argument("--json", action="store_true")
    p.add_argument("--mcu", help="chip to check against, e.g. atmega1284p")
    p.add_argument("--address", type=_int, help="load address for a .bin")
    p.add_argument("--method", choices=METHODS, help="method to check against")

    p = sub.add_parser("detect", help="list serial ports, DFU devices and CAN nodes")
    p.add_argument("--json", action="store_true")
    p.add_argument("--can", action="store_true", help="also query the CAN bus")
    p.add_argument("--can-interface", default="socketcan")
    p.add_argument("--can-channel", default="can0")
    p.add_argument(
        "--probe",
        action="store_true",
        help="ask each serial port's bootloader (resets the boards!)",
    )
    p.add_argument(
        "--extra-port",
        action="append",
        default=[],
        metavar="GLOB",
        help="additional port names or globs, e.g. '/tmp/ttyFLASHER*'",
    )

    p = sub.add_parser("flash", help="write a firmware file and verify it")
    p.add_argument("file", type=Path)
    _add_target_args(p)
    p.add_argument(
        "--address",
        type=_int,
        help="load address for a .bin (default: the board's application start)",
    )
    speed = p.add_mutually_exclusive_group()
    speed.add_argument(
        "--quick",
        action="store_const",
        const=True,
        default=None,
        help="skip blocks that are already equal (the default for dfu)",
    )
    speed.add_argument(
        "--full",
        dest="quick",
        action="store_const",
        const=False,
        help="erase and write every touched block even if it already holds the image",
    )
    p.add_argument(
        "--allow-bootloader-erase",
        action="store_true",
        help="allow writing over the bootloader area (dangerous)",
    )
    p.add_argument(
        "--backup",
        type=Path,
        metavar="FILE",
        help="read the current firmware into FILE (.hex or .bin) first",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per event on stdout")
    sd = p.add_argument_group("marlin-sd (32-bit boards that update from their SD card)")
    sd.add_argument("--sd-filename", help="name on the card (default: the bootloader's rule)")
    sd.add_argument("--sd-family", choices=SD_FAMILIES, help="bootloader family (default: guessed)")
    sd.add_argument("--sd-mount", type=Path, help="the board's card mounted here: copy, no upload")
    sd.add_argument("--compress", action="store_true", help="heatshrink (needs heatshrink2)")

    p = sub.add_parser("rescue-bft", help="get a Marlin printer out of binary transfer mode")
    p.add_argument("--port", required=True, help="the printer's serial port")
    p.add_argument("--baud", type=int, default=115200)

    p = sub.add_parser("read", help="read the application flash back into a file")
    _add_target_args(p)
    p.add_argument("--out", type=Path, required=True, help="output file (.hex or .bin)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("history", help="show the last flashes")
    p.add_argument("--json", action="store_true")
    p.add_argument("--limit", type=int, default=20)
    return parser


def _import_hook(spec: str) -> Any:
    module, _, attr = spec.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split(".") if attr else []:
        obj = getattr(obj, part)
    return obj


def target_from_args(args: argparse.Namespace) -> Target:
    target = Target(
        method=getattr(args, "method", "auto") or "auto",
        port=args.port,
        baud=args.baud,
        mcu=args.mcu,
        address=getattr(args, "address", None),
        usb=args.usb,
        usb_path=args.usb_path,
        can_interface=args.can_interface,
        can_channel=args.can_channel,
        can_bitrate=args.can_bitrate,
        uuid=args.uuid,
        quick=getattr(args, "quick", None),
        allow_bootloader_erase=getattr(args, "allow_bootloader_erase", False),
    )
    for key in ("sd_filename", "sd_family", "sd_mount"):
        if getattr(args, key, None):
            target.options[key] = str(getattr(args, key))
    if getattr(args, "compress", False):
        target.options["compress"] = True
    target.options["state_dir"] = str(_data_dir(args))  # e.g. Creality's last file names
    if os.environ.get(ENV_USB_BACKEND):
        target.usb_backend = _import_hook(os.environ[ENV_USB_BACKEND])()
    if os.environ.get(ENV_CAN_BUS_FACTORY):
        target.can_bus_factory = _import_hook(os.environ[ENV_CAN_BUS_FACTORY])
    return target


def _terminal_prompt(err: TextIO) -> Callable[[str], None]:
    """The moment the user must act (press the reset button): ring the bell and say so."""

    def prompt(message: str) -> None:
        print(f"\a>>> {message}", file=err, flush=True)

    return prompt


def _data_dir(args: argparse.Namespace) -> Path:
    if args.data_dir:
        return Path(args.data_dir)
    if os.environ.get(ENV_HOME):
        return Path(os.environ[ENV_HOME])
    return Path.home() / ".octoprint-flasher"


# --- output ----------------------------------------------------------------------------


def _print_error(err: FlashError, out: TextIO) -> None:
    print(f"Error: {err.message}", file=out)
    if err.cause:
        print(f"Likely cause: {err.cause}", file=out)
    if err.hint:
        print(f"What to do: {err.hint}", file=out)


def _print_error_dict(err: dict[str, Any], out: TextIO) -> None:
    _print_error(FlashError(err.get("message", ""), err.get("cause", ""), err.get("hint", "")), out)


def _human_rate(rate: float) -> str:
    return f"{rate / 1024:.1f} KiB/s" if rate >= 1024 else f"{rate:.0f} B/s"


class ProgressPrinter:
    """Job events on the terminal: a redrawn bar on a tty, sparse lines otherwise."""

    def __init__(self, out: TextIO, verbose: bool) -> None:
        self.out = out
        self.verbose = verbose
        self.tty = out.isatty()
        self.bar_open = False
        self.last_decile: dict[str, int] = {}

    def __call__(self, event: JobEvent) -> None:
        d = event.data
        if event.type == "progress":
            self._progress(d)
        elif event.type == "state":
            self._end_bar()
            # the CLI has no printer connection: its disconnect/reconnect steps do nothing
            if d["state"] not in ("done", "failed", "cancelled", "disconnecting", "reconnecting"):
                print(f"{d['state'].replace('_', ' ')}...", file=self.out)
        elif event.type == "log":
            line = d["line"]
            if self.verbose or line.startswith(("Warning:", "Found ", "auto:", "Backup")):
                self._end_bar()
                print(f"  {line}", file=self.out)
        self.out.flush()

    def _progress(self, d: dict[str, Any]) -> None:
        pct = d["percent"]
        eta = f" ETA {d['eta']:.0f}s" if d.get("eta") is not None and pct < 100 else ""
        text = (
            f"{d['stage']:>10} {pct:5.1f}% {d['done']}/{d['total']} B {_human_rate(d['rate'])}{eta}"
        )
        if self.tty:
            width = 30
            filled = int(width * pct / 100)
            print(f"\r[{'#' * filled}{'.' * (width - filled)}] {text}   ", end="", file=self.out)
            self.bar_open = True
            if pct >= 100:
                self._end_bar()
        else:
            decile = int(pct // 10)
            if self.last_decile.get(d["stage"]) != decile:
                self.last_decile[d["stage"]] = decile
                print(f"  {text}", file=self.out)

    def _end_bar(self) -> None:
        if self.bar_open:
            print(file=self.out)
            self.bar_open = False


def _json_line(obj: dict[str, Any], out: TextIO) -> None:
    out.write(json.dumps(obj, default=str) + "\n")
    out.flush()


# --- commands --------------------------------------------------------------------------


def cmd_info(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    try:
        image = loaders.load(args.file, base_address=args.address)
    except ImageError as exc:
        if args.json:
            _json_line({"ok": False, "error": exc.to_dict()}, out)
        else:
            _print_error(exc, err)
        return EXIT_REFUSED
    report = preflight.check_offline(image, args.mcu, args.method)
    if args.json:
        _json_line({"ok": report.ok, "image": image.summary(), "preflight": report.to_dict()}, out)
        return EXIT_OK if report.ok else EXIT_REFUSED
    kinds = {"hex": "Intel HEX", "bin": "raw binary", "dfu": "DfuSe"}
    print(f"File:     {image.filename}", file=out)
    print(f"Kind:     {kinds.get(image.kind, image.kind)}", file=out)
    print(f"SHA-256:  {image.sha256}", file=out)
    n = len(image.segments)
    print(f"Size:     {image.size} bytes in {n} segment{'s' if n != 1 else ''}", file=out)
    if image.address_given:
        print(f"Range:    0x{image.start:08X}-0x{image.end - 1:08X}", file=out)
        for seg in image.segments:
            print(f"  0x{seg.address:08X}-0x{seg.end - 1:08X}  {len(seg.data)} bytes", file=out)
    else:
        print("Range:    (no address: written at the board's application start)", file=out)
    for note in image.notes:
        print(f"Note:     {note}", file=out)
    label = report.facts.get("chip") or "generic"
    print(f"Checks ({label}): {'OK' if report.ok else 'REFUSED'}", file=out)
    for key in ("content", "flash", "fits_below", "application_offset"):
        if key in report.facts:
            value = report.facts[key]
            shown = ", ".join(value) if isinstance(value, list) else value
            print(f"  {key.replace('_', ' ')}: {shown}", file=out)
    for w in report.warnings:
        print(f"  warning: {w}", file=out)
    for e in report.errors:
        _print_error_dict(e, out)
    return EXIT_OK if report.ok else EXIT_REFUSED


def cmd_detect(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    kwargs: dict[str, Any] = {}
    if os.environ.get(ENV_USB_BACKEND):
        kwargs["usb_backend"] = _import_hook(os.environ[ENV_USB_BACKEND])()
    if os.environ.get(ENV_CAN_BUS_FACTORY):
        kwargs["can_bus_factory"] = _import_hook(os.environ[ENV_CAN_BUS_FACTORY])
    devices = discovery.discover(
        can=args.can,
        probe=args.probe,
        can_interface=args.can_interface,
        can_channel=args.can_channel,
        extra_ports=args.extra_port,
        **kwargs,
    )
    if args.json:
        _json_line(devices.to_dict(), out)
        return EXIT_OK
    if not devices:
        print("No boards found.", file=out)
    for dev in devices:
        where = dev.port or dev.usb_path or dev.uuid or dev.id
        ident = f" [{dev.usb_id}]" if dev.usb_id else ""
        chip = f", {dev.chip}" if dev.chip else ""
        method = dev.method or "not flashable here"
        print(f"{where}{ident}: {dev.description}{chip} (method: {method})", file=out)
        if dev.hint:
            print(f"    {dev.hint}", file=out)
    for w in devices.warnings:
        print(f"warning: {w}", file=err)
    return EXIT_OK


def _open_via_registry(target: Target, log: Optional[LogCallback] = None) -> Flasher:
    """Resolved at call time so tests and embedders can replace ``methods.open_flasher``."""
    return methods.open_flasher(target, log)


def cmd_flash(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    target = target_from_args(args)
    target.options["prompt"] = _terminal_prompt(err)
    store = Store(_data_dir(args))
    if args.json:
        listener: Callable[[JobEvent], None] = lambda e: _json_line(  # noqa: E731
            {"type": e.type, **e.data}, out
        )
    else:
        listener = ProgressPrinter(err, args.verbose)
    try:
        stored = store.add_image(args.file, args.file.name, base_address=args.address)
    except ImageError as exc:
        if args.json:
            _json_line({"type": "result", "status": "failed", "error": exc.to_dict()}, out)
        else:
            _print_error(exc, err)
        return EXIT_REFUSED
    job = FlashJob(store, NoHost(), listener, opener=_open_via_registry)
    previous = _install_cancel_handler(job, err)
    try:
        result = job.run(stored.id, target, backup=args.backup is not None)
    finally:
        signal.signal(signal.SIGINT, previous)
        store.remove_image(stored.id)  # the user keeps the original; history keeps the facts
    if result.backup_id and args.backup is not None:
        write_image_file(store.load_image(result.backup_id), args.backup)
        if not args.json:
            print(f"Backup written to {args.backup}", file=err)
    return _report_result(result, args.json, out, err)


def _report_result(result: JobResult, as_json: bool, out: TextIO, err: TextIO) -> int:
    if as_json:
        return EXIT_OK if result.ok else exit_code_for(result.error)
    for w in result.warnings:
        print(f"warning: {w}", file=err)
    if result.ok and result.verified_by == "firmware-report":  # nothing could be read back
        print(f"{result.message} {result.confirmation} ({result.duration:.1f} s)", file=out)
        return EXIT_OK
    if result.ok:
        skipped = f", {result.blocks_skipped} blocks unchanged" if result.blocks_skipped else ""
        print(
            f"{result.message} {result.bytes_verified} bytes verified in "
            f"{result.duration:.1f} s{skipped}.",
            file=out,
        )
        return EXIT_OK
    if result.error:
        _print_error_dict(result.error, err)
    else:
        print(f"Error: {result.message}", file=err)
    return exit_code_for(result.error)


def _install_cancel_handler(job: FlashJob, err: TextIO) -> Any:
    """First Ctrl-C cancels at the next block boundary; the second one aborts hard."""

    def handler(signum: int, frame: Optional[FrameType]) -> None:
        if job.running and not getattr(handler, "fired", False):
            handler.fired = True  # type: ignore[attr-defined]
            print("\nCancelling at the next block boundary (Ctrl-C again to abort)...", file=err)
            job.cancel()
            return
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread (embedded use): no handler
        return signal.getsignal(signal.SIGINT)


def cmd_read(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    target = target_from_args(args)
    log: LogCallback = (
        (lambda line: print(f"  {line}", file=err)) if args.verbose else (lambda line: None)
    )
    printer = ProgressPrinter(err, args.verbose)
    t0 = time.monotonic()
    flasher: Optional[Flasher] = None
    try:
        flasher = _open_via_registry(target, log)
        info = flasher.identify()
        if not args.json:
            print(f"Found {info.describe()}", file=err)
        if not flasher.can_read:
            raise UnsupportedError(
                f"The {flasher.method} method cannot read the flash back.",
                hint="Reading is not possible with this bootloader.",
            )
        start = time.monotonic()

        def progress(p: Progress) -> None:
            elapsed = time.monotonic() - start
            rate = p.done / elapsed if elapsed > 0 else 0.0
            data = {
                "stage": p.stage,
                "done": p.done,
                "total": p.total,
                "percent": round(100.0 * p.done / p.total, 1) if p.total else 0.0,
                "rate": rate,
                "eta": (p.total - p.done) / rate if rate else None,
            }
            if args.json:
                _json_line({"type": "progress", **data}, out)
            else:
                printer(JobEvent("progress", data))

        image = flasher.read(progress)
        if not image.size:  # the error path below leaves the bootloader
            raise FlashError(
                "The application area is empty (erased): there is nothing to back up.",
                hint="No file was written. Flash a firmware first, or check the board/method.",
            )
        flasher.leave()
        write_image_file(image, args.out)
    except FlashError as exc:
        if args.json:
            _json_line({"type": "result", "status": "failed", "error": exc.to_dict()}, out)
        else:
            _print_error(exc, err)
        if flasher is not None and not isinstance(exc, CancelledError):
            try:
                flasher.leave()
            except Exception as leave_exc:  # best effort: report the first error
                print(f"  (could not leave the bootloader: {leave_exc})", file=err)
        return exit_code_for(exc.to_dict())
    finally:
        if flasher is not None:
            flasher.close()
    seconds = time.monotonic() - t0
    if args.json:
        _json_line(
            {
                "type": "result",
                "status": "success",
                "file": str(args.out),
                "image": image.summary(),
                "duration": round(seconds, 3),
            },
            out,
        )
    else:
        print(
            f"Read {image.size} bytes (0x{image.start:08X}-0x{image.end - 1:08X}) into "
            f"{args.out} in {seconds:.1f} s.",
            file=out,
        )
    return EXIT_OK


def cmd_history(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    records = Store(_data_dir(args)).history(args.limit)
    if args.json:
        _json_line({"history": records}, out)
        return EXIT_OK
    if not records:
        print("No flashes recorded yet.", file=out)
    for rec in records:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rec.get("time", 0)))
        error = rec.get("error") or {}
        tail = f" - {error.get('message')}" if error else ""
        print(
            f"{when}  {rec.get('result', '?'):9} {rec.get('filename', '')} -> "
            f"{rec.get('target', '')} ({rec.get('method', '')}, {rec.get('duration', 0):.1f} s)"
            f"{tail}",
            file=out,
        )
    return EXIT_OK


def cmd_rescue_bft(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from .flashers.marlin_sd import rescue

    log = (lambda line: print(line, file=err)) if args.verbose else None
    print(rescue(args.port, args.baud, log), file=out)
    return EXIT_OK


COMMANDS = {
    "info": cmd_info,
    "detect": cmd_detect,
    "flash": cmd_flash,
    "read": cmd_read,
    "history": cmd_history,
    "rescue-bft": cmd_rescue_bft,
}


def main(
    argv: Optional[list[str]] = None, out: Optional[TextIO] = None, err: Optional[TextIO] = None
) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    try:
        return COMMANDS[args.command](args, out, err)
    except UnsupportedError as exc:
        _print_error(exc, err)
        return EXIT_UNSUPPORTED
    except BusyError as exc:
        _print_error(exc, err)
        return EXIT_BUSY
    except FlashError as exc:
        _print_error(exc, err)
        return exit_code_for(exc.to_dict())
    except KeyboardInterrupt:
        print("Aborted.", file=err)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
