"""Finding USB DFU devices through pyusb, and turning USB failures into advice.

The backend is injectable: a :class:`~octoprint_flasher.target.Target` may carry one (tests,
the demo), the environment variable ``OCTOPRINT_FLASHER_USB_BACKEND=module:factory`` may name
a factory returning one (so the CLI can reach an emulator), and otherwise pyusb's libusb1
backend is used. Nothing here knows DFU request bytes; it only reads descriptors.
"""

from __future__ import annotations

import errno
import importlib
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from ..errors import BusyError, ConnectError, FlashError

ENV_BACKEND = "OCTOPRINT_FLASHER_USB_BACKEND"

ST_DFU = (0x0483, 0xDF11)
UDEV_RULE = (
    'SUBSYSTEM=="usb", ATTRS{idVendor}=="0483", ATTRS{idProduct}=="df11", '
    'MODE="0660", GROUP="plugdev"'
)


def udev_steps(rules_file: str, rule: str) -> str:
    """What to do when the OctoPrint user may not open a USB device: one rule and its group."""
    return (
        f"Create /etc/udev/rules.d/{rules_file} containing:\n  {rule}\n"
        "add the OctoPrint user to that group (sudo usermod -aG plugdev pi — use the account "
        "OctoPrint runs as, then restart OctoPrint), and reload the rules: "
        "sudo udevadm control --reload-rules && sudo udevadm trigger"
    )


UDEV_STEPS = udev_steps("50-stm32-dfu.rules", UDEV_RULE)
BOOT0_STEPS = (
    "Put the board into DFU mode with its BOOT0 jumper: power it off, fit the jumper from "
    "BOOT0 to 3.3 V, power it on (or press reset), flash, then remove the jumper and reset. "
    "Heaters may switch on while the board sits in DFU mode, so stay near the printer."
)


@dataclass(frozen=True)
class UsbAdvice:
    """How USB errors name one kind of device, and what to do about each of them."""

    name: str  # "The DFU device"
    access_cause: str
    udev: str
    busy_cause: str
    busy_hint: str
    gone_name: str
    gone_cause: str
    gone_hint: str
    restart: str  # how to bring the board back into its bootloader


DFU_ADVICE = UsbAdvice(
    name="The DFU device",
    access_cause="The OctoPrint user may not open the USB device 0483:df11 (no udev rule).",
    udev=UDEV_STEPS,
    busy_cause="Another program (dfu-util, STM32CubeProgrammer, a second flash) holds it.",
    busy_hint="Close that program or wait for it to finish, then try again.",
    gone_name="The DFU device",
    gone_cause="The board was reset, unplugged or lost power.",
    gone_hint="Reconnect it in DFU mode. " + BOOT0_STEPS,
    restart="power-cycle the board in DFU mode",
)

# Known non-DFU identities of boards that could be put into DFU, and what to do with them.
KNOWN_IDS: dict[tuple[int, int], tuple[str, str]] = {
    (0x1D50, 0x606F): (
        "Klipper running as a USB-to-CAN bridge (gs_usb)",
        "This board has no serial port to reboot through. Request its bootloader over CAN "
        "(the katapult method, or `flashtool.py -i can0 -u <UUID> -r`), or use BOOT0. "
        + BOOT0_STEPS,
    ),
    (0x1D50, 0x614E): (
        "Klipper running over USB serial",
        "Enter its bootloader with a 1200-baud touch of its serial port (Klipper jumps to "
        "Katapult or the ROM), or use BOOT0. " + BOOT0_STEPS,
    ),
    (0x1D50, 0x6177): (
        "the Katapult bootloader",
        "Flash it with the katapult method instead of DFU.",
    ),
    (0x0483, 0x5740): (
        "an STM32 virtual COM port (e.g. Marlin)",
        "Its firmware cannot jump to DFU on request. " + BOOT0_STEPS,
    ),
}


