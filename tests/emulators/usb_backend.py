"""What every emulated pyusb backend here shares: the device list and the plain USB plumbing.

An emulator's backend (:mod:`tests.emulators.dfu_device`, :mod:`tests.emulators.picoboot_device`)
subclasses :class:`EmulatedBackend` and keeps only what its device does differently (alternate
settings, bulk endpoints, its serial side). Descriptors, control transfers and presence come from
the emulated device objects, so each emulator's faults, timing and re-enumeration stay its own;
the errors carry the libusb codes and errnos pyusb raises on Linux.
"""

from __future__ import annotations

import errno
from array import array
from typing import Any, Generic, Iterator, Optional, Protocol, TypeVar

import usb.backend
import usb.core


class Descriptor:
    """A descriptor as pyusb's backend contract wants it: plain attributes."""

    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)


def usb_error(text: str, code: int, err: int) -> usb.core.USBError:
    """A ``USBError`` as pyusb's libusb1 backend raises it (libusb code and errno)."""
    return usb.core.USBError(text, code, err)


def gone() -> usb.core.USBError:
    """The device left the bus (unplugged, rebooted, re-enumerating)."""
    return usb_error("No such device (it may have been disconnected)", -4, errno.ENODEV)


def pipe() -> usb.core.USBError:
    """The device stalled the request."""
    return usb_error("Pipe error", -9, errno.EPIPE)


class _HostFaults(Protocol):
    """The host-side faults every emulator offers (a missing udev rule, a busy interface)."""

    @property
    def access_denied(self) -> bool: ...

    @property
    def busy(self) -> bool: ...


class EmulatedDevice(Protocol):
    """What :class:`EmulatedBackend` needs of an emulated device."""

    @property
    def present(self) -> bool: ...

    @property
    def faults(self) -> _HostFaults: ...

    def device_descriptor(self) -> Descriptor: ...

    def config_descriptor(self) -> Descriptor: ...

    def interface_descriptor(self, intf: int, alt: int) -> Descriptor: ...

    def control(
        self, bm: int, req: int, value: int, index: int, data: array, timeout: int, /
    ) -> int: ...


DeviceT = TypeVar("DeviceT", bound=EmulatedDevice)


class EmulatedBackend(usb.backend.IBackend, Generic[DeviceT]):
    """A pyusb backend holding emulated devices; pass it as ``usb.core.find(backend=...)``.

    A device handle is the device object itself; only devices that are ``present`` enumerate.
    """

    def __init__(self, devices: Optional[list[DeviceT]] = None) -> None:
        self.devices = list(devices or [])

    def enumerate_devices(self) -> Iterator[DeviceT]:
        return iter([d for d in self.devices if d.present])

    def get_device_descriptor(self, dev: DeviceT) -> Descriptor:
        return dev.device_descriptor()

    def get_configuration_descriptor(self, dev: DeviceT, config: int) -> Descriptor:
        if config != 0:
            raise IndexError("no such configuration")
        return dev.config_descriptor()

    def get_interface_descriptor(
        self, dev: DeviceT, intf: int, alt: int, config: int
    ) -> Descriptor:
        return dev.interface_descriptor(intf, alt)

    def open_device(self, dev: DeviceT) -> DeviceT:
        if not dev.present:
            raise gone()
        if dev.faults.access_denied:
            raise usb_error("Access denied (insufficient permissions)", -3, errno.EACCES)
        return dev

    def close_device(self, dev_handle: DeviceT) -> None:
        return None

    def set_configuration(self, dev_handle: DeviceT, config_value: int) -> None:
        return None

    def get_configuration(self, dev_handle: DeviceT) -> int:
        return 1

    def claim_interface(self, dev_handle: DeviceT, intf: int) -> None:
        if dev_handle.faults.busy:
            raise usb_error("Resource busy", -6, errno.EBUSY)

    def release_interface(self, dev_handle: DeviceT, intf: int) -> None:
        return None

    def ctrl_transfer(
        self,
        dev_handle: DeviceT,
        bmRequestType: int,
        bRequest: int,
        wValue: int,
        wIndex: int,
        data: array,
        timeout: int,
    ) -> int:
        return dev_handle.control(bmRequestType, bRequest, wValue, wIndex, data, timeout)

    def reset_device(self, dev_handle: DeviceT) -> None:
        return None

    def is_kernel_driver_active(self, dev_handle: DeviceT, intf: int) -> bool:
        return False

    def detach_kernel_driver(self, dev_handle: DeviceT, intf: int) -> None:
        return None

    def get_parent(self, dev: DeviceT) -> None:
        return None
