"""32-bit Marlin boards that flash ``firmware.bin`` from their SD card at reset.

The printer's own firmware does the delivery: the image goes to the card over Marlin's binary
file transfer (or is copied to the card when it is mounted on this host), then the board is
reset (``M997``, or the user presses the button), its bootloader flashes the file, and the
new firmware must answer. The flash cannot be read back over this path, so success is what
the board itself confirms: the FIRMWARE_NAME read from the ``.bin`` before the upload
reported by M115 afterwards, and/or the bootloader's rename (``FIRMWARE.CUR``) on the card.
Anything less is reported as "not confirmed", never as verified.

identify() only asks (M115, M21, M27): it never changes what the board runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

from ..errors import (
    BusyError,
    ConnectError,
    FlashError,
    PreflightError,
    UnsupportedError,
    VerifyError,
)
from ..flasher import (
    STAGE_WRITING,
    CancelToken,
    Flasher,
    FlashResult,
    LogCallback,
    Progress,
    ProgressCallback,
    TargetInfo,
    no_progress,
)
from ..image.marlin import BinInfo, describe_bin
from ..image.model import FirmwareImage
from ..links.serial_port import Wire, open_port
from ..protocols import marlin_bft as bft
from ..target import Target

METHOD = "marlin-sd"
#: stage shown while the board's bootloader copies the card's file into flash
STAGE_SD_FLASHING = "flashing_from_sd"

FAMILIES = ("btt", "creality", "creality-f4", "mks", "mks-encrypted")
#: MKS Robin boards whose bootloader wants the MKS-encrypted image (Marlin's encrypt_mks)
MKS_ENCRYPTED_NAMES = (
    "Robin.bin",
    "Robin_mini.bin",
    "Robin_nano35.bin",
    "Robin_e3.bin",
    "Robin_e3p.bin",
    "mksLite.bin",
    "mksLite3.bin",
    "Robin_pro.bin",
    "Robin2.bin",
)
F4_DIR = "STM32F4_UPDATE"
F4_ALIAS = "STM32F~1"

DEFAULTS: dict[str, float] = {
    "ack_timeout": 1.0,  # > Marlin's 500 ms half-packet drop
    "gcode_timeout": 5.0,
    "vanish_timeout": 10.0,  # port drop after M997 (native USB)
    "come_back_timeout": 90.0,  # bootloader flash + boot
    "settle": 1.0,  # after CLOSE the card is released; Marlin's upload.py waits 1 s
    "max_retries": 10,
}


def _opt(target: Target, name: str) -> float:
    return float(target.options.get(name, DEFAULTS[name]))


# --- image checks (no I/O) ------------------------------------------------------------------


def check_image(image: FirmwareImage, target: Target) -> list[str]:
    """Everything the file alone can tell: a ``.bin`` with a Cortex-M vector table, what it
    is (Marlin and its FIRMWARE_NAME, Klipper, MKS-encrypted), and whether it suits the
    bootloader family the user named."""
    if image.kind != "bin":
        raise PreflightError(
            f"{image.filename or 'This file'} is a .{image.kind} file; boards that update from "
            "their SD card flash only a .bin.",
            cause="SD bootloaders read a raw firmware.bin; a .hex is for AVR boards (or "
            "programmers) and would be ignored or flashed as garbage.",
            hint="Use the firmware.bin from the build's .pio/build/<env>/ folder.",
        )
    data = image.to_bytes()
    info = describe_bin(data)
    if info is None:
        raise PreflightError(
            f"{image.filename or 'This file'} is not a firmware for a 32-bit printer board.",
            cause="It does not start with an ARM Cortex-M vector table (stack pointer in RAM, "
            "reset handler inside the image): a G-code file, an AVR build, a truncated "
            "download or a bootloader-less image for another board.",
            hint="Pick the firmware.bin built for this board.",
        )
    warnings = [f"{image.filename or 'The image'} is {info.describe()}."]
    family = str(target.options.get("sd_family", "") or "")
    if info.encrypted_mks and family and family != "mks-encrypted":
        raise PreflightError(
            "This image is MKS-encrypted; only MKS Robin bootloaders decrypt it.",
            cause=f"The board was described as {family!r}, whose bootloader would flash the "
            "encrypted bytes as they are and not start.",
            hint="Use the plain firmware.bin for this board, or pick the MKS Robin family.",
        )
    if family == "mks-encrypted" and not info.encrypted_mks:
        raise PreflightError(
            "This MKS Robin bootloader expects an MKS-encrypted image; this one is plain.",
            cause="The Robin bootloader decrypts what it flashes: a plain image becomes garbage.",
            hint="Use the Robin*.bin the Marlin build writes (not firmware.bin).",
        )
    if info.kind == "klipper":
        warnings.append(
            "After flashing Klipper the board no longer answers G-code: success can only be "
            "confirmed by the bootloader's rename on the card, if it does one."
        )
    elif not info.firmware_name:
        warnings.append(
            "No FIRMWARE_NAME in the image: the board's report after flashing cannot be "
            "compared with it."
        )
    return warnings


# --- file names per bootloader family -------------------------------------------------------


def guess_family(report: bft.MarlinReport) -> str:
    """From what M115 says (Marlin reports no board name: MACHINE_TYPE is the best clue).
    Unknown boards get the BTT/LPC convention, which most SD bootloaders accept."""
    machine = report.machine.lower()
    if any(k in machine for k in ("skr", "btt", "bigtree", "octopus", "manta")):
        return "btt"
    if "robin" in machine or "mks" in machine:
        return "mks"
    if "ender-3 s1" in machine or "ender 3 s1" in machine or "free-runs" in machine:
        return "creality-f4"
    if any(k in machine for k in ("ender", "creality", "cr-10", "cr10", "cr-6", "sermoon")):
        return "creality"
    return "btt"


def _state_file(target: Target) -> Optional[Path]:
    folder = target.options.get("state_dir")
    return Path(folder) / "marlin-sd-names.json" if folder else None


def _load_state(target: Target) -> dict[str, Any]:
    path = _state_file(target)
    if path is None or not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _save_state(target: Target, state: dict[str, Any]) -> None:
    path = _state_file(target)
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
    os.replace(tmp, path)


def unique_name(previous: list[str], now: Optional[float] = None) -> str:
    """An 8.3 name Creality's bootloader has not flashed yet: ``FWhhmmss.BIN``."""
    stamp = time.localtime(now if now is not None else time.time())
    name = time.strftime("FW%H%M%S.BIN", stamp)
    taken = {p.rsplit("/", 1)[-1].upper() for p in previous}
    n = 0
    while name in taken:
        n += 1
        name = f"FW{n:06d}.BIN"
    return name


