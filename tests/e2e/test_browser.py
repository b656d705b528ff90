"""The plugin's settings page in a real browser: Debian's Chromium, headless, driven by
Playwright against the same OctoPrint server and simulated printer as the HTTP tests.

A user logs in through OctoPrint's login form, opens Settings → Firmware Updater, picks the
printer's port, uploads a firmware, confirms, watches the bar reach 100 % and reads the
success message; a firmware too big for the board's chip ends in a readable error instead.
Each state is saved as a screenshot under docs/screenshots/ for the README.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest

from tests.e2e.conftest import ADMIN, Client, OctoPrintServer, SimPrinter, poll

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.browser,
    pytest.mark.realtime,
    pytest.mark.timeout(300, func_only=True),  # see test_security.py
]

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
# Without the background-networking flags Chromium keeps dialling Google on a closed network.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
UI_TIMEOUT_MS = 60_000  # OctoPrint bundles its web assets on the first page load
TOO_BIG = re.compile(r"too (big|large)|larger|does not fit|exceeds|wrong chip|1284", re.I)


@pytest.fixture(scope="module")
def page(
    octoprint_server: OctoPrintServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.fail("Debian's chromium is missing: run scripts/bootstrap.sh (package chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 900},
        )
        context.set_default_timeout(UI_TIMEOUT_MS)
        try:
            page = context.pages[0] if context.pages else context.new_page()
            yield page
        finally:
            context.close()


def shot(page: Any, name: str, focus: Optional[str] = None, settle_ms: int = 300) -> Path:
    """Save the viewport as docs/screenshots/<name>.png, scrolled so ``focus`` is in view,
    after ``settle_ms`` for Knockout to finish redrawing (0 to catch a moving bar)."""
    if focus is not None:
        page.locator(focus).scroll_into_view_if_needed()
    if settle_ms:
        page.wait_for_timeout(settle_ms)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), animations="disabled")
    return path


def open_flasher_settings(page: Any, server: OctoPrintServer) -> None:
    """Load OctoPrint's UI (logging in through its form if needed) and open our settings."""
    page.goto(server.url("/"))
    if page.locator("#login-user").is_visible():
        page.fill("#login-user", ADMIN[0])
        page.fill("#login-password", ADMIN[1])
        page.click("#login-button")
    page.wait_for_selector("#navbar_show_settings", state="visible")
    page.click("#navbar_show_settings")
    page.wait_for_selector("#settings_dialog", state="visible")
    # Bootstrap fades the dialog in; clicks and screenshots during the fade hit the page below
    page.wait_for_function(
        "getComputedStyle(document.querySelector('#settings_dialog')).opacity === '1'"
    )
    page.click("#settings_plugin_flasher_link a")
    page.wait_for_selector("#settings_plugin_flasher", state="visible")


def choose_port(page: Any, port: str) -> None:
    """Pick ``port`` in the device list (refreshing it until discovery shows it)."""
    panel = page.locator("#settings_plugin_flasher")

    def listed() -> Any:
        options = panel.locator("#flasher_device option")
        for i in range(options.count()):
            option = options.nth(i)
            if port in (option.text_content() or "") or port == option.get_attribute("value"):
                return option.get_attribute("value") or option.text_content()
        panel.locator("#flasher_refresh").click()
        return None

    value = poll(f"{port} in the device list", listed, timeout=30, interval=1.0)
    panel.locator("#flasher_device").select_option(value)
    method = panel.locator("#flasher_method")
    if method.count() and method.locator("option[value='stk500v1']").count():
        method.select_option("stk500v1")


