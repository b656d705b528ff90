"""The demo as a newcomer uses it, in a real browser: one page load, the three boards in the
order a newcomer tries them, each with the wrong file first and then the right one.

The DFU board (emulated STM32F446 in ROM DFU) refuses a Klipper build for an STM32F407 and then
takes its own file, written at the address its vector table names; the Katapult CAN node refuses
canboot.bin without being rebooted and then takes Klipper; the printer refuses a Mega 2560 build
once its chip is named and then takes its new firmware and is Operational again. Nothing is
restarted in between. The states are saved as screenshots for the README.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Client, OctoPrintServer, SimPrinter, poll
from tests.e2e.test_browser import (
    choose_port,
    flash_and_confirm,
    open_flasher_settings,
    page,  # noqa: F401  (the module-scoped browser page fixture)
    shot,
    upload,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.browser,
    pytest.mark.realtime,
    pytest.mark.timeout(420, func_only=True),  # three boards, two files each
]


def choose_device(ui: Any, label_part: str) -> None:
    """Pick the device whose label contains ``label_part`` (refreshing until it is listed)."""
    panel = ui.locator("#settings_plugin_flasher")

    def listed() -> Any:
        options = panel.locator("#flasher_device option")
        for i in range(options.count()):
            if label_part in (options.nth(i).text_content() or ""):
                return options.nth(i).get_attribute("value")
        panel.locator("#flasher_refresh").click()
        return None

    value = poll(f"{label_part!r} in the device list", listed, timeout=30, interval=1.0)
    panel.locator("#flasher_device").select_option(value)


def check_file(ui: Any, path: Path, expect_ok: bool) -> str:
    """Choose ``path``, wait for the verdict on that very file and return its text."""
    verdict = upload(ui, path)
    ui.locator(".flasher-image td", has_text=path.name).wait_for(state="visible")
    wanted = "flasher-ok" if expect_ok else "flasher-error"
    ui.locator(f"#flasher_preflight.{wanted}").wait_for(state="visible")
    text: str = verdict.inner_text() or ""
    if expect_ok:
        assert ui.locator("#flasher_flash").is_enabled(), text
    else:
        assert ui.locator("#flasher_flash").is_disabled(), text
    return text


def flash_until_result(ui: Any) -> Any:
    flash_and_confirm(ui)
    result = ui.locator("#flasher_result.flasher-success, #flasher_result.flasher-failure")
    result.wait_for(state="visible", timeout=180_000)
    return result


def test_newcomer_flashes_every_demo_board_after_one_refused_file_each(
    page: Any,  # noqa: F811
    octoprint_server: OctoPrintServer,
    admin: Client,
    printer: SimPrinter,
    demo_samples: dict[str, Path],
) -> None:
    admin.wait_idle(timeout=120)
    if admin.connection()["state"] != "Operational":
        admin.connect_printer(printer.port, printer.baud)
        admin.wait_printer_state("Operational", timeout=60)
    if admin.demo_boards()["dfu"]["mode"] != "dfu":  # test_demo_boards flashed it: reset it
        admin.press_dfu_reset()  # with BOOT0 fitted, so it is in ROM DFU as the demo starts
    node_events = admin.demo_boards()["katapult"]["events"]

    open_flasher_settings(page, octoprint_server)

    # 1. the DFU board: a build for another STM32 is refused from the file alone
    choose_device(page, "STM32F446")
    text = check_file(page, demo_samples["wrong-chip-klipper-stm32f407.bin"], expect_ok=False)
    assert "stm32f407" in text.lower(), text
    assert not page.locator("#flasher_written_at").is_visible()  # nothing will be written
    shot(page, "07-dfu-wrong-chip", focus="#flasher_preflight")
    assert admin.demo_boards()["dfu"]["mode"] == "dfu"

    check_file(page, demo_samples["klipper-stm32f446-dfu.bin"], expect_ok=True)
    written_at = page.locator("#flasher_written_at")
    assert written_at.is_visible() and "0x08000000" in written_at.inner_text()
    shot(page, "08-dfu-written-at", focus="#flasher_preflight")
    result = flash_until_result(page)
    shot(page, "09-dfu-done", focus="#flasher_result")
    assert "flasher-success" in (result.get_attribute("class") or ""), result.inner_text()
    assert admin.status()["result"]["verified_by"] == "read-back"
    assert admin.connection()["state"] == "Operational"  # not the printer's board

    # 2. the Katapult node: canboot.bin is refused and the node is not rebooted
    choose_device(page, "CAN node")
    text = check_file(page, demo_samples["wrong-canboot.bin"], expect_ok=False)
    assert "katapult bootloader itself" in text.lower(), text
    shot(page, "10-katapult-canboot-refused", focus="#flasher_preflight")
    assert admin.demo_boards()["katapult"]["events"] == node_events

    check_file(page, demo_samples["klipper-stm32g0b1-katapult.bin"], expect_ok=True)
    assert "0x08002000" in page.locator("#flasher_written_at").inner_text()
    result = flash_until_result(page)
    shot(page, "11-katapult-done", focus="#flasher_result")
    assert "flasher-success" in (result.get_attribute("class") or ""), result.inner_text()
    status = admin.status()["result"]
    assert "Klipper answers on the CAN bus" in status["confirmation"], status
    assert admin.demo_boards()["katapult"]["mode"] == "klipper"
    assert admin.connection()["state"] == "Operational"

    # 3. the printer: with its chip named, the Mega 2560 build is refused before touching it
    choose_port(page, printer.port)
    page.fill("#flasher_mcu", "atmega1284p")
    text = check_file(page, demo_samples["wrong-chip-atmega2560.hex"], expect_ok=False)
    assert "too big" in text.lower() or "1284" in text, text
    assert admin.connection()["state"] == "Operational"

    check_file(page, demo_samples["printer-demo2-atmega1284p.hex"], expect_ok=True)
    result = flash_until_result(page)
    assert "flasher-success" in (result.get_attribute("class") or ""), result.inner_text()
    status = admin.wait_idle(timeout=60)["result"]
    assert status["ok"] is True and status["reconnected"] is True, status
    admin.wait_printer_state("Operational", timeout=60)