@dataclasses.dataclass
class Naming:
    """Where the file goes, what to delete first, and what the bootloader leaves after."""

    path: str  # "/FIRMWARE.BIN", "/STM32F~1/FW120501.BIN"
    delete: list[str]
    renamed_to: Optional[str]  # "/FIRMWARE.CUR" for BTT/LPC
    family: str


def plan_names(
    family: str,
    override: str = "",
    previous: Optional[list[str]] = None,
    long_filenames: bool = False,
    mks_name: str = "Robin_nano35.bin",
) -> Naming:
    """The naming rule of each bootloader family (docs/marlin.md)."""
    previous = list(previous or [])
    if family == "btt":
        path = "/" + (override or "firmware.bin")
        return Naming(path, ["/FIRMWARE.CUR", path, *previous], "/FIRMWARE.CUR", family)
    if family in ("mks", "mks-encrypted"):
        path = "/" + (override or mks_name)
        return Naming(path, [path, *previous], None, family)
    folder = ""
    if family == "creality-f4":
        folder = "/" + (F4_DIR if long_filenames else F4_ALIAS)
    elif family != "creality":
        raise UnsupportedError(
            f"Unknown SD bootloader family {family!r}.", hint="Use one of " + ", ".join(FAMILIES)
        )
    name = override or unique_name(previous)
    path = f"{folder}/{name}"
    if path.upper() in (p.upper() for p in previous[-1:]):
        raise PreflightError(
            f"{name} is the name of the last file this Creality board flashed; its bootloader "
            "skips a file whose name it has already flashed.",
            hint="Leave the file name empty (a new name is chosen) or give another name.",
        )
    return Naming(path, [*previous], None, family)


