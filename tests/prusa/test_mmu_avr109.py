"""MMU2S/MMU3 and CW1/CW1S through the avr109 flasher on the emulated Caterina: the 1200-baud
touch, following the board to its new tty by USB location, page writes, read-back, exit and
the application coming back; the reset-button prompt; faults; refusals before touching."""

from __future__ import annotations

from typing import Any, Iterator, Optional

import pytest

from octoprint_flasher import methods
from octoprint_flasher.errors import ConnectError, FlashError, PreflightError
from octoprint_flasher.flashers import avr109
from octoprint_flasher.image.load import load_bytes
from octoprint_flasher.image.model import FirmwareImage
from octoprint_flasher.target import Target
from tests.emulators import caterina_board as cb
from tests.emulators.katapult_node import UsbWorld
from tests.prusa import samples

APP = samples.mmu_app()
OLD = samples.mmu_app(seed=9)


@pytest.fixture
def world() -> UsbWorld:
    return UsbWorld()


@pytest.fixture
def boards() -> Iterator[list[cb.CaterinaBoard]]:
    made: list[cb.CaterinaBoard] = []
    yield made
    for b in made:
        b.close()


def board(made: list[cb.CaterinaBoard], world: UsbWorld, **kw: Any) -> cb.CaterinaBoard:
    kw.setdefault("app", OLD)
    kw.setdefault("time_scale", 0.1)
    b = cb.CaterinaBoard(world=world, **kw)
    made.append(b)
    return b


def mmu_file(device: str = "mm-control", data: bytes = APP) -> FirmwareImage:
    return load_bytes(samples.device_file(device, data), "MMU2S_MMU3_FW3.0.3.hex")


def target(b: cb.CaterinaBoard, usb: Optional[str] = "2c99:0004", **opts: Any) -> Target:
    options = {"list_ports": b.world.list_ports, "entry_timeout": 1.5, "timeout": 0.3, **opts}
    return Target("avr109", port=b.port, usb=usb, options=options)


def run(t: Target, image: FirmwareImage) -> tuple[avr109.Avr109Flasher, Any, Optional[str]]:
    assert methods.check_image(t, image) is not None  # the job's check before touching
    f = avr109.open_flasher(t)
    try:
        f.check(image, f.identify())
        result = f.flash(image)
        back = f.leave()
    finally:
        f.close()
    return f, result, back


def test_touch_follow_write_verify_and_the_mmu_comes_back(
    boards: list[cb.CaterinaBoard], world: UsbWorld
) -> None:
    b = board(boards, world)
    app_port = b.port
    assert app_port is not None
    f, result, back = run(target(b), mmu_file())
    assert bytes(b.flash[: len(APP)]) == APP
    assert f.entered_from_app and f.info is not None
    assert f.info.details["installed_version"] == "3.0.3+1234"  # read at 0xAC before writing
    assert any("bootloader on" in e and app_port not in e for e in b.events)  # a new tty
    assert result.verified_by == "read-back" and "read back over avr109" in result.confirmation
    assert back is not None and "Reconnect the printer" in back
    assert b.wait_for_mode("app")


def test_a_second_mmu_on_the_host_is_never_touched(
    boards: list[cb.CaterinaBoard], world: UsbWorld
) -> None:
    other = board(boards, world, location="1-1.2", serial_number="OTHER")
    b = board(boards, world)
    run(target(b), mmu_file())
    assert other.stats.touches == 0 and bytes(other.flash[: len(OLD)]) == OLD
    assert bytes(b.flash[: len(APP)]) == APP


@pytest.mark.parametrize(
    "ids,device,usb",
    [(cb.CW1_IDS, "cw1", "2c99:0008"), (cb.CW1S_IDS, "cw1s", "2c99:000f")],
)
def test_cw1_and_cw1s_enter_on_touch_and_close(
    boards: list[cb.CaterinaBoard], world: UsbWorld, ids: Any, device: str, usb: str
) -> None:
    b = board(boards, world, ids=ids, touch="arduino")
    run(target(b, usb=usb), mmu_file(device))
    assert b.stats.touches == 1 and bytes(b.flash[: len(APP)]) == APP


