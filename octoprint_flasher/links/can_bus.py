"""python-can plumbing: open a bus, send whole frames reliably, and a node's byte stream.

python-can is imported lazily (only here) because it conflicts with some OctoPrint versions;
everything else in the package works without it.

Two rules from Katapult's parser shape this module: a frame the host gives up on can wedge
the node until reset, so ``send`` retries the *same* frame on ENOBUFS (a full kernel queue)
instead of dropping it, and a byte stream is cut into 8-byte frames only, never re-split.
"""

from __future__ import annotations

import errno
import importlib
import os
import time
from typing import Any, Callable, Optional

from ..errors import ConnectError

BusFactory = Callable[[], Any]

#: ``module:function`` returning a python-can bus; lets a separate process (the CLI in tests,
#: the demo) reach an emulated node on python-can's in-process ``virtual`` interface.
BUS_FACTORY_ENV = "OCTOPRINT_FLASHER_CAN_BUS_FACTORY"

ENOBUFS_PATIENCE = 1.0  # seconds to keep retrying one frame while the TX queue is full


def _import_can() -> Any:
    try:
        return importlib.import_module("can")
    except ImportError as exc:
        raise ConnectError(
            "CAN support needs the Python package python-can, which is missing.",
            hint="Install it into OctoPrint's environment: pip install python-can",
        ) from exc


def factory_from_env(environ: Optional[dict[str, str]] = None) -> Optional[BusFactory]:
    """Resolve :data:`BUS_FACTORY_ENV` (``package.module:callable``) if it is set."""
    spec = (environ if environ is not None else os.environ).get(BUS_FACTORY_ENV, "")
    if not spec:
        return None
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise ConnectError(
            f"{BUS_FACTORY_ENV}={spec!r} is not of the form module:function.",
            hint="Example: tests.emulators.katapult_node:demo_bus",
        )
    factory: BusFactory = getattr(importlib.import_module(module_name), attr)
    return factory


def open_bus(
    interface: str = "socketcan",
    channel: str = "can0",
    bitrate: Optional[int] = None,
    factory: Optional[BusFactory] = None,
) -> Any:
    """Open a python-can bus, or call ``factory`` (tests, demo, env hook) instead."""
    factory = factory or factory_from_env()
    if factory is not None:
        return factory()
    can = _import_can()
    kwargs: dict[str, Any] = {"interface": interface, "channel": channel}
    if bitrate and interface != "socketcan":
        # socketcan's bitrate belongs to `ip link`; slcan/gs_usb/pcan need it from us
        kwargs["bitrate"] = bitrate
    if interface == "socketcan":
        # every node->host id is odd (0x3F1 and 0x100+2n+1): let the kernel drop the rest
        kwargs["can_filters"] = [{"can_id": 0x001, "can_mask": 0x001, "extended": False}]
    try:
        return can.Bus(**kwargs)
    except Exception as exc:  # python-can raises several unrelated types here
        raise ConnectError(
            f"Cannot open CAN interface {interface} channel {channel}: {exc}",
            cause=_open_cause(interface, channel, exc),
            hint=_open_hint(interface, channel, bitrate),
        ) from exc


def _open_cause(interface: str, channel: str, exc: Exception) -> str:
    code = getattr(exc, "errno", None) or getattr(exc, "error_code", None)
    if code == errno.ENODEV or "No such device" in str(exc):
        return (
            f"there is no network interface {channel} (adapter unplugged, or a Klipper "
            "USB-CAN bridge rebooted into its bootloader)"
        )
    if interface == "socketcan":
        return "the interface is missing or down"
    return "the adapter is missing, busy, or the interface name is wrong"


def _open_hint(interface: str, channel: str, bitrate: Optional[int]) -> str:
    if interface == "socketcan":
        rate = bitrate or 1000000
        return (
            f"Bring it up: sudo ip link set {channel} up type can bitrate {rate}; "
            f"sudo ip link set {channel} txqueuelen 128"
        )
    return f"Check the adapter and the channel name ({channel}); pass the bus bitrate."


class CanLink:
    """One open bus: whole frames out (retrying ENOBUFS), frames in, statistics."""

    def __init__(self, bus: Any, owns_bus: bool = True) -> None:
        self.bus = bus
        self.owns_bus = owns_bus
        self.enobufs_retries = 0
        self.frames_sent = 0
        self._can = _import_can()

    def send(self, arbitration_id: int, data: bytes) -> None:
        if len(data) > 8:
            raise ValueError("a classic CAN frame carries at most 8 bytes")
        msg = self._can.Message(arbitration_id=arbitration_id, data=data, is_extended_id=False)
        deadline = time.monotonic() + ENOBUFS_PATIENCE
        pause = 0.0005
        while True:
            try:
                self.bus.send(msg, timeout=ENOBUFS_PATIENCE)
                self.frames_sent += 1
                return
            except Exception as exc:  # can.CanOperationError or OSError
                code = getattr(exc, "error_code", None) or getattr(exc, "errno", None)
                full = code == errno.ENOBUFS or "No buffer space" in str(exc)
                if full and time.monotonic() < deadline:
                    self.enobufs_retries += 1
                    time.sleep(pause)
                    pause = min(pause * 2, 0.02)
                    continue
                raise ConnectError(
                    f"Sending a CAN frame failed: {exc}",
                    cause=(
                        "the kernel transmit queue stayed full: nothing acknowledges frames "
                        "(no node, bitrate mismatch, missing termination) or txqueuelen is "
                        "too small"
                        if full
                        else "the interface went down or the adapter disappeared"
                    ),
                    hint="Run the CAN diagnostics (interface state, error counters) and "
                    "check wiring, termination and bitrate.",
                ) from exc

    def recv(self, timeout: float) -> Optional[tuple[int, bytes]]:
        deadline = time.monotonic() + timeout
        while True:
            remaining = max(0.0, deadline - time.monotonic())
            msg = self.bus.recv(remaining)
            if msg is None:
                return None
            if msg.is_extended_id or msg.is_remote_frame or getattr(msg, "is_error_frame", 0):
                if remaining <= 0:
                    return None
                continue
            return msg.arbitration_id, bytes(msg.data)

    def drain(self) -> None:
        while self.bus.recv(0) is not None:
            pass

    def close(self) -> None:
        if self.owns_bus and self.bus is not None:
            try:
                self.bus.shutdown()
            finally:
                self.bus = None


class NodeStream:
    """A Katapult node's byte stream over its pair of CAN ids (a :class:`ByteLink`)."""

    def __init__(self, link: CanLink, tx_id: int, rx_id: int) -> None:
        self.link = link
        self.tx_id = tx_id
        self.rx_id = rx_id
        self.bytes_out = 0

    def write(self, data: bytes) -> None:
        for pos in range(0, len(data), 8):
            self.link.send(self.tx_id, data[pos : pos + 8])
        self.bytes_out += len(data)

    def read(self, timeout: float) -> bytes:
        """Wait for the node's next frame, then take every frame already queued with it, so
        a 10-frame reply costs one wake-up of the caller instead of ten."""
        deadline = time.monotonic() + timeout
        out = b""
        while True:
            frame = self.link.recv(0.0 if out else max(0.0, deadline - time.monotonic()))
            if frame is None:
                if out or time.monotonic() >= deadline:
                    return out
                continue
            if frame[0] == self.rx_id:
                out += frame[1]
            elif not out and time.monotonic() >= deadline:
                return b""

    def flush_input(self) -> None:
        self.link.drain()