# --- the flasher ------------------------------------------------------------------------------


class MarlinSdFlasher(Flasher):
    method = METHOD
    can_read = False

    def __init__(self, target: Target, log: Optional[LogCallback] = None) -> None:
        super().__init__(log)
        self.target = target
        self.port = target.port
        self.baud = target.baud or 115200
        self.ser: Any = None
        self.wire: Optional[Wire] = None
        self.session: Optional[bft.BftSession] = None
        self.report = bft.MarlinReport()
        self.family = ""
        self.entered_from_app = False  # identify() never reboots the board
        self.verified_by = "not-confirmed"
        self.confirmation = ""
        self.mount = target.options.get("sd_mount")
        self._started = False  # the `start` banner was seen while waiting for the reset

    # -- port --

    def _open(self) -> None:
        if self.port is None:
            raise ConnectError(
                "No serial port given for the printer.",
                hint="Pass --port, e.g. /dev/ttyUSB0 or /dev/ttyACM0.",
            )
        self.ser = open_port(self.port, self.baud, 0.1)
        self.wire = Wire(self.ser, self.port)
        self.session = bft.BftSession(
            self.wire,
            self.log,
            ack_timeout=_opt(self.target, "ack_timeout"),
            max_retries=int(_opt(self.target, "max_retries")),
            gcode_timeout=_opt(self.target, "gcode_timeout"),
        )

    def close(self) -> None:
        ser, self.ser = self.ser, None
        self.wire = None
        self.session = None
        if ser is not None:
            try:
                ser.close()
            except Exception:
                pass

    def _cmd(self, line: str, timeout: Optional[float] = None) -> list[str]:
        assert self.session is not None
        lines = self.session.command(line, timeout)
        self.log(f"> {line}: " + (" | ".join(lines) if lines else "ok"))
        return lines

    # -- identify --

    def identify(self) -> TargetInfo:
        if self.port is None and self.mount:
            return self._identify_mount_only()
        self._open()
        assert self.session is not None and self.wire is not None
        self.wire.drain(0.05)
        try:
            lines = self._cmd("M115")
        except ConnectError:
            self.log("No answer to M115: checking whether the printer is stuck in binary mode")
            self.log(bft.rescue(self.wire, self.log, _opt(self.target, "ack_timeout")))
            lines = self._cmd("M115")
        self.report = bft.parse_m115(lines)
        if not self.report.firmware_name:
            raise UnsupportedError(
                f"The board on {self.port} answered, but not as Marlin (no FIRMWARE_NAME).",
                cause="This port is not a Marlin printer (Klipper, another firmware), or the "
                "baud rate is wrong.",
                hint="Check the port and baud rate; boards not running Marlin need another "
                "method (dfu, katapult).",
            )
        if not self.mount and not self.report.cap("BINARY_FILE_TRANSFER"):
            raise UnsupportedError(
                "This Marlin firmware was built without BINARY_FILE_TRANSFER, so files cannot "
                "be uploaded to its SD card over USB.",
                cause="M115 does not report Cap:BINARY_FILE_TRANSFER:1 (it is off by default; "
                "it cannot be combined with MEATPACK).",
                hint="Copy firmware.bin to the SD card on a computer this once (or mount the "
                "card here and give its path as sd_mount); enable BINARY_FILE_TRANSFER in "
                "Configuration_adv.h for next time.",
            )
        if not self.mount and "SD_WRITE" in self.report.caps and not self.report.cap("SD_WRITE"):
            raise UnsupportedError(
                "This Marlin firmware cannot write to its SD card (Cap:SD_WRITE:0).",
                cause="It was built with SDCARD_READONLY.",
                hint="Copy firmware.bin to the card on a computer this once.",
            )
        if not self.mount:
            card = bft.sd_card_ok(self._cmd("M21"))
            if not card:
                raise ConnectError(
                    "The printer reports no usable SD card (M21).",
                    cause="No card in the board's own slot, an unformatted card, or the "
                    "firmware uses the display's slot (SDCARD_CONNECTION LCD), which the "
                    "bootloader cannot read.",
                    hint="Insert a FAT32-formatted card into the mainboard's slot and try again.",
                )
        status = " ".join(self._cmd("M27"))
        if "SD printing byte" in status:
            raise BusyError(
                "The printer is printing from its SD card.",
                cause="Opening a file for the upload would abort the print.",
                hint="Wait for the print to finish, then flash.",
            )
        return self._info()

    def _identify_mount_only(self) -> TargetInfo:
        self.report = bft.MarlinReport()
        return self._info()

    def _info(self) -> TargetInfo:
        self.family = str(self.target.options.get("sd_family") or guess_family(self.report))
        if self.family not in FAMILIES:
            raise UnsupportedError(
                f"Unknown SD bootloader family {self.family!r}.",
                hint="Use one of " + ", ".join(FAMILIES),
            )
        if self.mount:
            self._check_mount()
        name = self.report.firmware_name or "unknown firmware"
        return TargetInfo(
            method=METHOD,
            chip=self.report.machine or "printer board",
            flash_start=0x08000000,
            flash_size=16 << 20,
            app_start=0x08000000,
            app_end=0x08000000 + (16 << 20),
            page_size=512,
            bootloader=f"SD-card bootloader ({self.family}) under {name}",
            details={
                "firmware_name": self.report.firmware_name,
                "machine": self.report.machine,
                "family": self.family,
                "caps": dict(self.report.caps),
                "delivery": "sd-mount" if self.mount else "binary-file-transfer",
            },
        )

    def _check_mount(self) -> None:
        path = Path(str(self.mount))
        if not path.is_dir() or not os.access(path, os.W_OK):
            raise ConnectError(
                f"The SD card folder {path} does not exist or is not writable.",
                cause="The card is not mounted there, or it is mounted read-only / for "
                "another user.",
                hint="Mount the card (or pick its folder) and check that OctoPrint's user can "
                "write to it.",
            )

    def check(self, image: FirmwareImage, target: TargetInfo) -> list[str]:
        """The card takes the whole file and the bootloader places it: describe the board
        as owning the image's link range so the generic placement check agrees."""
        check_image(image, self.target)  # its warnings were shown by the job's image check
        info = describe_bin(image.to_bytes())
        if info is not None and info.link_base is not None:
            base = 0x08000000 if info.link_base >= 0x08000000 else 0
            start = image.start if image.address_given else info.link_base
            target.flash_start, target.app_start = base, min(start, info.link_base)
            target.app_end = base + target.flash_size
        if self.family == "mks-encrypted" and info is not None and not info.encrypted_mks:
            raise PreflightError(
                "This MKS Robin bootloader expects an MKS-encrypted image; this one is plain.",
                hint="Use the Robin*.bin the Marlin build writes.",
            )
        if info is not None and info.encrypted_mks and self.family != "mks-encrypted":
            raise PreflightError(
                f"This image is MKS-encrypted, but the board looks like a {self.family} board "
                "whose bootloader does not decrypt.",
                hint="Use the plain firmware.bin, or set the family to mks-encrypted.",
            )
        return []

    # -- flash --

    def flash(
        self,
        image: FirmwareImage,
        progress: ProgressCallback = no_progress,
        cancel: Optional[CancelToken] = None,
        quick: bool = False,
    ) -> FlashResult:
        t0 = time.monotonic()
        self.application_runs = True  # until the reset, a failure leaves the old firmware running
        data = image.to_bytes()
        expected = describe_bin(data)
        state = _load_state(self.target)
        key = self._printer_key()
        previous = list(state.get(key, []))
        naming = plan_names(
            self.family,
            str(self.target.options.get("sd_filename") or ""),
            previous,
            long_filenames=self.report.cap("LONG_FILENAME") or bool(self.mount),
            mks_name=str(self.target.options.get("mks_name") or "Robin_nano35.bin"),
        )
        old_name = self.report.firmware_name
        packets = 0
        if self.mount:
            self._copy_to_mount(naming, data, progress)
        else:
            packets = self._upload(naming, data, progress, cancel)
        if naming.family.startswith("creality"):
            state[key] = (previous + [naming.path])[-8:]
            _save_state(self.target, state)
        elif naming.path not in previous and naming.path.upper() != "/FIRMWARE.BIN":
            state[key] = (previous + [naming.path])[-8:]
            _save_state(self.target, state)
        self._reset_board(progress, expected is not None and expected.kind == "klipper")
        self._confirm(expected, old_name, naming, len(data))
        return FlashResult(
            bytes_written=len(data),
            bytes_verified=0,  # nothing was read back
            blocks_written=packets,
            seconds=time.monotonic() - t0,
            verified_by=self.verified_by,
            confirmation=self.confirmation,
        )

    def _printer_key(self) -> str:
        uuid = self.report.fields.get("UUID", "")
        return uuid or self.report.machine or str(self.port or self.mount)

    def _upload(
        self,
        naming: Naming,
        data: bytes,
        progress: ProgressCallback,
        cancel: Optional[CancelToken],
    ) -> int:
        assert self.session is not None
        self._cmd("M155 S0")  # temperature reports keep coming in binary mode
        for path in dict.fromkeys(naming.delete):
            self._cmd(f"M30 {path}")
        compress = bool(self.target.options.get("compress", False))
        payload = data
        session = self.session
        total = len(data)
        progress(Progress(STAGE_WRITING, 0, total))
        with session:
            session.start()
            if compress:
                params = session.query()
                payload, compress = _compress(data, params, self.log)
            scale = total / max(1, len(payload))

            def tick() -> None:
                if cancel is not None:
                    cancel.check()

            session.open(naming.path, compress=compress)
            session.write_file(
                payload,
                int(self.target.options.get("block_size") or 0) or None,
                lambda n: progress(Progress(STAGE_WRITING, min(total, int(n * scale)), total)),
                tick,
            )
            session.close_file()
        stats = session.stats
        self.log(
            f"Uploaded {naming.path}: {stats.packets} packets, {stats.resends} resends, "
            f"{stats.timeouts} timeouts, blocks of {stats.block_size} B"
        )
        time.sleep(min(_opt(self.target, "settle"), 1.0))
        self._cmd("M21")  # CLOSE released the card
        size = bft.parse_file_opened(self._cmd(f"M23 {naming.path}"))
        self._cmd("M21")
        if size != len(data):
            raise VerifyError(
                f"The card holds {naming.path} with {size} bytes, not {len(data)}.",
                cause="The upload was cut short or the card failed a write.",
                hint="Flash again; if it repeats, check or replace the SD card.",
            )
        return stats.packets

    def _copy_to_mount(self, naming: Naming, data: bytes, progress: ProgressCallback) -> None:
        root = Path(str(self.mount))
        for path in dict.fromkeys(naming.delete):
            for found in _case_insensitive(root, path):
                found.unlink()
                self.log(f"Deleted {found}")
        parts = [p for p in naming.path.split("/") if p]
        folder = root
        for part in parts[:-1]:
            match = [p for p in folder.iterdir() if p.name.upper() == part.upper()]
            folder = match[0] if match else folder / part
            folder.mkdir(exist_ok=True)
        dest = folder / parts[-1]
        progress(Progress(STAGE_WRITING, 0, len(data)))
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            done = 0
            while done < len(data):
                done += os.write(fd, view[done : done + 65536])
                progress(Progress(STAGE_WRITING, done, len(data)))
            os.fsync(fd)
        finally:
            os.close(fd)
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the directory entry too: the card may be pulled next
        finally:
            os.close(dir_fd)
        if dest.read_bytes() != data:
            raise VerifyError(f"{dest} does not hold what was written.", hint="Check the card.")
        self.log(f"Copied {len(data)} bytes to {dest} (synced)")

    # -- reset and come back --

    def _reset_board(self, progress: ProgressCallback, klipper: bool = False) -> None:
        self.application_runs = False  # from here on the bootloader may be flashing the card
        prompt: Optional[Callable[[str], None]] = self.target.options.get("prompt")
        needs_button = self.session is None
        if self.session is not None:
            assert self.wire is not None
            self.wire.drain(0.05)
            self.wire.write(b"M997\n")
            self.log("> M997 (reset into the SD bootloader)")
            answer = self._await_reset()
            if answer == "unknown":
                needs_button = True
                self.log("This firmware has no M997")
        if needs_button:
            if prompt is None:
                raise UnsupportedError(
                    "The firmware is on the SD card, but this board cannot reset itself "
                    "(no M997) and there is no one to ask to press its reset button.",
                    hint="Press the printer board's reset button (or switch the printer off "
                    "and on): the bootloader flashes the file at start-up.",
                )
            prompt(
                "Press the printer board's reset button now (or switch the printer off and "
                "on): its bootloader flashes the firmware from the SD card."
            )
        progress(Progress(STAGE_SD_FLASHING, 0, 1))
        try:
            self._wait_for_come_back(progress)
        except ConnectError:
            if not klipper:
                raise
            self.log("No sign from the board: expected when it now runs Klipper on a UART")
        progress(Progress(STAGE_SD_FLASHING, 1, 1))

    def _await_reset(self) -> str:
        """After M997: ``unknown`` (the HAL has none), ``gone`` (port dropped) or ``start``."""
        assert self.wire is not None and self.session is not None
        deadline = time.monotonic() + _opt(self.target, "gcode_timeout")
        reader = self.session.reader
        while time.monotonic() < deadline:
            try:
                line = reader.next_line(0.1)
            except ConnectError:
                self.log(f"{self.port} went away (the board is resetting)")
                self.close()  # a stale handle can make the board come back as ttyACM1
                return "gone"
            if line is None:
                if self.port and not os.path.exists(self.port):
                    self.log(f"{self.port} went away (the board is resetting)")
                    self.close()
                    return "gone"
                continue
            if "Unknown command" in line and "M997" in line:
                return "unknown"
            if line == "start":
                self.log("The board restarted (start)")
                self._started = True
                return "start"
        return "silent"

    def _wait_for_come_back(self, progress: ProgressCallback) -> None:
        """Native USB boards drop the port and re-enumerate; USB-UART bridges (CH340) keep it
        and Marlin prints ``start``. Either way, then M115 must answer."""
        if self.port is None:
            return
        deadline = time.monotonic() + _opt(self.target, "come_back_timeout")
        vanish_until = time.monotonic() + _opt(self.target, "vanish_timeout")
        started = getattr(self, "_started", False)
        while time.monotonic() < deadline and not started:
            if self.ser is None:
                if os.path.exists(self.port):
                    try:
                        self._open()
                    except ConnectError:
                        time.sleep(0.05)
                        continue
                    self.log(f"{self.port} is back")
                    break
                time.sleep(0.02)
                continue
            assert self.session is not None
            try:
                line = self.session.reader.next_line(0.1)
            except ConnectError:
                self.log(f"{self.port} went away (the board is resetting)")
                self.close()
                continue
            if line is None:
                if not os.path.exists(self.port):
                    self.close()
                elif time.monotonic() > vanish_until and self.ser is not None:
                    vanish_until = deadline  # keep listening for `start`
                continue
            if line == "start":
                self.log("The board restarted (start)")
                started = True
        else:
            if not started:
                raise ConnectError(
                    f"The board did not come back on {self.port} within "
                    f"{_opt(self.target, 'come_back_timeout'):.0f} s.",
                    cause="It is still flashing, hangs at 'Resetting...', or came back under "
                    "another port name.",
                    hint="Wait a minute, then power-cycle the printer and reconnect; the "
                    "firmware is on the SD card and is flashed at start-up.",
                )
        self._started = False

    def _ask_m115(self, patience: float) -> Optional[bft.MarlinReport]:
        """M115 until it answers (the banner and the card mount come first), or None."""
        if self.session is None:
            return None
        deadline = time.monotonic() + patience
        while time.monotonic() < deadline:
            try:
                lines = self.session.command("M115", 1.0)
            except ConnectError as exc:
                if "did not answer" not in exc.message:
                    return None
                continue
            report = bft.parse_m115(lines)
            if report.firmware_name:
                return report
        return None

    def _probe(self, path: str) -> Optional[int]:
        assert self.session is not None
        self._cmd("M21")
        size = bft.parse_file_opened(self._cmd(f"M23 {path}"))
        self._cmd("M21")  # a fresh mount releases the selection
        return size

    def _confirm(
        self, expected: Optional[BinInfo], old_name: str, naming: Naming, size: int
    ) -> None:
        # Klipper answers no G-code: one short try only shows whether the old Marlin remained
        klipper = expected is not None and expected.kind == "klipper"
        patience = 1.5 if klipper else max(5.0, _opt(self.target, "gcode_timeout"))
        new = self._ask_m115(patience) if self.port else None
        want = expected.firmware_name if expected else ""
        renamed = False
        if new is not None and naming.renamed_to:
            renamed = self._probe(naming.renamed_to) == size and self._probe(naming.path) is None
        evidence = []
        if new is not None:
            self.log(f"M115 after the reset: {new.firmware_name}")
            if want and new.firmware_name == want and want != old_name:
                evidence.append(f"the board reports the new build (M115 FIRMWARE_NAME: {want})")
            elif want and new.firmware_name != want:
                raise VerifyError(
                    f"The board came back with {new.firmware_name!r}, not the uploaded {want!r}.",
                    cause=_not_flashed_cause(naming, new.firmware_name == old_name),
                    hint=f"This was flashed as a {naming.family!r} board"
                    + (
                        " (guessed from MACHINE_TYPE); if that is wrong, choose the board's "
                        "SD bootloader family (sd_family) and flash again."
                        if not self.target.options.get("sd_family")
                        else "; check the file name rule for this board and flash again."
                    ),
                )
        if renamed:
            evidence.append(
                f"its bootloader renamed {naming.path.lstrip('/')} to "
                f"{(naming.renamed_to or '').lstrip('/')}"
            )
        if evidence:
            self.verified_by = "firmware-report"
            self.confirmation = (
                "Confirmed: "
                + " and ".join(evidence)
                + "; the flash cannot be read back over this path."
            )
        else:
            self.verified_by = "not-confirmed"
            self.confirmation = "Not confirmed: " + _why_not(
                expected, new, old_name, self.mount, self.port
            )
        self.log(self.confirmation)

    def read(
        self, progress: ProgressCallback = no_progress, cancel: Optional[CancelToken] = None
    ) -> FirmwareImage:
        raise UnsupportedError(
            "A board that updates from its SD card cannot be read back over serial.",
            hint="Flash without a backup.",
        )

    def leave(self) -> Optional[str]:
        """Nothing to leave: the board runs its application throughout (and binary mode was
        closed when the upload ended)."""
        return None


