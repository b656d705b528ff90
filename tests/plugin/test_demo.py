"""The demo's pieces without starting a server: its transport plugin and its sample files."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

import pytest
import yaml

from octoprint_flasher import discovery, methods, preflight
from octoprint_flasher.errors import FlashError
from octoprint_flasher.image import cortex_m
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
    # the SKR Pico running Klipper, on the same emulated USB bus
    pico = next(d for d in found if d.method == "picoboot")
    assert (pico.usb_id, pico.chip, pico.usb_path) == ("1d50:614e", "RP2040", "1-1.3")


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
    pico_target = target_from_json({"method": "picoboot", "usb_path": "1-1.3"}, {}, offer)
    assert pico_target.usb_backend is offer["usb_backend"]


def test_demo_config_skips_the_wizards_and_autoconnects_to_the_pty() -> None:
    run_demo = load_module(REPO / "demo" / "run_demo.py", "run_demo")
    config = yaml.safe_load(run_demo.config_yaml(Path("/tmp/ttyFLASHER0")))
    assert config["server"]["firstRun"] is False
    assert config["server"]["onlineCheck"]["enabled"] is False
    assert config["serial"]["port"] == "/tmp/ttyFLASHER0"
    assert config["serial"]["autoconnect"] is True
    assert config["serial"]["additionalPorts"] == ["/tmp/ttyFLASHER*"]


def test_demo_samples_flash_where_they_belong_and_each_board_has_a_refused_one(
    tmp_path: Path,
) -> None:
    """Every board's right file passes the checks the page runs at upload, with the target the
    page builds from the device list; its wrong file is refused by those same checks (from the
    file alone, so before the board is touched)."""
    run_demo = load_module(REPO / "demo" / "run_demo.py", "run_demo")
    paths = {p.name: p for p in run_demo.make_samples(tmp_path).values()}  # needs gcc-avr
    assert list(paths) == [name for name, *_ in run_demo.SAMPLES]
    targets = {
        "dfu": {"method": "auto", "usb": "0483:df11", "usb_path": "1-2", "mcu": "STM32F446"},
        "katapult": {"method": "auto", "uuid": "0e2f3a4b5c6d", "can_channel": "flasher-demo"},
        "printer": {"method": "stk500v1", "port": "/tmp/ttyFLASHER0", "mcu": "atmega1284p"},
        "pico": {"method": "picoboot", "usb_path": "1-1.3", "mcu": "RP2040"},
        "creality": {"method": "marlin-sd", "port": "/tmp/ttyFLASHER1"},
        "mk3s": {"method": "auto", "port": "/tmp/ttyFLASHER2"},
        "mmu": {"method": "auto", "port": "/dev/ttyACM0", "usb_path": "1-1.4"},
    }
    written_at = {
        "klipper-stm32f446-dfu.bin": 0x08000000,
        "klipper-stm32g0b1-katapult.bin": 0x08002000,
    }
    for name, board, right, _what in run_demo.SAMPLES:
        target = target_from_json(targets[board], {})
        try:
            image = cortex_m.place(loaders.load(paths[name]), target.address)
        except FlashError as exc:  # refused when loading (a Prusa file of two builds)
            assert not right, (name, exc.message)
            continue
        target = methods.resolve_method(target, image)  # a Prusa file names its method
        report = preflight.check_offline(image, mcu_name=target.mcu, method=target.method)
        if report.ok:
            try:
                report.warnings += methods.check_image(target, image)
            except FlashError as exc:
                report.fail(exc)
        assert report.ok is right, (name, report.errors)
        if name in written_at:
            assert image.start == written_at[name], (name, hex(image.start))
