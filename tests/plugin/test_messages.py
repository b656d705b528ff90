"""Browser messages: at most 10 per second, merged without losing a stage or the result."""

from __future__ import annotations

import time
from pathlib import Path

from octoprint_flasher.plugin.routes import MessageThrottle
from tests.plugin.conftest import Harness

TARGET = {"method": "stk500v1", "port": "/dev/ttyUSB0"}


class ManualClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_of_progress_collapses_to_the_newest() -> None:
    sent: list[dict] = []
    clock = ManualClock()
    throttle = MessageThrottle(sent.append, interval=0.1, clock=clock)
    for done in range(1, 101):
        throttle.push({"type": "progress", "done": done, "total": 100})
    assert throttle.pump() is True
    assert throttle.pump() is False  # nothing left, and not due anyway
    assert sent == [{"type": "progress", "done": 100, "total": 100}]


def test_log_lines_join_and_state_changes_are_never_merged_away() -> None:
    sent: list[dict] = []
    clock = ManualClock()
    throttle = MessageThrottle(sent.append, interval=0.1, clock=clock)
    throttle.push({"type": "state", "state": "writing"})
    throttle.push({"type": "log", "line": "a", "lines": ["a"]})
    throttle.push({"type": "progress", "done": 1})
    throttle.push({"type": "log", "line": "b", "lines": ["b"]})
    throttle.push({"type": "state", "state": "verifying"})
    throttle.push({"type": "progress", "done": 2})
    throttle.push({"type": "result", "ok": True})
    while True:
        if not throttle.pump():
            clock.now += 0.2
            if not throttle.pump():
                break
    kinds = [m["type"] for m in sent]
    assert kinds == ["state", "log", "progress", "state", "progress", "result"]
    assert sent[1]["lines"] == ["a", "b"] and sent[1]["line"] == "a\nb"
    assert sent[3]["state"] == "verifying"


def test_the_channel_never_sends_more_than_ten_messages_a_second() -> None:
    stamps: list[float] = []
    throttle = MessageThrottle(lambda m: stamps.append(time.monotonic()), interval=0.1)
    throttle.start()
    try:
        for i in range(60):  # 60 state changes cannot merge: they queue up
            throttle.push({"type": "state", "state": f"s{i}"})
            time.sleep(0.005)
        deadline = time.monotonic() + 3
        while len(stamps) < 12 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        throttle.stop()
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    assert len(stamps) >= 12
    assert min(gaps) >= 0.099


def test_a_real_flash_reaches_the_browser_in_order_and_only_with_the_permission(
    harness: Harness, hex_file: Path
) -> None:
    image_id = harness.upload(hex_file, target=TARGET).get_json()["image"]["id"]
    harness.client.post("/plugin/flasher/flash", json={"image_id": image_id, "target": TARGET})
    harness.wait_idle()
    harness.wait_for(
        "the result message", lambda: any(m["type"] == "result" for _t, m in harness.messages)
    )
    messages = [m for _t, m in harness.messages]
    states = [m["state"] for m in messages if m["type"] == "state"]
    assert states[0] == "preflight"
    assert "writing" in states and "verifying" in states
    assert states[-1] == "done"
    assert messages[-1]["type"] == "result" and messages[-1]["ok"] is True
    assert any(m["type"] == "progress" for m in messages)
    assert any(m["type"] == "log" and m["lines"] for m in messages)
    stamps = [t for t, _m in harness.messages]
    assert all(b - a >= 0.099 for a, b in zip(stamps, stamps[1:]))


def test_the_full_log_goes_to_the_console_log_file(harness: Harness, hex_file: Path) -> None:
    image_id = harness.upload(hex_file, target=TARGET).get_json()["image"]["id"]
    harness.client.post("/plugin/flasher/flash", json={"image_id": image_id, "target": TARGET})
    harness.wait_idle()
    text = Path(harness.settings.get_plugin_logfile_path(postfix="console")).read_text()
    assert "optiboot answered" in text
    assert "== success" in text
