"""Byte-level behaviour of the DfuSe protocol layer, without any USB device."""

from __future__ import annotations

import errno
from typing import Optional

import pytest
import usb.core

from octoprint_flasher.protocols import dfuse
from octoprint_flasher.protocols.dfuse import (
    DfuSession,
    DfuStatus,
    DfuStatusError,
    LayoutError,
    State,
    Status,
    StuckBusyError,
    Timeouts,
    parse_functional_descriptor,
    parse_layout,
)

K = 1024


def geometry(text: str) -> list[tuple[int, int, int, str]]:
    return [
        (s.start, s.count, s.sector_size, "r" * s.readable + "e" * s.erasable + "w" * s.writable)
        for s in parse_layout(text).segments
    ]


class TestLayoutStrings:
    """Every string quoted in the research notes, as the ROMs send them."""

    def test_f407_internal_flash(self) -> None:
        layout = parse_layout("@Internal Flash  /0x08000000/04*016Kg,01*064Kg,07*128Kg")
        assert layout.name == "Internal Flash"
        assert geometry(layout.raw) == [
            (0x08000000, 4, 16 * K, "rew"),
            (0x08010000, 1, 64 * K, "rew"),
            (0x08020000, 7, 128 * K, "rew"),
        ]
        assert layout.size == 1024 * K
        assert layout.end == 0x08100000
        assert layout.smallest_sector == 16 * K

    def test_f407_other_alternates(self) -> None:
        assert geometry("@Option Bytes  /0x1FFFC000/01*016 g") == [(0x1FFFC000, 1, 16, "rew")]
        assert geometry("@OTP Memory /0x1FFF7800/01*512 g,01*016 g") == [
            (0x1FFF7800, 1, 512, "rew"),
            (0x1FFF7A00, 1, 16, "rew"),
        ]

    def test_device_feature_is_forced_read_write(self) -> None:
        assert geometry("@Device Feature/0xFFFF0000/01*004 g") == [(0xFFFF0000, 1, 4, "rw")]

    def test_f411_family_with_type_e(self) -> None:
        assert geometry("@Internal Flash  /0x08000000/04*016Kg,01*064Kg,03*128Kg")[-1] == (
            0x08020000,
            3,
            128 * K,
            "rew",
        )
        assert geometry("@Option Bytes  /0x1FFFC000/01*016 e") == [(0x1FFFC000, 1, 16, "rw")]

    def test_h743_three_spaces(self) -> None:
        layout = parse_layout("@Internal Flash   /0x08000000/16*128Kg")
        assert layout.name == "Internal Flash"
        assert layout.size == 2048 * K
        assert geometry("@Option Bytes   /0x5200201C/01*128 e") == [(0x5200201C, 1, 128, "rw")]

    def test_h723_and_g0b1(self) -> None:
        assert geometry("@Internal Flash   /0x08000000/08*128Kg") == [
            (0x08000000, 8, 128 * K, "rew")
        ]
        assert geometry("@Internal Flash   /0x08000000/256*02Kg") == [
            (0x08000000, 256, 2 * K, "rew")
        ]

    def test_g474_option_bytes_two_blocks(self) -> None:
        assert geometry("@Option Bytes   /0x1FFF7800/01*048 e/0x1FFFF800/01*048 e") == [
            (0x1FFF7800, 1, 48, "rw"),
            (0x1FFFF800, 1, 48, "rw"),
        ]

    def test_f429_truncated_string_decodes_to_first_megabyte(self) -> None:
        # bLength 166 declared, 112 bytes sent: pyusb decodes buf[2:112] (55 characters)
        full = "@Internal Flash  /0x08000000/04*016Kg,01*064Kg,07*128Kg,04*016Kg,01*064Kg,07*128Kg"
        sent = (bytes([166, 3]) + full.encode("utf-16-le"))[:112]
        text = sent[2 : sent[0] & 0xFE].decode("utf-16-le")
        layout = parse_layout(text)
        assert layout.size == 1024 * K
        assert parse_layout(full).size == 2048 * K

    def test_truncation_inside_a_group_is_ignored_with_a_note(self) -> None:
        layout = parse_layout("@Internal Flash  /0x08000000/04*016Kg,01*064Kg,07*12")
        assert layout.size == 128 * K
        assert "truncated" in layout.notes[0]

    def test_non_printable_junk_is_dropped(self) -> None:
        layout = parse_layout("@Internal Flash  /0x08000000/04*016Kg,01*064Kg\x00\x07\ufffd\x01")
        assert layout.size == 128 * K
        assert layout.raw.endswith("064Kg")

    def test_spaces_and_leading_zeros_and_multipliers(self) -> None:
        assert geometry("@ Flash /0x08000000/ 002 * 0001 M g , 0004*512 B a") == [
            (0x08000000, 2, 1024 * K, "rew"),
            (0x08200000, 4, 512, "r"),
        ]

    def test_sector_lookup_is_aligned(self) -> None:
        layout = parse_layout("@Internal Flash  /0x08000000/04*016Kg,01*064Kg,03*128Kg")
        assert layout.sector_at(0x08008123) == (0x08008000, 16 * K)
        assert layout.sector_at(0x08031234) == (0x08020000, 128 * K)
        assert layout.sector_at(0x08080000) is None
        # a 40 KiB image at 0x08008000 touches two 16 KiB sectors and the 64 KiB one
        assert layout.sectors(0x08008000, 0x08008000 + 40 * K) == [
            (0x08008000, 16 * K),
            (0x0800C000, 16 * K),
            (0x08010000, 64 * K),
        ]
        assert layout.uncovered(0x08070000, 0x08090000) == [(0x08080000, 0x08090000)]
        assert layout.uncovered(0x08000000, 0x08080000) == []

    def test_read_only_memory_is_not_writable(self) -> None:
        layout = parse_layout("@X /0x08000000/01*016Ka,01*016Kg")
        assert layout.uncovered(0x08000000, 0x08008000) == [(0x08000000, 0x08004000)]

    @pytest.mark.parametrize("text", ["", "Internal Flash", "@Internal Flash", "@X /0x0800/,"])
    def test_unparseable_strings_are_refused(self, text: str) -> None:
        with pytest.raises(LayoutError):
            parse_layout(text)

    def test_garbage_in_the_middle_is_refused(self) -> None:
        with pytest.raises(LayoutError, match="unreadable sector group"):
            parse_layout("@Internal Flash /0x08000000/04*016Kg,zz,01*064Kg")


