"""Fixtures for the end-to-end tests: one real OctoPrint server with the plugin installed,
HTTP sessions logged in the way a browser is (session cookie + CSRF header), a collector for
the push socket, and the simulated printer on a pty.

Everything is package scoped: starting OctoPrint costs several seconds and the simulated board
holds the machine-wide real-time lock, so the whole e2e set shares one of each, and both are
gone (lock released) before tests of other packages run.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import pytest
import requests
import websocket

from tests.conftest import REALTIME_LOCK

OCTOPRINT = Path(sys.executable).parent / "octoprint"
REPO = Path(__file__).resolve().parents[2]
DEMO_PLUGIN = REPO / "demo" / "flasher_demo_transports.py"
ADMIN = ("admin", "e2e-admin-pass")
VIEWER = ("viewer", "e2e-viewer-pass")  # in group "users": no PLUGIN_FLASHER_FLASH
PORT_GLOB_NAME = "ttyFLASHER"
SERVER_START_TIMEOUT = 90.0  # six seconds on an idle machine; the CI box is shared

CONFIG_YAML = """\
devel:
  enableRateLimiter: false
plugins:
  _disabled: [announcements, softwareupdate]
  tracking:
    enabled: false
  virtual_printer:
    enabled: false
  flasher:
    settle_delay: 0.5
serial:
  additionalPorts: ["{port_glob}"]
  autoconnect: false
