"""The demo's pieces without starting a server: its transport plugin and its sample files."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

import pytest
import yaml

from octoprint_flasher import discovery, preflight
from octoprint_flasher.image import load as loaders
from octoprint_flasher.plugin.routes import apply_transports, target_from_json

REPO = Path(__file__).resolve().parents[2]


def load_module(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def demo_plugin(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.setenv("FLASHER_REPO", str(REPO))
    monkeypatch.setenv("FLASHER_DEMO_TIME_SCALE", "0.01")
    module = load_module(REPO / "demo" / "flasher_demo_transports.py", "flasher_demo_transports")
    plugin = module.__plugin_implementation__
    try:
        yield module
    finally:
        plugin.on_shutdown()


def test_demo_plugin_registers_the_flashers_transport_hook(demo_plugin: Any) -> None:
    hooks = demo_plugin.__plugin_hooks__
    assert set(hooks) == {"octoprint.plugin.flasher.transports"}
    assert demo_plugin.__plugin_pythoncompat__ == ">=3.9,<4"


def test_demo_boards_appear_in_discovery_through_the_offered_transports(
    demo_plugin: Any,
) -> None:
    offer = demo_plugin.__plugin_implementation__.transports()
    assert set(offer) >= {"usb_backend", "can_bus_factory", "can_interface", "can_channel"}
    found = discovery.discover(
        can=True,
        usb_backend=offer["usb_backend"],
        can_bus_factory=offer["can_bus_factory"],
        can_interface=offer["can_interface"],
        can_channel=offer["can_channel"],
        port_lister=lambda: [],
    )
    kinds = {d.kind for d in found}
    assert {"usb-dfu", "can"} <= kinds, (found, found.warnings)
    dfu = next(d for d in found if d.kind == "usb-dfu")
    assert dfu.usb_id == "0483:df11"


def test_offered_transports_reach_only_targets_without_a_serial_port(demo_plugin: Any) -> None:
    offer = demo_plugin.__plugin_implementation__.transports()
    can_target = target_from_json({"method": "auto", "uuid": "0e2f3a4b5c6d"}, {}, offer)
    assert can_target.can_bus_factory is offer["can_bus_factory"]
    assert can_target.can_channel == "flasher-demo"
    serial_target = target_from_json({"method": "auto", "port": "/dev/ttyUSB0"}, {}, offer)
    assert serial_target.usb_backend is None and serial_target.can_bus_factory is None
    dfu_target = target_from_json({"method": "dfu", "usb": "0483:df11"}, {}, {})
    apply_transports(dfu_target, offer)
    assert dfu_target.usb_backend is offer["usb_backend"]


def test_demo_config_skips_the_wizards_and_autoconnects_to_the_pty() -> None:
    run_demo = load_module(REPO / "demo" / "run_demo.py", "run_demo")
    config = yaml.safe_load(run_demo.config_yaml(Path("/tmp/ttyFLASHER0")))
    assert config["server"]["firstRun"] is False
    assert config["server"]["onlineCheck"]["enabled"] is False
    assert config["serial"]["port"] == "/tmp/ttyFLASHER0"
    assert config["serial"]["autoconnect"] is True
    assert config["serial"]["additionalPorts"] == ["/tmp/ttyFLASHER*"]


def test_demo_samples_flash_where_they_belong_and_the_wrong_one_is_refused(
    tmp_path: Path,
) -> None:
    run_demo = load_module(REPO / "demo" / "run_demo.py", "run_demo")
    samples = list(run_demo.make_samples(tmp_path).values())  # the AVR toolchain is required
    printer, dfu_bin, katapult_bin, wrong = (loaders.load(p) for p in samples)
    assert preflight.check_offline(printer, "atmega1284p", "stk500v1").ok
    assert preflight.check_offline(
        loaders.load(samples[1], base_address=0x08000000), "stm32f446"
    ).ok
    assert katapult_bin.size == 26 * 1024 and dfu_bin.size == 32 * 1024
    verdict = preflight.check_offline(wrong, "atmega1284p", "stk500v1")
    assert not verdict.ok
    assert "too big" in verdict.errors[0]["message"].lower()
