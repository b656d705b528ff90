"""The method registry's image checks: what is refused before any board is touched."""

from __future__ import annotations

import pytest

from octoprint_flasher import methods
from octoprint_flasher.errors import PreflightError
from octoprint_flasher.image.model import FirmwareImage, Segment
from octoprint_flasher.target import Target


def multilang() -> FirmwareImage:
    return FirmwareImage(
        [Segment(0, b"\x0c\x94" * 64)],
        "FW3.14.1-MULTILANG.hex",
        "hex",
        external=[Segment(0, b"\xa5\x5a\xb4\x4b" * 16)],
    )


@pytest.mark.parametrize("method", ["stk500v1", "stk500v2", "auto"])
def test_a_multilang_file_is_refused_by_methods_that_would_write_only_the_program(
    method: str,
) -> None:
    with pytest.raises(PreflightError, match="(language|MULTILANG)"):
        methods.check_image(Target(method=method, port="/dev/ttyFAKE0"), multilang())


def test_a_target_that_names_nothing_has_no_method_checks() -> None:
    assert methods.check_image(Target(method="auto"), multilang()) == []


@pytest.mark.parametrize(
    ("kind", "method"),
    [("mk3-multilang", "prusa"), ("avr-printer", "prusa"), ("mmu", "avr109"), ("cw1s", "avr109")],
)
def test_auto_takes_the_method_a_prusa_file_names(kind: str, method: str) -> None:
    image = multilang()
    image.extra["prusa"] = {"kind": kind}
    resolved = methods.resolve_method(Target(method="auto", port="/dev/ttyACM0"), image)
    assert resolved.method == method and resolved.port == "/dev/ttyACM0"


def test_a_method_the_user_chose_is_kept_whatever_the_file_says() -> None:
    image = multilang()
    image.extra["prusa"] = {"kind": "mmu"}
    assert methods.resolve_method(Target(method="stk500v2"), image).method == "stk500v2"
    assert methods.resolve_method(Target(method="auto"), FirmwareImage([])).method == "auto"
