"""The vector-table chip check on images avr-gcc really produced (no board needed)."""

from __future__ import annotations

import pytest

from octoprint_flasher import preflight
from octoprint_flasher.image import load as loaders
from tests.emulators.simboard import build_test_firmware


@pytest.mark.parametrize(
    "built_for, board, ok",
    [
        ("atmega1284p", "atmega1284p", True),
        ("atmega2560", "atmega1284p", False),
        ("atmega328p", "atmega2560", False),
        ("atmega2560", "atmega2560", True),
    ],
)
def test_small_builds_for_another_avr_are_refused(built_for: str, board: str, ok: bool) -> None:
    image = loaders.load(build_test_firmware(built_for, "Vectors", size=2048))
    report = preflight.check_offline(image, board)
    assert report.ok is ok, report.errors
    if not ok:
        assert "interrupt vectors" in report.errors[0]["message"]
