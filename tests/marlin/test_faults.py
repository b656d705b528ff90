"""Every fault the link and the card can throw at an upload: the file on the card is exact
or the flash fails loudly, binary mode is always left, and a failed upload never resets."""

from __future__ import annotations

import sys

import pytest
import serial

from octoprint_flasher.errors import CancelledError, FlashError, ProtocolError
from octoprint_flasher.flasher import CancelToken
from octoprint_flasher.flashers.marlin_sd import rescue
from octoprint_flasher.links.serial_port import Wire
from octoprint_flasher.protocols import marlin_bft as bft
from tests.emulators.marlin_printer import Faults, MarlinPrinter, make_marlin_bin

from .conftest import MakePrinter, Run, as_bin, flash, marlin_target

NEW = "Marlin 2.1.2.7 (Dec  7 2026 10:11:12)"
#: binary stream offsets for a btt upload: SYNC (8 B), OPEN "/firmware.bin" (26 B), WRITEs
FIRST_WRITE = 8 + 26
PACKET = 106


def image(size: int = 12 * 1024) -> bytes:
    return make_marlin_bin(NEW, size=size, seed=11)


def assert_left_binary_mode(printer: MarlinPrinter) -> None:
    assert printer.wait_for(lambda: not printer.binary, 1.0)
    assert printer.stats.resets == 0  # a failed upload never resets the board


def test_lost_ok_is_resent_and_the_duplicate_written_once(make_printer: MakePrinter) -> None:
    printer = make_printer(faults=Faults(lose_ok_syncs={5, 6, 40}))
    data = image()
    run = flash(printer, data)
    assert printer.stats.duplicates == 3 and printer.stats.flashes == ["/FIRMWARE.BIN"]
    assert printer.file("/FIRMWARE.CUR") == data and run.flasher.verified_by == "firmware-report"


def test_corrupted_and_lost_host_bytes_get_resend_requests(make_printer: MakePrinter) -> None:
    faults = Faults(
        rx_corrupt_offsets={FIRST_WRITE + 3 * PACKET + 20, FIRST_WRITE + 7 * PACKET + 2},
        rx_drop_offsets={FIRST_WRITE + 10 * PACKET + 50},  # half a packet: the 500 ms drop
    )
    printer = make_printer(faults=faults)
    data = image()
    flash(printer, data)
    assert printer.stats.resend_requests >= 3 and printer.stats.timeouts == 1
    assert printer.file("/FIRMWARE.CUR") == data


def test_a_corrupted_ok_counts_as_lost(make_printer: MakePrinter) -> None:
    printer = make_printer(faults=Faults(corrupt_ok_syncs={9}))
    data = image()
    flash(printer, data)
    assert printer.file("/FIRMWARE.CUR") == data


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_loss_and_corruption_both_ways_never_give_a_wrong_success(
    make_printer: MakePrinter, seed: int
) -> None:
    faults = Faults(
        rx_loss_rate=0.0005,
        rx_corrupt_rate=0.0005,
        tx_loss_rate=0.01,
        tx_corrupt_rate=0.01,
        seed=seed,
    )
    printer = make_printer(faults=faults)
    data = image(16 * 1024)
    try:
        run = flash(printer, data)
    except FlashError:
        assert printer.firmware_name != NEW  # failed loudly, and nothing was flashed
        return
    assert printer.file("/FIRMWARE.CUR") == data and printer.firmware_name == NEW
    assert run.flasher.verified_by == "firmware-report"


def test_a_64_byte_receive_ring_makes_the_blocks_smaller_until_they_fit(
    make_printer: MakePrinter,
) -> None:
    printer = make_printer(rx_buffer=64)
    data = image(40 * 1024)
    run = flash(printer, data)
    assert printer.stats.rx_ring_drops > 0  # full packets did overrun the ring
    assert printer.file("/FIRMWARE.CUR") == data
    assert any("blocks of 48 B" in line for line in run.log)


def test_sd_write_error_fails_the_flash_and_leaves_binary_mode(make_printer: MakePrinter) -> None:
    printer = make_printer()
    printer.card.ioerror_at = 5000
    with pytest.raises(ProtocolError, match="PFT:ioerror"):
        flash(printer, image())
    assert_left_binary_mode(printer)
    assert "/FIRMWARE.BIN" not in printer.card.files  # ABORT deleted the partial file


