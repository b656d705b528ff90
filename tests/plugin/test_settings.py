"""Settings defaults and migration: old flat keys move, hand-edited values are repaired."""

from __future__ import annotations

from pathlib import Path

from octoprint_flasher.plugin import settings
from tests.plugin.conftest import FakeSettings, Harness


def test_defaults_are_safe_and_complete() -> None:
    d = settings.defaults()
    assert d["method"] == "auto"
    assert d["max_upload_mb"] == 16
    assert d["reconnect_after_flash"] is True
    assert d["backup_before_flash"] is False
    assert settings.gcode_lines(d["pre_gcode"]) == ["M104 S0", "M140 S0"]
    d["stk500"]["baud"] = 1
    assert settings.DEFAULTS["stk500"]["baud"] == 0  # a copy, not the module's dict


def test_version_1_flat_keys_move_into_their_method_sections() -> None:
    v1 = {
        "baud": "57600",
        "dfu_address": "134225920",
        "can_channel": "can1",
        "max_size_kb": 5120,
        "gcode_before": "M104 S0",
        "reconnect": "false",
    }
    out = settings.migrate(v1, 1)
    assert out["stk500"]["baud"] == 57600
    assert out["dfu"]["address"] == "0x08002000"
    assert out["katapult"]["can_channel"] == "can1"
    assert out["max_upload_mb"] == 5
    assert out["pre_gcode"] == "M104 S0"
    assert out["reconnect_after_flash"] is False
    assert not {"baud", "dfu_address", "can_channel", "max_size_kb", "reconnect"} & set(out)


def test_unversioned_settings_are_treated_as_version_1() -> None:
    assert settings.migrate({"baud": 250000}, None)["stk500"]["baud"] == 250000


def test_hand_edited_nonsense_falls_back_to_safe_values() -> None:
    out = settings.migrate(
        {
            "method": "avrdude",
            "max_upload_mb": "9999",
            "settle_delay": -3,
            "dfu": {"address": "over there"},
            "extra_port_globs": "/dev/ttyFOO*, /tmp/ttyBAR*",
            "backup_before_flash": "yes",
        },
        2,
    )
    assert out["method"] == "auto"
    assert out["max_upload_mb"] == 256
    assert out["settle_delay"] == 0.0
    assert out["dfu"]["address"] == ""
    assert out["extra_port_globs"] == ["/dev/ttyFOO*", "/tmp/ttyBAR*"]
    assert out["backup_before_flash"] is True


def test_upload_limit_in_bytes_is_clamped() -> None:
    assert settings.max_upload_bytes(16) == 16 * 1024 * 1024
    assert settings.max_upload_bytes("nonsense") == 16 * 1024 * 1024
    assert settings.max_upload_bytes(0) == 1024 * 1024


def test_plugin_migration_rewrites_stored_settings(harness: Harness, tmp_path: Path) -> None:
    fake = FakeSettings(tmp_path, {"baud": 57600, "method": "STK500V1", "max_size_kb": 2048})
    harness.plugin._settings = fake
    harness.plugin.on_settings_migrate(settings.SETTINGS_VERSION, None)
    assert fake.values["stk500"] == {"baud": 57600}
    assert fake.values["method"] == "stk500v1"
    assert fake.values["max_upload_mb"] == 2
    assert "baud" not in fake.values and "max_size_kb" not in fake.values


def test_bodysize_hook_follows_the_upload_limit(harness: Harness) -> None:
    harness.settings.values["max_upload_mb"] = 4
    ((method, route, size),) = harness.plugin.bodysize_hook([])
    assert (method, route) == ("POST", r"/upload")
    assert 4 * 1024 * 1024 < size <= 4 * 1024 * 1024 + 64 * 1024


def test_permission_is_dangerous_and_for_admins_by_default(harness: Harness) -> None:
    (perm,) = harness.plugin.get_additional_permissions()
    assert perm["key"] == "FLASH"
    assert perm["dangerous"] is True
    assert perm["default_groups"] == ["admins"]


def test_software_update_uses_the_pypi_release_of_the_package(harness: Harness) -> None:
    check = harness.plugin.get_update_information()["flasher"]
    assert check["type"] == "pypi_release"
    assert check["package"] == "OctoPrint-Flasher"
    assert "{target_version}" in check["pip"]


class User:
    def __init__(self, allowed: bool) -> None:
        self.allowed = allowed

    def has_permission(self, permission: object) -> bool:
        return self.allowed


def test_flash_events_reach_only_users_with_the_flash_permission(harness: Harness) -> None:
    emit = harness.plugin.socket_emit_hook
    done = {"type": "plugin_flasher_flash_done", "payload": {"filename": "marlin.hex"}}
    assert emit(None, User(True), "event", done) is True
    assert emit(None, User(False), "event", done) is False
    assert emit(None, None, "event", done) is False
    assert emit(None, User(False), "event", {"type": "Connected"}) is True
    assert emit(None, User(False), "current", {}) is True
