"""The plugin's HTTP routes and its push channel to the browser.

Routes are a mixin the plugin class inherits, so ``__init__`` stays a list of mixins and hooks.
Every route needs the FLASH permission; errors are JSON ``{"error", "cause", "hint", "kind"}``
built from the :mod:`errors` hierarchy so the page can show what happened and what to do. The
routes only translate HTTP to the core (``Store``, ``FlashJob``, ``discovery``, ``preflight``);
they know no protocol bytes.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import flask
import octoprint.plugin
from flask_babel import gettext
from octoprint.access.permissions import Permissions

from ..errors import BusyError, FlashError, ImageError, UnsupportedError
from ..target import METHODS, Target
from .settings import max_upload_bytes

UPLOAD_FIELD = "file"
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._+-]+")
_USB_ID = re.compile(r"^[0-9a-fA-F]{4}:[0-9a-fA-F]{4}$")
_UUID = re.compile(r"^[0-9a-fA-F]{12}$")


class RequestError(FlashError):
    """The request itself is wrong (missing field, bad target value)."""

    kind = "request"


class NotFoundError(FlashError):
    """An image or history record the request names does not exist (any more)."""

    kind = "not_found"


def error_response(exc: FlashError, status: int) -> flask.Response:
    body = {"error": exc.message, "cause": exc.cause, "hint": exc.hint, "kind": exc.kind}
    response = flask.jsonify(body)
    response.status_code = status
    return response


def status_for(exc: FlashError) -> int:
    """HTTP status for an error raised by the core."""
    if isinstance(exc, BusyError):
        return 409
    if isinstance(exc, NotFoundError):
        return 404
    if isinstance(exc, (ImageError, RequestError, UnsupportedError)):
        return 400
    return 500


def safe_filename(name: str) -> str:
    """A file name without directories or shell-hostile characters, keeping the extension."""
    base = Path(str(name).replace("\\", "/")).name
    cleaned = _SAFE_NAME.sub("_", base).strip("._") or "firmware"
    return cleaned[:120]


def parse_address(value: Any) -> Optional[int]:
    if value is None or value == "":
        return None
    try:
        number = value if isinstance(value, int) and not isinstance(value, bool) else None
        if number is None:
            number = int(str(value).strip(), 0)
    except ValueError:
        raise RequestError(
            f"The address {value!r} is not a number.",
            hint="Write it in hex like 0x08002000, or leave it empty for the chip's default.",
        ) from None
    if number < 0 or number >= 1 << 32:
        raise RequestError(f"The address {value!r} is outside the 32-bit address space.")
    return number


def _positive_int(value: Any, name: str) -> Optional[int]:
    if value is None or value == "" or value == 0:
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise RequestError(f"The {name} {value!r} is not a whole number.") from None
    if number <= 0:
        raise RequestError(f"The {name} must be positive, not {number}.")
    return number


#: marlin-sd choices the page may send
SD_OPTIONS = ("sd_family", "sd_filename")
#: methods that reach a board by USB id or path as well as by port
USB_METHODS = ("picoboot", "avr109", "prusa")


def target_from_json(
    data: Any, defaults: dict[str, Any], transports: Optional[dict[str, Any]] = None
) -> Target:
    """Build a :class:`Target` from the browser's JSON, filling gaps from the settings.

    ``transports`` are the demo/test links other plugins offer through the
    ``octoprint.plugin.flasher.transports`` hook (an emulated USB backend, a CAN bus factory).
    """
    if data is None:
        data = {}
    if isinstance(data, str):
        try:
            data = json.loads(data) if data.strip() else {}
        except ValueError:
            raise RequestError("The target is not valid JSON.") from None
    if not isinstance(data, dict):
        raise RequestError("The target must be a JSON object.")
    method = str(data.get("method") or defaults.get("method") or "auto").strip().lower()
    if method not in METHODS:
        raise RequestError(
            f"Unknown flashing method {method!r}.",
            hint="Choose one of: " + ", ".join(METHODS),
        )
    port = str(data.get("port") or "").strip() or None
    if port and not port.startswith("/") and port.upper() != "VIRTUAL":
        raise RequestError(
            f"The port {port!r} is not an absolute device path.",
            cause="A serial port on Linux is a path like /dev/ttyUSB0 or /dev/serial/by-id/...",
            hint="Pick the device from the list, or type the full path.",
        )
    if port and port.upper() == "VIRTUAL":
        raise RequestError(
            "OctoPrint's virtual printer cannot be flashed.",
            hint="Pick the serial port of the real board.",
        )
    usb = str(data.get("usb") or "").strip() or None
    if usb and not _USB_ID.match(usb):
        raise RequestError(f"The USB id {usb!r} is not VID:PID (like 0483:df11).")
    uuid = str(data.get("uuid") or "").strip().lower() or None
    if uuid and not _UUID.match(uuid):
        raise RequestError(
            f"The CAN UUID {uuid!r} is not 12 hex digits.",
            hint="Use the UUID shown by the device list (like 0e2f3a4b5c6d).",
        )
    stk = defaults.get("stk500") or {}
    dfu = defaults.get("dfu") or {}
    kat = defaults.get("katapult") or {}
    baud = _positive_int(data.get("baud"), "baud rate")
    if baud is None and method in ("auto", "stk500v1", "stk500v2"):
        baud = _positive_int(stk.get("baud"), "baud rate")
    address = parse_address(data.get("address"))
    if address is None and method == "dfu":
        address = parse_address(dfu.get("address"))
    target = Target(
        method=method,
        port=port,
        baud=baud,
        mcu=str(data.get("mcu") or "").strip() or None,
        address=address,
        usb=usb,
        usb_path=str(data.get("usb_path") or "").strip() or None,
        can_interface=str(data.get("can_interface") or kat.get("can_interface") or "socketcan"),
        can_channel=str(data.get("can_channel") or kat.get("can_channel") or "can0"),
        can_bitrate=_positive_int(data.get("can_bitrate") or kat.get("can_bitrate"), "bitrate"),
        uuid=uuid,
        quick=None if data.get("quick") is None else bool(data.get("quick")),
        allow_bootloader_erase=bool(data.get("allow_bootloader_erase", False)),
    )
    for key in SD_OPTIONS:  # marlin-sd: which SD bootloader, which file name
        value = str(data.get(key) or "").strip()
        if value:
            target.options[key] = value
    if method in USB_METHODS and not port and not (usb or target.usb_path):
        raise RequestError(
            f"The {method} method needs a USB device or its serial port.",
            hint="Pick the board from the device list.",
        )
    if method not in ("auto", "dfu", "katapult", *USB_METHODS) and not port:
        raise RequestError(
            f"The {method} method needs a serial port.",
            hint="Pick the printer's port from the device list or type it.",
        )
    apply_transports(target, transports or {})
    return target


def apply_transports(target: Target, transports: dict[str, Any]) -> None:
    """Route a target through transports a demo plugin injected, when the target wants them."""
    backend = transports.get("usb_backend")
    wants_usb = target.method == "picoboot" or (
        target.method in ("auto", "dfu") and not target.port
    )
    if backend is not None and wants_usb:
        target.usb_backend = backend
    factory = transports.get("can_bus_factory")
    if factory is not None and target.method in ("auto", "katapult") and not target.port:
        channel = transports.get("can_channel")
        if channel is None or channel == target.can_channel or target.uuid:
            target.can_bus_factory = factory
            target.can_interface = str(transports.get("can_interface", "virtual"))
            if channel:
                target.can_channel = str(channel)
    lister = transports.get("list_ports")
    if callable(lister) and target.method in ("auto", "avr109", "prusa"):
        # a USB serial board that re-enumerates (MMU's 1200-baud touch) is followed with it
        target.options["list_ports"] = lister


def target_to_json(target: Target) -> dict[str, Any]:
    """The part of a target worth remembering for a re-flash (no live transport objects)."""
    keep = (
        "method", "port", "baud", "mcu", "address", "usb", "usb_path", "can_interface",
        "can_channel", "can_bitrate", "uuid", "quick",
    )  # fmt: skip
    return {k: getattr(target, k) for k in keep}


def image_json(stored: Any) -> dict[str, Any]:
    """The upload answer's ``image``: the stored image's summary plus its id."""
    summary = getattr(stored, "summary", None)
    data = dict(summary() if callable(summary) else summary or {})
    data["id"] = stored.id
    for key in ("filename", "sha256", "size"):
        if key not in data and hasattr(stored, key):
            data[key] = getattr(stored, key)
    return data


def report_json(report: Any) -> dict[str, Any]:
    """A preflight report as ``{"ok", "errors": [...], "warnings": [...]}``."""
    errors = [
        e.to_dict() if isinstance(e, FlashError) else dict(e) for e in getattr(report, "errors", [])
    ]
    warnings = [str(w) for w in getattr(report, "warnings", [])]
    facts = getattr(report, "facts", {}) or {}
    ok = bool(getattr(report, "ok", not errors)) and not errors
    return {"ok": ok, "errors": errors, "warnings": warnings, "facts": _jsonable(facts)}


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def expand_port_globs(patterns: list[str]) -> list[str]:
    """Port names from glob patterns (OctoPrint's ``serial.additionalPorts`` style)."""
    ports: list[str] = []
    for pattern in patterns:
        for name in sorted(glob.glob(pattern)):
            if name not in ports:
                ports.append(name)
    return ports


KEPT_UPLOADS = 20


def prune_uploads(store: Any, keep: int = KEPT_UPLOADS) -> list[str]:
    """Remove the oldest uploads beyond ``keep``: every target change re-checks the file as a
    new upload, and a failed flash keeps its image, so without a bound they pile up. Backups
    are never pruned (they are the way back)."""
    uploads = [img for img in store.images() if not getattr(img, "backup", False)]
    removed = []
    for img in uploads[: max(0, len(uploads) - keep)]:
        store.remove_image(img.id)
        removed.append(img.id)
    return removed


class MessageThrottle:
    """Sends at most one plugin message per ``interval`` without losing meaning.

    Progress updates collapse to the newest and log lines join into one message, but a state
    change or a result is never merged away: the queue only merges within the stretch after
    the last queued state/result, so the browser sees every stage in order.
    """

    def __init__(
        self,
        send: Callable[[dict[str, Any]], None],
        interval: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._send = send
        self.interval = interval
        self._clock = clock
        self._queue: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._last = float("-inf")
        self._stopped = False
        self._thread: Optional[threading.Thread] = None

    def push(self, message: dict[str, Any]) -> None:
        with self._cond:
            kind = message.get("type")
            tail = self._mergeable_tail()
            if kind == "progress":
                for i, queued in enumerate(tail):
                    if queued.get("type") == "progress":
                        self._queue[len(self._queue) - len(tail) + i] = dict(message)
                        break
                else:
                    self._queue.append(dict(message))
            elif kind == "log" and any(q.get("type") == "log" for q in tail):
                queued = next(q for q in tail if q.get("type") == "log")
                queued["lines"].extend(message.get("lines", []))
                queued["line"] = "\n".join(queued["lines"])
            else:
                item = dict(message)
                if kind == "log":
                    item["lines"] = list(item.get("lines", []))
                self._queue.append(item)
            self._cond.notify()

    def _mergeable_tail(self) -> list[dict[str, Any]]:
        for i in range(len(self._queue) - 1, -1, -1):
            if self._queue[i].get("type") in ("state", "result"):
                return self._queue[i + 1 :]
        return self._queue

    def pump(self) -> bool:
        """Send the next message if one is due; True if something was sent."""
        with self._cond:
            if not self._queue or self._clock() - self._last < self.interval:
                return False
            message = self._queue.pop(0)
            self._last = self._clock()
        self._send(message)
        return True

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="flasher-push", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop sending; whatever is still queued is dropped (nobody is listening any more)."""
        with self._cond:
            self._stopped = True
            self._queue.clear()
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=2)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    return
                wait = self._last + self.interval - self._clock()
            if wait > 0:
                with self._cond:
                    self._cond.wait(wait)  # stop() wakes us early
                continue
            try:
                self.pump()
            except Exception:  # a broken socket must not kill the channel
                time.sleep(self.interval)


class TargetMemory:
    """Remembers which target each image was flashed to, so history can re-flash it.

    The job's history records describe the target as text; a re-flash needs the fields. Kept
    as JSON in the data folder, keyed by image id (at start) and by history record id (when the
    job reports its result), so it survives restarts and image removal.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._data: dict[str, dict[str, Any]] = {"images": {}, "records": {}}
        try:
            loaded = json.loads(path.read_text())
            if isinstance(loaded, dict):
                self._data["images"].update(loaded.get("images") or {})
                self._data["records"].update(loaded.get("records") or {})
        except (OSError, ValueError):
            pass

    def remember_image(self, image_id: str, target: dict[str, Any]) -> None:
        with self._lock:
            self._data["images"][image_id] = target
            self._save()

    def remember_record(self, record_id: str, image_id: str) -> None:
        with self._lock:
            target = self._data["images"].get(image_id)
            if target is not None:
                self._data["records"][record_id] = target
                self._save()

    def get(self, record: dict[str, Any]) -> Optional[dict[str, Any]]:
        with self._lock:
            found = self._data["records"].get(str(record.get("id")))
            if found is None and record.get("image_id"):
                found = self._data["images"].get(str(record.get("image_id")))
            return dict(found) if found else None

    def _save(self) -> None:
        tmp = self._path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._data, indent=1, sort_keys=True))
        tmp.replace(self._path)


