"""The demo's Prusa MK3S flashed from the settings page in a real browser (Debian's Chromium
through Playwright), as a newcomer does it from Settings -> Firmware Updater (issue 12).

OctoPrint is connected to the MK3S (tests/emulators/prusa_einsy.py, on <port_dir>/ttyFLASHER2),
so the page marks its port as the printer's. A MULTILANG file carrying another build's
language catalogs is refused from the file: Flash stays disabled, the printer stays
Operational and the board is neither reset nor written. The right MULTILANG file passes, and
after the confirmation (which says the printer is disconnected and reconnected) the stage
shows the two passes ("1/2 firmware" then "2/2 languages"), the result is a success whose
"Now:" box asks the user to choose a language on the printer, the emulator's flash and
language flash hold exactly the file's two sections, and OctoPrint is Operational again on
the MK3S. The screenshot goes to docs/screenshots/ for the README.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from octoprint_flasher.image.load import load
from tests.e2e.conftest import Client, OctoPrintServer, SocketCollector
from tests.e2e.test_browser import (
    open_flasher_settings,
    page,  # noqa: F401  (the module-scoped browser page fixture)
    shot,
)
from tests.e2e.test_browser_newcomer import check_file, choose_device
from tests.e2e.test_demo_boards import printer_watch
from tests.e2e.test_marlin_sd import connect_to
from tests.e2e.test_prusa import MK3S_RIGHT, MK3S_WRONG

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.browser,
    pytest.mark.realtime,
    pytest.mark.timeout(300, func_only=True),
]

FIRMWARE_PASS = ("1/2 firmware \u00b7 Writing", "1/2 firmware \u00b7 Verifying (reading back)")
LANGUAGE_PASS = (
    "2/2 languages \u00b7 Writing the languages",
    "2/2 languages \u00b7 Verifying the languages",
)

# every text #flasher_stage shows, in order, collected in the page (the passes last seconds,
# a poll from here could still miss one)
RECORD_STAGES = """() => {
    const el = document.querySelector('#flasher_stage');
    const seen = [el.textContent];
    window.flasherStagesSeen = seen;
    new MutationObserver(() => {
        if (seen[seen.length - 1] !== el.textContent) seen.push(el.textContent);
    }).observe(el, {childList: true, characterData: true, subtree: true});
}"""


def board_state(board: Any) -> tuple[Any, ...]:
    """What a touch of the MK3S would change: resets, firmware starts, both flashes."""
    return (board.stats.resets, board.starts, bytes(board.flash), bytes(board.xflash.data))


def refused_at_upload(ui: Any, path: Path) -> str:
    """Choose ``path``; the server refuses the file itself (HTTP 400), so the page shows its
    message, cause and hint in the error box instead of a verdict, and offers no Flash."""
    ui.locator("#flasher_file").set_input_files(str(path))
    box = ui.locator(".flasher-http-error")
    box.wait_for(state="visible")
    assert not ui.locator("#flasher_preflight").is_visible()
    assert ui.locator("#flasher_flash").is_disabled()
    return str(box.inner_text())


def in_order(seen: list[str], wanted: tuple[str, ...]) -> bool:
    it = iter(seen)
    return all(any(s == w for s in it) for w in wanted)


def test_mk3s_multilang_from_the_page_writes_firmware_then_languages_and_is_operational_again(
    page: Any,  # noqa: F811
    octoprint_server: OctoPrintServer,
    admin: Client,
    admin_socket: SocketCollector,
    mk3s: tuple[Any, str],
    demo_samples: dict[str, Path],
) -> None:
    board, port = mk3s
    connect_to(admin, port)  # Operational: the firmware model answered OctoPrint's hello
    assert any("M115" in line for line in board.gcode_lines), board.gcode_lines

    before = board_state(board)

    # the list marks the printer's port; another build's catalogs are refused from the file
    # alone: neither listing, choosing nor checking disconnects the printer or resets the board
    with printer_watch(admin, admin_socket) as seen:
        open_flasher_settings(page, octoprint_server)
        choose_device(page, Path(port).name)
        chosen = page.locator("#flasher_device option:checked").inner_text()
        assert port in chosen and "the printer" in chosen, chosen
        text = refused_at_upload(page, demo_samples[MK3S_WRONG])
    assert "do not belong to the firmware" in text and "What to do:" in text, text
    assert set(seen) <= {"Operational"}, seen
    assert board_state(board) == before, "the refused file touched the MK3S"
    assert board.lcd_upload_size is None

    # the right file: firmware through the bootloader, then the catalogs through the firmware
    image = load(demo_samples[MK3S_RIGHT])
    firmware, catalogs = image.segments[0].data, image.external[0].data
    check_file(page, demo_samples[MK3S_RIGHT], expect_ok=True)
    page.evaluate(RECORD_STAGES)
    page.locator("#flasher_flash").click()
    confirm = page.locator("#flasher_confirm")
    confirm.wait_for(state="visible")
    assert "disconnected while flashing and reconnected afterwards" in confirm.inner_text()
    page.click("#flasher_confirm_ok")

    result = page.locator(
        "#flasher_result.flasher-success, #flasher_result.flasher-failure, "
        "#flasher_result.flasher-unconfirmed"
    )
    result.wait_for(state="visible", timeout=120_000)
    shot(page, "17-prusa-mk3s-languages", focus="#flasher_result")
    said = result.inner_text()
    assert "flasher-success" in (result.get_attribute("class") or ""), said
    assert not page.locator("#flasher_partial").is_visible(), said
    stages: list[str] = page.evaluate("window.flasherStagesSeen")
    assert in_order(stages, FIRMWARE_PASS + LANGUAGE_PASS), stages
    assert stages[-1] == "Done", stages
    now = page.locator("#flasher_next_step")
    assert now.is_visible(), said
    assert now.inner_text().strip().startswith("Now:"), now.inner_text()
    assert "choose a language on the printer" in now.inner_text(), now.inner_text()
    assert "choose a language" not in result.locator("strong").first.inner_text(), said
    checked = page.locator("#flasher_confirmation").inner_text()
    assert "languages:" in checked and "read back and equal" in checked, said

    assert bytes(board.flash[: len(firmware)]) == firmware
    assert board.xflash.read(image.external[0].address, len(catalogs)) == catalogs
    status = admin.status()["result"]
    assert status["verified_by"] == "read-back" and status["reconnected"] is True, status
    current = admin.wait_printer_state("Operational", timeout=60)
    assert current["port"] == port, current
