"""CAN admin frames, UUIDs, and the python-can link's frame discipline."""

from __future__ import annotations

import errno
from typing import Any, Optional

import can
import pytest

from octoprint_flasher.errors import ConnectError
from octoprint_flasher.links.can_bus import CanLink, NodeStream, factory_from_env
from octoprint_flasher.protocols import klipper_can as kc


def test_uuid_is_fasthash_of_chip_id_as_flashtool_computes_it() -> None:
    # reference values computed with Katapult's flashtool.py convert_usbsn_to_uuid()
    assert kc.uuid_from_chip_id(bytes.fromhex("2D0029001250304B53313420")).hex() == "44294c38216c"
    assert kc.uuid_from_chip_id(bytes.fromhex("0E0022001750425938323120")).hex() == "6cbab3314b18"
    assert kc.uuid_from_chip_id(bytes.fromhex("ABCDEF0123")).hex() == "9ec931374a0c"


def test_admin_frames() -> None:
    uuid = bytes.fromhex("4220d6e9e9f9")
    assert kc.query_frame() == b"\x00"
    assert kc.set_katapult_nodeid_frame(uuid, 129) == bytes.fromhex("114220d6e9e9f981")
    assert kc.request_bootloader_frame(uuid) == bytes.fromhex("024220d6e9e9f9")
    assert kc.clear_katapult_nodeids_frame() == b"\x12"
    assert (kc.node_tx_id(129), kc.node_rx_id(129)) == (0x202, 0x203)
    assert (kc.node_tx_id(4), kc.node_rx_id(4)) == (0x108, 0x109)


@pytest.mark.parametrize(
    ("frame", "app"),
    [
        ("204220d6e9e9f911", "Katapult"),
        ("204220d6e9e9f901", "Klipper"),
        ("204220d6e9e9f9", "Klipper"),  # DLC 7: an old Klipper
    ],
)
def test_query_answers_tell_katapult_from_klipper(frame: str, app: str) -> None:
    answer = kc.parse_answer(bytes.fromhex(frame))
    assert answer is not None and answer.uuid == "4220d6e9e9f9" and answer.app == app


def test_parse_uuid_rejects_typos_with_an_example() -> None:
    assert kc.parse_uuid("4220D6E9E9F9") == bytes.fromhex("4220d6e9e9f9")
    with pytest.raises(ValueError, match="12 hex digits"):
        kc.parse_uuid("4220d6e9e9f")


class FullQueueBus:
    """A bus whose kernel queue is full for the first ``full`` sends (ENOBUFS)."""

    def __init__(self, full: int, code: int = errno.ENOBUFS) -> None:
        self.full = full
        self.code = code
        self.sent: list[Any] = []

    def send(self, msg: Any, timeout: Optional[float] = None) -> None:
        if self.full:
            self.full -= 1
            text = "No buffer space available" if self.code == errno.ENOBUFS else "Network is down"
            raise can.CanOperationError(f"Failed to transmit: {text}", self.code)
        self.sent.append(msg)

    def recv(self, timeout: Optional[float] = None) -> Any:
        return None

    def shutdown(self) -> None:
        pass


def test_enobufs_resends_the_same_frame_and_never_splits_it() -> None:
    bus = FullQueueBus(full=5)
    link = CanLink(bus)
    NodeStream(link, 0x202, 0x203).write(bytes(range(20)))
    assert [bytes(m.data) for m in bus.sent] == [
        bytes(range(8)),
        bytes(range(8, 16)),
        bytes(range(16, 20)),
    ]
    assert all(m.arbitration_id == 0x202 and not m.is_extended_id for m in bus.sent)
    assert link.enobufs_retries == 5


def test_other_send_errors_are_reported_not_retried() -> None:
    bus = FullQueueBus(full=1, code=errno.ENETDOWN)
    with pytest.raises(ConnectError, match="interface went down"):
        CanLink(bus).send(0x3F0, b"\x00")
    assert bus.sent == []


def test_node_stream_reads_only_its_own_id() -> None:
    ch = "link-test"
    host = can.Bus(interface="virtual", channel=ch)
    other = can.Bus(interface="virtual", channel=ch)
    try:
        other.send(can.Message(arbitration_id=0x3F1, data=b"\x20", is_extended_id=False))
        other.send(can.Message(arbitration_id=0x203, data=b"abc", is_extended_id=False))
        stream = NodeStream(CanLink(host, owns_bus=False), 0x202, 0x203)
        assert stream.read(0.5) == b"abc"
        assert stream.read(0.01) == b""
    finally:
        host.shutdown()
        other.shutdown()


def test_bus_factory_env_hook() -> None:
    factory = factory_from_env(
        {"OCTOPRINT_FLASHER_CAN_BUS_FACTORY": "tests.emulators.katapult_node:demo_bus"}
    )
    assert factory is not None and factory.__name__ == "demo_bus"
    with pytest.raises(ConnectError, match="module:function"):
        factory_from_env({"OCTOPRINT_FLASHER_CAN_BUS_FACTORY": "nocolon"})
