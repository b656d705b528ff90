"""Flashing RP2040/RP2350 boards through the boot ROM's PICOBOOT interface, with read-back.

The algorithm (Klipper's ``rp2040_flash`` plus what it leaves out): find the ROM
(``2e8a:0003``/``000f``), or reach it from a running Klipper by the 1200-baud touch and follow
the board by its USB path; claim the vendor interface, reset it, take exclusive access (the
USB drive is locked out), exit XIP; erase exactly the 4 KiB sectors the image touches (bytes
of a partly covered sector that are not the image's are read first and written back); write
256-byte pages (all-0xFF pages are left erased); **read every touched sector back** and
compare; REBOOT and confirm the application came back (Klipper ``1d50:614e`` at the same
path). Quick mode reads the touched sectors first and skips the identical ones. A Klipper that
jumps to Katapult instead of the ROM is handed over to the Katapult flasher.
"""

from __future__ import annotations

import dataclasses
import errno
import time
from typing import Any, Callable, Optional

from ..discovery import Device
from ..errors import (
    ConnectError,
    FlashError,
    PreflightError,
    ProtocolError,
    VerifyError,
)
from ..flasher import (
    STAGE_ERASING,
    STAGE_READING,
    STAGE_VERIFYING,
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
from ..image import rp2040
from ..image.klipper import klipper_build
from ..image.model import FirmwareImage, Segment
from ..links import bootloader_entry as entry
from ..links import usb_device
from ..protocols import picoboot as pb
from ..target import Target

ROM_IDS = {(pb.VENDOR_ID, pb.PID_RP2040): "RP2040", (pb.VENDOR_ID, pb.PID_RP2350): "RP2350"}
SECTOR = pb.FLASH_SECTOR
PAGE = pb.FLASH_PAGE
READ_CHUNK = 16 * 1024
#: the ROM acknowledges REBOOT at once and resets after this delay (Klipper waits 500 ms,
#: pypicoboot 100 ms; the ACK has already reached us, so the shorter one is enough)
REBOOT_DELAY_MS = 100
ERASE_TIMEOUT_MS = 2000  # W25Q16JV sector erase: 45 ms typical, 400 ms maximum

UDEV_RULE = 'SUBSYSTEM=="usb", ATTRS{idVendor}=="2e8a", MODE="0660", GROUP="plugdev"'
UDEV_STEPS = usb_device.udev_steps("60-rp2040-picoboot.rules", UDEV_RULE)
BOOTSEL_STEPS = (
    "Put the board into BOOTSEL mode by hand: unplug its USB cable, hold the BOOTSEL (BOOT) "
    "button, plug the cable back in and release the button (on the SKR Pico: fit the BOOT "
    "jumper and press RESET). It then shows as a drive named RPI-RP2 and as USB 2e8a:0003; "
    "flash again."
)


def _opt(target: Target, key: str, default: Any) -> Any:
    value = target.options.get(key)
    return default if value is None else value


def _path_of_location(location: Optional[str]) -> str:
    """pyserial's ``1-1.3:1.0`` to the USB path ``1-1.3``."""
    return (location or "").split(":", 1)[0]


#: USB errors in PICOBOOT terms (udev rule for 2e8a, who holds the device, BOOTSEL)
USB_ADVICE = usb_device.UsbAdvice(
    name="The RP2040 boot ROM",
    access_cause="The OctoPrint user may not open the RP2040 boot ROM (USB 2e8a:0003/000f): "
    "there is no udev rule for it.",
    udev=UDEV_STEPS,
    busy_cause="Another program holds its PICOBOOT interface (picotool, Klipper's make "
    "flash, a second flash from here).",
    busy_hint="Close that program or wait for it to finish, then flash again.",
    gone_name="The board",
    gone_cause="It was unplugged, reset or lost power (a bad cable or a back-powered board "
    "also does this).",
    gone_hint="If it was writing, the firmware is incomplete: " + BOOTSEL_STEPS,
    restart="put the board in BOOTSEL mode again",
)


def explain_usb_error(exc: BaseException, what: str) -> FlashError:
    return usb_device.explain_usb_error(exc, what, USB_ADVICE)


class PicobootFlasher(Flasher):
    method = "picoboot"
    can_read = True

    def __init__(self, target: Target, log: Optional[LogCallback] = None) -> None:
        super().__init__(log)
        self.target = target
        self.scale = float(_opt(target, "picoboot_time_scale", 1.0))
        self.entry_timeout = float(_opt(target, "entry_timeout", 8.0))
        # an emulated USB backend (tests, the demo) may emulate the board's serial side too
        backend = target.usb_backend or usb_device.env_backend()
        self.lister: Callable[[], list[Any]] = _opt(
            target, "list_ports", getattr(backend, "list_serial_ports", entry.list_serial_ports)
        )
        self.open_serial: Optional[Callable[..., Any]] = _opt(
            target, "open_serial", getattr(backend, "open_serial", None)
        )
        self.sleep: Callable[[float], None] = time.sleep
        self.entered_from_app = False
        self.backend: Any = None
        self.dev: Any = None
        self.path = target.usb_path or ""
        self.serial = ""
        self.session: Optional[pb.PicobootSession] = None
        self.chip: Optional[rp2040.RpChip] = None
        self.info: Optional[TargetInfo] = None
        self.delegate: Optional[Flasher] = None
        self._written = False
        self._left = False
        self._closed = False

    # --- finding the ROM ------------------------------------------------------------------
    def _seconds(self, s: float) -> float:
        return s * self.scale

    def _roms(self) -> list[Any]:
        want = usb_device.parse_vid_pid(self.target.usb) if self.target.usb else None
        out = []
        for dev in usb_device.list_devices(self.backend):
            usb_id = (dev.idVendor, dev.idProduct)
            if usb_id not in ROM_IDS or (want and usb_id != want):
                continue
            if self.path and usb_device.usb_path(dev) != self.path:
                continue
            out.append(dev)
        return out

    def _klipper_port(self) -> Optional[Any]:
        """The serial port of a Klipper (1d50:614e) we may ask to reboot: the one named, or
        the one at the USB path, or the only one."""
        try:
            ports = self.lister()
        except Exception:
            return None
        if self.target.port:
            for p in ports:
                if getattr(p, "device", None) == self.target.port:
                    return p
            return None
        klippers = [p for p in ports if entry._usb_id(p) == entry.KLIPPER_USB]
        if self.path:
            klippers = [
                p for p in klippers if _path_of_location(getattr(p, "location", None)) == self.path
            ]
        return klippers[0] if len(klippers) == 1 else None

    def _connect(self) -> None:
        if self.session is not None or self.delegate is not None:
            return
        self.backend = usb_device.resolve_backend(self.target.usb_backend)
        roms = [] if self.target.port else self._roms()
        if not roms:
            port = self._klipper_port()
            if port is None:
                raise self._not_found()
            roms = self._enter_from_klipper(port)
            if self.delegate is not None:
                return
        if len(roms) > 1:
            listing = ", ".join(usb_device.usb_path(d) or "?" for d in roms)
            raise ConnectError(
                f"{len(roms)} boards are in BOOTSEL mode (at {listing}).",
                cause="More than one RP2040/RP2350 waits in its boot ROM.",
                hint="Choose one with its USB path (--usb-path BUS-PORT), or unplug the others.",
            )
        self._open(roms[0])

    def _not_found(self) -> ConnectError:
        where = f" at USB path {self.path}" if self.path else ""
        if self.target.port:
            return ConnectError(
                f"{self.target.port} is not a Klipper USB port (1d50:614e) and no board waits "
                f"in BOOTSEL{where}.",
                cause="The port belongs to another firmware, or the board is not connected.",
                hint=BOOTSEL_STEPS,
            )
        return ConnectError(
            f"No RP2040/RP2350 in BOOTSEL mode (USB 2e8a:0003 or 2e8a:000f){where}, and no "
            "Klipper USB board to reboot into it.",
            cause="The board runs a firmware without a USB bootloader request, or it is not "
            "connected by a data-capable cable.",
            hint=BOOTSEL_STEPS,
        )

    def _enter_from_klipper(self, port: Any) -> list[Any]:
        """1200-baud touch, then follow the board by its USB path until the ROM or Katapult
        shows up there. Nothing comes back: the BOOTSEL steps."""
        location = _path_of_location(getattr(port, "location", None)) or self.path
        serial_number = getattr(port, "serial_number", None)
        self.log(f"picoboot: {port.device} runs Klipper: asking it to reboot into its bootloader")
        entry.touch_1200(port.device, self.open_serial)
        self.entered_from_app = True
        self.path = location
        deadline = time.monotonic() + self._seconds(self.entry_timeout)
        while True:
            roms = self._roms()
            if roms:
                self.log(f"picoboot: the boot ROM came up at USB path {location or '?'}")
                return roms
            try:
                ports = self.lister()
            except Exception:
                ports = []
            for p in ports:
                if entry._usb_id(p) != entry.KATAPULT_USB:
                    continue
                here = _path_of_location(getattr(p, "location", None))
                if (location and here == location) or (
                    serial_number and getattr(p, "serial_number", None) == serial_number
                ):
                    self._hand_over(p)
                    return []
            if time.monotonic() >= deadline:
                where = f" at {location}" if location else ""
                raise ConnectError(
                    "The board did not come back as the RP2040 boot ROM (2e8a:0003) or Katapult "
                    f"(1d50:6177) after the bootloader request{where}.",
                    cause="The firmware ignored the request (Klipper older than v0.11, or not "
                    "Klipper), or the board re-enumerated where we could not match it.",
                    hint=BOOTSEL_STEPS,
                )
            self.sleep(self._seconds(0.05))

    def _hand_over(self, port: Any) -> None:
        from . import katapult

        self.log(f"picoboot: the board came up as Katapult on {port.device}; using Katapult")
        options = dict(self.target.options)
        options.update(list_ports=self.lister, open_serial=self.open_serial)
        chosen = dataclasses.replace(
            self.target, method="katapult", port=port.device, options=options
        )
        self.delegate = katapult.open_flasher(chosen, self.log)
        # Klipper was running before our request: a refusal must send it back there
        self.delegate.entered_from_app = True

    def _open(self, dev: Any) -> None:
        import usb.util

        self.dev = dev
        self.path = usb_device.usb_path(dev) or self.path
        name = ROM_IDS[(dev.idVendor, dev.idProduct)]
        self.chip = rp2040.find_chip(name)
        try:
            endpoints = pb.find_interface(dev)
            if endpoints is None:
                raise ConnectError(
                    f"The {name} boot ROM at {self.path or '?'} offers no PICOBOOT interface.",
                    cause="PICOBOOT was disabled in the chip's OTP (RP2350), or this is not a "
                    "Raspberry Pi boot ROM.",
                    hint="Copy the .uf2 to the board's USB drive instead.",
                )
            if not self.target.usb_backend and not usb_device.env_backend():
                try:
                    if dev.is_kernel_driver_active(endpoints.interface):
                        dev.detach_kernel_driver(endpoints.interface)
                except (NotImplementedError, Exception):  # not on every platform
                    pass
            usb.util.claim_interface(dev, endpoints.interface)
            try:
                self.serial = usb.util.get_string(dev, dev.iSerialNumber) or ""
            except Exception:
                self.serial = ""
            session = pb.PicobootSession(
                dev, endpoints, timeout_ms=max(50, int(3000 * self.scale)), log=self.log
            )
            session.interface_reset()
            session.exclusive_access(pb.Exclusive.EXCLUSIVE)
            session.exit_xip()
        except Exception as exc:
            raise self._explain(exc, "opening the boot ROM") from exc
        self.session = session
        self.endpoints = endpoints

    def _explain(self, exc: BaseException, what: str) -> FlashError:
        if isinstance(exc, FlashError):
            return exc
        if isinstance(exc, pb.PicobootError):
            code = exc.status.status if exc.status is not None else None
            name = pb.status_name(code) if code is not None else "no status (the ROM is silent)"
            if code in (pb.Status.INVALID_ADDRESS, pb.Status.BAD_ALIGNMENT):
                return PreflightError(
                    f"The boot ROM refused {exc.what} while {what}: {name}.",
                    cause="The image lies outside the chip's flash or is not page-aligned.",
                    hint="Build the firmware for this board and upload its klipper.uf2.",
                )
            return ProtocolError(
                f"The boot ROM refused {exc.what} while {what}: {name}.",
                cause="The ROM was in a state it does not accept that command in (another "
                "tool used it, or the USB drive was written at the same time).",
                hint="Eject the RPI-RP2 drive if the desktop opened it, then flash again (a "
                "full, not quick, flash). " + BOOTSEL_STEPS,
            )
        if type(exc).__name__ == "USBTimeoutError" or getattr(exc, "errno", None) in (
            errno.ETIMEDOUT,
        ):
            busy = self._still_busy()
            return ConnectError(
                f"The boot ROM did not finish {what}"
                + (" (it still reports the command in progress)." if busy else "."),
                cause="The flash chip or the ROM hung, or the USB link stalled.",
                hint="Unplug the board. " + BOOTSEL_STEPS,
            )
        if pb.is_usb_error(exc) or type(exc).__name__ == "NoBackendError":
            return explain_usb_error(exc, what)
        raise exc

    def _still_busy(self) -> bool:
        if self.session is None:
            return False
        try:
            return self.session.command_status().in_progress
        except Exception:
            return False

    # --- identify ---------------------------------------------------------------------------
    def identify(self) -> TargetInfo:
        if self.info is not None:
            return self.info
        self._connect()
        if self.delegate is not None:
            self.info = self.delegate.identify()
            return self.info
        chip = self.chip
        assert chip is not None and self.session is not None
        try:
            magic = int.from_bytes(self.session.read(0x10, 4), "little")
        except Exception as exc:
            raise self._explain(exc, "reading the boot ROM's version") from exc
        version = magic >> 24
        flash_size = int(_opt(self.target, "flash_size", chip.default_flash))
        self.info = TargetInfo(
            method=self.method,
            chip=chip.name,
            flash_start=rp2040.FLASH_BASE,
            flash_size=flash_size,
            app_start=rp2040.FLASH_BASE,
            app_end=rp2040.FLASH_BASE + flash_size,
            page_size=SECTOR,
            bootloader=f"{chip.name} boot ROM v{version} (PICOBOOT)",
            details={
                "usb_id": f"2e8a:{chip.usb_pid:04x}",
                "usb_path": self.path,
                "serial": self.serial,
                "interface": self.endpoints.interface,
                "usb_drive": self.endpoints.interface == 1,
                "entered_from_app": self.entered_from_app,
            },
        )
        self.log(f"picoboot: {self.info.describe()}")
        return self.info

    def check(self, image: FirmwareImage, target: TargetInfo) -> list[str]:
        if self.delegate is not None:
            return self.delegate.check(image, target)
        return rp2040.check_image(image, self.chip, target.flash_size)

    # --- flash ------------------------------------------------------------------------------
    def _expected(self, image: FirmwareImage) -> list[tuple[int, bytes]]:
        """``(sector, 4 KiB)`` after a full flash: image bytes, and for sectors the image only
        partly covers, what is there now elsewhere (so nothing outside the image changes)."""
        session = self.session
        assert session is not None
        sectors = sorted({a for a, _ in image.blocks(SECTOR, base=rp2040.FLASH_BASE)})
        out = []
        for start in sectors:
            want = bytearray(image.read(start, SECTOR, 0xFF))
            mask = bytearray(SECTOR)
            for seg in image.segments:
                lo, hi = max(seg.address, start), min(seg.end, start + SECTOR)
                if lo < hi:
                    mask[lo - start : hi - start] = b"\x01" * (hi - lo)
            if 0 in mask:
                now = session.read(start, SECTOR)
                for i in range(SECTOR):
                    if not mask[i]:
                        want[i] = now[i]
            out.append((start, bytes(want)))
        return out

    def flash(
        self,
        image: FirmwareImage,
        progress: ProgressCallback = no_progress,
        cancel: Optional[CancelToken] = None,
        quick: bool = False,
    ) -> FlashResult:
        began = time.monotonic()
        info = self.identify()
        if self.delegate is not None:
            return self.delegate.flash(image, progress, cancel, quick)
        self.check(image, info)
        image = rp2040.place(image)
        session = self.session
        assert session is not None
        cancel = cancel or CancelToken()
        quick = bool(quick or self.target.quick)
        try:
            sectors = self._expected(image)
            todo = sectors
            if quick:
                todo = self._changed(sectors, progress, cancel)
                self.log(
                    f"picoboot: quick: {len(sectors) - len(todo)} of {len(sectors)} sectors same"
                )
            total = len(todo) * SECTOR
            progress(Progress(STAGE_ERASING, 0, total))
            for n, (start, _) in enumerate(todo, 1):
                cancel.check()
                self._written = True
                session.flash_erase(
                    start, SECTOR, timeout_ms=int(ERASE_TIMEOUT_MS * self.scale) + 50
                )
                progress(Progress(STAGE_ERASING, n * SECTOR, total))
            runs = [
                (start + off, data[off : off + PAGE])
                for start, data in todo
                for off in range(0, SECTOR, PAGE)
                if data[off : off + PAGE] != b"\xff" * PAGE
            ]
            written = 0
            wtotal = len(runs) * PAGE
            progress(Progress(STAGE_WRITING, 0, wtotal))
            for chunk in self._merge(runs):
                cancel.check()
                session.write(chunk[0], chunk[1])
                written += len(chunk[1])
                progress(Progress(STAGE_WRITING, written, wtotal))
            # sectors quick mode skipped were just read back and compared: not read twice
            verified = self._verify(todo, progress, cancel) + (len(sectors) - len(todo)) * SECTOR
        except FlashError:
            raise
        except Exception as exc:
            raise self._explain(exc, "flashing") from exc
        return FlashResult(
            bytes_written=written,
            bytes_verified=verified,
            blocks_written=len(runs),
            blocks_skipped=len(sectors) - len(todo),
            seconds=time.monotonic() - began,
            verified_by="read-back",
            confirmation=f"read back all {verified} bytes of the {len(sectors)} touched sectors",
        )

    @staticmethod
    def _merge(pages: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
        """Adjacent pages inside one sector become one WRITE (fewer round trips)."""
        out: list[tuple[int, bytes]] = []
        for address, data in pages:
            if out and out[-1][0] + len(out[-1][1]) == address and address % SECTOR:
                out[-1] = (out[-1][0], out[-1][1] + data)
            else:
                out.append((address, data))
        return out

    def _changed(
        self, sectors: list[tuple[int, bytes]], progress: ProgressCallback, cancel: CancelToken
    ) -> list[tuple[int, bytes]]:
        session = self.session
        assert session is not None
        changed = []
        total = len(sectors) * SECTOR
        for n, (start, want) in enumerate(sectors, 1):
            cancel.check()
            if session.read(start, SECTOR) != want:
                changed.append((start, want))
            progress(Progress(STAGE_READING, n * SECTOR, total))
        return changed

    def _verify(
        self, sectors: list[tuple[int, bytes]], progress: ProgressCallback, cancel: CancelToken
    ) -> int:
        session = self.session
        assert session is not None
        total = len(sectors) * SECTOR
        done = 0
        progress(Progress(STAGE_VERIFYING, 0, total))
        for start, want in sectors:
            cancel.check()
            back = session.read(start, SECTOR)
            if back != want:
                at = next(i for i in range(SECTOR) if back[i] != want[i])
                raise VerifyError(
                    f"Verify failed at 0x{start + at:08X}: expected 0x{want[at]:02X}, read back "
                    f"0x{back[at]:02X}.",
                    cause="The flash chip did not program or erase correctly (worn or "
                    "counterfeit flash, or a brown-out during the write).",
                    hint="The board stays in BOOTSEL: flash again without quick mode. If it "
                    "repeats, the board's flash chip is faulty.",
                )
            done += SECTOR
            progress(Progress(STAGE_VERIFYING, done, total))
        return done

    # --- read -------------------------------------------------------------------------------
    def read(
        self, progress: ProgressCallback = no_progress, cancel: Optional[CancelToken] = None
    ) -> FirmwareImage:
        info = self.identify()
        if self.delegate is not None:
            return self.delegate.read(progress, cancel)
        session = self.session
        assert session is not None
        cancel = cancel or CancelToken()
        data = bytearray()
        total = info.flash_size
        try:
            while len(data) < total:
                cancel.check()
                data += session.read(info.flash_start + len(data), READ_CHUNK)
                progress(Progress(STAGE_READING, len(data), total))
        except FlashError:
            raise
        except Exception as exc:
            raise self._explain(exc, "reading the flash") from exc
        used = (len(data.rstrip(b"\xff")) + SECTOR - 1) // SECTOR * SECTOR
        image = FirmwareImage(
            [Segment(info.flash_start, bytes(data[:used]))] if used else [],
            filename=f"backup-{info.chip.lower()}-{info.flash_start:08x}.bin",
            kind="bin",
        )
        if not used:
            image.notes.append("The flash is empty (all 0xFF).")
        return image

    # --- leave ------------------------------------------------------------------------------
    def leave(self) -> Optional[str]:
        """Reboot into the application and confirm it came back on the same USB path."""
        if self.delegate is not None:
            said = self.delegate.leave()
            return said if isinstance(said, str) else None
        if self._left:
            return None
        self._connect()
        session, chip = self.session, self.chip
        assert session is not None and chip is not None
        self._left = True
        try:
            if chip.name == "RP2350":
                session.reboot2_normal(delay_ms=REBOOT_DELAY_MS)
            else:
                session.reboot(0, chip.sram[1], delay_ms=REBOOT_DELAY_MS)
        except Exception as exc:
            raise self._explain(exc, "rebooting into the firmware") from exc
        self.log("picoboot: reboot requested")
        self._release()
        return self._confirm()

    def _confirm(self) -> str:
        """Wait for the ROM to leave and something to come back at the same USB path."""
        old = self.dev.address if self.dev is not None else None
        deadline = time.monotonic() + self._seconds(
            float(_opt(self.target, "confirm_seconds", 6.0))
        )
        gone = False
        while time.monotonic() < deadline:
            here = [
                d
                for d in usb_device.list_devices(self.backend)
                if not self.path or usb_device.usb_path(d) == self.path
            ]
            roms = [d for d in here if (d.idVendor, d.idProduct) in ROM_IDS]
            if not gone and not [d for d in roms if d.address == old]:
                gone = True
            if gone and roms:
                raise ProtocolError(
                    "The firmware was written and verified, but the board came back in BOOTSEL "
                    "mode instead of starting it.",
                    cause="The ROM did not accept the image (no valid boot2 stage for this "
                    "flash chip), or the BOOTSEL button/jumper is still held.",
                    hint="Release the BOOT button or remove the BOOT jumper and press reset; if "
                    "it comes back as a drive again, flash a 'no bootloader' klipper.uf2.",
                )
            others = [d for d in here if (d.idVendor, d.idProduct) not in ROM_IDS]
            if gone and others:
                d = others[0]
                where = f" at {self.path}" if self.path else ""
                if (d.idVendor, d.idProduct) == entry.KLIPPER_USB:
                    return f"Klipper answers again on USB (1d50:614e{where})."
                if (d.idVendor, d.idProduct) == entry.KATAPULT_USB:
                    return f"The board restarted into Katapult (1d50:6177{where})."
                return (
                    f"The board restarted and enumerates as {d.idVendor:04x}:{d.idProduct:04x}"
                    f"{where}."
                )
            self.sleep(self._seconds(0.05))
        return (
            "The board left BOOTSEL; its firmware did not show up on USB (a build that talks "
            "over CAN or UART does not), so only the read-back confirms the flash."
        )

    def _release(self) -> None:
        if self.dev is None:
            return
        try:
            import usb.util

            usb.util.dispose_resources(self.dev)
        except Exception as exc:  # the device is usually gone by now
            self.log(f"picoboot: releasing the device: {exc}")
        self.session = None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.delegate is not None:
            self.delegate.close()
        self._release()


def open_flasher(target: Target, log: Optional[LogCallback] = None) -> Flasher:
    """Registry entry point (see :mod:`octoprint_flasher.methods`); the device is opened on
    the first call that needs it, so errors carry the right advice."""
    return PicobootFlasher(target, log)


def check_image(image: FirmwareImage, target: Target) -> list[str]:
    """What the image alone settles (no I/O): RP flash range, boot2 CRC or IMAGE_DEF, vector
    table, UF2 family against a chip the user named, Klipper's dictionary naming another MCU."""
    chip = rp2040.find_chip(target.mcu)
    if target.mcu and chip is None:
        raise PreflightError(
            f"The picoboot method flashes RP2040/RP2350 boards, not {target.mcu}.",
            hint="Choose the method for that board, or the right MCU.",
        )
    flash_size = target.options.get("flash_size")
    warnings = rp2040.check_image(image, chip, int(flash_size) if flash_size else None)
    build = klipper_build(rp2040.place(image).to_bytes()[: 4 * 1024 * 1024])
    if build is not None and build.mcu and not build.mcu.lower().startswith(("rp2040", "rp2350")):
        raise PreflightError(
            f"{image.filename or 'The file'} is a Klipper build for {build.mcu}, not for an "
            "RP2040/RP2350.",
            cause="The wrong klipper build was picked (make menuconfig sets the MCU).",
            hint="Build with 'Raspberry Pi RP2040' as the processor and upload out/klipper.uf2.",
        )
    return warnings


def discover(usb_backend: Any = None) -> list[Device]:
    """Boards in BOOTSEL and RP2040/RP2350 boards running Klipper over USB."""
    backend = usb_device.resolve_backend(usb_backend)
    devices: list[Device] = []
    for dev in usb_device.list_devices(backend):
        usb_id = (dev.idVendor, dev.idProduct)
        path = usb_device.usb_path(dev)
        if usb_id in ROM_IDS:
            chip = ROM_IDS[usb_id]
            devices.append(
                Device(
                    id=f"usb:{path or f'2e8a:{dev.idProduct:04x}'}",
                    kind="usb-picoboot",
                    usb_path=path or None,
                    vid=dev.idVendor,
                    pid=dev.idProduct,
                    description=f"{chip} boot ROM (BOOTSEL, PICOBOOT)",
                    method="picoboot",
                    chip=chip,
                    hint="Waiting in BOOTSEL: flash a .uf2 (or a no-bootloader .bin).",
                )
            )
        elif usb_id == entry.KLIPPER_USB:
            try:
                import usb.util

                product = usb.util.get_string(dev, dev.iProduct) or ""
            except Exception:
                product = ""
            if not product.lower().startswith(("rp2040", "rp2350")):
                continue
            devices.append(
                Device(
                    id=f"usb:{path or '1d50:614e'}",
                    kind="usb",
                    usb_path=path or None,
                    vid=dev.idVendor,
                    pid=dev.idProduct,
                    description=f"Klipper on an {product.upper()} (USB)",
                    method="picoboot",
                    chip=product.upper(),
                    hint="Flashing asks Klipper to reboot into the boot ROM (or Katapult); "
                    "stop Klipper first.",
                )
            )
    return devices