class FlasherApi(octoprint.plugin.BlueprintPlugin):
    """Blueprint routes under ``/plugin/flasher/``; state lives on the plugin instance."""

    # set by the plugin in initialize(); typed loosely to keep the core imports lazy
    _job: Any
    _store: Any
    _host: Any
    _targets: Any

    def is_blueprint_protected(self) -> bool:
        return False  # every route checks the FLASH permission itself

    def is_blueprint_csrf_protected(self) -> bool:
        return True

    # provided by the plugin class
    flasher_defaults: Callable[[], dict[str, Any]]
    flasher_transports: Callable[[], dict[str, Any]]
    flasher_start: Callable[[str, Target, bool], None]
    flasher_printer_facts: Callable[[], dict[str, Any]]
    flasher_rescue: Callable[[str], str]

    # -- routes ---------------------------------------------------------------------------

    @octoprint.plugin.BlueprintPlugin.route("/upload", methods=["POST"])
    @Permissions.PLUGIN_FLASHER_FLASH.require(403)
    def upload(self) -> Any:
        from .. import methods
        from ..image import cortex_m
        from ..preflight import check_offline

        suffixes = self._settings.global_get(["server", "uploads"]) or {}
        path_key = UPLOAD_FIELD + "." + str(suffixes.get("pathSuffix") or "path")
        name_key = UPLOAD_FIELD + "." + str(suffixes.get("nameSuffix") or "name")
        values = flask.request.values
        if path_key not in values:
            return error_response(
                RequestError(
                    gettext("No firmware file was uploaded."),
                    hint=gettext("Choose a .hex, .bin, .dfu or .uf2 file and upload it again."),
                ),
                400,
            )
        try:
            target = target_from_json(values.get("target"), self.flasher_defaults())
            max_size = max_upload_bytes(self._settings.get(["max_upload_mb"]))
            try:
                size = Path(values[path_key]).stat().st_size
            except OSError as exc:
                raise RequestError(
                    f"The uploaded file could not be read ({exc.strerror}).",
                    hint="Upload it again.",
                ) from None
            if size > max_size:
                raise ImageError(
                    f"The file is {size} bytes, more than the {max_size} bytes allowed.",
                    hint="Raise the upload limit in the Firmware Updater settings if this "
                    "really is a firmware file.",
                )
            # Store copies the file: OctoPrint deletes its temporary upload after this request.
            stored = self._store.add_image(
                Path(values[path_key]),
                safe_filename(values.get(name_key) or "firmware"),
                base_address=target.address,
            )
            if not self._job.running:  # never pull an image from under a running flash
                prune_uploads(self._store)
            image = cortex_m.place(self._store.load_image(stored.id), target.address)
            target = methods.resolve_method(target, image)
            report = check_offline(image, mcu_name=target.mcu, method=target.method)
            if report.ok:  # the method's own image checks, as the job runs them before touching
                try:
                    report.warnings += methods.check_image(target, image)
                except FlashError as exc:
                    report.fail(exc)
            if image.address_given:
                report.facts["written_at"] = f"0x{image.start:08X}"
        except FlashError as exc:
            return error_response(exc, status_for(exc))
        return flask.jsonify({"image": image_json(stored), "preflight": report_json(report)})

    @octoprint.plugin.BlueprintPlugin.route("/flash", methods=["POST"])
    @Permissions.PLUGIN_FLASHER_FLASH.require(403)
    def flash(self) -> Any:
        data = flask.request.get_json(silent=True)
        if not isinstance(data, dict):
            return error_response(RequestError("Send the flash request as a JSON object."), 400)
        image_id = str(data.get("image_id") or "")
        try:
            if not image_id:
                raise RequestError("No image_id given.", hint="Upload the firmware file first.")
            target = target_from_json(
                data.get("target"), self.flasher_defaults(), self.flasher_transports()
            )
            if target.allow_bootloader_erase and not data.get("confirm"):
                raise RequestError(
                    "Writing over the bootloader needs an explicit confirmation.",
                    hint="Confirm the warning in the dialog, or build the image with the "
                    "bootloader offset.",
                )
            self._require_image(image_id)
            target.printer_port = bool(data.get("printer_board")) or self._is_printer_port(
                target.port
            )
            backup = data.get("backup")
            if backup is None:
                backup = bool(self._settings.get_boolean(["backup_before_flash"]))
            self.flasher_start(image_id, target, bool(backup))
        except FlashError as exc:
            return error_response(exc, status_for(exc))
        return flask.jsonify({"status": self._job.status()}), 202

    def _is_printer_port(self, port: Optional[str]) -> bool:
        """Whether ``port`` is the printer's own: the port OctoPrint is connected to, or the one
        it connects to by default. Only then does a flash disconnect the printer."""
        if not port:
            return False
        ours = [self._printer.get_current_connection()[1]]
        ours.append(self._settings.global_get(["serial", "port"]))
        remembered = getattr(getattr(self, "_host", None), "remembered", None)
        ours.append(getattr(remembered, "port", None))  # the last connection a flash restored
        real = os.path.realpath(port)
        return any(p and (p == port or os.path.realpath(str(p)) == real) for p in ours)

    @octoprint.plugin.BlueprintPlugin.route("/cancel", methods=["POST"])
    @Permissions.PLUGIN_FLASHER_FLASH.require(403)
    def cancel(self) -> Any:
        if not self._job.running:
            return error_response(
                BusyError("No flash is running, so there is nothing to cancel."), 409
            )
        self._job.cancel()
        return flask.jsonify({"status": self._job.status()})

    @octoprint.plugin.BlueprintPlugin.route("/rescue", methods=["POST"])
    @Permissions.PLUGIN_FLASHER_FLASH.require(403)
    def rescue(self) -> Any:
        """Get a Marlin printer out of binary file-transfer mode (a host that died mid-upload
        leaves it deaf to G-code until it is power-cycled)."""
        data = flask.request.get_json(silent=True) or {}
        port = str(data.get("port") or "").strip()
        try:
            if not port.startswith("/"):
                raise RequestError(
                    "Give the printer's serial port.", hint="Pick it from the device list."
                )
            if self._job.running:
                raise BusyError("A flash is running.", hint="Wait for it to finish first.")
            said = self.flasher_rescue(port)
        except FlashError as exc:
            return error_response(exc, status_for(exc))
        return flask.jsonify({"message": said})

    @octoprint.plugin.BlueprintPlugin.route("/status", methods=["GET"])
    @Permissions.PLUGIN_FLASHER_FLASH.require(403)
    def status(self) -> Any:
        return flask.jsonify(_jsonable(self._job.status()))

    @octoprint.plugin.BlueprintPlugin.route("/devices", methods=["GET"])
    @Permissions.PLUGIN_FLASHER_FLASH.require(403)
    def devices(self) -> Any:
        from .. import discovery

        transports = self.flasher_transports()
        patterns = list(self._settings.global_get(["serial", "additionalPorts"]) or [])
        patterns += list(self._settings.get(["extra_port_globs"]) or [])
        args = flask.request.args
        want_can = args.get("can", "") in ("1", "true") or bool(transports.get("can_bus_factory"))
        probe = args.get("probe", "") in ("1", "true")
        if probe and (self._job.running or self._printer.is_printing()):
            return error_response(
                BusyError(
                    "Probing resets the boards, so it is not done while printing or flashing.",
                    hint="Wait until the printer is idle, then refresh with probing again.",
                ),
                409,
            )
        katapult = self._settings.get(["katapult"]) or {}
        try:
            found = discovery.discover(
                can=want_can,
                probe=probe,
                usb_backend=transports.get("usb_backend"),
                can_bus_factory=transports.get("can_bus_factory"),
                can_interface=str(
                    transports.get("can_interface") or katapult.get("can_interface") or "socketcan"
                ),
                can_channel=str(
                    transports.get("can_channel") or katapult.get("can_channel") or "can0"
                ),
                extra_ports=expand_port_globs(patterns),
                port_lister=transports.get("list_ports"),
            )
        except FlashError as exc:
            return error_response(exc, status_for(exc))
        printer_port = self._printer.get_current_connection()[1]
        devices = []
        for device in found:
            data = _jsonable(device.to_dict())
            data["printer"] = bool(printer_port and device.port == printer_port)
            if data["printer"]:
                data.update(self.flasher_printer_facts())
            devices.append(data)
        warnings = [str(w) for w in found.warnings]
        return flask.jsonify({"devices": devices, "warnings": warnings})

    @octoprint.plugin.BlueprintPlugin.route("/history", methods=["GET"])
    @Permissions.PLUGIN_FLASHER_FLASH.require(403)
    def history(self) -> Any:
        records = [_jsonable(r) for r in self._store.history()]
        kept = {img.id for img in self._store.images()}
        for record in records:
            record["can_reflash"] = bool(
                record.get("image_id") in kept and self._targets.get(record)
            )
            record["can_rollback"] = bool(
                record.get("backup_id") in kept and self._targets.get(record)
            )
        images = [image_json(img) for img in self._store.images()]
        return flask.jsonify({"history": records, "images": images})

    @octoprint.plugin.BlueprintPlugin.route("/history/<record_id>/reflash", methods=["POST"])
    @Permissions.PLUGIN_FLASHER_FLASH.require(403)
    def reflash(self, record_id: str) -> Any:
        return self._flash_from_history(record_id, "image_id")

    @octoprint.plugin.BlueprintPlugin.route("/history/<record_id>/rollback", methods=["POST"])
    @Permissions.PLUGIN_FLASHER_FLASH.require(403)
    def rollback(self, record_id: str) -> Any:
        return self._flash_from_history(record_id, "backup_id")

    def _flash_from_history(self, record_id: str, key: str) -> Any:
        try:
            record = next((r for r in self._store.history() if str(r.get("id")) == record_id), None)
            if record is None:
                raise NotFoundError(f"There is no flash {record_id!r} in the history.")
            image_id = record.get(key)
            what = "backup" if key == "backup_id" else "firmware image"
            if not image_id:
                raise NotFoundError(
                    f"No {what} was kept for this flash.",
                    cause="Images are removed after a successful flash; backups exist only "
                    "when 'backup before flash' was on.",
                    hint="Upload the file again.",
                )
            remembered = self._targets.get(record)
            if not remembered:
                raise NotFoundError(
                    "The target of this flash is not known any more.",
                    hint="Upload the file again and pick the device.",
                )
            self._require_image(str(image_id))
            target = target_from_json(
                remembered, self.flasher_defaults(), self.flasher_transports()
            )
            self.flasher_start(str(image_id), target, False)
        except FlashError as exc:
            return error_response(exc, status_for(exc))
        return flask.jsonify({"status": self._job.status()}), 202

    def _require_image(self, image_id: str) -> None:
        if image_id not in {img.id for img in self._store.images()}:
            raise NotFoundError(
                f"There is no uploaded image {image_id!r}.",
                cause="It was flashed successfully (and then removed) or never uploaded.",
                hint="Upload the firmware file again.",
            )
