"""The page tells which pass of a Prusa flash runs, puts the step the printer asks of the user
on its own line after a success, and reads a failed language pass as a firmware update."""

from __future__ import annotations

import json

from tests.plugin.test_format_js import run_node

LEFT = (
    "The printer restarted with the new firmware (it printed 'start'): choose a language on "
    "the printer; it restarts a few times while it copies it."
)


def test_stages_of_a_two_pass_flash_are_numbered_and_a_one_pass_flash_is_not() -> None:
    got = run_node(
        {
            "writing": "F.phase('writing', true)",
            "verifying": "F.phase('verifying', true)",
            "languages": "F.phase('writing_languages', true)",
            "comparing": "F.phase('reading_languages', true)",
            "leaving": "F.phase('leaving_bootloader', true)",
            "one_pass": "F.phase('writing', false)",
        }
    )
    assert got == {
        "writing": "firmware",
        "verifying": "firmware",
        "languages": "languages",
        "comparing": "languages",
        "leaving": "",
        "one_pass": "",
    }


def test_after_success_the_printers_request_is_the_next_step_not_buried_in_the_message() -> None:
    result = {
        "status": "success",
        "message": "Firmware written and verified by reading it back. " + LEFT,
        "board_message": LEFT,
    }
    got = run_node({"o": f"F.outcome({json.dumps(result)})"})["o"]
    assert got == {
        "ok": True,
        "partial": False,
        "message": "Firmware written and verified by reading it back.",
        "next": LEFT,
    }


def test_a_failed_language_pass_reads_as_firmware_updated_and_no_next_step() -> None:
    result = {
        "status": "failed",
        "message": "The firmware was written and verified (the printer works, in English); the "
        "languages were NOT installed: no confirmation.",
        "board_message": "The new firmware is written, verified and running.",
        "error": {"kind": "languages", "message": "…"},
    }
    failed = {"status": "failed", "message": "Verify failed.", "error": {"kind": "verify"}}
    got = run_node(
        {"lang": f"F.outcome({json.dumps(result)})", "other": f"F.outcome({json.dumps(failed)})"}
    )
    lang, other = got["lang"], got["other"]
    assert isinstance(lang, dict) and isinstance(other, dict)
    assert lang["partial"] is True and lang["next"] == ""
    assert lang["message"].startswith("The firmware was written and verified")
    assert other["partial"] is False and other["ok"] is False
