"""The Prusa MMU2S/MMU3 and CW1/CW1S (ATmega32U4 with Prusa's Caterina): avr109 over USB CDC.

Entry: the application reboots into Caterina on a 1200-baud touch and the board re-enumerates
with the bootloader's product id, often under a new tty name, so it is found again by its USB
location and serial number (:mod:`..links.usb_follow`). Caterina leaves after 8 s without a
command, so entry, identification and writing follow each other without pauses. Boards that
do not answer the touch (an Arduino Leonardo bootloader on an MMU board; broken firmware) get
the "press the reset button now" prompt, then we keep polling.

Caterina erases every page right before writing it, so unlike the Mega stk500v2 bootloader
pages can be written in any order and skipped; everything below 0x7000 is the application.
``research/prusa.md`` §2.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

from ..errors import ConnectError, PreflightError, ProtocolError, VerifyError
from ..flasher import (
    STAGE_ENTERING,
    STAGE_READING,
    STAGE_VERIFYING,
    STAGE_WRITING,
    VERIFIED_READ_BACK,
    CancelToken,
    Flasher,
    FlashResult,
    LogCallback,
    Progress,
    ProgressCallback,
    TargetInfo,
    no_progress,
)
from ..image import prusa_hex
from ..image.model import FirmwareImage, Segment
from ..links import usb_follow
from ..links.bootloader_entry import list_serial_ports, touch_1200
from ..links.serial_port import SerialLink
from ..protocols.avr109 import Avr109, Avr109Error
from ..target import Target

SIG_32U4 = b"\x1e\x95\x87"
PAGE = 128
APP_END = 0x7000
FLASH = 0x8000
VERSION_ADDRESS = 0xAC  # MMU3: {major, minor, revision u16, build u16} after the vectors
READ_CHUNK = 512

#: application USB id -> (bootloader USB id, device kind)
APP_IDS: dict[tuple[int, int], tuple[tuple[int, int], Optional[str]]] = {
    (0x2C99, 0x0004): ((0x2C99, 0x0003), prusa_hex.MMU),
    (0x2C99, 0x0008): ((0x2C99, 0x0007), prusa_hex.CW1),
    (0x2C99, 0x000F): ((0x2C99, 0x000E), prusa_hex.CW1S),
    (0x2341, 0x8036): ((0x2341, 0x0036), None),  # an MMU board with a Leonardo bootloader
}
BOOT_IDS: dict[tuple[int, int], Optional[str]] = dict(APP_IDS.values())
NAMES = {prusa_hex.MMU: "MMU", prusa_hex.CW1: "CW1", prusa_hex.CW1S: "CW1S", None: "board"}


def _usb_id(text: Optional[str]) -> Optional[tuple[int, int]]:
    if not text:
        return None
    try:
        vid, pid = (int(x, 16) for x in text.split(":"))
    except ValueError:
        return None
    return vid, pid


def device_kind(usb: Optional[tuple[int, int]]) -> Optional[str]:
    if usb is None:
        return None
    if usb in APP_IDS:
        return APP_IDS[usb][1]
    return BOOT_IDS.get(usb)


def check_image(image: FirmwareImage, target: Target) -> list[str]:
    """What the file alone says (no I/O): a controller file, no ISP image, the controller the
    USB id names."""
    info = (getattr(image, "extra", None) or {}).get("prusa") or {}
    kind = info.get("kind", "")
    name = image.filename or "the file"
    if getattr(image, "external", None):
        kind = prusa_hex.MK3_MULTILANG
    if target.mcu and "32u4" not in target.mcu.lower():
        raise PreflightError(
            f"The avr109 method flashes the ATmega32U4 of an MMU or CW1, not {target.mcu}.",
            hint="Leave the MCU empty, or choose the printer's method. Nothing was written.",
        )
    prusa_hex.check_for_controller(kind, name, image.end, device_kind(_usb_id(target.usb)))
    warnings: list[str] = []
    if not kind:
        warnings.append(
            f"{name} has no '; device = …' header: make sure it is the firmware for this "
            "MMU/CW1 (Prusa's files start with one)."
        )
    return warnings


class Avr109Flasher(Flasher):
    method = "avr109"

    def __init__(self, target: Target, log: Optional[LogCallback] = None) -> None:
        super().__init__(log)
        opts = target.options
        self.target = target
        self.port: Optional[str] = target.port
        self.lister: Callable[[], list[Any]] = opts.get("list_ports") or list_serial_ports
        self.open_serial: Optional[Callable[..., Any]] = opts.get("open_serial")
        self.serial_factory = opts.get("serial_factory")
        prompt = opts.get("prompt")
        self.prompt: Optional[Callable[[str], None]] = prompt if callable(prompt) else None
        self.entry_timeout = float(opts.get("entry_timeout", 10.0))
        self.button_timeout = float(opts.get("button_timeout", 30.0))
        self.back_timeout = float(opts.get("back_timeout", 5.0))
        self.timeout = float(opts.get("timeout", 1.0))
        self.link: Optional[SerialLink] = None
        self.proto: Optional[Avr109] = None
        self.info: Optional[TargetInfo] = None
        self.entered_from_app = False
        self.location: Optional[str] = None
        self.serial_number: Optional[str] = None
        self.kind: Optional[str] = device_kind(_usb_id(target.usb))
        self.app_id: Optional[tuple[int, int]] = None
        self.recoveries = 0
        #: the bootloader's answer to S, once known (resynchronisation looks for it)
        self.identifier = ""

    # --- entering ------------------------------------------------------------------------------

    def _enter(self) -> str:
        """The bootloader's port: touched and followed if the application runs."""
        me = usb_follow.find_port(self.lister, self.port)
        usb = usb_follow.usb_id_of(me)
        if me is not None:
            self.location = getattr(me, "location", None)
            self.serial_number = getattr(me, "serial_number", None)
            self.kind = self.kind or device_kind(usb)
        if usb in BOOT_IDS:
            self.app_id = next(a for a, (b, _) in APP_IDS.items() if b == usb)
            self.log(f"avr109: {self.port} is already the bootloader")
            assert self.port is not None
            return self.port
        if usb not in APP_IDS:
            if not self.port:
                raise ConnectError(
                    "No port given for the MMU/CW1.",
                    hint="Pick the MMU's USB port (USB id 2c99:0004).",
                )
            self.log(f"avr109: {self.port} has no known USB id; talking to it as a bootloader")
            return self.port
        assert self.port is not None and usb is not None
        self.app_id = usb
        boot_id = APP_IDS[usb][0]
        others = [p.device for p in self.lister() if p.device != self.port]
        self.log(f"avr109: 1200-baud touch on {self.port} (USB {usb[0]:04x}:{usb[1]:04x})")
        touch_1200(self.port, self.open_serial)
        self.entered_from_app = True
        found = usb_follow.wait_for_port(
            self.lister, [boot_id], self.location, self.serial_number, self.entry_timeout, others
        )
        if found is None:
            if self.prompt is None:
                raise ConnectError(
                    f"The {NAMES[self.kind]} did not come back as its bootloader (USB "
                    f"{boot_id[0]:04x}:{boot_id[1]:04x}) within {self.entry_timeout:.0f} s of "
                    "the 1200-baud touch.",
                    cause="Its firmware ignores the touch (an Arduino Leonardo bootloader on "
                    "the board, or firmware that hangs), or the device came back elsewhere.",
                    hint="Press the reset button on the board (next to its USB socket) and "
                    "flash again within 8 s, or flash from the page, which asks at the right "
                    "moment.",
                )
            self.prompt(
                f"Press the reset button on the {NAMES[self.kind]} now (next to its USB "
                f"connector); waiting {self.button_timeout:.0f} s for its bootloader."
            )
            found = usb_follow.wait_for_port(
                self.lister,
                [boot_id],
                self.location,
                self.serial_number,
                self.button_timeout,
                others,
            )
            if found is None:
                raise ConnectError(
                    f"The {NAMES[self.kind]}'s bootloader did not appear after the reset "
                    "button either.",
                    cause="The board is not powered, the cable carries no data, or its "
                    "bootloader is missing.",
                    hint="Check the USB cable and the board's power; a board without a "
                    "bootloader needs an ISP programmer.",
                )
        self.log(f"avr109: bootloader on {found.device}")
        return str(found.device)

    def _open(self, port: str) -> Avr109:
        self.port = port
        self.link = SerialLink(port, 115200, factory=self.serial_factory)
        last: Optional[Exception] = None
        for _ in range(20):  # the new tty may need a moment for udev's permissions
            try:
                self.link.open()
                break
            except ConnectError as exc:
                last = exc
                time.sleep(0.05)
        else:
            assert last is not None
            raise last
        self.proto = Avr109(self.link.ser, timeout=self.timeout)
        self.proto.wire.drain(0.05)  # a prober's stray bytes (ModemManager's AT) and echoes
        return self.proto

    def identify(self) -> TargetInfo:
        if self.info is not None:
            return self.info
        proto = self._open(self._enter())
        ident = self._resync(proto)
        self.identifier = ident
        if ident != "CATERIN":
            self.log(f"avr109: the bootloader calls itself {ident!r}, not Caterina")
        sig = proto.signature()
        if sig != SIG_32U4:
            raise ProtocolError(
                f"The avr109 bootloader reports chip signature {sig.hex(' ')}, not the "
                "ATmega32U4's 1e 95 87.",
                cause="This is not an MMU/CW1 control board.",
                hint="Check the port. Nothing was written.",
            )
        block = proto.block_size()
        if block < PAGE or not proto.auto_increment():
            raise ProtocolError(
                f"The bootloader offers a {block}-byte block and no auto-increment.",
                cause="An avr109 dialect this flasher does not drive.",
                hint="Flash it with avrdude -c avr109. Nothing was written.",
            )
        proto.set_address(VERSION_ADDRESS)
        raw = proto.read_block(6)
        version = _version(raw)
        self.info = TargetInfo(
            method=self.method,
            chip="atmega32u4",
            flash_start=0,
            flash_size=FLASH,
            app_start=0,
            app_end=APP_END,
            page_size=PAGE,
            bootloader=f"{ident} (avr109)",
            details={
                "port": self.port,
                "device": NAMES[self.kind],
                "usb_location": self.location,
                "serial_number": self.serial_number,
                "installed_version": version,
                "block_size": block,
            },
        )
        self.log(
            f"avr109: {self.info.describe()}"
            + (f"; installed firmware {version}" if version else "")
        )
        return self.info

    def _resync(self, proto: Avr109) -> str:
        """``S`` until it answers: a touch-time prober or a half-sent command may be ahead
        of us. ESC bytes finish any pending block command harmlessly (never answered); after
        a failure the identifier is looked for in the stream, since answers to the garbage
        a lost byte turned into commands may still be queued ahead of it."""
        expected = self.identifier
        for attempt in range(3):
            try:
                if not expected:
                    return proto.identifier()
                proto.wire.write(b"S")
                got = bytearray()
                deadline = time.monotonic() + proto.timeout
                while expected.encode() not in got and time.monotonic() < deadline:
                    got += proto.wire.read(1, deadline - time.monotonic())
                if expected.encode() in got:
                    proto.wire.drain(0.02)
                    return expected
                raise Avr109Error(f"No '{expected}' in the answer to S: {bytes(got[-16:])!r}.")
            except Avr109Error:
                if attempt == 2:
                    raise
                proto.wire.write(b"\x1b" * (4 + PAGE + 8))
                proto.wire.drain(0.1)
        raise AssertionError("unreachable")  # pragma: no cover

    # --- checks and flashing -------------------------------------------------------------

    def check(self, image: FirmwareImage, target: TargetInfo) -> list[str]:
        warnings = check_image(image, self.target)
        if image.end > target.app_end:
            raise prusa_hex.isp_image_error(image.filename or "the file", image.end)
        return warnings

    def _with_resync(self, op: Callable[[], Any]) -> Any:
        while True:
            try:
                return op()
            except Avr109Error as exc:
                self.recoveries += 1
                if self.recoveries > 4:
                    raise
                self.log(f"avr109: {exc.message} — resynchronising")
                assert self.proto is not None
                self.proto.wire.write(b"\x1b" * (4 + PAGE + 8))
                self.proto.wire.drain(0.1)
                self._resync(self.proto)

    def _write(
        self, pages: list[tuple[int, bytes]], progress: ProgressCallback, cancel: Any
    ) -> None:
        proto = self.proto
        assert proto is not None
        total = len(pages) * PAGE
        progress(Progress(STAGE_WRITING, 0, total))
        address: Optional[int] = None
        for i, (addr, data) in enumerate(pages):
            if cancel is not None:
                cancel.check()

            def one(a: int = addr, d: bytes = data) -> None:
                nonlocal address
                if address != a:
                    proto.set_address(a)
                address = None  # unknown until the block is answered
                proto.write_block(d)
                address = a + len(d)

            self._with_resync(one)
            progress(Progress(STAGE_WRITING, (i + 1) * PAGE, total))

    def _read(
        self, addresses: list[int], stage: str, progress: ProgressCallback, cancel: Any
    ) -> dict[int, bytes]:
        proto = self.proto
        assert proto is not None
        runs: list[list[int]] = []
        for a in sorted(addresses):
            if runs and runs[-1][-1] + PAGE == a and len(runs[-1]) * PAGE < READ_CHUNK:
                runs[-1].append(a)
            else:
                runs.append([a])
        out: dict[int, bytes] = {}
        total = len(addresses) * PAGE
        done = 0
        progress(Progress(stage, 0, total))
        for run in runs:
            if cancel is not None:
                cancel.check()

            def one(r: list[int] = run) -> bytes:
                proto.set_address(r[0])
                return proto.read_block(len(r) * PAGE)

            data = self._with_resync(one)
            for i, a in enumerate(run):
                out[a] = data[i * PAGE : (i + 1) * PAGE]
            done += len(run) * PAGE
            progress(Progress(stage, done, total))
        return out

    def flash(
        self,
        image: FirmwareImage,
        progress: ProgressCallback = no_progress,
        cancel: Optional[CancelToken] = None,
        quick: bool = False,
    ) -> FlashResult:
        started = time.monotonic()
        if self.info is None:
            progress(Progress(STAGE_ENTERING, 0, 1))
        info = self.identify()
        self.check(image, info)
        pages = list(image.blocks(PAGE))
        skipped = 0
        if quick:
            now = self._read([a for a, _ in pages], STAGE_READING, progress, cancel)
            todo = [(a, d) for a, d in pages if now[a] != d]
            skipped = len(pages) - len(todo)
            pages = todo
        self._write(pages, progress, cancel)
        bad = self._verify(pages, progress, cancel)
        if bad:
            self.log(f"avr109: {len(bad)} pages differ after writing; writing them again")
            again = [(a, d) for a, d in pages if a in bad]
            self._write(again, progress, cancel)
            still = self._verify(again, progress, cancel)
            if still:
                raise VerifyError(
                    f"Verify failed at 0x{still[0]:04X} after writing the page twice.",
                    cause="The page is above the bootloader's limit, or the flash is worn.",
                    hint="Flash again; if it fails at the same address the board needs an ISP "
                    "programmer.",
                )
        nbytes = len(pages) * PAGE
        name = NAMES[self.kind]
        return FlashResult(
            bytes_written=nbytes,
            bytes_verified=nbytes,
            blocks_written=len(pages),
            blocks_skipped=skipped,
            seconds=time.monotonic() - started,
            verified_by=VERIFIED_READ_BACK,
            confirmation=f"{name} firmware: {nbytes} bytes written and read back over avr109"
            + (f" ({skipped} pages already identical)" if skipped else ""),
        )

    def _verify(
        self, pages: list[tuple[int, bytes]], progress: ProgressCallback, cancel: Any
    ) -> list[int]:
        found = self._read([a for a, _ in pages], STAGE_VERIFYING, progress, cancel)
        return [a for a, d in pages if found[a] != d]

    def read(
        self, progress: ProgressCallback = no_progress, cancel: Optional[CancelToken] = None
    ) -> FirmwareImage:
        self.identify()
        pages = self._read(list(range(0, APP_END, PAGE)), STAGE_READING, progress, cancel)
        data = b"".join(pages[a] for a in sorted(pages)).rstrip(b"\xff")
        segs = [Segment(0, data)] if data else []
        return FirmwareImage(segs, filename="atmega32u4-backup.hex", kind="hex")

    def leave(self) -> Optional[str]:
        """``E``, then wait for the application's USB id at the same place."""
        if self.proto is None:
            return None
        try:
            self.proto.exit()
        finally:
            self.close()
        self.proto = None
        if self.app_id is None or not (self.location or self.serial_number):
            return None
        back = usb_follow.wait_for_port(
            self.lister, [self.app_id], self.location, self.serial_number, self.back_timeout
        )
        name = NAMES[self.kind]
        if back is None:
            return (
                f"The {name} did not come back as its application within "
                f"{self.back_timeout:.0f} s; the firmware is verified, power-cycle the {name}."
            )
        extra = " Reconnect the printer so it sees the MMU." if self.kind == prusa_hex.MMU else ""
        return f"The {name} runs its new firmware again ({back.device}).{extra}"

    def close(self) -> None:
        if self.link is not None:
            self.link.close()


def _version(raw: bytes) -> str:
    """MMU3's version struct, or "" when the bytes are not one (MM-control-01, erased)."""
    if len(raw) != 6 or raw in (b"\xff" * 6, b"\x00" * 6):
        return ""
    major, minor = raw[0], raw[1]
    revision = int.from_bytes(raw[2:4], "little")
    build = int.from_bytes(raw[4:6], "little")
    if major > 9 or minor > 99:
        return ""
    return f"{major}.{minor}.{revision}+{build}"


def open_flasher(target: Target, log: Optional[LogCallback] = None) -> Avr109Flasher:
    """No I/O here: the touch (which reboots the running firmware) happens in identify()."""
    return Avr109Flasher(target, log)