def _not_flashed_cause(naming: Naming, still_old: bool) -> str:
    if not still_old:
        return "Another firmware file on the card was flashed instead."
    if naming.family.startswith("creality"):
        return (
            "The board still runs the old firmware: Creality bootloaders skip a file whose "
            "name they flashed before, and files with other names on the card compete."
        )
    if naming.family == "btt":
        return (
            "The board still runs the old firmware: the bootloader did not take "
            f"{naming.path.lstrip('/')} (wrong name for this board, or a card it cannot read)."
        )
    return "The board still runs the old firmware: the bootloader did not take the file."


def _why_not(
    expected: Optional[BinInfo],
    new: Optional[bft.MarlinReport],
    old: str,
    mount: Any,
    port: Optional[str],
) -> str:
    if new is None:
        if mount is not None and not port:
            return (
                "the file was copied to the card, but without the printer's serial port the "
                "board's report after the reset cannot be read."
            )
        if expected is not None and expected.kind == "klipper":
            return (
                "the board restarted and no longer answers G-code, as expected after flashing "
                "Klipper; whether the bootloader took the file cannot be seen from here."
            )
        return "the board did not answer M115 after the reset."
    if expected is None or not expected.firmware_name:
        return "the image carries no FIRMWARE_NAME to compare with the board's report."
    if expected.firmware_name == old:
        return (
            f"the board reports {old!r}, the same build it ran before, so a new flash cannot "
            "be told from no flash."
        )
    return "nothing the board reports tells the new firmware from the old one."


