"""Find boards: serial ports, USB DFU devices and CAN nodes, as one list of :class:`Device`.

Serial ports are listed here (pyserial's ``list_ports`` plus extra names such as OctoPrint's
``serial.additionalPorts`` globs) and named from :mod:`chips`' USB table. DFU devices, CAN
nodes and bootloader probing come from the protocol flashers, imported lazily so a method that
is missing or lacks a dependency only loses its own devices, with a warning instead of a crash.
"""

from __future__ import annotations

import glob
import importlib
import inspect
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Iterable, Optional

from . import chips
from .errors import FlashError

KIND_SERIAL = "serial"
KIND_USB_DFU = "usb-dfu"
KIND_CAN = "can"


@dataclass
class Device:
    """One board (or bootloader) the user could flash, and how to reach it."""

    id: str
    kind: str  # serial | usb-dfu | can
    port: Optional[str] = None
    usb_path: Optional[str] = None
    uuid: Optional[str] = None
    vid: Optional[int] = None
    pid: Optional[int] = None
    description: str = ""
    method: Optional[str] = None
    chip: Optional[str] = None
    hint: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def usb_id(self) -> str:
        return chips.format_usb_id(self.vid, self.pid)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["usb_id"] = self.usb_id
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Device:
        """Build from a provider's dict; unknown keys go to ``details``."""
        names = {f.name for f in fields(cls)}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names and k != "usb_id"}
        known.setdefault("id", str(data.get("port") or data.get("uuid") or data.get("usb_path")))
        known.setdefault("kind", KIND_SERIAL)
        dev = cls(**known)
        dev.details.update(extra)
        return dev


class DeviceList(list[Device]):
    """A ``list[Device]`` that also carries the providers' warnings."""

    def __init__(self, devices: Iterable[Device] = (), warnings: Optional[list[str]] = None):
        super().__init__(devices)
        self.warnings: list[str] = list(warnings or [])

    def to_dict(self) -> dict[str, Any]:
        return {"devices": [d.to_dict() for d in self], "warnings": list(self.warnings)}


PortLister = Callable[[], list[Any]]


def _pyserial_ports() -> list[Any]:
    from serial.tools import list_ports

    return list(list_ports.comports())


def serial_devices(
    extra_ports: Iterable[str] = (), lister: Optional[PortLister] = None
) -> list[Device]:
    """Serial ports with their USB ids named, plus existing ``extra_ports`` (globs allowed)."""
    devices: list[Device] = []
    seen: set[str] = set()
    for info in (lister or _pyserial_ports)():
        port = str(info.device)
        if port in seen:
            continue
        seen.add(port)
        vid = getattr(info, "vid", None)
        pid = getattr(info, "pid", None)
        row = chips.lookup_usb(vid, pid)
        raw_desc = getattr(info, "description", "") or ""
        desc = row.description if row else (raw_desc if raw_desc != "n/a" else "serial port")
        details: dict[str, Any] = {}
        for attr in ("manufacturer", "product", "serial_number", "location", "hwid"):
            value = getattr(info, attr, None)
            if value and value != "n/a":
                details[attr] = value
        devices.append(
            Device(
                id=port,
                kind=KIND_SERIAL,
                port=port,
                usb_path=getattr(info, "location", None) or None,
                vid=vid,
                pid=pid,
                description=desc,
                method=row.method if row else "auto",
                hint=row.hint if row else "",
                details=details,
            )
        )
    for pattern in extra_ports:
        names = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        for name in names:
            if name in seen or not os.path.exists(name):
                continue
            seen.add(name)
            devices.append(
                Device(
                    id=name,
                    kind=KIND_SERIAL,
                    port=name,
                    description="additional serial port",
                    method="auto",
                )
            )
    return devices


def _provider(module: str, func: str) -> Optional[Callable[..., Any]]:
    """``module.func`` or None when that flasher module does not exist (yet). Any other
    import failure (a missing dependency inside it) propagates to the caller's warning."""
    full = f"{__package__}.flashers.{module}"
    try:
        mod = importlib.import_module(full)
    except ModuleNotFoundError as exc:
        if exc.name == full:
            return None
        raise
    fn = getattr(mod, func, None)
    return fn if callable(fn) else None


