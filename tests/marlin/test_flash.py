"""The marlin-sd flasher against the emulated printer: naming per bootloader family, reset,
come-back and the confirmation rules."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from octoprint_flasher.errors import (
    BusyError,
    ConnectError,
    PreflightError,
    UnsupportedError,
    VerifyError,
)
from octoprint_flasher.flashers.marlin_sd import check_image, plan_names, unique_name
from octoprint_flasher.image.model import image_from_bytes
from octoprint_flasher.target import Target
from tests.emulators.klipper_firmware import make_klipper_bin
from tests.emulators.marlin_printer import DEFAULT_NAME, make_marlin_bin

from .conftest import MakePrinter, Run, as_bin, flash, marlin_target

OLD = DEFAULT_NAME
NEW = "Marlin 2.1.2.7 (Dec  7 2026 10:11:12)"


def new_build(size: int = 16 * 1024, **kw: object) -> bytes:
    return make_marlin_bin(NEW, size=size, seed=5, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("transport", ["uart", "usb"])
def test_btt_board_flashes_firmware_bin_and_both_proofs_confirm_it(
    make_printer: MakePrinter, transport: str
) -> None:
    printer = make_printer(family="btt", transport=transport)
    printer.card.files["/FIRMWARE.CUR"] = b"old"  # left by the previous flash
    data = new_build()
    run = flash(printer, data)
    assert printer.card.files == {"/FIRMWARE.CUR": data}  # renamed by the bootloader
    assert printer.firmware_name == NEW and printer.stats.resets == 1
    assert run.flasher.verified_by == "firmware-report"
    assert NEW in run.flasher.confirmation and "FIRMWARE.CUR" in run.flasher.confirmation
    assert "cannot be read back" in run.flasher.confirmation
    assert run.result is not None and run.result.bytes_written == len(data)
    assert run.result.bytes_verified == 0  # nothing was read back, and it says so
    if transport == "usb":
        assert any("went away" in line for line in run.log)  # the port dropped and returned
    else:
        assert any("(start)" in line for line in run.log)  # CH340: the port stays


def test_creality_gets_a_new_name_each_time_and_remembers_it(
    make_printer: MakePrinter, tmp_path: Path
) -> None:
    printer = make_printer(family="creality", machine="Ender-3 V2")
    state = tmp_path / "state"
    first = new_build()
    run1 = flash(printer, first, state_dir=str(state))
    name1 = printer.stats.flashes[-1]
    assert name1.startswith("/FW") and name1.endswith(".BIN") and len(name1) <= 13
    assert run1.flasher.verified_by == "firmware-report"
    second = make_marlin_bin("Marlin 2.1.2.7 (Dec  8 2026 01:02:03)", size=12 * 1024, seed=9)
    run2 = flash(printer, second, state_dir=str(state))
    name2 = printer.stats.flashes[-1]
    assert name2 != name1 and name1 not in printer.card.files  # old upload deleted
    assert printer.firmware_name == "Marlin 2.1.2.7 (Dec  8 2026 01:02:03)"
    assert run2.flasher.verified_by == "firmware-report"
    assert name1 in (state / "marlin-sd-names.json").read_text()


def test_creality_skips_a_repeated_name_and_the_flasher_says_the_old_firmware_runs(
    make_printer: MakePrinter,
) -> None:
    printer = make_printer(family="creality", machine="Ender-3 V2")
    flash(printer, new_build(), sd_filename="FW.BIN")  # no state_dir: nothing remembered
    newer = make_marlin_bin("Marlin 2.1.2.7 (Dec  9 2026 09:09:09)", seed=3)
    with pytest.raises(VerifyError) as exc:
        flash(printer, newer, sd_filename="FW.BIN")
    assert "not the uploaded" in exc.value.message
    assert "Creality bootloaders skip a file whose name they flashed" in exc.value.cause
    assert printer.firmware_name == NEW


def test_a_remembered_creality_name_is_refused_before_uploading(
    make_printer: MakePrinter, tmp_path: Path
) -> None:
    printer = make_printer(family="creality", machine="Ender-3 V2")
    flash(printer, new_build(), sd_filename="FW.BIN", state_dir=str(tmp_path))
    with pytest.raises(PreflightError, match="last file this Creality board flashed"):
        flash(printer, new_build(), sd_filename="FW.BIN", state_dir=str(tmp_path))
    assert printer.stats.resets == 1


def test_creality_f401_uses_the_update_folder_by_its_short_alias(
    make_printer: MakePrinter,
) -> None:
    printer = make_printer(family="creality-f4", machine="Ender-3 S1")
    data = new_build()
    run = flash(printer, data)
    (key,) = printer.card.files
    assert key.startswith("/STM32F~1/FW") and printer.card.files[key] == data
    assert run.flasher.family == "creality-f4" and printer.firmware_name == NEW


def test_mks_encrypted_image_goes_to_the_fixed_name_and_is_confirmed_after_decrypting(
    make_printer: MakePrinter,
) -> None:
    printer = make_printer(family="mks-encrypted", machine="MKS Robin Nano")
    data = new_build(24 * 1024, mks_encrypt=True)
    run = flash(printer, data, sd_family="mks-encrypted")
    assert printer.card.files["/ROBIN_NANO35.BIN"] == data
    assert printer.firmware_name == NEW and run.flasher.verified_by == "firmware-report"


def test_a_plain_image_for_an_encrypting_mks_bootloader_is_refused_untouched(
    make_printer: MakePrinter,
) -> None:
    printer = make_printer(family="mks-encrypted")
    with pytest.raises(PreflightError, match="expects an MKS-encrypted image"):
        flash(printer, new_build(), sd_family="mks-encrypted")
    assert printer.card.files == {} and printer.stats.resets == 0


def test_without_m997_the_user_is_asked_to_press_reset_at_that_moment(
    make_printer: MakePrinter,
) -> None:
    printer = make_printer(family="btt", m997=False)
    prompts: list[str] = []

    def prompt(message: str) -> None:
        prompts.append(message)
        assert "/FIRMWARE.BIN" in printer.card.files  # uploaded before asking
        threading.Timer(0.05, printer.press_reset).start()

    run = flash(printer, new_build(), prompt=prompt)
    assert len(prompts) == 1 and "Press the printer board's reset button now" in prompts[0]
    assert run.flasher.verified_by == "firmware-report" and printer.firmware_name == NEW


def test_without_m997_and_without_a_prompt_the_error_says_to_press_reset(
    make_printer: MakePrinter,
) -> None:
    printer = make_printer(family="btt", m997=False)
    with pytest.raises(UnsupportedError) as exc:
        flash(printer, new_build())
    assert "Press the printer board's reset button" in exc.value.hint
    assert "/FIRMWARE.BIN" in printer.card.files


def test_the_same_build_again_without_a_rename_is_not_confirmed(
    make_printer: MakePrinter,
) -> None:
    printer = make_printer(family="creality", machine="Ender-3 Pro", firmware_name=NEW)
    run = flash(printer, new_build())
    assert run.flasher.verified_by == "not-confirmed"
    assert run.flasher.confirmation.startswith("Not confirmed")
    assert "same build it ran before" in run.flasher.confirmation


def test_the_same_build_again_is_confirmed_by_the_btt_rename_alone(
    make_printer: MakePrinter,
) -> None:
    printer = make_printer(family="btt", firmware_name=NEW)
    run = flash(printer, new_build())
    assert run.flasher.verified_by == "firmware-report"
    assert "renamed firmware.bin to FIRMWARE.CUR" in run.flasher.confirmation
    assert "reports the new build" not in run.flasher.confirmation


def test_klipper_image_is_flashed_and_reported_as_not_confirmed(
    make_printer: MakePrinter,
) -> None:
    printer = make_printer(family="creality", machine="Ender-3 V2")
    data = make_klipper_bin(mcu="stm32f103xe", app_start=0x08007000, size=16 * 1024)
    run = flash(printer, data, come_back_timeout=1.0, gcode_timeout=0.5)
    assert printer.state == "klipper"
    assert run.flasher.verified_by == "not-confirmed"
    assert "no longer answers G-code" in run.flasher.confirmation


def test_card_already_mounted_on_the_host_is_written_synced_then_reset_and_confirmed(
    make_printer: MakePrinter, tmp_path: Path
) -> None:
    mount = tmp_path / "sdcard"
    mount.mkdir()
    (mount / "FIRMWARE.CUR").write_bytes(b"old")
    printer = make_printer(family="btt", transport="usb", mount_dir=str(mount))
    data = new_build()
    run = flash(printer, data, sd_mount=str(mount))
    assert (mount / "FIRMWARE.CUR").read_bytes() == data and not (mount / "firmware.bin").exists()
    assert run.flasher.verified_by == "firmware-report" and printer.firmware_name == NEW
    assert any("synced" in line for line in run.log)


# --- refusals: nothing is changed on the printer --------------------------------------------


def test_firmware_without_binary_file_transfer_is_refused_with_a_way_out(
    make_printer: MakePrinter,
) -> None:
    printer = make_printer(bft=False)
    with pytest.raises(UnsupportedError) as exc:
        flash(printer, new_build())
    assert "BINARY_FILE_TRANSFER" in exc.value.message and "sd_mount" in exc.value.hint
    assert printer.card.files == {} and printer.stats.resets == 0


def test_no_sd_card_is_refused(make_printer: MakePrinter) -> None:
    printer = make_printer()
    printer.card.present = False
    with pytest.raises(ConnectError, match="no usable SD card"):
        flash(printer, new_build())
    assert printer.stats.resets == 0


def test_read_only_firmware_is_refused(make_printer: MakePrinter) -> None:
    printer = make_printer(sd_write=False)
    with pytest.raises(UnsupportedError, match="SD_WRITE:0"):
        flash(printer, new_build())


def test_printing_from_sd_is_refused(make_printer: MakePrinter) -> None:
    printer = make_printer()
    printer.printing = True
    with pytest.raises(BusyError):
        flash(printer, new_build())
    assert printer.card.files == {}


def test_hex_gcode_and_random_files_are_refused_by_the_image_check() -> None:
    target = Target(method="marlin-sd", port="/dev/null")
    hex_image = image_from_bytes(new_build(), 0x08007000, filename="firmware.hex")
    hex_image.kind = "hex"
    with pytest.raises(PreflightError, match="flash only a .bin"):
        check_image(hex_image, target)
    with pytest.raises(PreflightError, match="not a firmware for a 32-bit"):
        check_image(as_bin(b"G28\nG1 X1\n" * 300, "print.bin"), target)
    with pytest.raises(PreflightError, match="MKS-encrypted"):
        check_image(
            as_bin(new_build(24 * 1024, mks_encrypt=True)),
            Target(method="marlin-sd", options={"sd_family": "btt"}),
        )
    warnings = check_image(as_bin(make_klipper_bin(app_start=0x08007000)), target)
    assert any("Klipper" in w for w in warnings)
    assert any(NEW in w for w in check_image(as_bin(new_build()), target))


def test_naming_rules_per_family() -> None:
    assert plan_names("btt").path == "/firmware.bin"
    assert plan_names("btt").renamed_to == "/FIRMWARE.CUR"
    assert "/FIRMWARE.CUR" in plan_names("btt").delete
    assert plan_names("mks", mks_name="Robin_e3.bin").path == "/Robin_e3.bin"
    assert plan_names("creality-f4", long_filenames=True).path.startswith("/STM32F4_UPDATE/")
    assert plan_names("creality-f4").path.startswith("/STM32F~1/")
    taken = [f"/{unique_name([], now=0)}"]
    assert unique_name(taken, now=0) not in {t.strip("/") for t in taken}


def test_identify_answers_and_does_not_change_what_the_board_runs(
    make_printer: MakePrinter,
) -> None:
    printer = make_printer(machine="Ender-3 V2")
    run = Run(marlin_target(printer))
    try:
        info = run.flasher.identify()
    finally:
        run.flasher.close()
    assert info.details["firmware_name"] == OLD and info.details["family"] == "creality"
    assert printer.stats.resets == 0 and not printer.binary and printer.card.files == {}


def test_mounted_card_without_a_port_is_copied_and_reported_as_not_confirmed(
    tmp_path: Path,
) -> None:
    mount = tmp_path / "sdcard"
    (mount / "STM32F4_UPDATE").mkdir(parents=True)
    prompts: list[str] = []
    target = Target(
        method="marlin-sd",
        options={"sd_mount": str(mount), "sd_family": "creality-f4", "prompt": prompts.append},
    )
    run = Run(target)
    data = new_build()
    run(as_bin(data))
    (written,) = list((mount / "STM32F4_UPDATE").iterdir())
    assert written.read_bytes() == data and written.name.startswith("FW")
    assert len(prompts) == 1 and run.flasher.verified_by == "not-confirmed"
    assert "without the printer's serial port" in run.flasher.confirmation


def test_discovery_probing_names_a_free_marlin_port_for_the_sd_upload(
    make_printer: MakePrinter,
) -> None:
    """No AVR bootloader answers on a 32-bit Marlin board; its M115 does, with
    BINARY_FILE_TRANSFER, so the probe offers marlin-sd for that port."""
    from octoprint_flasher import discovery

    printer = make_printer()

    class Port:
        device = printer.port
        vid = pid = None
        description = "pty"

    devs = discovery.discover(probe=True, port_lister=lambda: [Port()])
    (dev,) = [d for d in devs if d.port == printer.port]
    assert dev.method == "marlin-sd", devs.warnings
    assert dev.details["firmware"].startswith("Marlin") and dev.details["baud"] == printer.baud