class TestBytes:
    def test_getstatus_poll_timeout_is_24_bit_little_endian(self) -> None:
        status = DfuStatus.parse(bytes([0x0B, 0x64, 0x01, 0x02, 0x0A, 0x00]))
        assert status.status == Status.ERR_VENDOR
        assert status.poll_timeout_ms == 0x020164
        assert status.state == State.DFU_ERROR
        assert status.to_bytes() == bytes([0x0B, 0x64, 0x01, 0x02, 0x0A, 0x00])
        assert "read-out protection" in status.describe()

    def test_short_status_is_a_protocol_error(self) -> None:
        with pytest.raises(dfuse.ProtocolError, match="3 bytes"):
            DfuStatus.parse(b"\x00\x00\x00")

    def test_dfuse_commands(self) -> None:
        assert dfuse.cmd_set_address(0x08008000) == bytes([0x21, 0x00, 0x80, 0x00, 0x08])
        assert dfuse.cmd_erase(0x08020000) == bytes([0x41, 0x00, 0x00, 0x02, 0x08])
        assert dfuse.cmd_mass_erase() == b"\x41"
        assert dfuse.cmd_read_unprotect() == b"\x92"

    def test_block_address(self) -> None:
        assert dfuse.block_address(0x08008000, 2, 2048) == 0x08008000
        assert dfuse.block_address(0x08008000, 5, 2048) == 0x08008000 + 3 * 2048

    def test_functional_descriptor_found_among_others(self) -> None:
        # an interface association descriptor, then the F407 ROM's functional descriptor
        blob = bytes([8, 0x0B, 0, 1, 0xFE, 1, 2, 0]) + bytes.fromhex("09210bff0000081a01")
        fd = parse_functional_descriptor(blob)
        assert fd is not None
        assert (fd.attributes, fd.detach_timeout_ms, fd.transfer_size) == (0x0B, 255, 2048)
        assert fd.is_dfuse and fd.can_download and fd.can_upload
        assert fd.to_bytes() == bytes.fromhex("09210bff0000081a01")

    def test_dfu_1_0_functional_descriptor_has_no_version(self) -> None:
        fd = parse_functional_descriptor(bytes([7, 0x21, 0x03, 0xFF, 0x00, 0x00, 0x04]))
        assert fd is not None and fd.transfer_size == 1024 and fd.dfu_version == 0x0100

    def test_no_functional_descriptor(self) -> None:
        assert parse_functional_descriptor(b"") is None
        assert parse_functional_descriptor(bytes([0, 0x21])) is None