def _compress(
    data: bytes, params: Optional[tuple[int, int]], log: LogCallback
) -> tuple[bytes, bool]:
    """heatshrink with the printer's parameters, when both sides have it."""
    if params is None:
        log("The printer has no decompressor: sending uncompressed")
        return data, False
    try:
        import heatshrink2  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        log("heatshrink2 is not installed: sending uncompressed (pip install heatshrink2)")
        return data, False
    window, lookahead = params
    packed = heatshrink2.compress(data, window_sz2=window, lookahead_sz2=lookahead)
    log(f"Compressed {len(data)} -> {len(packed)} bytes (heatshrink {window},{lookahead})")
    return bytes(packed), True


def _case_insensitive(root: Path, path: str) -> list[Path]:
    parts = [p for p in path.split("/") if p]
    found = [root]
    for part in parts:
        nxt = []
        for folder in found:
            if folder.is_dir():
                nxt += [p for p in folder.iterdir() if p.name.upper() == part.upper()]
        found = nxt
    return [p for p in found if p.is_file()]


def open_flasher(target: Target, log: Optional[LogCallback] = None) -> MarlinSdFlasher:
    """Build the flasher; the port opens in identify()."""
    return MarlinSdFlasher(target, log)


def rescue(port: str, baud: int = 115200, log: Optional[LogCallback] = None) -> str:
    """Get a printer out of binary mode (a host that died mid-upload leaves it deaf to
    G-code until it is power-cycled)."""
    ser = open_port(port, baud, 0.1)
    try:
        return bft.rescue(Wire(ser, port), log or (lambda _l: None))
    finally:
        ser.close()


def probe(port: str, baud: int = 115200, timeout: float = 2.0) -> Optional[bft.MarlinReport]:
    """M115 on a free port: the report when it is Marlin, else None. For discovery: only
    ports nobody holds (never the printer port OctoPrint is connected to)."""
    try:
        ser = open_port(port, baud, 0.1)
    except FlashError:
        return None
    try:
        session = bft.BftSession(Wire(ser, port), gcode_timeout=timeout)
        for _ in range(2):  # bytes an earlier probe left in the line buffer spoil the first
            report = bft.parse_m115(session.command("M115"))
            if report.firmware_name:
                return report
        return None
    except FlashError:
        return None
    finally:
        ser.close()
