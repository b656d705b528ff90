"""Method "auto": the decision table from target fields and the port's USB id."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Optional

import pytest

from octoprint_flasher import methods
from octoprint_flasher.errors import UnsupportedError
from octoprint_flasher.flasher import LogCallback
from octoprint_flasher.flashers import auto
from octoprint_flasher.target import Target


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Target]]:
    """Replace every real opener with a recorder of (method, target)."""
    calls: list[tuple[str, Target]] = []

    def fake_get_opener(method: str) -> Any:
        def opener(target: Target, log: Optional[LogCallback] = None) -> Any:
            calls.append((method, target))
            return SimpleNamespace(method=method)

        return opener

    monkeypatch.setattr(methods, "get_opener", fake_get_opener)
    monkeypatch.setattr(auto, "_avr_opener", lambda: fake_get_opener("avr_auto"))
    monkeypatch.setattr(
        auto,
        "list_serial_ports",
        lambda: [
            SimpleNamespace(device="/dev/ttyACM0", vid=0x1D50, pid=0x6177),
            SimpleNamespace(device="/dev/ttyACM1", vid=0x1D50, pid=0x614E),
            SimpleNamespace(device="/dev/ttyACM2", vid=0x0483, pid=0x5740),
            SimpleNamespace(device="/dev/ttyUSB0", vid=0x1A86, pid=0x7523),
            SimpleNamespace(device="/dev/ttyS0", vid=None, pid=None),
        ],
    )
    return calls


@pytest.mark.parametrize(
    "target, method",
    [
        (Target(usb="0483:df11"), "dfu"),
        (Target(usb_path="1-1.3"), "dfu"),
        (Target(usb="0483:df11", port="/dev/ttyUSB0"), "dfu"),
        (Target(uuid="4220d6e9e9f9"), "katapult"),
        (Target(can_bus_factory=lambda: None), "katapult"),
        (Target(port="/dev/ttyACM0"), "katapult"),  # Katapult on USB
        (Target(port="/dev/ttyACM1"), "katapult"),  # Klipper on USB
        (Target(port="/dev/ttyUSB0"), "avr_auto"),  # CH340: an AVR board
        (Target(port="/dev/ttyS0"), "avr_auto"),
        (Target(port="/tmp/ttyFLASHER0"), "avr_auto"),  # a pty, not listed
    ],
)
def test_decision_table(target: Target, method: str, opened: list[tuple[str, Target]]) -> None:
    lines: list[str] = []
    auto.open_flasher(target, lines.append)
    assert opened[0][0] == method
    assert lines and lines[0].startswith("auto: ")
    if method != "avr_auto":
        assert opened[0][1].method == method  # the chosen method is passed on


def test_stm32_serial_port_is_refused_with_dfu_advice(opened: list[tuple[str, Target]]) -> None:
    with pytest.raises(UnsupportedError, match="cannot be replaced over serial") as info:
        auto.open_flasher(Target(port="/dev/ttyACM2"))
    assert "DFU" in info.value.hint and opened == []


def test_nothing_to_flash(opened: list[tuple[str, Target]]) -> None:
    with pytest.raises(UnsupportedError, match="Nothing to flash"):
        auto.open_flasher(Target())


def test_a_symlinked_port_is_resolved(
    opened: list[tuple[str, Target]], tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = tmp_path / "ttyACM9"
    real.touch()
    link = tmp_path / "usb-katapult_stm32g0b1xx-if00"
    link.symlink_to(real)
    monkeypatch.setattr(
        auto,
        "list_serial_ports",
        lambda: [SimpleNamespace(device=str(real), vid=0x1D50, pid=0x6177)],
    )
    auto.open_flasher(Target(port=str(link)))
    assert opened[0][0] == "katapult"


def test_missing_avr_autodetect_module_is_a_clear_unsupported_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(auto, "AVR_AUTO_MODULE", "octoprint_flasher.flashers.no_such_module")
    monkeypatch.setattr(auto, "list_serial_ports", lambda: [])
    with pytest.raises(UnsupportedError, match="not available") as info:
        auto.open_flasher(Target(port="/dev/ttyUSB0"))
    assert "--method stk500v1" in info.value.hint