server:
  firstRun: false
  onlineCheck:
    enabled: false
  pluginBlacklist:
    enabled: false
  seenWizards:
    backup: null
    corewizard: 4
    file_check: 1
    tracking: null
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def poll(what: str, check: Callable[[], Any], timeout: float, interval: float = 0.1) -> Any:
    """Call ``check`` until it returns something truthy; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = check()
        except (requests.RequestException, OSError) as exc:
            last = exc
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})"
            )
        time.sleep(interval)


@dataclass
class OctoPrintServer:
    basedir: Path
    port: int
    proc: subprocess.Popen[bytes]
    console: Path
    port_dir: Path  # serial.additionalPorts globs <port_dir>/ttyFLASHER*

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + "/" + path.lstrip("/")

    def log_tail(self, lines: int = 60) -> str:
        """The end of OctoPrint's log and of the plugin's own console log (or, if OctoPrint
        never got as far as logging, of its stdout)."""
        logs = self.basedir / "logs"
        sources = [logs / "octoprint.log", logs / "plugin_flasher_console.log"]
        if not sources[0].exists():
            sources = [self.console]
        parts = []
        for path in sources:
            if path.exists():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path.name} (last {len(text)} lines) ---\n" + "\n".join(text))
        return "\n".join(parts)


def _octoprint_cli(basedir: Path, *args: str) -> None:
    subprocess.run(
        [str(OCTOPRINT), "--basedir", str(basedir), *args],
        check=True,
        capture_output=True,
        timeout=120,
    )


_SERVER: Optional[OctoPrintServer] = None


@pytest.fixture(scope="package")
def octoprint_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OctoPrintServer]:
    """OctoPrint 1.11 serving on a free loopback port from a throw-away basedir, with the
    plugin (installed editable in .venv), an admin and a user without the flash permission."""
    global _SERVER
    basedir = tmp_path_factory.mktemp("octoprint")
    # a short directory: the port's path is what users see in the device list (screenshots)
    port_dir = Path(tempfile.mkdtemp(prefix="fl-"))
    (basedir / "config.yaml").write_text(
        CONFIG_YAML.format(port_glob=str(port_dir / (PORT_GLOB_NAME + "*")))
    )
    _octoprint_cli(basedir, "user", "add", ADMIN[0], "--password", ADMIN[1], "--admin")
    _octoprint_cli(basedir, "user", "add", VIEWER[0], "--password", VIEWER[1], "-g", "users")
    # the demo's emulated STM32F446 in ROM DFU and Katapult CAN node, as the demo installs them
    (basedir / "plugins").mkdir()
    shutil.copy(DEMO_PLUGIN, basedir / "plugins" / DEMO_PLUGIN.name)

    port = free_port()
    console = basedir / "console.log"
    with console.open("wb") as out:
        proc = subprocess.Popen(
            [str(OCTOPRINT), "--basedir", str(basedir), "serve", "--host", "127.0.0.1",
             "--port", str(port), "--iknowwhatimdoing"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "FLASHER_REPO": str(REPO)},
            start_new_session=True,
        )  # fmt: skip
    server = OctoPrintServer(basedir, port, proc, console, port_dir)
    _SERVER = server

    def online() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"OctoPrint exited with {proc.returncode}\n{server.log_tail()}")
        return requests.get(server.url("online.txt"), timeout=2).status_code == 200

    try:
        poll("OctoPrint to come online", online, SERVER_START_TIMEOUT, interval=0.25)
        yield server
    finally:
        _SERVER = None
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        shutil.rmtree(port_dir, ignore_errors=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Attach the tail of OctoPrint's log to every failing e2e test: the server side of a
    failure (a traceback in the plugin, a vetoed connect) is only visible there."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.failed and _SERVER is not None:
        report.sections.append(("octoprint.log", _SERVER.log_tail()))


class Client:
    """A ``requests`` session that behaves like OctoPrint's web UI: it fetches the CSRF cookie
    from ``/login`` and sends it back as ``X-CSRF-Token`` on every request."""

    def __init__(self, server: OctoPrintServer, csrf: bool = True) -> None:
        self.server = server
        self.session = requests.Session()
        r = self.session.get(server.url("login"), timeout=30)
        r.raise_for_status()
        self.csrf_token = self.session.cookies.get(f"csrf_token_P{server.port}")
        assert self.csrf_token, f"no CSRF cookie after GET /login: {self.session.cookies}"
        if csrf:
            self.session.headers["X-CSRF-Token"] = self.csrf_token

    def login(self, user: str, password: str) -> Client:
        r = self.post("api/login", json={"user": user, "pass": password, "remember": False})
        assert r.status_code == 200, f"login as {user} failed: {r.status_code} {r.text}"
        return self

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", 30)
        return self.session.get(self.server.url(path), **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", 60)
        return self.session.post(self.server.url(path), **kwargs)

    # -- the plugin's API --------------------------------------------------------------------

    def upload(
        self, path: Path, target: Optional[dict[str, Any]] = None, filename: Optional[str] = None
    ) -> requests.Response:
        data = {"target": json.dumps(target)} if target is not None else {}
        with path.open("rb") as fh:
            files = {"file": (filename or path.name, fh, "application/octet-stream")}
            return self.post("plugin/flasher/upload", files=files, data=data)

    def flash(
        self, image_id: str, target: dict[str, Any], backup: bool = False
    ) -> requests.Response:
        body = {"image_id": image_id, "target": target, "confirm": True, "backup": backup}
        return self.post("plugin/flasher/flash", json=body)

    def status(self) -> dict[str, Any]:
        r = self.get("plugin/flasher/status")
        assert r.status_code == 200, f"GET status: {r.status_code} {r.text}"
        result: dict[str, Any] = r.json()
        return result

    def wait_idle(self, timeout: float) -> dict[str, Any]:
        """Poll the job status until no flash runs; return the final status."""

        def idle() -> Optional[dict[str, Any]]:
            status = self.status()
            return None if job_running(status) else status

        result: dict[str, Any] = poll("the flash job to finish", idle, timeout, interval=0.25)
        return result

    def connection(self) -> dict[str, Any]:
        r = self.get("api/connection")
        assert r.status_code == 200, f"GET /api/connection: {r.status_code} {r.text}"
        current: dict[str, Any] = r.json()["current"]
        return current

    def connect_printer(self, port: str, baudrate: int) -> requests.Response:
        body = {"command": "connect", "port": port, "baudrate": baudrate,
                "printerProfile": "_default"}  # fmt: skip
        return self.post("api/connection", json=body)

    def disconnect_printer(self) -> None:
        r = self.post("api/connection", json={"command": "disconnect"})
        assert r.status_code == 204, f"disconnect: {r.status_code} {r.text}"

    # -- the demo's emulated boards (demo/flasher_demo_transports.py) -------------------------

    def demo_boards(self) -> dict[str, Any]:
        """What the emulated DFU device and CAN node are doing, from inside OctoPrint."""
        r = self.get("api/plugin/flasher_demo_transports")
        assert r.status_code == 200, f"GET demo boards: {r.status_code} {r.text}"
        state: dict[str, Any] = r.json()
        return state

    def press_dfu_reset(self) -> dict[str, Any]:
        """The DFU board's reset button with BOOT0 still fitted: it is in ROM DFU again."""
        r = self.post("api/plugin/flasher_demo_transports", json={"command": "press_dfu_reset"})
        assert r.status_code == 200, f"press_dfu_reset: {r.status_code} {r.text}"
        poll("the DFU board back in DFU", lambda: self.demo_boards()["dfu"]["mode"] == "dfu", 10)
        return self.demo_boards()

    def find_device(self, kind: str, timeout: float = 30) -> dict[str, Any]:
        """The first device of ``kind`` ("usb-dfu", "can") in the plugin's device list."""

        def listed() -> Optional[dict[str, Any]]:
            r = self.get("plugin/flasher/devices")
            assert r.status_code == 200, r.text
            return next((d for d in r.json()["devices"] if d["kind"] == kind), None)

        found: dict[str, Any] = poll(f"a {kind} device in the list", listed, timeout, 0.5)
        return found

    def wait_printer_state(self, state: str, timeout: float) -> dict[str, Any]:
        def reached() -> Optional[dict[str, Any]]:
            current = self.connection()
            return current if current.get("state") == state else None

        found: dict[str, Any] = poll(f"the printer to be {state}", reached, timeout, interval=0.25)
        return found


