"""The plugin class: OctoPrint's mixins and hooks around the flashing core.

Routes live in :mod:`.routes`, the printer connection in :mod:`.host`, settings in
:mod:`.settings`; flashing itself is the OctoPrint-free core (``job``, ``store``, flashers).
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import threading
from pathlib import Path
from typing import Any, Callable, Optional

import octoprint.plugin
from flask_babel import gettext
from octoprint.access import ADMIN_GROUP
from octoprint.access.permissions import Permissions
from octoprint.events import Events

from .. import methods
from ..target import Target
from . import settings as flasher_settings
from .host import HostOptions, OctoPrintHost
from .routes import FlasherApi, MessageThrottle, TargetMemory, target_to_json

TRANSPORTS_HOOK = "octoprint.plugin.flasher.transports"
CUSTOM_EVENTS = ["flash_started", "flash_done", "flash_failed"]
# what OctoPrint names them (EVENT_DONE exists only once registered)
EVENT_STARTED, EVENT_DONE, EVENT_FAILED = (f"plugin_flasher_{e}" for e in CUSTOM_EVENTS)


class FlasherPlugin(
    octoprint.plugin.SettingsPlugin,
    octoprint.plugin.AssetPlugin,
    octoprint.plugin.TemplatePlugin,
    FlasherApi,
    octoprint.plugin.EventHandlerPlugin,
    octoprint.plugin.StartupPlugin,
    octoprint.plugin.ShutdownPlugin,
):
    def __init__(self) -> None:
        super().__init__()
        self._job: Any = None
        self._store: Any = None
        self._host: Any = None
        self._targets: Any = None
        self._throttle: Optional[MessageThrottle] = None
        self._console = logging.getLogger("octoprint.plugins.flasher.console")
        self._transports: dict[str, Any] = {}
        self._transports_loaded = False
        self._lock = threading.Lock()
        # the flasher opener; None means methods.open_flasher (tests inject a fake board)
        self._opener: Optional[Callable[..., Any]] = None
        self._current_image_id: Optional[str] = None
        # what the printer's firmware said of itself on OctoPrint's connection (M115)
        self._printer_firmware: dict[str, Any] = {}
        self._printer_caps: dict[str, bool] = {}
        self._flashing_port: Optional[str] = None  # the serial port the running job uses

    ##~~ lifecycle

    def initialize(self) -> None:
        from ..job import FlashJob
        from ..store import Store

        data = Path(self.get_plugin_data_folder())
        self._store = Store(
            data,
            max_size=flasher_settings.max_upload_bytes(self._settings.get(["max_upload_mb"])),
        )
        self._targets = TargetMemory(data / "targets.json")
        self._host = OctoPrintHost(
            self._printer,
            self._host_options(),
            log=self._console_line,
        )
        self._throttle = MessageThrottle(self._send_message)
        self._throttle.start()
        self._job = FlashJob(self._store, self._host, self._on_job_event, opener=self._open_flasher)
        self._setup_console_log()

    def on_after_startup(self) -> None:
        self._load_transports()

    def on_shutdown(self) -> None:
        if self._job is not None and self._job.running:
            self._logger.warning("OctoPrint shuts down during a flash; cancelling it.")
            self._job.cancel()
        if self._throttle is not None:
            self._throttle.stop()

    ##~~ SettingsPlugin

    def get_settings_defaults(self) -> dict[str, Any]:
        return flasher_settings.defaults()

    def get_settings_version(self) -> int:
        return flasher_settings.SETTINGS_VERSION

    def on_settings_migrate(self, target: int, current: Optional[int]) -> None:
        stored = self._settings.get_all_data(merged=False) or {}
        migrated = flasher_settings.migrate(stored, current)
        for key in list(stored):
            if key not in migrated:
                self._settings.remove([key])
        for key, value in migrated.items():
            self._settings.set([key], value)

    def on_settings_save(self, data: dict[str, Any]) -> dict[str, Any]:
        result = octoprint.plugin.SettingsPlugin.on_settings_save(self, data)
        if self._host is not None:
            self._host.options = self._host_options()
        return result

    ##~~ AssetPlugin / TemplatePlugin

    def get_assets(self) -> dict[str, list[str]]:
        return {"js": ["js/flasher_format.js", "js/flasher.js"], "css": ["css/flasher.css"]}

    def get_template_configs(self) -> list[dict[str, Any]]:
        return [{"type": "settings", "name": gettext("Firmware Updater"), "custom_bindings": True}]

    def is_template_autoescaped(self) -> bool:
        return True

    def get_template_vars(self) -> dict[str, Any]:
        return {
            "max_upload_bytes": flasher_settings.max_upload_bytes(
                self._settings.get(["max_upload_mb"])
            )
        }

    ##~~ EventHandlerPlugin

    def on_event(self, event: str, payload: Any) -> None:
        if event == Events.SETTINGS_UPDATED and self._store is not None:
            self._store.max_size = flasher_settings.max_upload_bytes(
                self._settings.get(["max_upload_mb"])
            )
        if event == Events.DISCONNECTED:
            # what one printer said of itself must not describe the next port connected
            self._printer_firmware, self._printer_caps = {}, {}

    ##~~ hooks

    def firmware_info_hook(
        self,
        comm: Any,
        firmware_name: str,
        firmware_data: dict[str, Any],
        *args: Any,
        **kwargs: Any,
    ) -> None:
        self._printer_firmware = dict(firmware_data or {})
        self._printer_firmware.setdefault("FIRMWARE_NAME", firmware_name)
        self._printer_caps = {}  # the Cap: lines of this M115 answer follow

    def firmware_capability_hook(
        self, comm: Any, capability: str, enabled: bool, already_defined: Any, *a: Any, **kw: Any
    ) -> None:
        self._printer_caps[str(capability)] = bool(enabled)

    def get_additional_permissions(self, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        return [
            {
                "key": "FLASH",
                "name": "Flash firmware",
                "description": gettext(
                    "Allows uploading firmware and flashing it to the printer's mainboard"
                ),
                "roles": ["flash"],
                "dangerous": True,
                "default_groups": [ADMIN_GROUP],
            }
        ]

    def bodysize_hook(self, current_max_body_sizes: Any, *args: Any, **kwargs: Any) -> list[Any]:
        limit = flasher_settings.max_upload_bytes(self._settings.get(["max_upload_mb"]))
        # room for the multipart framing and the small form fields around the file
        return [("POST", r"/upload", limit + 64 * 1024)]

    def handle_connect(self, printer: Any, *args: Any, **kwargs: Any) -> bool:
        """Veto OctoPrint connecting while a flash holds the port, or while a flash runs on the
        port it wants (or on any serial port when it would pick one itself): opening it would
        reset the board mid-write (True = handled/blocked). The job's own reconnect, after the
        board is done, is never vetoed."""
        if self._host is not None and self._host.reconnecting:
            return False
        if (self._host is not None and self._host.veto_connect()) or self._flashing_port_wanted(
            kwargs.get("port")
        ):
            line = "Refused a printer connection: firmware is being flashed on that port."
            self._logger.warning(line)
            self._console_line(line)
            return True
        return False

    def socket_emit_hook(
        self, socket: Any, user: Any, message: str, payload: Any, *args: Any, **kwargs: Any
    ) -> bool:
        """Our events name firmware files and boards: only FLASH users receive them."""
        if message != "event" or not isinstance(payload, dict):
            return True
        if payload.get("type") not in (EVENT_STARTED, EVENT_DONE, EVENT_FAILED):
            return True
        return bool(user and user.has_permission(Permissions.PLUGIN_FLASHER_FLASH))

    def get_update_information(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return {
            "flasher": {
                "displayName": "Firmware Updater (OctoPrint-Flasher)",
                "displayVersion": self._plugin_version,
                "type": "pypi_release",
                "package": "OctoPrint-Flasher",
                "pip": "OctoPrint-Flasher=={target_version}",
            }
        }

    ##~~ glue used by the routes

    def flasher_defaults(self) -> dict[str, Any]:
        return {
            "method": self._settings.get(["method"]),
            "stk500": self._settings.get(["stk500"]) or {},
            "dfu": self._settings.get(["dfu"]) or {},
            "katapult": self._settings.get(["katapult"]) or {},
        }

    def flasher_transports(self) -> dict[str, Any]:
        if not self._transports_loaded:
            self._load_transports()
        return self._transports

    def _flashing_port_wanted(self, port: Any) -> bool:
        flashing = self._flashing_port
        if not flashing or self._job is None or not self._job.running:
            return False
        if not port or str(port).upper() == "AUTO":
            return True
        return os.path.realpath(str(port)) == os.path.realpath(flashing)

    def flasher_printer_facts(self) -> dict[str, Any]:
        """What OctoPrint's own connection learnt from the printer's M115: its firmware, and
        whether it can take a firmware.bin over the serial link (marlin-sd)."""
        facts: dict[str, Any] = {}
        name = self._printer_firmware.get("FIRMWARE_NAME")
        if name:
            facts["firmware"] = str(name)
        if self._printer_caps.get("BINARY_FILE_TRANSFER"):
            facts["preferred_method"] = "marlin-sd"
            facts["sd_upload"] = True
        return facts

    def flasher_rescue(self, port: str) -> str:
        from ..flashers import marlin_sd

        ours = port == self._printer.get_current_connection()[1]
        if ours:
            self._host.options = self._host_options()
            self._host.disconnect()
        try:
            return marlin_sd.rescue(port, self._connection_baud(), log=self._console_line)
        finally:
            if ours:
                self._host.release()
                self._host.reconnect()

    def _connection_baud(self) -> int:
        remembered = getattr(self._host, "remembered", None)
        baud = self._printer.get_current_connection()[2] or getattr(remembered, "baudrate", None)
        return int(baud or 115200)

    def _prompt_user(self, message: str) -> None:
        """The flasher needs a hand now (press the reset button): tell the page at once."""
        self._console_line(f"!! {message}")
        self._send_message({"type": "prompt", "message": message})

    def flasher_start(self, image_id: str, target: Target, backup: bool) -> None:
        self._host.options = self._host_options()
        self._flashing_port = target.port
        target.options.setdefault("prompt", self._prompt_user)
        target.options.setdefault("state_dir", self.get_plugin_data_folder())
        if target.method == "marlin-sd" and not target.baud:
            target.baud = self._connection_baud()
        self._targets.remember_image(image_id, target_to_json(target))
        with self._lock:
            self._current_image_id = image_id
        try:
            self._job.start(image_id, target, backup=backup)
        except Exception:
            with self._lock:
                self._current_image_id = None
            raise
        if target.port:
            self._settings.set(["last_port"], target.port)
            self._settings.save()

    ##~~ internals

    def _open_flasher(self, target: Target, log: Optional[Callable[[str], None]]) -> Any:
        """Open through the registry, or through the opener a test injected."""
        opener = self._opener or methods.open_flasher
        return opener(target, log)

    def _host_options(self) -> HostOptions:
        return HostOptions(
            reconnect=bool(self._settings.get_boolean(["reconnect_after_flash"])),
            reconnect_timeout=float(self._settings.get_float(["reconnect_timeout"]) or 30),
            settle_delay=float(self._settings.get_float(["settle_delay"]) or 0),
            pre_gcode=str(self._settings.get(["pre_gcode"]) or ""),
            post_gcode=str(self._settings.get(["post_gcode"]) or ""),
        )

    def _load_transports(self) -> None:
        merged: dict[str, Any] = {}
        for name, hook in self._plugin_manager.get_hooks(TRANSPORTS_HOOK).items():
            try:
                offered = hook()
            except Exception:
                self._logger.exception(
                    f"Transport hook of plugin {name} failed", extra={"plugin": name}
                )
                continue
            if isinstance(offered, dict):
                self._logger.info(f"Plugin {name} offers flasher transports: {sorted(offered)}")
                merged.update(offered)
        self._transports = merged
        self._transports_loaded = True

    def _on_job_event(self, event: Any) -> None:
        """Job events → console log, OctoPrint events and (throttled) browser messages."""
        kind = event.type
        data = dict(event.data or {})
        if kind == "log":
            line = str(data.get("line", ""))
            self._console.info(line)
            message: dict[str, Any] = {"type": "log", "line": line, "lines": [line]}
        else:
            message = dict(data, type=kind)
        if kind == "state":
            self._console.info(f"-- {data.get('state')}")
            if data.get("state") == "preflight":
                self._event_bus.fire(EVENT_STARTED, self._event_payload(data))
        if kind == "result":
            self._on_result(data)
        if self._throttle is not None:
            self._throttle.push(message)

    def _on_result(self, data: dict[str, Any]) -> None:
        with self._lock:
            image_id, self._current_image_id = self._current_image_id, None
        if data.get("job_id") and image_id:
            self._targets.remember_record(str(data["job_id"]), image_id)
        if self._host is not None:
            self._host.release()  # the job is over: OctoPrint may connect again
        ok = data.get("ok") is True
        self._console.info(f"== {data.get('status')}: {data.get('message', '')}")
        event = EVENT_DONE if ok else EVENT_FAILED
        self._event_bus.fire(event, self._event_payload(data))

    def _event_payload(self, data: dict[str, Any]) -> dict[str, Any]:
        status = self._job.status() if self._job is not None else {}
        image = status.get("image") or {}
        return {
            "target": status.get("target"),
            "filename": image.get("filename"),
            "sha256": image.get("sha256"),
            "result": data.get("status"),
            "message": data.get("message"),
        }

    def _send_message(self, message: dict[str, Any]) -> None:
        self._plugin_manager.send_plugin_message(
            self._identifier, message, permissions=[Permissions.PLUGIN_FLASHER_FLASH]
        )

    def _console_line(self, line: str) -> None:
        """A host-side line: into the console log once, and to the browser like a job's."""
        if self._job is not None:
            self._on_job_event(_HostLog(line))  # logs it to the console too
        else:
            self._console.info(line)

    def _setup_console_log(self) -> None:
        for old in list(self._console.handlers):  # a re-initialised plugin logs anew
            self._console.removeHandler(old)
            old.close()
        handler = logging.handlers.RotatingFileHandler(
            self._settings.get_plugin_logfile_path(postfix="console"),
            maxBytes=2 * 1024 * 1024,
            backupCount=3,
        )
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        self._console.addHandler(handler)
        self._console.setLevel(logging.INFO)
        self._console.propagate = False


class _HostLog:
    """A host log line shaped like a job ``log`` event."""

    type = "log"

    def __init__(self, line: str) -> None:
        self.data = {"line": line}


def register_custom_events(*args: Any, **kwargs: Any) -> list[str]:
    return list(CUSTOM_EVENTS)