class ScriptedDevice:
    """Answers GETSTATUS from a script and records every request."""

    def __init__(self, statuses: list[object]) -> None:
        self.statuses = list(statuses)
        self.sent: list[tuple[int, int, bytes]] = []

    def ctrl_transfer(
        self, bm: int, req: int, value: int, index: int, data: object, timeout: int
    ) -> object:
        if bm == 0x21:
            payload = bytes(data) if isinstance(data, (bytes, bytearray)) else b""
            self.sent.append((req, value, payload))
            return len(payload)
        self.sent.append((req, value, b""))
        if req == dfuse.DFU_GETSTATUS:
            item = self.statuses.pop(0)
            if isinstance(item, Exception):
                raise item
            assert isinstance(item, tuple)
            state, status, poll = item
            return DfuStatus(status, poll, state).to_bytes()
        raise AssertionError(f"unexpected IN request {req}")


def session(dev: ScriptedDevice, scale: float = 1.0) -> tuple[DfuSession, list[float]]:
    slept: list[float] = []
    clock = [0.0]

    def sleep(s: float) -> None:
        slept.append(s)
        clock[0] += s

    def now() -> float:
        return clock[0]

    return DfuSession(dev, 0, 2048, Timeouts(scale=scale), sleep=sleep, clock=now), slept


BUSY = State.DFU_DNBUSY
IDLE5 = State.DFU_DNLOAD_IDLE