def page_target(device: dict[str, Any]) -> dict[str, Any]:
    """The target the settings page sends for a device picked in its list (flasher.js)."""
    target: dict[str, Any] = {"method": "auto"}
    # the page takes the method discovery knows for boards no probe can tell (RP2040, ...)
    preferred = device.get("preferred_method") or (device["kind"] != "serial" and device["method"])
    if preferred:
        target["method"] = preferred
    for key in ("port", "usb_path", "uuid"):
        if device.get(key):
            target[key] = device[key]
    if device["kind"] == "usb-dfu" and device.get("usb_id"):
        target["usb"] = device["usb_id"]
    if device.get("chip"):
        target["mcu"] = device["chip"]
    if (device.get("details") or {}).get("can_channel"):
        target["can_channel"] = device["details"]["can_channel"]
    return target


def job_running(status: dict[str, Any]) -> bool:
    """Whether ``GET status`` describes a flash in progress."""
    return bool(status["running"])


@pytest.fixture(scope="package")
def admin(octoprint_server: OctoPrintServer) -> Client:
    """Logged-in admin: has PLUGIN_FLASHER_FLASH through the admins group."""
    return Client(octoprint_server).login(*ADMIN)


@pytest.fixture(scope="package")
def viewer(octoprint_server: OctoPrintServer) -> Client:
    """Logged-in user in group ``users``: may watch the printer, may not flash."""
    return Client(octoprint_server).login(*VIEWER)