def test_leonardo_bootloader_needs_the_button_and_says_so(
    boards: list[cb.CaterinaBoard], world: UsbWorld
) -> None:
    b = board(boards, world, ids=cb.LEONARDO_IDS, touch="none")
    with pytest.raises(ConnectError) as err:
        run(target(b, usb="2341:8036", entry_timeout=0.3), mmu_file())
    assert "reset button" in err.value.hint


def test_the_reset_prompt_comes_when_the_touch_does_not_work(
    boards: list[cb.CaterinaBoard], world: UsbWorld
) -> None:
    b = board(boards, world, ids=cb.LEONARDO_IDS, touch="none")
    asked: list[str] = []

    def prompt(message: str) -> None:
        asked.append(message)
        b.press_reset()

    run(target(b, usb="2341:8036", entry_timeout=0.3, prompt=prompt), mmu_file())
    assert asked and "Press the reset button" in asked[0]
    assert bytes(b.flash[: len(APP)]) == APP


def test_a_board_already_in_its_bootloader_is_not_touched(
    boards: list[cb.CaterinaBoard], world: UsbWorld
) -> None:
    b = board(boards, world, mode="bootloader")
    f, _, _ = run(target(b, usb="2c99:0003"), mmu_file())
    assert not f.entered_from_app and b.stats.touches == 0
    assert bytes(b.flash[: len(APP)]) == APP


def test_without_usb_information_the_port_is_spoken_to_as_a_bootloader(
    boards: list[cb.CaterinaBoard], world: UsbWorld
) -> None:
    b = board(boards, world, mode="bootloader")
    t = Target("avr109", port=b.port, options={"list_ports": lambda: []})
    run(t, mmu_file())
    assert bytes(b.flash[: len(APP)]) == APP


def test_isp_image_is_refused_before_the_touch(
    boards: list[cb.CaterinaBoard], world: UsbWorld
) -> None:
    b = board(boards, world)
    isp = samples.mmu_app(0x7000) + bytes(range(256)) * 16
    with pytest.raises(PreflightError, match="ISP image"):
        methods.check_image(target(b), mmu_file(data=isp))
    assert b.stats.touches == 0 and b.mode == "app"


def test_quick_reflash_of_the_same_file_writes_nothing(
    boards: list[cb.CaterinaBoard], world: UsbWorld
) -> None:
    b = board(boards, world, app=APP)
    f = avr109.open_flasher(target(b))
    try:
        result = f.flash(mmu_file(), quick=True)
        f.leave()
    finally:
        f.close()
    assert result.blocks_written == 0 and b.stats.pages_written == 0


@pytest.mark.parametrize("kind", ["drop", "corrupt"])
def test_a_lost_or_garbled_byte_is_recovered(
    boards: list[cb.CaterinaBoard], world: UsbWorld, kind: str
) -> None:
    b = board(boards, world, mode="bootloader")
    b.inject(kind, after=5000)
    run(target(b, usb="2c99:0003"), mmu_file())
    assert bytes(b.flash[: len(APP)]) == APP and b.faults[0].fired


def test_stray_prober_bytes_are_drained(boards: list[cb.CaterinaBoard], world: UsbWorld) -> None:
    b = board(boards, world)
    b.stray = b"AT\r"
    run(target(b), mmu_file())
    assert bytes(b.flash[: len(APP)]) == APP


def test_unplugged_mid_write_says_how_to_recover(
    boards: list[cb.CaterinaBoard], world: UsbWorld
) -> None:
    b = board(boards, world, mode="bootloader")
    b.inject("unplug", after=8000)
    with pytest.raises(FlashError) as err:
        run(target(b, usb="2c99:0003"), mmu_file())
    assert "bootloader" in err.value.hint or "Reconnect" in err.value.hint


def test_caterina_ignores_pages_at_its_own_code() -> None:
    with cb.CaterinaBoard(mode="bootloader", timing=False) as b:
        b._address = 0x7000
        assert b._command(b"B\x00\x80F" + b"\x00" * 128) == (b"\r", 0.0)
        assert b.stats.ignored_pages == 1 and b.flash[0x7000] == 1