def upload(page: Any, firmware: Path) -> Any:
    """Choose ``firmware`` in the file input and return the pre-flight verdict once shown."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    panel = page.locator("#settings_plugin_flasher")
    panel.locator("#flasher_file").set_input_files(str(firmware))
    verdict = page.locator("#flasher_preflight.flasher-ok, #flasher_preflight.flasher-error")
    try:
        verdict.wait_for(state="visible", timeout=5_000)
    except PlaywrightTimeout:  # a page that does not upload on choose has a button for it
        panel.locator("#flasher_upload").click()
        verdict.wait_for(state="visible")
    return page.locator("#flasher_preflight")


def bar_percent(page: Any) -> float:
    style = page.locator("#flasher_progress .bar").get_attribute("style") or ""
    match = re.search(r"width:\s*([\d.]+)%", style)
    return float(match.group(1)) if match else 0.0


def flash_and_confirm(page: Any) -> None:
    panel = page.locator("#settings_plugin_flasher")
    panel.locator("#flasher_flash").click()
    page.wait_for_selector("#flasher_confirm", state="visible")
    page.click("#flasher_confirm_ok")


def test_flash_from_the_settings_page(
    page: Any,
    octoprint_server: OctoPrintServer,
    admin: Client,
    printer: Any,
    browser_firmware: Path,
) -> None:
    admin.wait_idle(timeout=120)
    if admin.connection()["state"] != "Operational":
        admin.connect_printer(printer.port, printer.baud)
        admin.wait_printer_state("Operational", timeout=60)

    open_flasher_settings(page, octoprint_server)
    shot(page, "01-empty")

    choose_port(page, printer.port)
    verdict = upload(page, browser_firmware)
    assert "flasher-ok" in (verdict.get_attribute("class") or ""), verdict.inner_text()
    shot(page, "02-file-checked", focus="#flasher_preflight")

    flash_and_confirm(page)
    poll("the progress bar to move", lambda: 0 < bar_percent(page) < 100, timeout=60, interval=0.1)
    shot(page, "03-flashing", focus="#flasher_progress", settle_ms=0)

    result = page.locator("#flasher_result.flasher-success, #flasher_result.flasher-failure")
    result.wait_for(state="visible", timeout=180_000)
    shot(page, "04-success", focus="#flasher_result")
    assert "flasher-success" in (result.get_attribute("class") or ""), result.inner_text()
    assert bar_percent(page) == 100
    assert "100 %" in (page.locator("#flasher_progress .bar").inner_text() or "")
    assert admin.status()["result"]["ok"] is True


def test_wrong_chip_named_by_the_user_is_refused_before_flashing(
    page: Any, octoprint_server: OctoPrintServer, printer: SimPrinter, oversized_firmware: Path
) -> None:
    """With the chip typed in, the page refuses a Mega 2560 image bigger than the 1284P's
    whole flash at upload time, says why, and offers no Flash button."""
    open_flasher_settings(page, octoprint_server)  # a fresh page: no verdict from before
    choose_port(page, printer.port)
    page.fill("#flasher_mcu", "atmega1284p")
    verdict = upload(page, oversized_firmware)
    shot(page, "05-wrong-chip", focus="#flasher_preflight")
    assert "flasher-error" in (verdict.get_attribute("class") or ""), verdict.inner_text()
    assert TOO_BIG.search(verdict.inner_text() or ""), verdict.inner_text()
    assert page.locator("#flasher_flash").is_disabled()


def test_image_too_big_for_the_board_fails_without_touching_it(
    page: Any,
    octoprint_server: OctoPrintServer,
    admin: Client,
    printer: SimPrinter,
    oversized_firmware: Path,
) -> None:
    """Without a chip name the page cannot know; the flasher learns the chip from the
    bootloader and refuses before writing, so the board keeps its firmware."""
    admin.wait_idle(timeout=120)
    before = printer.board.flash_dump()
    open_flasher_settings(page, octoprint_server)  # a fresh page: no verdict from before
    choose_port(page, printer.port)
    verdict = upload(page, oversized_firmware)
    assert "flasher-ok" in (verdict.get_attribute("class") or ""), verdict.inner_text()
    flash_and_confirm(page)
    failure = page.locator("#flasher_result.flasher-failure, #flasher_result.flasher-success")
    failure.wait_for(state="visible", timeout=180_000)
    shot(page, "06-too-big-for-board", focus="#flasher_result")
    assert "flasher-failure" in (failure.get_attribute("class") or ""), failure.inner_text()
    assert TOO_BIG.search(failure.inner_text() or ""), failure.inner_text()
    result = admin.wait_idle(timeout=60)["result"]
    assert result["ok"] is False and result["board_in_bootloader"] is False, result
    assert printer.board.flash_dump() == before, "the refused image changed the flash"