def _call(fn: Callable[..., Any], **kwargs: Any) -> Any:
    """Pass only the keyword arguments the provider accepts (providers grow independently)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return fn(**kwargs)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return fn(**kwargs)
    return fn(**{k: v for k, v in kwargs.items() if k in params})


def _as_device(item: Any) -> Device:
    if isinstance(item, Device):
        return item
    if isinstance(item, dict):
        return Device.from_dict(item)
    raise TypeError(f"a discovery provider returned {type(item).__name__}, not a Device")


def _apply_probe(dev: Device, found: Any) -> None:
    """Merge what a bootloader probe learned (dict or object with attributes)."""
    data = found if isinstance(found, dict) else getattr(found, "__dict__", {})
    chip = data.get("chip")
    if chip:
        dev.chip = str(chip)
    method = data.get("method") or data.get("protocol")
    if method:
        dev.method = str(method)
    dev.details["probe"] = {k: v for k, v in data.items() if _jsonable(v)}


def _jsonable(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool, type(None), list, dict))


def discover(
    *,
    can: bool = False,
    probe: bool = False,
    usb_backend: Any = None,
    can_bus_factory: Optional[Callable[[], Any]] = None,
    can_interface: str = "socketcan",
    can_channel: str = "can0",
    extra_ports: Iterable[str] = (),
    port_lister: Optional[PortLister] = None,
) -> DeviceList:
    """Every board we can see. ``probe`` talks to each serial port's bootloader (resets the
    board: never while printing); ``can`` queries the CAN bus for Katapult/Klipper nodes."""
    warnings: list[str] = []
    devices: list[Device] = []
    try:
        devices.extend(serial_devices(extra_ports, port_lister))
    except Exception as exc:  # a broken sysfs must not hide USB and CAN devices
        warnings.append(f"Could not list serial ports: {exc}")

    providers: list[tuple[str, str, dict[str, Any]]] = [
        ("dfu", "USB DFU", {"usb_backend": usb_backend}),
        ("picoboot", "RP2040 USB", {"usb_backend": usb_backend}),
    ]
    if can:
        providers.append(
            (
                "katapult",
                "CAN",
                {
                    "can_bus_factory": can_bus_factory,
                    "can_interface": can_interface,
                    "can_channel": can_channel,
                },
            )
        )
    for module, label, kwargs in providers:
        try:
            fn = _provider(module, "discover")
            if fn is None:
                continue
            for item in _call(fn, **kwargs) or []:
                dev = _as_device(item)
                if not any(d.id == dev.id and d.kind == dev.kind for d in devices):
                    devices.append(dev)
        except FlashError as exc:
            warnings.append(f"{label}: {exc}")
        except ModuleNotFoundError as exc:
            warnings.append(
                f"{label} discovery needs the Python package {exc.name!r}, which is missing."
            )
        except Exception as exc:
            warnings.append(f"{label} discovery failed: {type(exc).__name__}: {exc}")

    if probe:
        try:
            prober = _provider("avr_auto", "probe")
        except Exception as exc:
            prober = None
            warnings.append(f"Bootloader probing is unavailable: {exc}")
        for dev in devices:
            if (
                prober is None
                or dev.kind != KIND_SERIAL
                or dev.method not in ("auto", "stk500v1", "stk500v2", None)
            ):
                continue
            try:
                found = prober(dev.port)
            except FlashError as exc:
                warnings.append(f"{dev.port}: {exc.message}")
                continue
            except Exception as exc:
                warnings.append(f"{dev.port}: probing failed: {type(exc).__name__}: {exc}")
                continue
            if found:
                _apply_probe(dev, found)
            else:
                _probe_marlin(dev, warnings)
    return DeviceList(devices, warnings)


#: bauds 32-bit Marlin printers run their USB serial at, most common first
MARLIN_BAUDS = (115200, 250000)


def _probe_marlin(dev: Device, warnings: list[str]) -> None:
    """No AVR bootloader answered: ask for M115, as a running Marlin answers. A printer that
    reports BINARY_FILE_TRANSFER can take a firmware.bin over this port (method marlin-sd)."""
    try:
        prober = _provider("marlin_sd", "probe")
    except Exception as exc:
        warnings.append(f"Marlin probing is unavailable: {exc}")
        return
    if prober is None or not dev.port:
        return
    for baud in MARLIN_BAUDS:
        try:
            report = prober(dev.port, baud)
        except Exception as exc:
            warnings.append(f"{dev.port}: M115 probe failed: {type(exc).__name__}: {exc}")
            return
        if report is None:
            continue
        dev.details["firmware"] = report.firmware_name
        dev.details["baud"] = baud
        if report.cap("BINARY_FILE_TRANSFER"):
            dev.method = "marlin-sd"
            dev.description = f"{report.firmware_name} (firmware.bin over this port)"
        return
