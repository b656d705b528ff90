"""A plugin instance wired into a bare Flask app, as OctoPrint's server would wire it.

No server runs: the plugin gets the attributes the plugin core injects (settings, printer,
plugin manager, event bus), its blueprint is mounted under ``/plugin/flasher`` and a
``Principal`` gives every request an identity that holds (or lacks) the FLASH role. Uploads
are posted the way OctoPrint's Tornado layer rewrites them: ``file.name`` and ``file.path``.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional
from unittest import mock

import flask
import pytest
from flask_babel import Babel
from octoprint.access.permissions import Permissions, PluginOctoPrintPermission
from octoprint.vendor.flask_principal import (
    Identity,
    Principal,
    RoleNeed,
    identity_changed,
    identity_loaded,
)

import octoprint_flasher
from octoprint_flasher.plugin import settings as flasher_settings
from tests.plugin.fakes import FakeFlasher, FakePrinter, MemoryBoard

# Register the plugin permission once, as the server does from the permissions hook.
if not isinstance(getattr(Permissions, "PLUGIN_FLASHER_FLASH", None), PluginOctoPrintPermission):
    Permissions.PLUGIN_FLASHER_FLASH = PluginOctoPrintPermission(
        "Flash firmware", "", RoleNeed("plugin_flasher_flash"), plugin="flasher"
    )


class FakeSettings:
    """The slice of OctoPrint's ``PluginSettings`` the plugin uses, over a plain dict."""

    def __init__(self, folder: Path, stored: Optional[dict[str, Any]] = None) -> None:
        self.values = copy.deepcopy(stored if stored is not None else {})
        self.global_values: dict[str, Any] = {
            "server": {"uploads": {"pathSuffix": "path", "nameSuffix": "name"}},
            "serial": {"additionalPorts": []},
        }
        self.folder = folder
        self.saved = 0

    def _lookup(self, root: dict[str, Any], path: list[str]) -> Any:
        node: Any = root
        for key in path:
            if not isinstance(node, dict) or key not in node:
                return None
            node = node[key]
        return node

    def get(self, path: list[str], **kwargs: Any) -> Any:
        value = self._lookup(self.values, path)
        if value is None:
            value = self._lookup(flasher_settings.DEFAULTS, path)
        return copy.deepcopy(value)

    def get_boolean(self, path: list[str]) -> bool:
        return bool(self.get(path))

    def get_float(self, path: list[str]) -> float:
        return float(self.get(path))

    def get_int(self, path: list[str]) -> int:
        return int(self.get(path))

    def global_get(self, path: list[str]) -> Any:
        return copy.deepcopy(self._lookup(self.global_values, path))

    def get_all_data(self, merged: bool = True, **kwargs: Any) -> dict[str, Any]:
        return copy.deepcopy(self.values)

    def set(self, path: list[str], value: Any) -> None:
        node = self.values
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = copy.deepcopy(value)

    def remove(self, path: list[str]) -> None:
        node: Any = self.values
        for key in path[:-1]:
            node = node.get(key, {})
        node.pop(path[-1], None)

    def save(self) -> None:
        self.saved += 1

    def get_plugin_logfile_path(self, postfix: Optional[str] = None) -> str:
        return str(self.folder / f"plugin_flasher_{postfix}.log")


class Harness:
    """The plugin, its fakes and a test client; ``grant`` decides the FLASH role."""

    def __init__(self, tmp_path: Path, board: MemoryBoard) -> None:
        self.board = board
        self.opened: list[Any] = []
        self.messages: list[tuple[float, dict[str, Any]]] = []
        self.events: list[tuple[str, Any]] = []
        self.grant = True
        self.printer = FakePrinter()
        self.settings = FakeSettings(tmp_path)
        self.settings.values.update({"settle_delay": 0.0, "pre_gcode": "", "reconnect_timeout": 2})
        self.printer.port_busy = lambda: board.port_open
        plugin = octoprint_flasher.__plugin_implementation__.__class__()
        plugin._identifier = "flasher"
        plugin._plugin_name = "Firmware Updater"
        plugin._plugin_version = "0.1.0"
        plugin._basefolder = str(Path(octoprint_flasher.__file__).parent)
        plugin._data_folder = str(tmp_path / "data")
        plugin._logger = logging.getLogger("octoprint.plugins.flasher")
        plugin._settings = self.settings
        plugin._printer = self.printer
        plugin._plugin_manager = mock.MagicMock()
        plugin._plugin_manager.get_hooks.return_value = {}
        plugin._plugin_manager.send_plugin_message.side_effect = self._on_message
        plugin._event_bus = mock.MagicMock()
        plugin._event_bus.fire.side_effect = lambda event, payload=None: self.events.append(
            (event, payload)
        )
        plugin._opener = self._open
        Path(plugin._data_folder).mkdir(parents=True, exist_ok=True)
        plugin.initialize()
        self.plugin = plugin
        self.app = self._app()
        self.client = self.app.test_client()

    def _open(self, target: Any, log: Any = None) -> FakeFlasher:
        self.opened.append(target)
        flasher = FakeFlasher(self.board, log)
        return flasher

    def _on_message(self, identifier: str, data: dict[str, Any], permissions: Any = None) -> None:
        assert identifier == "flasher"
        assert permissions == [Permissions.PLUGIN_FLASHER_FLASH]
        self.messages.append((time.monotonic(), data))

    def _app(self) -> flask.Flask:
        app = flask.Flask("flasher-test")
        app.config["SECRET_KEY"] = "test"
        Principal(app, use_sessions=False)
        Babel(app)

        @app.before_request
        def _identity() -> None:
            identity_changed.send(app, identity=Identity("tester"))

        @identity_loaded.connect_via(app)
        def _roles(sender: Any, identity: Identity) -> None:
            if self.grant:
                identity.provides.add(RoleNeed("plugin_flasher_flash"))

        app.register_blueprint(self.plugin.get_blueprint(), url_prefix="/plugin/flasher")
        return app

    # -- helpers the tests read like sentences with

    def upload(self, path: Path, name: Optional[str] = None, target: Any = None) -> Any:
        data = {"file.name": name or path.name, "file.path": str(path)}
        if target is not None:
            data["target"] = target if isinstance(target, str) else flask.json.dumps(target)
        return self.client.post("/plugin/flasher/upload", data=data)

    def wait_idle(self, timeout: float = 10) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.client.get("/plugin/flasher/status").get_json()
            if status["state"] in ("done", "failed", "cancelled") and not self.plugin._job.running:
                return status
            time.sleep(0.02)
        raise AssertionError(f"job did not finish: {status}")

    def wait_for(self, what: str, check: Callable[[], Any], timeout: float = 5) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = check()
            if value:
                return value
            time.sleep(0.01)
        raise AssertionError(f"timed out waiting for {what}")

    def close(self) -> None:
        job = self.plugin._job
        if job is not None and job.running:
            job.cancel()
            job.wait(5)
        self.plugin.on_shutdown()


@pytest.fixture
def board() -> MemoryBoard:
    return MemoryBoard()


@pytest.fixture
def harness(tmp_path: Path, board: MemoryBoard) -> Iterator[Harness]:
    h = Harness(tmp_path, board)
    try:
        yield h
    finally:
        h.close()


@pytest.fixture
def hex_file(tmp_path: Path) -> Path:
    """A small ATmega1284P application as Intel HEX (1 KiB at address 0)."""
    from intelhex import IntelHex

    ih = IntelHex()
    ih.frombytes(bytes((i * 7) & 0xFF for i in range(1024)), offset=0)
    path = tmp_path / "marlin.hex"
    ih.write_hex_file(str(path))
    return path
