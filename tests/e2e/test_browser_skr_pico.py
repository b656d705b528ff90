"""The demo's SKR Pico from the Settings page, in a real browser (Debian's Chromium through
Playwright): the board shows as "Klipper on an RP2040 (USB)", the page names each .uf2's chip
family, refuses the RP2350 build without touching the board, and flashes klipper.uf2 with no
warning to override; the result says Klipper answers again on USB and how the flash was
checked. The printer stays connected. Screenshots go to docs/screenshots/ for the README.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Client, OctoPrintServer, SimPrinter
from tests.e2e.test_browser import (
    open_flasher_settings,
    page,  # noqa: F401  (the module-scoped browser page fixture)
    shot,
)
from tests.e2e.test_browser_newcomer import check_file, choose_device
from tests.e2e.test_demo_boards import operational_printer

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.browser,
    pytest.mark.realtime,
    pytest.mark.timeout(300, func_only=True),
]


def test_skr_pico_refuses_the_rp2350_uf2_and_flashes_klipper_uf2_from_the_page(
    page: Any,  # noqa: F811
    octoprint_server: OctoPrintServer,
    admin: Client,
    printer: SimPrinter,
    demo_samples: dict[str, Path],
) -> None:
    operational_printer(admin, printer)
    before = admin.demo_boards()["rp2040"]
    assert before["mode"] == "app", before

    open_flasher_settings(page, octoprint_server)
    choose_device(page, "Klipper on an RP2040")
    family = page.locator("#flasher_uf2_family")

    text = check_file(page, demo_samples["wrong-chip-klipper-rp2350.uf2"], expect_ok=False)
    assert "RP2350" in text and "RP2040" in text, text
    assert "RP2350 Arm secure" in family.inner_text() and "0xe48bff59" in family.inner_text()
    shot(page, "12-skr-pico-rp2350-refused", focus="#flasher_preflight")
    assert admin.demo_boards()["rp2040"] == before, "the refused file touched the SKR Pico"

    check_file(page, demo_samples["klipper-rp2040-skr-pico.uf2"], expect_ok=True)
    assert "RP2040" in family.inner_text() and "0xe48bff56" in family.inner_text()
    assert not page.locator(".flasher-preflight-warnings li").count()
    page.locator("#flasher_flash").click()
    confirm = page.locator("#flasher_confirm")
    confirm.wait_for(state="visible")
    # nothing to override: the plain "Yes, flash", and the printer is not this board's
    assert "alert-error" not in (confirm.get_attribute("class") or ""), confirm.inner_text()
    assert "printer stays connected" in confirm.inner_text(), confirm.inner_text()
    page.click("#flasher_confirm_ok")

    result = page.locator("#flasher_result.flasher-success, #flasher_result.flasher-failure")
    result.wait_for(state="visible", timeout=120_000)
    shot(page, "13-skr-pico-done", focus="#flasher_result")
    said = result.inner_text()
    assert "flasher-success" in (result.get_attribute("class") or ""), said
    assert "Klipper answers again on USB (1d50:614e" in said, said
    assert not page.locator("#flasher_result li").count(), said  # no warnings
    checked = page.locator("#flasher_confirmation")
    assert checked.is_visible() and "read back all" in checked.inner_text(), said
    status = admin.status()["result"]
    assert status["verified_by"] == "read-back" and status["reconnected"] is None, status
    after = admin.demo_boards()["rp2040"]
    assert after["mode"] == "app" and after["usb_id"] == "1d50:614e", after
    assert after["touches"] == before["touches"] + 1, after
    assert admin.connection()["state"] == "Operational"