class TestPolling:
    def test_waits_bw_poll_timeout_between_status_requests(self) -> None:
        dev = ScriptedDevice([(BUSY, 0, 100), (BUSY, 0, 250), (IDLE5, 0, 0)])
        s, slept = session(dev)
        s.erase_sector(0x08008000, 16 * K)
        assert dev.sent[0] == (dfuse.DFU_DNLOAD, 0, b"\x41\x00\x80\x00\x08")
        assert slept == [0.1, 0.25]

    def test_error_state_raises_with_the_status(self) -> None:
        dev = ScriptedDevice([(BUSY, 0, 5), (State.DFU_ERROR, Status.ERR_TARGET, 0)])
        s, _ = session(dev)
        with pytest.raises(DfuStatusError) as info:
            s.set_address(0x09000000)
        assert info.value.status.status == Status.ERR_TARGET

    def test_first_status_must_be_busy_or_done(self) -> None:
        dev = ScriptedDevice([(State.DFU_IDLE, 0, 0)])
        s, _ = session(dev)
        with pytest.raises(DfuStatusError, match="dfuIDLE"):
            s.set_address(0x08000000)

    def test_busy_past_the_deadline_is_an_error(self) -> None:
        dev = ScriptedDevice([(BUSY, 0, 1000)] * 20)
        s, _ = session(dev)
        with pytest.raises(StuckBusyError, match="more than 5.0s"):
            s.set_address(0x08000000)

    def test_stuck_erase_gets_two_clrstatus_and_counts_as_done(self) -> None:
        statuses: list[object] = [
            (BUSY, 0, 1000),
            (BUSY, 0, 1000),
            (BUSY, 0, 1000),
            (BUSY, 0, 1000),
        ]
        statuses.append((State.DFU_IDLE, 0, 0))
        dev = ScriptedDevice(statuses)
        s, _ = session(dev, scale=0.5)  # 128 KiB deadline: 4 s * 0.5
        # the poll level only; erase_sector then reads the sector back (tests/dfu/test_stuck_erase)
        s.command(dfuse.cmd_erase(0x08020000), "Erasing", 2.0, stuck_quirk=True)
        reqs = [r for r, _, _ in dev.sent]
        assert reqs.count(dfuse.DFU_CLRSTATUS) == 2
        assert s.quirks_used == ["stuck-dnbusy"]

    def test_hundred_zero_timeouts_give_up(self) -> None:
        dev = ScriptedDevice([(BUSY, 0, 0)] * 102)
        s, _ = session(dev)
        with pytest.raises(StuckBusyError, match="100 times"):
            s.set_address(0x08000000)

    def test_stall_after_a_nonzero_timeout_is_retried(self) -> None:
        stall = usb.core.USBError("Pipe error", -9, errno.EPIPE)
        dev = ScriptedDevice([(BUSY, 0, 7), stall, (IDLE5, 0, 0)])
        s, slept = session(dev)
        s.set_address(0x08000000)
        assert slept == [0.007, 0.007]

    def test_recover_clears_error_and_aborts_idle_states(self) -> None:
        dev = ScriptedDevice(
            [
                (State.DFU_ERROR, Status.ERR_FIRMWARE, 0),
                (State.DFU_UPLOAD_IDLE, 0, 0),
                (State.DFU_IDLE, 0, 0),
            ]
        )
        s, _ = session(dev)
        s.recover()
        reqs = [r for r, _, _ in dev.sent]
        assert reqs == [
            dfuse.DFU_GETSTATUS,
            dfuse.DFU_CLRSTATUS,
            dfuse.DFU_GETSTATUS,
            dfuse.DFU_ABORT,
            dfuse.DFU_GETSTATUS,
        ]

    def test_leave_errors_are_the_normal_goodbye(self) -> None:
        gone = usb.core.USBError("No such device", -4, errno.ENODEV)
        dev = ScriptedDevice([(BUSY, 0, 5), (IDLE5, 0, 0), gone])
        s, _ = session(dev)
        how = s.leave(0x08008000)
        assert "left" in how
        assert dev.sent[3] == (dfuse.DFU_DNLOAD, 0, b"")

    def test_leave_accepts_manifest(self) -> None:
        dev = ScriptedDevice([(State.DFU_MANIFEST, 0, 0)])
        s, _ = session(dev)
        assert s.leave(None) == "device entered dfuMANIFEST"


def test_write_uses_one_set_address_per_run_and_a_fresh_one_for_the_short_tail() -> None:
    ok: list[object] = [(BUSY, 0, 0), (IDLE5, 0, 0)]
    dev = ScriptedDevice(ok * 6)
    s, _ = session(dev)
    s.write(0x08008000, bytes(2048 * 3 + 100))
    dnloads = [(v, len(p), p[:1]) for r, v, p in dev.sent if r == dfuse.DFU_DNLOAD]
    assert (
        dnloads
        == [
            (0, 5, b"\x21"),
            (2, 2048, b"\x00"),
            (3, 2048, b"\x00"),
            (4, 2048, b"\x00"),
            (0, 5, b"\x21"),
            (2, 100, b"\x00"),
        ][: len(dnloads)]
    )
    assert len(dnloads) == 6
    tail_address = [p for r, v, p in dev.sent if r == dfuse.DFU_DNLOAD and v == 0][1]
    assert tail_address == dfuse.cmd_set_address(0x08008000 + 3 * 2048)


def test_usb_error_classification() -> None:
    stall = usb.core.USBError("Pipe error", -9, errno.EPIPE)
    gone = usb.core.USBError("No such device", -4, errno.ENODEV)
    timeout = usb.core.USBTimeoutError("Operation timed out", -7, errno.ETIMEDOUT)
    assert dfuse.is_stall(stall) and not dfuse.is_gone(stall)
    assert dfuse.is_gone(gone)
    assert dfuse.is_timeout(timeout)
    plain: Optional[Exception] = ValueError("x")
    assert plain is not None and not dfuse.is_usb_error(plain)
