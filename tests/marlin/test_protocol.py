"""The BFT framing and the printer's lines, byte for byte as docs/marlin.md gives them."""

from __future__ import annotations

import pytest

from octoprint_flasher.protocols import marlin_bft as bft


@pytest.mark.parametrize(
    ("made", "wire"),
    [
        (bft.sync_packet(0), "ad b5 00 01 00 00 01 03"),
        (bft.packet(0, bft.PROTOCOL_FILE, bft.FILE_QUERY), "ad b5 00 10 00 00 10 30"),
        (
            bft.packet(1, bft.PROTOCOL_FILE, bft.FILE_OPEN, bft.open_payload("fw.bin")),
            "ad b5 01 11 09 00 1b 49 00 00 66 77 2e 62 69 6e 00 c5 9d",
        ),
        (
            bft.packet(5, bft.PROTOCOL_FILE, bft.FILE_WRITE, b"ABC"),
            "ad b5 05 13 03 00 1b 53 41 42 43 50 3b",
        ),
        (bft.close_packet(9), "ad b5 09 02 00 00 0b 2a"),
    ],
)  # fmt: skip
def test_packets_match_the_worked_bytes(made: bytes, wire: str) -> None:
    assert made.hex(" ") == wire


def test_footer_covers_the_header_with_its_checksum_then_the_payload() -> None:
    pkt = bft.packet(7, 1, 3, b"\x00\xff" * 10)
    head = bft.parse_header(pkt[:8])
    assert head.valid and (head.sync, head.protocol, head.ptype, head.length) == (7, 1, 3, 20)
    assert int.from_bytes(pkt[-2:], "little") == bft.fletcher16(pkt[2:-2])
    # the receiver's running sum: the header checksum is a snapshot after 4 bytes
    assert bft.fletcher16(pkt[2:-2]) == bft.fletcher16(pkt[8:-2], bft.fletcher16(pkt[2:8]))


def test_a_packet_without_payload_has_no_footer() -> None:
    assert len(bft.close_packet(0)) == bft.HEADER_SIZE


@pytest.mark.parametrize(
    ("line", "kind", "sync"),
    [
        ("ok12", "ok", 12),
        ("rs0", "rs", 0),
        ("fe3", "fe", 3),
        ("ok", "other", -1),  # a G-code ok is not a packet ack
        ("ok T:21.40 /0.00", "other", -1),
        ("echo:Resend request 1", "other", -1),
        ("rsvp", "other", -1),
        ("ssh", "other", -1),
        ("fe", "other", -1),
    ],
)
def test_replies_are_matched_exactly(line: str, kind: str, sync: int) -> None:
    reply = bft.parse_reply(line)
    assert (reply.kind, reply.sync) == (kind, sync)


def test_sync_reply_gives_expected_sync_buffer_and_version() -> None:
    reply = bft.parse_reply("ss48,96,0.1.0")
    assert (reply.kind, reply.sync, reply.buffer_size, reply.version) == ("ss", 48, 96, "0.1.0")


def test_marlins_own_ptf_spelling_counts_as_a_file_result() -> None:
    assert bft.parse_reply("PTF:invalid") == bft.Reply("pft", text="invalid")
    assert bft.parse_reply("PFT:ioerror") == bft.Reply("pft", text="ioerror")


@pytest.mark.parametrize(
    ("text", "params"),
    [
        ("version:0.1.0:compression:heatshrink,8,4", (8, 4)),
        ("version:0.1.0:compresion:heatshrink,8,4", (8, 4)),  # 2021 spelling
        ("version:0.1.0:compression:none", None),
    ],
)
def test_query_answer_names_the_compression(text: str, params: object) -> None:
    assert bft.query_compression(text) == params


M115 = [
    "FIRMWARE_NAME:Marlin 2.1.2.7 (Dec  6 2026 05:42:29) SOURCE_CODE_URL:github.com/"
    "MarlinFirmware/Marlin PROTOCOL_VERSION:1.0 MACHINE_TYPE:Ender-3 V2 EXTRUDER_COUNT:1 "
    "UUID:cede2a2f-41a2-4748-9b12-c55c62f367ff",
    "Cap:SERIAL_XON_XOFF:0",
    "Cap:BINARY_FILE_TRANSFER:1",
    "Cap:SD_WRITE:1",
    "Cap:LFN_WRITE:0",
]


def test_m115_gives_the_comparable_name_the_machine_and_the_caps() -> None:
    report = bft.parse_m115(M115)
    assert report.firmware_name == "Marlin 2.1.2.7 (Dec  6 2026 05:42:29)"
    assert report.machine == "Ender-3 V2"
    assert report.cap("BINARY_FILE_TRANSFER") and report.cap("SD_WRITE")
    assert not report.cap("LFN_WRITE") and not report.cap("NOT_REPORTED")


def test_card_listing_and_file_probe_answers() -> None:
    assert bft.sd_card_ok(["echo:SD card ok"]) is True
    assert bft.sd_card_ok(["echo:No SD card"]) is False
    assert bft.sd_card_ok(["echo:busy"]) is None
    lines = ["Begin file list", "TEST.GCO 1234", "CUBE~1.GCO 99 cube-long.gcode", "End file list"]
    assert bft.parse_listing(lines) == [("TEST.GCO", 1234), ("CUBE~1.GCO", 99)]
    opened = ["File opened: FIRMWARE.CUR Size: 16384", "File selected"]
    assert bft.parse_file_opened(opened) == 16384
    assert bft.parse_file_opened(["open failed, File: FIRMWARE.CUR."]) is None