def test_write_protected_card_fails_at_open(make_printer: MakePrinter) -> None:
    printer = make_printer()
    printer.card.write_protected = True
    with pytest.raises(ProtocolError, match="could not open /firmware.bin"):
        flash(printer, image())
    assert_left_binary_mode(printer)


def test_overrun_fe_mid_transfer_fails_instead_of_succeeding(make_printer: MakePrinter) -> None:
    printer = make_printer()
    target = marlin_target(printer)
    run = Run(target)
    shrink = {"done": False}

    def progress(p: object) -> None:
        if not shrink["done"] and getattr(p, "done", 0) > 2000:
            printer.buffer_size = 64  # the printer now refuses 96-byte packets
            shrink["done"] = True

    run.flasher.identify()
    with pytest.raises(ProtocolError, match="buffer overrun"):
        run.flasher.flash(as_bin(image()), progress)
    run.flasher.close()
    assert printer.stats.overruns >= 1
    assert_left_binary_mode(printer)


def test_sync_wrap_resend_is_taken_as_received(make_printer: MakePrinter) -> None:
    printer = make_printer(faults=Faults(lose_ok_syncs={255}))
    printer.sync = 240  # the counter outlives sessions; this upload crosses 255 -> 0
    data = image()
    flash(printer, data)
    assert printer.file("/FIRMWARE.CUR") == data


def test_compressed_upload_writes_the_same_file_in_fewer_packets(
    make_printer: MakePrinter,
) -> None:
    import heatshrink2  # noqa: F401  the optional 'heatshrink' extra, installed for the tests

    printer = make_printer()
    data = image(16 * 1024)
    run = flash(printer, data, compress=True)
    assert printer.file("/FIRMWARE.CUR") == data
    assert run.result is not None and run.result.blocks_written < len(data) // 96
    assert any("Compressed" in line for line in run.log)


def test_cancel_mid_upload_aborts_deletes_and_leaves_binary_mode(
    make_printer: MakePrinter,
) -> None:
    printer = make_printer()
    run = Run(marlin_target(printer))
    cancel = CancelToken()
    run.flasher.identify()

    def progress(p: object) -> None:
        if getattr(p, "done", 0) > 3000:
            cancel.cancel()

    with pytest.raises(CancelledError):
        run.flasher.flash(as_bin(image()), progress, cancel)
    run.flasher.close()
    assert "/FIRMWARE.BIN" not in printer.card.files
    assert_left_binary_mode(printer)


def test_host_dying_mid_transfer_leaves_the_printer_deaf_until_rescued(
    make_printer: MakePrinter,
) -> None:
    printer = make_printer()
    ser = serial.Serial(printer.port, 115200, timeout=0.05)
    session = bft.BftSession(Wire(ser), ack_timeout=0.15)
    session.start()
    session.open("firmware.bin")
    session.write_file(image(4096)[:1000])
    ser.close()  # the host dies: no ABORT, no CLOSE
    assert printer.binary
    assert printer.wait_for(lambda: printer.stats.idle_aborts == 1, 2.0)
    assert printer.file("/FIRMWARE.BIN") is None and printer.binary  # still deaf to G-code
    assert "stuck in binary mode" in rescue(printer.port)
    assert not printer.binary
    assert "not in binary mode" in rescue(printer.port)


def test_identify_rescues_a_printer_left_in_binary_mode(make_printer: MakePrinter) -> None:
    printer = make_printer()
    ser = serial.Serial(printer.port, 115200, timeout=0.05)
    ser.write(b"M28 B1\n")
    assert printer.wait_for(lambda: printer.binary, 1.0)
    ser.close()
    run = Run(marlin_target(printer, gcode_timeout=0.5))
    try:
        info = run.flasher.identify()
    finally:
        run.flasher.close()
    assert info.details["firmware_name"] and not printer.binary
    assert any("stuck in binary mode" in line for line in run.log)


def test_without_heatshrink2_compression_falls_back_to_a_plain_upload(
    make_printer: MakePrinter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "heatshrink2", None)  # import fails as if not installed
    printer = make_printer()
    data = image()
    run = flash(printer, data, compress=True)
    assert printer.file("/FIRMWARE.CUR") == data
    assert any("heatshrink2 is not installed" in line for line in run.log)


def test_a_printer_without_a_decompressor_gets_a_plain_upload(make_printer: MakePrinter) -> None:
    printer = make_printer(compression=False, old_spelling=True)  # "compresion:none"
    data = image()
    run = flash(printer, data, compress=True)
    assert printer.file("/FIRMWARE.CUR") == data
    assert any("no decompressor" in line for line in run.log)
