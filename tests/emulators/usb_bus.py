"""One emulated USB bus made of several emulated pyusb backends.

The plugin accepts one ``usb_backend`` transport (and the CLI one
``OCTOPRINT_FLASHER_USB_BACKEND``), but the demo has boards from different emulators: the
STM32 in ROM DFU (:mod:`tests.emulators.dfu_device`) and the SKR Pico running Klipper
(:mod:`tests.emulators.picoboot_device`). :class:`UsbBus` shows all their devices as one bus,
as libusb shows every device on a host, and hands each pyusb call to the backend that owns the
device, so every emulator stays exactly as it is. The emulators' serial side (a Klipper's CDC
port, for the 1200-baud touch) is passed through as well.
"""

from __future__ import annotations

import errno
from array import array
from typing import Any, Iterator

import usb.backend


class _Routed:
    """A device or handle of one member backend, tagged with that backend."""

    __slots__ = ("backend", "inner")

    def __init__(self, backend: Any, inner: Any) -> None:
        self.backend = backend
        self.inner = inner

    def __repr__(self) -> str:
        return f"<{type(self.inner).__name__} on {type(self.backend).__name__}>"


class UsbBus(usb.backend.IBackend):
    """A pyusb backend whose devices are those of ``backends``, in order."""

    def __init__(self, *backends: Any) -> None:
        self.backends = list(backends)
        # one wrapper per device object, so a device keeps its identity across enumerations
        self._wrapped: dict[int, _Routed] = {}

    def _wrap(self, backend: Any, inner: Any) -> _Routed:
        found = self._wrapped.get(id(inner))
        if found is None or found.inner is not inner:
            found = self._wrapped[id(inner)] = _Routed(backend, inner)
        return found

    # -- the serial side of the same boards -----------------------------------------------
    def list_serial_ports(self) -> list[Any]:
        """Every member's emulated serial ports (members without a serial side add none)."""
        ports: list[Any] = []
        for backend in self.backends:
            lister = getattr(backend, "list_serial_ports", None)
            if lister is not None:
                ports.extend(lister())
        return ports

    def open_serial(self, port: str, baudrate: int = 9600, **kwargs: Any) -> Any:
        """Open ``port`` on the member that has it, like ``serial.Serial`` would."""
        for backend in self.backends:
            opener = getattr(backend, "open_serial", None)
            if opener is None:
                continue
            try:
                return opener(port, baudrate, **kwargs)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    raise
        raise OSError(errno.ENOENT, f"could not open port {port}: No such file or directory")

    # -- pyusb's backend interface, routed by device ---------------------------------------
    def enumerate_devices(self) -> Iterator[_Routed]:
        return iter(
            [self._wrap(b, dev) for b in self.backends for dev in list(b.enumerate_devices())]
        )

    def get_parent(self, dev: _Routed) -> Any:
        parent = dev.backend.get_parent(dev.inner)
        return None if parent is None else self._wrap(dev.backend, parent)

    def get_device_descriptor(self, dev: _Routed) -> Any:
        return dev.backend.get_device_descriptor(dev.inner)

    def get_configuration_descriptor(self, dev: _Routed, config: int) -> Any:
        return dev.backend.get_configuration_descriptor(dev.inner, config)

    def get_interface_descriptor(self, dev: _Routed, intf: int, alt: int, config: int) -> Any:
        return dev.backend.get_interface_descriptor(dev.inner, intf, alt, config)

    def get_endpoint_descriptor(
        self, dev: _Routed, ep: int, intf: int, alt: int, config: int
    ) -> Any:
        return dev.backend.get_endpoint_descriptor(dev.inner, ep, intf, alt, config)

    def open_device(self, dev: _Routed) -> _Routed:
        return _Routed(dev.backend, dev.backend.open_device(dev.inner))

    def close_device(self, dev_handle: _Routed) -> None:
        dev_handle.backend.close_device(dev_handle.inner)

    def set_configuration(self, dev_handle: _Routed, config_value: int) -> None:
        dev_handle.backend.set_configuration(dev_handle.inner, config_value)

    def get_configuration(self, dev_handle: _Routed) -> int:
        return int(dev_handle.backend.get_configuration(dev_handle.inner))

    def set_interface_altsetting(self, dev_handle: _Routed, intf: int, altsetting: int) -> None:
        dev_handle.backend.set_interface_altsetting(dev_handle.inner, intf, altsetting)

    def claim_interface(self, dev_handle: _Routed, intf: int) -> None:
        dev_handle.backend.claim_interface(dev_handle.inner, intf)

    def release_interface(self, dev_handle: _Routed, intf: int) -> None:
        dev_handle.backend.release_interface(dev_handle.inner, intf)

    def bulk_write(self, dev_handle: _Routed, ep: int, intf: int, data: array, timeout: int) -> int:
        return int(dev_handle.backend.bulk_write(dev_handle.inner, ep, intf, data, timeout))

    def bulk_read(self, dev_handle: _Routed, ep: int, intf: int, buff: array, timeout: int) -> int:
        return int(dev_handle.backend.bulk_read(dev_handle.inner, ep, intf, buff, timeout))

    def intr_write(self, dev_handle: _Routed, ep: int, intf: int, data: array, timeout: int) -> int:
        return int(dev_handle.backend.intr_write(dev_handle.inner, ep, intf, data, timeout))

    def intr_read(self, dev_handle: _Routed, ep: int, intf: int, buff: array, timeout: int) -> int:
        return int(dev_handle.backend.intr_read(dev_handle.inner, ep, intf, buff, timeout))

    def ctrl_transfer(
        self,
        dev_handle: _Routed,
        bmRequestType: int,
        bRequest: int,
        wValue: int,
        wIndex: int,
        data: array,
        timeout: int,
    ) -> int:
        return int(
            dev_handle.backend.ctrl_transfer(
                dev_handle.inner, bmRequestType, bRequest, wValue, wIndex, data, timeout
            )
        )

    def clear_halt(self, dev_handle: _Routed, ep: int) -> None:
        dev_handle.backend.clear_halt(dev_handle.inner, ep)

    def reset_device(self, dev_handle: _Routed) -> None:
        dev_handle.backend.reset_device(dev_handle.inner)

    def is_kernel_driver_active(self, dev_handle: _Routed, intf: int) -> bool:
        return bool(dev_handle.backend.is_kernel_driver_active(dev_handle.inner, intf))

    def detach_kernel_driver(self, dev_handle: _Routed, intf: int) -> None:
        dev_handle.backend.detach_kernel_driver(dev_handle.inner, intf)

    def attach_kernel_driver(self, dev_handle: _Routed, intf: int) -> None:
        dev_handle.backend.attach_kernel_driver(dev_handle.inner, intf)