class SocketCollector:
    """Collects every frame of OctoPrint's push socket (the raw SockJS websocket) on a thread.

    Tests take a :meth:`mark` before acting and then wait for messages after it, so one
    collector serves the whole session without tests seeing each other's messages.
    """

    def __init__(self, client: Client) -> None:
        r = client.post("api/login", json={"passive": True})
        assert r.status_code == 200, f"passive login: {r.status_code} {r.text}"
        me = r.json()
        url = f"ws://127.0.0.1:{client.server.port}/sockjs/websocket"
        self.ws = websocket.create_connection(url, timeout=10)
        self.ws.send(json.dumps({"auth": f"{me['name']}:{me['session']}"}))
        self.messages: list[dict[str, Any]] = []
        self.arrived: list[float] = []  # time.monotonic() of each message, same index
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="ws-collector", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self.ws.settimeout(1.0)
        while not self._closed:
            try:
                frame = self.ws.recv()
            except websocket.WebSocketTimeoutException:
                continue
            except (websocket.WebSocketException, OSError):
                break
            if not frame:
                continue
            try:
                message = json.loads(frame)
            except ValueError:
                continue
            with self._cond:
                self.messages.append(message)
                self.arrived.append(time.monotonic())
                self._cond.notify_all()

    def close(self) -> None:
        self._closed = True
        self.ws.close()
        self._thread.join(timeout=5)

    def mark(self) -> int:
        with self._cond:
            return len(self.messages)

    def since(self, mark: int) -> list[dict[str, Any]]:
        with self._cond:
            return list(self.messages[mark:])

    def flasher(self, mark: int) -> list[dict[str, Any]]:
        """The plugin's own messages (``send_plugin_message`` payloads) since ``mark``."""
        return [
            m["plugin"]["data"]
            for m in self.since(mark)
            if isinstance(m.get("plugin"), dict) and m["plugin"].get("plugin") == "flasher"
        ]

    def flasher_times(self, mark: int) -> list[float]:
        """Arrival times of the plugin's messages since ``mark`` (to check the rate limit)."""
        with self._cond:
            pairs = list(zip(self.messages[mark:], self.arrived[mark:]))
        return [
            t
            for m, t in pairs
            if isinstance(m.get("plugin"), dict) and m["plugin"].get("plugin") == "flasher"
        ]

    def events(self, mark: int) -> list[dict[str, Any]]:
        return [m["event"] for m in self.since(mark) if isinstance(m.get("event"), dict)]

    def terminal(self, mark: int) -> list[str]:
        """Terminal lines OctoPrint pushed (``current.logs``): what the printer said and got."""
        lines: list[str] = []
        for m in self.since(mark):
            for key in ("current", "history"):
                if isinstance(m.get(key), dict):
                    lines.extend(str(x) for x in m[key].get("logs", []))
        return lines

    def wait_for(self, what: str, found: Callable[[], Any], timeout: float) -> Any:
        """Wait until ``found()`` (evaluated over the collected messages) is truthy."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                result = found()
                if result:
                    return result
                left = deadline - time.monotonic()
                if left <= 0 or (self._closed or not self._thread.is_alive()):
                    raise AssertionError(f"no {what} on the socket within {timeout:.0f} s")
                self._cond.wait(min(left, 0.5))


@pytest.fixture(scope="package")
def admin_socket(admin: Client) -> Iterator[SocketCollector]:
    collector = SocketCollector(admin)
    # The server sends "connected" first; wait so no early message is lost to a slow auth.
    collector.wait_for(
        "connected frame", lambda: any("connected" in m for m in collector.messages), 30
    )
    yield collector
    collector.close()


@pytest.fixture(scope="package")
def package_realtime_lock() -> Iterator[None]:
    """The machine-wide real-time lock (see tests/conftest.py), held while the e2e package runs
    because the simulated printer lives that long. Package scope matters: a session-scoped
    hold would deadlock the next package's function-scoped ``realtime_lock`` (flock)."""
    REALTIME_LOCK.touch(exist_ok=True)
    with REALTIME_LOCK.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# -- the simulated printer ---------------------------------------------------------------------

BOARD_CONFIG = "m1284p-optiboot-115200"
MCU = "atmega1284p"


@dataclass
class SimPrinter:
    """The simulated ATmega1284P printer as the tests see it: where it is and what it runs."""

    board: Any  # tests.emulators.simboard.SimBoard
    port: str
    baud: int
    old_name: str = "E2E-Old"
    new_name: str = "E2E-New"
    busy_name: str = "E2E-Busy"
    browser_name: str = "E2E-Browser"

    @property
    def target(self) -> dict[str, Any]:
        """The target a user picks for this board: optiboot speaks STK500v1 at 115200."""
        return {"method": "stk500v1", "port": self.port, "baud": self.baud}


@pytest.fixture(scope="package")
def printer(package_realtime_lock: None, octoprint_server: OctoPrintServer) -> Iterator[SimPrinter]:
    """Real optiboot in simavr on a pty linked into the glob OctoPrint lists as serial ports,
    with the test firmware "E2E-Old" answering like a printer."""
    from tests.emulators.simboard import SimBoard, build_test_firmware

    old = build_test_firmware(MCU, SimPrinter.old_name)
    link = octoprint_server.port_dir / (PORT_GLOB_NAME + "0")
    board = SimBoard(BOARD_CONFIG, app_hex=old, port_link=link)
    board.start()
    try:
        yield SimPrinter(board=board, port=str(link), baud=115200)
    finally:
        board.stop()


@pytest.fixture(scope="package")
def new_firmware() -> Path:
    """About 4 KiB: small enough to flash in seconds, several optiboot pages to show progress."""
    from tests.emulators.simboard import build_test_firmware

    path: Path = build_test_firmware(MCU, SimPrinter.new_name, size=4096)
    return path


@pytest.fixture(scope="package")
def big_firmware() -> Path:
    """16 KiB, so a flash lasts long enough to be interfered with from a second request."""
    from tests.emulators.simboard import build_test_firmware

    path: Path = build_test_firmware(MCU, SimPrinter.busy_name, size=16 * 1024)
    return path


