"""The demo's 32-bit Marlin printer flashed from the settings page in a real browser.

OctoPrint is connected to the Ender-3 V2-style printer (its M115 reports binary file
transfer), so the page picks the SD upload for its port without being told. The 8-bit
Ender-3's .hex is refused at upload; the right firmware.bin shows the upload's percentage,
rate and ETA, then "waiting for the board to flash itself from the SD card", then success
confirmed by the firmware's own report; the printer is Operational again and its M115 names
the new build. The same build flashed again cannot be told from no flash: the page shows that
as a warning, not as success. Screenshots go to docs/screenshots/ for the README.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import CREALITY_LINK_NAME, Client, OctoPrintServer, poll
from tests.e2e.test_browser import (
    flash_and_confirm,
    open_flasher_settings,
    page,  # noqa: F401  (the module-scoped browser page fixture)
    shot,
)
from tests.e2e.test_browser_newcomer import check_file, choose_device
from tests.e2e.test_http_flow import firmware_name
from tests.e2e.test_marlin_sd import NEW, OLD, RIGHT, WRONG, connect_to, sd_printer_device

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.browser,
    pytest.mark.realtime,
    pytest.mark.timeout(300, func_only=True),
]


def stage(ui: Any) -> str:
    return str(ui.locator("#flasher_stage").inner_text() or "")


def test_creality_printer_is_flashed_from_the_page_and_confirmed_by_its_m115(
    page: Any,  # noqa: F811
    octoprint_server: OctoPrintServer,
    admin: Client,
    admin_socket: Any,
    creality_printer: Any,
    demo_samples: dict[str, Path],
    tmp_path: Path,
) -> None:
    port = str(octoprint_server.port_dir / CREALITY_LINK_NAME)
    connect_to(admin, port)
    sd_printer_device(admin, port)  # OctoPrint's M115 has marked the port

    open_flasher_settings(page, octoprint_server)
    choose_device(page, CREALITY_LINK_NAME)
    assert page.locator("#flasher_sd_family").is_visible()  # the SD upload was chosen

    text = check_file(page, demo_samples[WRONG], expect_ok=False)
    assert "flash only a .bin" in text, text
    assert creality_printer.stats.resets == 0 and admin.connection()["state"] == "Operational"

    check_file(page, demo_samples[RIGHT], expect_ok=True)
    flash_and_confirm(page)

    def uploading() -> bool:
        rate = page.locator("#flasher_stage + span").inner_text() or ""
        bar = page.locator("#flasher_progress .bar").inner_text() or ""
        return stage(page) == "Writing" and "/s" in rate and bar not in ("", "0 %", "100 %")

    poll("the upload's rate and percentage", uploading, timeout=30, interval=0.1)
    assert "ETA" in page.locator(".flasher-status").inner_text()
    shot(page, "14-marlin-sd-uploading", focus=".flasher-status", settle_ms=0)
    poll(
        "the wait for the SD bootloader",
        lambda: stage(page) == "Waiting for the board to flash itself from the SD card",
        timeout=30,
        interval=0.1,
    )

    result = page.locator(
        "#flasher_result.flasher-success, #flasher_result.flasher-failure, "
        "#flasher_result.flasher-unconfirmed"
    )
    result.wait_for(state="visible", timeout=120_000)
    shot(page, "15-marlin-sd-confirmed", focus="#flasher_result")
    said = result.inner_text()
    assert "flasher-success" in (result.get_attribute("class") or ""), said
    assert f"the board reports the new build (M115 FIRMWARE_NAME: {NEW})" in said, said
    how = page.locator("#flasher_verified_by").inner_text()
    assert how.startswith("Confirmed by the firmware's own report"), how
    row = page.locator("#flasher_history tbody tr").first
    assert "marlin-sd" in row.inner_text() and "success" in row.inner_text(), row.inner_text()
    admin.wait_printer_state("Operational", timeout=60)
    firmware_name(admin, admin_socket, NEW)
    assert OLD not in creality_printer.firmware_name

    # the same build again (a small file): written and flashed, but nothing tells it apart
    from tests.emulators.marlin_printer import make_marlin_bin

    again = tmp_path / "firmware-same-build.bin"
    again.write_bytes(make_marlin_bin(NEW, size=8 * 1024, base=0x08007000, seed=5))
    check_file(page, again, expect_ok=True)
    flash_and_confirm(page)
    ended = page.locator("#flasher_result.flasher-unconfirmed, #flasher_result.flasher-failure")
    ended.wait_for(state="visible", timeout=60_000)
    shot(page, "16-marlin-sd-same-build-unconfirmed", focus="#flasher_result")
    assert "flasher-unconfirmed" in (ended.get_attribute("class") or ""), ended.inner_text()
    assert "NOT confirmed" in ended.inner_text(), ended.inner_text()
    assert admin.status()["result"]["verified_by"] == "not-confirmed"
    cell = page.locator("#flasher_history tbody tr").first.locator("td").nth(6)
    poll("the history's warning", lambda: cell.inner_text() == "unconfirmed", 10)
    assert "text-warning" in (cell.get_attribute("class") or ""), cell.get_attribute("class")
