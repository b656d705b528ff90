"""The plugin's settings: defaults, version and migration, free of OctoPrint imports.

Settings hold only what a user chooses (method, per-method link options, safety switches);
volatile state (kept images, history) lives in the plugin's data folder so that saving a flash
does not change the UI cache hash. Migration also *repairs* hand-edited values, because a
config.yaml typo must never turn into a surprising flash target.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

from ..target import METHODS

SETTINGS_VERSION = 2

MIB = 1024 * 1024

DEFAULTS: dict[str, Any] = {
    "method": "auto",
    "last_port": "",
    "stk500": {"baud": 0},  # 0: try the usual bootloader rates
    "dfu": {"address": ""},  # "": the chip's default application address
    "katapult": {"can_interface": "socketcan", "can_channel": "can0", "can_bitrate": 0},
    "max_upload_mb": 16,
    "backup_before_flash": False,
    "reconnect_after_flash": True,
    "reconnect_timeout": 30,
    "pre_gcode": "M104 S0\nM140 S0",
    "post_gcode": "",
    "settle_delay": 2.0,
    "extra_port_globs": [],
}

_LIMITS = {
    "max_upload_mb": (1, 256),
    "reconnect_timeout": (5, 600),
    "settle_delay": (0.0, 60.0),
}


def defaults() -> dict[str, Any]:
    """A deep copy, so callers may mutate it."""
    return copy.deepcopy(DEFAULTS)


def max_upload_bytes(value: Any) -> int:
    """The upload limit in bytes from the ``max_upload_mb`` setting, clamped to sane bounds."""
    lo, hi = _LIMITS["max_upload_mb"]
    return int(_clamp(_number(value, DEFAULTS["max_upload_mb"]), lo, hi) * MIB)


def migrate(stored: Optional[dict[str, Any]], current: Optional[int]) -> dict[str, Any]:
    """Bring stored settings of version ``current`` (None: unversioned) to SETTINGS_VERSION.

    Version 1 kept the link options flat (``baud``, ``can_channel``, ``dfu_address``,
    ``max_size_kb``, ``gcode_before``/``gcode_after`` and ``reconnect`` as a string); version 2
    groups them per method. Every version is then normalised: unknown methods fall back to
    ``auto``, numbers are parsed and clamped, G-code is text, port globs are a list of strings.
    The result holds every current key and nothing else; callers drop stored keys it lacks.
    """
    data = copy.deepcopy(stored or {})
    if current is None or current < 2:
        data = _from_v1(data)
    return _normalise(data)


def _from_v1(data: dict[str, Any]) -> dict[str, Any]:
    out = dict(data)
    if "baud" in out:
        out.setdefault("stk500", {})["baud"] = out.pop("baud")
    if "dfu_address" in out:
        out.setdefault("dfu", {})["address"] = out.pop("dfu_address")
    for key in ("can_interface", "can_channel", "can_bitrate"):
        if key in out:
            out.setdefault("katapult", {})[key] = out.pop(key)
    if "max_size_kb" in out:
        kb = _number(out.pop("max_size_kb"), DEFAULTS["max_upload_mb"] * 1024)
        out["max_upload_mb"] = max(1, -(-int(kb) // 1024))
    if "gcode_before" in out:
        out["pre_gcode"] = out.pop("gcode_before")
    if "gcode_after" in out:
        out["post_gcode"] = out.pop("gcode_after")
    if "reconnect" in out:
        out["reconnect_after_flash"] = out.pop("reconnect")
    return out


def _normalise(data: dict[str, Any]) -> dict[str, Any]:
    out = defaults()
    method = str(data.get("method", "auto")).strip().lower()
    out["method"] = method if method in METHODS else "auto"
    out["last_port"] = str(data.get("last_port") or "").strip()

    stk = _section(data, "stk500")
    out["stk500"]["baud"] = max(0, int(_number(stk.get("baud"), 0)))
    dfu = _section(data, "dfu")
    out["dfu"]["address"] = _address_text(dfu.get("address"))
    kat = _section(data, "katapult")
    out["katapult"]["can_interface"] = str(kat.get("can_interface") or "socketcan").strip()
    out["katapult"]["can_channel"] = str(kat.get("can_channel") or "can0").strip()
    out["katapult"]["can_bitrate"] = max(0, int(_number(kat.get("can_bitrate"), 0)))

    for key, (lo, hi) in _LIMITS.items():
        value = _clamp(_number(data.get(key), DEFAULTS[key]), lo, hi)
        out[key] = int(value) if isinstance(DEFAULTS[key], int) else float(value)
    for key in ("backup_before_flash", "reconnect_after_flash"):
        out[key] = _boolean(data.get(key), DEFAULTS[key])
    for key in ("pre_gcode", "post_gcode"):
        out[key] = _gcode_text(data.get(key, DEFAULTS[key]))
    globs = data.get("extra_port_globs") or []
    if isinstance(globs, str):
        globs = globs.replace(",", "\n").splitlines()
    out["extra_port_globs"] = [str(g).strip() for g in globs if str(g).strip()]
    return out


def gcode_lines(text: Any) -> list[str]:
    """G-code commands from a settings text: one per line or ``;``-free line, comments cut."""
    lines = []
    for raw in _gcode_text(text).splitlines():
        line = raw.split(";", 1)[0].strip()
        if line:
            lines.append(line)
    return lines


def _gcode_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "\n".join(str(v) for v in value)
    return "" if value is None else str(value)


def _section(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key)
    return value if isinstance(value, dict) else {}


def _number(value: Any, fallback: float) -> float:
    if isinstance(value, bool):
        return fallback
    if isinstance(value, (int, float)):
        return value
    try:
        return float(str(value).strip())
    except (TypeError, ValueError):
        return fallback


def _clamp(value: float, lo: float, hi: float) -> float:
    return max(lo, min(hi, value))


def _boolean(value: Any, fallback: bool) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "1", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("false", "no", "0", "off"):
        return False
    if isinstance(value, int):
        return bool(value)
    return fallback


def _address_text(value: Any) -> str:
    """Keep a valid address as ``0x`` hex text, drop anything else (empty = chip default)."""
    if value is None or value == "":
        return ""
    try:
        number = value if isinstance(value, int) else int(str(value).strip(), 0)
    except ValueError:
        return ""
    return f"0x{number:08X}" if number >= 0 else ""