@pytest.fixture(scope="package")
def browser_firmware(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The file a user would pick, under a readable name (it shows in the screenshots)."""
    from tests.emulators.simboard import build_test_firmware

    built = build_test_firmware(MCU, SimPrinter.browser_name, size=4096)
    path = tmp_path_factory.mktemp("upload") / "printer-firmware-1284p.hex"
    shutil.copyfile(built, path)
    return path


@pytest.fixture(scope="package")
def oversized_firmware(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Mega 2560 build of 140 KiB: more than the 1284P's whole 128 KiB flash."""
    from tests.emulators.simboard import build_test_firmware

    built = build_test_firmware("atmega2560", "E2E-Mega", size=140 * 1024)
    path = tmp_path_factory.mktemp("upload-mega") / "mega2560-firmware.hex"
    shutil.copyfile(built, path)
    return path


@pytest.fixture(scope="package")
def demo_samples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The demo's sample files (demo/run_demo.py make_samples), by file name."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_demo", REPO / "demo" / "run_demo.py")
    assert spec is not None and spec.loader is not None
    run_demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_demo)
    paths = run_demo.make_samples(tmp_path_factory.mktemp("demo-samples")).values()
    return {path.name: path for path in paths}


# -- the second printer: a 32-bit Marlin board that updates from its SD card (issue 11) --------

CREALITY_LINK_NAME = PORT_GLOB_NAME + "1"


def load_run_demo() -> Any:
    """demo/run_demo.py as a module (the demo is a script, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_demo", REPO / "demo" / "run_demo.py")
    assert spec is not None and spec.loader is not None
    run_demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_demo)
    return run_demo


@pytest.fixture(scope="module")
def creality_printer(
    package_realtime_lock: None,
    octoprint_server: OctoPrintServer,
    admin: Client,
    printer: SimPrinter,
) -> Iterator[Any]:
    """The demo's Ender-3 V2-style printer (tests.emulators.marlin_printer, started by the
    demo's own function) on <port_dir>/ttyFLASHER1, fresh for each module: Marlin 2.1.2.7
    with BINARY_FILE_TRANSFER, M997, an empty SD card and Creality's bootloader. Afterwards
    OctoPrint is connected to the AVR printer again, as the other e2e tests expect."""
    run_demo = load_run_demo()
    link = octoprint_server.port_dir / CREALITY_LINK_NAME
    board = run_demo.start_creality_printer(link)
    try:
        yield board
    finally:
        try:
            admin.wait_idle(timeout=180)
            if admin.connection().get("port") != printer.port:
                admin.connect_printer(printer.port, printer.baud)
                admin.wait_printer_state("Operational", timeout=60)
        finally:
            run_demo.stop_creality_printer(board, link)


@pytest.fixture(scope="module")
def mk3s(
    package_realtime_lock: None,
    octoprint_server: OctoPrintServer,
    admin: Client,
    printer: SimPrinter,
) -> Iterator[tuple[Any, str]]:
    """The demo's Prusa MK3S (tests.emulators.prusa_einsy, started by the demo's own function)
    on its pty link <port_dir>/ttyFLASHER2, fresh for each module, with the board's port.
    Afterwards OctoPrint is connected to the AVR printer again, as the other e2e tests expect."""
    run_demo = load_run_demo()
    link = octoprint_server.port_dir / run_demo.PRUSA_LINK_NAME
    board = run_demo.start_prusa_printer(link)
    try:
        yield board, str(link)
    finally:
        try:
            admin.wait_idle(timeout=180)
            if admin.connection().get("port") != printer.port:
                if admin.connection()["state"] != "Closed":
                    admin.disconnect_printer()
                    admin.wait_printer_state("Closed", timeout=30)
                admin.connect_printer(printer.port, printer.baud)
                admin.wait_printer_state("Operational", timeout=60)
        finally:
            run_demo.stop_prusa_printer(board, link)


_FILE_ORDER = (
    "test_http_flow.py",
    "test_security.py",
    "test_demo_boards.py",
    "test_browser.py",
    "test_browser_newcomer.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the e2e files in story order on the one shared board: the HTTP flow first (it
    expects the board's initial firmware), the browser last (its error case may leave the
    printer disconnected). Other packages' items keep their slots."""
    here = Path(__file__).parent
    slots = [i for i, item in enumerate(items) if Path(str(item.fspath)).parent == here]
    ours = [items[i] for i in slots]

    def rank(item: pytest.Item) -> int:
        name = Path(str(item.fspath)).name
        return _FILE_ORDER.index(name) if name in _FILE_ORDER else len(_FILE_ORDER)

    for slot, item in zip(slots, sorted(ours, key=rank)):
        items[slot] = item
