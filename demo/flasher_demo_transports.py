"""OctoPrint-Flasher demo transports: emulated boards for a machine without USB or CAN.

A single-file OctoPrint plugin that ``scripts/demo.sh`` copies into the demo basedir's
``plugins/`` folder. It answers the Firmware Updater's ``octoprint.plugin.flasher.transports``
hook with one emulated USB bus (a pyusb backend: an STM32 in ROM DFU and a BTT SKR Pico
running Klipper, RP2040) and an emulated Katapult node on a python-can ``virtual`` bus, and
a Prusa MMU3 on emulated USB serial (offered as ``list_ports``), all from the project's
``tests/emulators``. The repository root
comes from the ``FLASHER_REPO`` environment variable the demo sets. Never install this on a
real printer: it only shows the flasher's own code paths against emulators.

It also answers ``/api/plugin/flasher_demo_transports`` (admins only): ``GET`` tells what the
emulated boards are doing (the DFU device's mode, the CAN node's mode and reboot events, the
SKR Pico's mode, USB id, touches and flash checksum), so the
end-to-end tests can check that a refused file left a board untouched; the command
``press_dfu_reset`` is the reset button of the DFU board with its BOOT0 jumper still fitted:
the board enumerates in ROM DFU again, keeping its flash, so it can be flashed once more.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Optional

import octoprint.plugin

__plugin_name__ = "Firmware Updater demo boards"
__plugin_description__ = "Emulated DFU and Katapult boards for the OctoPrint-Flasher demo"
__plugin_pythoncompat__ = ">=3.9,<4"

CAN_CHANNEL = "flasher-demo"

_log = logging.getLogger("octoprint.plugins.flasher_demo_transports")


class DemoTransports(
    octoprint.plugin.StartupPlugin,
    octoprint.plugin.ShutdownPlugin,
    octoprint.plugin.SimpleApiPlugin,
):
    """Builds the emulated boards once and offers them to the flasher."""

    def __init__(self) -> None:
        self._offer: Optional[dict[str, Any]] = None
        self._node: Any = None
        self._dfu: Any = None
        self._pico: Any = None
        self._mmu: Any = None

    def transports(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if self._offer is None:
            self._offer = self._build()
        return self._offer

    def on_after_startup(self) -> None:
        offer = self.transports()
        _log.info(f"Demo boards offered to the Firmware Updater: {sorted(offer)}")

    def on_shutdown(self) -> None:
        stop = getattr(self._node, "stop", None)
        if callable(stop):
            stop()
        if self._mmu is not None:
            self._mmu.close()

    # -- the boards' state, for the end-to-end tests and the curious -------------------------------
    def is_api_protected(self) -> bool:
        return True

    def is_api_adminonly(self) -> bool:
        return True

    def get_api_commands(self) -> dict[str, list[str]]:
        return {"press_dfu_reset": []}

    def on_api_get(self, request: Any) -> Any:
        import flask

        self.transports()
        return flask.jsonify(self._state())

    def on_api_command(self, command: str, data: dict[str, Any]) -> Any:
        import flask

        self.transports()
        if command == "press_dfu_reset" and self._dfu is not None:
            self._dfu.press_reset(boot0=True)
        return flask.jsonify(self._state())

    def _state(self) -> dict[str, Any]:
        state = boards_state(self._dfu, self._node)
        if self._pico is not None:
            state["rp2040"] = rp2040_state(self._pico)
        if self._mmu is not None:
            state["mmu"] = mmu_state(self._mmu)
        return state

    def _build(self) -> dict[str, Any]:
        repo = os.environ.get("FLASHER_REPO")
        if repo and repo not in sys.path:
            sys.path.insert(0, repo)
        offer: dict[str, Any] = {}
        try:
            backend = _dfu_backend()
            self._dfu = next(iter(backend.enumerate_devices()), None)
            # the one USB transport: the DFU board and the SKR Pico on one emulated bus
            bus, self._pico = _usb_bus(backend)
            offer["usb_backend"] = bus
        except ImportError as exc:
            _log.warning(f"No emulated USB boards: {exc}")
        try:
            factory, node = _katapult_bus()
            self._node = node
            offer.update(can_bus_factory=factory, can_interface="virtual", can_channel=CAN_CHANNEL)
        except ImportError as exc:
            _log.warning(f"No emulated Katapult node: {exc}")
        try:
            self._mmu, offer["list_ports"] = _mmu_usb()
        except ImportError as exc:
            _log.warning(f"No emulated Prusa MMU: {exc}")
        return offer


def boards_state(dfu: Any, node: Any) -> dict[str, Any]:
    """What the emulated boards are doing: enough to tell a board that was never touched from
    one that was rebooted, entered or written."""
    state: dict[str, Any] = {}
    if dfu is not None:
        present = dfu.present  # lets a re-enumerating device finish first
        state["dfu"] = {
            "mode": dfu.mode,
            "present": present,
            "usb_id": "{:04x}:{:04x}".format(*dfu.usb_ids),
            "left_to": dfu.left_to,
            "bytes_programmed": dfu.bytes_programmed,
            "erased": list(dfu.erased),
            "head": dfu.read_flash(dfu.model.flash_start, 8).hex(),
        }
    if node is not None:
        with node.lock:
            state["katapult"] = {
                "uuid": node.uuid_text,
                "mode": node.mode,
                "events": list(node.events),
                "boots": node.boots,
            }
    return state


def _dfu_backend() -> Any:
    """An STM32F446 waiting in its ROM bootloader (BOOT0 held at power-up). After a flash it
    starts the new application and leaves the DFU list, as a real board does when it leaves
    DFU; with the BOOT0 jumper still fitted, its reset button (the ``press_dfu_reset`` API
    command) brings it back into DFU."""
    from tests.emulators import dfu_device

    scale = float(os.environ.get("FLASHER_DEMO_TIME_SCALE", "1.0"))
    device = dfu_device.EmulatedDfuDevice(dfu_device.F446, time_scale=scale)
    return dfu_device.DfuBackend([device])


def rp2040_state(pico: Any) -> dict[str, Any]:
    """The SKR Pico: what it runs and enumerates as, everything done to it, and its flash
    (the used part's SHA-256, to compare with the image that was flashed)."""
    import hashlib

    with pico.lock:
        present = pico.present  # lets a re-enumeration that is due finish first
        flash = bytes(pico.flash).rstrip(b"\xff")
        return {
            "mode": pico.mode,
            "present": present,
            "usb_id": "{:04x}:{:04x}".format(*pico.usb_ids),
            "usb_path": pico.usb_path,
            "touches": pico.touches,
            "reboots": pico.reboots,
            "erased": len(pico.erased),
            "bytes_programmed": pico.bytes_programmed,
            "flash_used": len(flash),
            "flash_sha256": hashlib.sha256(flash).hexdigest(),
        }


def _usb_bus(dfu_backend: Any) -> tuple[Any, Any]:
    """The DFU board and a BTT SKR Pico running Klipper (RP2040, USB 1d50:614e) on one
    emulated USB bus: the flasher asks Klipper to reboot into the boot ROM (1200-baud touch on
    its serial port), flashes it over PICOBOOT and sees Klipper come back."""
    from tests.emulators import picoboot_device
    from tests.emulators.usb_bus import UsbBus

    scale = float(os.environ.get("FLASHER_DEMO_TIME_SCALE", "1.0"))
    pico = picoboot_device.skr_pico(time_scale=scale)
    return UsbBus(dfu_backend, picoboot_device.PicobootBackend([pico])), pico


def _katapult_bus() -> tuple[Any, Any]:
    """An STM32G0B1 running Klipper (with Katapult below it) on a python-can virtual bus: the
    flasher finds it by its UUID and asks it to reboot into Katapult, as on a real CAN bus."""
    from tests.emulators import katapult_node
    from tests.emulators.klipper_firmware import make_klipper_bin

    scale = float(os.environ.get("FLASHER_DEMO_TIME_SCALE", "1.0"))
    board = katapult_node.EmulatedBoard(channel=CAN_CHANNEL, firmware="klipper", time_scale=scale)
    board.install_app(make_klipper_bin())
    board.start()
    return katapult_node.virtual_bus_factory(CAN_CHANNEL), board


def _mmu_usb() -> tuple[Any, Any]:
    """A Prusa MMU3 control board (ATmega32U4, Prusa's Caterina) running its firmware, on USB
    2c99:0004 at location 1-1.4 (tests/emulators/caterina_board.py). Its port is a pty that
    vanishes on the 1200-baud touch and comes back under another name as the bootloader
    (2c99:0003); the flasher follows it with the port lister offered here (the host's real
    serial ports plus the emulated USB ones)."""
    from octoprint_flasher.links.bootloader_entry import list_serial_ports
    from tests.emulators.caterina_board import CaterinaBoard
    from tests.prusa.samples import mmu_app

    scale = float(os.environ.get("FLASHER_DEMO_TIME_SCALE", "1.0"))
    mmu = CaterinaBoard(app=mmu_app(12 * 1024, seed=6), time_scale=scale)

    def list_ports() -> list[Any]:
        return list(list_serial_ports()) + mmu.list_ports()

    return mmu, list_ports


def mmu_state(mmu: Any) -> dict[str, Any]:
    """The MMU: what it runs and on which port, what was done to it, and its application
    area (0x0000-0x6FFF, SHA-256) to compare with the file that was flashed."""
    import hashlib

    from tests.emulators.caterina_board import BOOT_START

    with mmu._lock:
        return {
            "mode": mmu.mode,
            "port": mmu.port,
            "touches": mmu.stats.touches,
            "enumerations": mmu.stats.enumerations,
            "pages_written": mmu.stats.pages_written,
            "events": list(mmu.events),
            "app_sha256": hashlib.sha256(bytes(mmu.flash[:BOOT_START])).hexdigest(),
        }


__plugin_implementation__ = DemoTransports()
__plugin_hooks__ = {"octoprint.plugin.flasher.transports": __plugin_implementation__.transports}