def _load_factory(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConnectError(
            f"{ENV_BACKEND}={spec!r} is not of the form module:factory.",
            hint="Unset it to use the real USB bus, or fix the value.",
        )
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConnectError(
            f"{ENV_BACKEND}={spec!r} cannot be loaded: {exc}.",
            hint="Unset it to use the real USB bus, or fix the value.",
        ) from exc
    return factory()


_ENV_CACHE: dict[str, Any] = {}


def env_backend() -> Any:
    """The backend named by ``OCTOPRINT_FLASHER_USB_BACKEND``, created once per process (so a
    rescan after leaving sees the same emulated bus)."""
    spec = os.environ.get(ENV_BACKEND, "").strip()
    if not spec:
        return None
    if spec not in _ENV_CACHE:
        _ENV_CACHE[spec] = _load_factory(spec)
    return _ENV_CACHE[spec]


def resolve_backend(backend: Any = None) -> Any:
    """The backend to use: the given one, the environment's, or libusb1 (checked present)."""
    if backend is not None:
        return backend
    env = env_backend()
    if env is not None:
        return env
    import usb.backend.libusb1

    real = usb.backend.libusb1.get_backend()
    if real is None:
        raise no_backend_error()
    return real


def no_backend_error() -> ConnectError:
    return ConnectError(
        "USB access is not available: the libusb library is missing.",
        cause="pyusb needs the system library libusb-1.0 and could not load it.",
        hint="Install it: sudo apt install libusb-1.0-0 — then restart OctoPrint.",
    )


def usb_path(dev: Any) -> str:
    """``BUS-PORT[.PORT…]`` as dfu-util and Klipper's flash_usb.py spell a physical port."""
    ports = getattr(dev, "port_numbers", None) or ()
    if dev.bus is None or not ports:
        return ""
    return f"{dev.bus}-{'.'.join(str(p) for p in ports)}"


def parse_vid_pid(text: str) -> tuple[int, int]:
    try:
        vid, pid = text.split(":")
        return int(vid, 16), int(pid, 16)
    except ValueError:
        raise ConnectError(
            f"{text!r} is not a USB id.",
            hint="Give it as VID:PID in hexadecimal, e.g. 0483:df11.",
        ) from None


@dataclass
class DfuAlt:
    alt: int
    name: str


@dataclass
class DfuCandidate:
    """A USB device with a DFU interface, as far as its descriptors tell without opening it
    for writing. ``error`` holds the advice when reading its strings failed."""

    device: Any
    vid: int
    pid: int
    path: str
    interface: int = 0
    alts: list[DfuAlt] = field(default_factory=list)
    functional: Optional[bytes] = None
    bcd_device: int = 0
    serial: str = ""
    product: str = ""
    error: Optional[FlashError] = None

    @property
    def usb_id(self) -> str:
        return f"{self.vid:04x}:{self.pid:04x}"


def explain_usb_error(
    exc: BaseException, what: str = "opening the DFU device", advice: UsbAdvice = DFU_ADVICE
) -> FlashError:
    """Turn a pyusb failure into what a user can do about it, in ``advice``'s terms."""
    if isinstance(exc, FlashError):
        return exc
    text = str(exc)
    code = getattr(exc, "errno", None)
    if code == errno.EACCES or "no langid" in text or "Access denied" in text:
        return ConnectError(
            f"Permission denied while {what}.", cause=advice.access_cause, hint=advice.udev
        )
    if code == errno.EBUSY or "Resource busy" in text:
        return BusyError(
            f"{advice.name} is busy ({what}).", cause=advice.busy_cause, hint=advice.busy_hint
        )
    if code in (errno.ENODEV, errno.ENOENT) or "No such device" in text:
        return ConnectError(
            f"{advice.gone_name} disappeared while {what}.",
            cause=advice.gone_cause,
            hint=advice.gone_hint,
        )
    if type(exc).__name__ == "NoBackendError":
        return no_backend_error()
    if type(exc).__name__ == "USBTimeoutError" or code == errno.ETIMEDOUT:
        return ConnectError(
            f"{advice.name} stopped answering while {what}.",
            cause="A bad USB cable or port, or the chip is stuck.",
            hint=f"Use a short data cable directly on the host, {advice.restart}, and try again.",
        )
    return ConnectError(
        f"USB error while {what}: {text}",
        cause="The USB link is unreliable (EPIPE/EIO often mean cable or port trouble).",
        hint=f"Try another cable or port, {advice.restart}, and try again.",
    )


def list_devices(backend: Any) -> list[Any]:
    import usb.core

    try:
        return list(usb.core.find(find_all=True, backend=backend))
    except usb.core.NoBackendError:
        raise no_backend_error() from None


def _dfu_interfaces(dev: Any) -> tuple[list[tuple[int, int, int]], Optional[bytes]]:
    """``(interface, alt, iInterface)`` of every DFU interface plus the functional descriptor
    (configuration extras first, then each alt, as dfu-util searches)."""
    from ..protocols.dfuse import DFU_CLASS, DFU_SUBCLASS, parse_functional_descriptor

    found: list[tuple[int, int, int]] = []
    functional: Optional[bytes] = None
    for cfg in dev:
        fd = parse_functional_descriptor(cfg.extra_descriptors or b"")
        if fd is not None:
            functional = fd.to_bytes()
        for intf in cfg:
            if intf.bInterfaceClass == DFU_CLASS and intf.bInterfaceSubClass == DFU_SUBCLASS:
                found.append((intf.bInterfaceNumber, intf.bAlternateSetting, intf.iInterface))
                if functional is None:
                    fd = parse_functional_descriptor(intf.extra_descriptors or b"")
                    if fd is not None:
                        functional = fd.to_bytes()
        break
    return found, functional


def find_dfu(
    backend: Any, usb_id: Optional[str] = None, path: Optional[str] = None
) -> list[DfuCandidate]:
    """Every DFU-capable device matching the optional ``VID:PID`` and ``BUS-PORT`` filters."""
    import usb.util

    want = parse_vid_pid(usb_id) if usb_id else None
    out: list[DfuCandidate] = []
    for dev in list_devices(backend):
        if want and (dev.idVendor, dev.idProduct) != want:
            continue
        where = usb_path(dev)
        if path and where != path:
            continue
        try:
            intfs, functional = _dfu_interfaces(dev)
        except Exception as exc:  # descriptors come from the kernel; failure is rare
            cand = DfuCandidate(dev, dev.idVendor, dev.idProduct, where)
            cand.error = explain_usb_error(exc, "reading its descriptors")
            out.append(cand)
            continue
        if not intfs:
            continue
        cand = DfuCandidate(
            dev, dev.idVendor, dev.idProduct, where, intfs[0][0], [], functional, dev.bcdDevice
        )
        try:
            for number, alt, index in intfs:
                if number == cand.interface:
                    name = usb.util.get_string(dev, index) if index else ""
                    cand.alts.append(DfuAlt(alt, name or ""))
            cand.serial = usb.util.get_string(dev, dev.iSerialNumber) or ""
            cand.product = usb.util.get_string(dev, dev.iProduct) or ""
        except Exception as exc:
            cand.error = explain_usb_error(exc, "reading the device's name strings")
        finally:
            try:
                usb.util.dispose_resources(dev)
            except Exception:  # releasing a device that is already gone cannot fail harder
                pass
        out.append(cand)
    return out


def not_found_error(
    backend: Any, usb_id: Optional[str] = None, path: Optional[str] = None
) -> ConnectError:
    """Why no DFU device was found, judged from what else is on the bus."""
    where = f" at USB path {path}" if path else ""
    wanted = usb_id or "0483:df11"
    try:
        others = list_devices(backend)
    except FlashError:
        others = []
    for dev in others:
        known = KNOWN_IDS.get((dev.idVendor, dev.idProduct))
        if known is None:
            continue
        what, todo = known
        found_at = usb_path(dev)
        return ConnectError(
            f"No DFU device {wanted}{where} found, but {dev.idVendor:04x}:{dev.idProduct:04x} "
            f"({what}) is connected{' at ' + found_at if found_at else ''}.",
            cause="The board is running its firmware (or another bootloader), not the STM32 "
            "ROM bootloader.",
            hint=todo,
        )
    return ConnectError(
        f"No DFU device {wanted}{where} found.",
        cause="The board is not in DFU mode, not connected by a data-capable USB cable, or "
        "the USB path/id given does not match.",
        hint=BOOT0_STEPS,
    )
