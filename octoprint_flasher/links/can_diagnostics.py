"""socketcan interface facts turned into advice a user can act on.

Most Katapult-over-CAN failures show up as "no answer" at the protocol level; the interface
knows why: it is down, at another bitrate, counting frame/CRC errors (termination, wiring),
bus-off without automatic restart, or its transmit queue is too short. Facts come from
``ip -details -statistics -json link show <if>`` and ``/sys/class/net/<if>``; both readers are
injectable so tests use canned fixtures (this kernel has no CAN).
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

RECOMMENDED_TXQUEUELEN = 128

IpReader = Callable[[str], Optional[dict[str, Any]]]


@dataclass
class CanFacts:
    channel: str
    exists: bool = True
    up: bool = False
    state: str = ""
    bitrate: Optional[int] = None
    restart_ms: Optional[int] = None
    berr_tx: int = 0
    berr_rx: int = 0
    xstats: dict[str, int] = field(default_factory=dict)
    rx: dict[str, int] = field(default_factory=dict)
    tx: dict[str, int] = field(default_factory=dict)
    txqueuelen: Optional[int] = None


@dataclass(frozen=True)
class Advice:
    level: str  # error | warning | info
    code: str
    message: str


def ip_link_json(channel: str) -> Optional[dict[str, Any]]:
    """Run ``ip -details -statistics -json link show <channel>`` (no shell) and parse it."""
    try:
        proc = subprocess.run(
            ["ip", "-details", "-statistics", "-json", "link", "show", channel],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        return {"missing": True}
    try:
        rows = json.loads(proc.stdout or "[]")
    except ValueError:
        return None
    return rows[0] if rows else {"missing": True}


def _int(value: Any) -> Optional[int]:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def facts_from_ip(channel: str, row: Optional[dict[str, Any]]) -> CanFacts:
    """Parse one ``ip -json`` link object."""
    if row is None:
        return CanFacts(channel, exists=True)
    if row.get("missing"):
        return CanFacts(channel, exists=False)
    info = (row.get("linkinfo") or {}).get("info_data") or {}
    xstats = (row.get("linkinfo") or {}).get("info_xstats") or {}
    stats = row.get("stats64") or row.get("stats") or {}
    berr = info.get("berr_counter") or {}
    flags = row.get("flags") or []
    return CanFacts(
        channel=channel,
        exists=True,
        up="UP" in flags or row.get("operstate") == "UP",
        state=str(info.get("state", "")),
        bitrate=_int((info.get("bittiming") or {}).get("bitrate")),
        restart_ms=_int(info.get("restart_ms")),
        berr_tx=_int(berr.get("tx")) or 0,
        berr_rx=_int(berr.get("rx")) or 0,
        xstats={k: v for k, v in xstats.items() if isinstance(v, int)},
        rx={k: v for k, v in (stats.get("rx") or {}).items() if isinstance(v, int)},
        tx={k: v for k, v in (stats.get("tx") or {}).items() if isinstance(v, int)},
        txqueuelen=_int(row.get("txqlen")),
    )


def read_facts(
    channel: str, reader: Optional[IpReader] = None, sysfs: Path = Path("/sys")
) -> CanFacts:
    """Interface facts from ``ip`` (or ``reader``), completed from sysfs where present."""
    facts = facts_from_ip(channel, (reader or ip_link_json)(channel))
    base = sysfs / "class" / "net" / channel
    if facts.txqueuelen is None:
        facts.txqueuelen = _read_int(base / "tx_queue_len")
    for name, key in (
        ("rx_errors", "errors"),
        ("rx_dropped", "dropped"),
        ("rx_over_errors", "over_errors"),
        ("rx_frame_errors", "frame_errors"),
    ):
        value = _read_int(base / "statistics" / name)
        if value is not None and key not in facts.rx:
            facts.rx[key] = value
    for name, key in (("tx_errors", "errors"), ("tx_dropped", "dropped")):
        value = _read_int(base / "statistics" / name)
        if value is not None and key not in facts.tx:
            facts.tx[key] = value
    return facts


def _read_int(path: Path) -> Optional[int]:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def advise(facts: CanFacts, expected_bitrate: Optional[int] = None) -> list[Advice]:
    """Everything worth telling the user about this interface, worst first."""
    ch = facts.channel
    out: list[Advice] = []
    if not facts.exists:
        return [
            Advice(
                "error",
                "missing",
                f"There is no CAN interface {ch}. Plug in the adapter (or, for a Klipper "
                "USB-CAN bridge, the board may be in its bootloader now and shows up as a "
                "USB serial port instead).",
            )
        ]
    if not facts.up:
        rate = expected_bitrate or facts.bitrate or 1000000
        out.append(
            Advice(
                "error",
                "down",
                f"{ch} is down. Bring it up: sudo ip link set {ch} up type can bitrate {rate}.",
            )
        )
    state = facts.state.upper()
    if state == "BUS-OFF":
        restart = (
            f" Automatic restart is off (restart-ms 0): sudo ip link set {ch} type can "
            "restart-ms 100, or take the interface down and up."
            if not facts.restart_ms
            else ""
        )
        out.append(
            Advice(
                "error",
                "bus-off",
                f"{ch} is BUS-OFF: it saw so many errors that it stopped sending. Typical "
                "causes: bitrate mismatch, missing termination, CANH/CANL swapped." + restart,
            )
        )
    elif state in ("ERROR-PASSIVE", "ERROR-WARNING"):
        out.append(
            Advice(
                "warning",
                "error-state",
                f"{ch} is {state} (error counters tx {facts.berr_tx}, rx {facts.berr_rx}): "
                "frames are failing on the wire. Check termination (two 120 ohm resistors, "
                "about 60 ohm across CANH-CANL with power off) and the bitrate.",
            )
        )
    if expected_bitrate and facts.bitrate and expected_bitrate != facts.bitrate:
        out.append(
            Advice(
                "error",
                "bitrate",
                f"{ch} runs at {facts.bitrate} bit/s but the firmware expects "
                f"{expected_bitrate} bit/s; nodes at another bitrate cannot answer. Set both "
                "to the same value.",
            )
        )
    frame_errors = facts.rx.get("frame_errors", 0) + facts.rx.get("crc_errors", 0)
    bus_errors = facts.xstats.get("bus_error", 0)
    if frame_errors or bus_errors:
        out.append(
            Advice(
                "warning",
                "bus-errors",
                f"{ch} has counted {facts.rx.get('errors', frame_errors)} receive errors "
                f"({frame_errors} frame/CRC, {bus_errors} bus errors): damaged frames on the "
                "wire. Usual causes: missing or doubled termination, untwisted or long stubs, "
                "or a node at another bitrate. A lost frame can wedge Katapult until reset.",
            )
        )
    if facts.rx.get("over_errors", 0):
        out.append(
            Advice(
                "warning",
                "overrun",
                f"{ch} dropped received frames ({facts.rx['over_errors']} overruns): the "
                "adapter cannot keep up (known with MCP2515 HATs); replies may be lost.",
            )
        )
    if facts.txqueuelen is not None and facts.txqueuelen < RECOMMENDED_TXQUEUELEN:
        out.append(
            Advice(
                "warning",
                "txqueuelen",
                f"{ch} has txqueuelen {facts.txqueuelen}; {RECOMMENDED_TXQUEUELEN} or more "
                f"avoids 'No buffer space available': sudo ip link set {ch} txqueuelen 128.",
            )
        )
    return out


def no_answer_advice(channel: str) -> str:
    """Why a query can come back empty even on a healthy bus."""
    return (
        f"No node answered on {channel}. A node that already has an id never answers a "
        "query: Klipper keeps its id while klippy runs (stop klippy, or give the UUID "
        "directly: the flasher asks Klipper to enter Katapult by UUID), and a Katapult node "
        "being flashed by another program keeps its id too."
    )
