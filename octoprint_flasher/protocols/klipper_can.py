"""Klipper/Katapult CAN admin layer: query, assign, clear, request bootloader, UUIDs.

Admin commands go to 0x3F0, answers come from 0x3F1; a node with id ``n`` receives its byte
stream on ``0x100 + 2n`` and sends on ``0x100 + 2n + 1``. Klipper and Katapult share the
layer and a chip's UUID, and differ only in the "app" byte of the query answer.

Pure frame logic over a :class:`FrameLink` (11-bit ids, <= 8 data bytes); python-can lives
in :mod:`octoprint_flasher.links.can_bus`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Protocol

ADMIN_ID = 0x3F0
ADMIN_RESP_ID = 0x3F1

CMD_QUERY_UNASSIGNED = 0x00
CMD_SET_KLIPPER_NODEID = 0x01
CMD_REQUEST_BOOTLOADER = 0x02
CMD_SET_KATAPULT_NODEID = 0x11
CMD_CLEAR_KATAPULT_NODEID = 0x12
RESP_NEED_NODEID = 0x20

APP_KLIPPER = "Klipper"
APP_KATAPULT = "Katapult"

#: flashtool assigns Katapult nodes from 128 on (ids 0x200+); Klipper uses 4 upward
KATAPULT_NODEID = 129
UUID_SEED = 0xA16231A7

_MASK64 = (1 << 64) - 1


def node_tx_id(nodeid: int) -> int:
    """CAN id on which the host sends to node ``nodeid``."""
    return 0x100 + 2 * nodeid


def node_rx_id(nodeid: int) -> int:
    """CAN id on which node ``nodeid`` answers."""
    return node_tx_id(nodeid) + 1


def parse_uuid(text: str) -> bytes:
    """``"4220d6e9e9f9"`` -> the 6 wire bytes, with an actionable error for typos."""
    cleaned = text.strip().lower().replace(":", "").replace("-", "")
    if cleaned.startswith("0x"):
        cleaned = cleaned[2:]
    try:
        raw = bytes.fromhex(cleaned)
    except ValueError:
        raw = b""
    if len(raw) != 6:
        raise ValueError(
            f"{text!r} is not a CAN UUID: expected 12 hex digits such as 4220d6e9e9f9 "
            "(as printed by the CAN query)"
        )
    return raw


def _mix(h: int) -> int:
    h ^= h >> 23
    h = (h * 0x2127599BF4325C37) & _MASK64
    h ^= h >> 47
    return h


def fasthash64(data: bytes, seed: int) -> int:
    """fast-hash's 64-bit hash, the function both firmwares apply to the chip id."""
    m = 0x880355F21E6D1965
    h = (seed ^ (len(data) * m)) & _MASK64
    whole = len(data) // 8 * 8
    for pos in range(0, whole, 8):
        h ^= _mix(int.from_bytes(data[pos : pos + 8], "little"))
        h = (h * m) & _MASK64
    tail = data[whole:]
    if tail:
        h ^= _mix(int.from_bytes(tail, "little"))
        h = (h * m) & _MASK64
    return _mix(h)


def uuid_from_chip_id(chip_id: bytes) -> bytes:
    """The 6 UUID wire bytes of a chip (or of a USB-CAN bridge, from its USB serial number)."""
    return fasthash64(chip_id, UUID_SEED).to_bytes(8, "little")[:6]


def query_frame() -> bytes:
    return bytes((CMD_QUERY_UNASSIGNED,))


def set_katapult_nodeid_frame(uuid: bytes, nodeid: int) -> bytes:
    return bytes((CMD_SET_KATAPULT_NODEID,)) + uuid + bytes((nodeid,))


def set_klipper_nodeid_frame(uuid: bytes, nodeid: int) -> bytes:
    return bytes((CMD_SET_KLIPPER_NODEID,)) + uuid + bytes((nodeid,))


def clear_katapult_nodeids_frame() -> bytes:
    return bytes((CMD_CLEAR_KATAPULT_NODEID,))


def request_bootloader_frame(uuid: bytes) -> bytes:
    return bytes((CMD_REQUEST_BOOTLOADER,)) + uuid


@dataclass(frozen=True)
class NodeAnswer:
    """One answer to QUERY_UNASSIGNED."""

    uuid: str
    app: str

    @property
    def uuid_bytes(self) -> bytes:
        return bytes.fromhex(self.uuid)


def parse_answer(data: bytes) -> Optional[NodeAnswer]:
    """Decode a RESP_NEED_NODEID frame; DLC 7 (no app byte) is an old Klipper."""
    if len(data) < 7 or data[0] != RESP_NEED_NODEID:
        return None
    app = APP_KLIPPER
    if len(data) >= 8 and data[7] == CMD_SET_KATAPULT_NODEID:
        app = APP_KATAPULT
    elif len(data) >= 8 and data[7] != CMD_SET_KLIPPER_NODEID:
        app = f"unknown (0x{data[7]:02x})"
    return NodeAnswer(bytes(data[1:7]).hex(), app)


class FrameLink(Protocol):
    """Whole CAN frames in and out; ``send`` must never split or drop a frame."""

    def send(self, arbitration_id: int, data: bytes) -> None: ...

    def recv(self, timeout: float) -> Optional[tuple[int, bytes]]: ...


class Admin:
    """The admin conversation. Every call sends one frame and, where there is an answer,
    collects it before returning, so there is never more than one command in flight."""

    def __init__(self, link: FrameLink) -> None:
        self.link = link

    def query(self, timeout: float = 0.25) -> list[NodeAnswer]:
        """Ask unassigned nodes to identify; collect answers until ``timeout`` of quiet."""
        self.link.send(ADMIN_ID, query_frame())
        found: dict[str, NodeAnswer] = {}
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return list(found.values())
            frame = self.link.recv(remaining)
            if frame is None:
                continue
            arb_id, data = frame
            if arb_id != ADMIN_RESP_ID:
                continue
            answer = parse_answer(data)
            if answer is not None:
                found[answer.uuid] = answer

    def wait_for(
        self, uuid: bytes, app: Optional[str], timeout: float, interval: float = 0.05
    ) -> Optional[NodeAnswer]:
        """Poll QUERY_UNASSIGNED until ``uuid`` answers (as ``app`` if given).

        This replaces fixed sleeps after a reboot: the node answers as soon as its CAN
        controller is up, usually well before flashtool's 1 s.
        """
        want = uuid.hex()
        deadline = time.monotonic() + timeout
        while True:
            window = min(interval, max(0.0, deadline - time.monotonic()))
            for answer in self.query(window):
                if answer.uuid == want and (app is None or answer.app == app):
                    return answer
            if time.monotonic() >= deadline:
                return None

    def assign_katapult(self, uuid: bytes, nodeid: int = KATAPULT_NODEID) -> None:
        self.link.send(ADMIN_ID, set_katapult_nodeid_frame(uuid, nodeid))

    def clear_katapult(self) -> None:
        self.link.send(ADMIN_ID, clear_katapult_nodeids_frame())

    def request_bootloader(self, uuid: bytes) -> None:
        self.link.send(ADMIN_ID, request_bootloader_frame(uuid))
