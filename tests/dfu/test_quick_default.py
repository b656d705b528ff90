"""Where 'quick' comes from: the CLI and the plugin leave it to the method unless told."""

from __future__ import annotations

from typing import Optional

import pytest

from octoprint_flasher import cli
from octoprint_flasher.plugin.routes import target_from_json


@pytest.mark.parametrize("flags,quick", [([], None), (["--quick"], True), (["--full"], False)])
def test_cli_leaves_quick_to_the_method_unless_told(
    flags: list[str], quick: Optional[bool]
) -> None:
    args = cli.build_parser().parse_args(["flash", "fw.bin", "--method", "dfu", *flags])
    assert cli.target_from_args(args).quick is quick


@pytest.mark.parametrize(
    "body,quick",
    [({}, None), ({"quick": None}, None), ({"quick": True}, True), ({"quick": False}, False)],
)
def test_plugin_request_leaves_quick_to_the_method_unless_told(
    body: dict[str, object], quick: Optional[bool]
) -> None:
    target = target_from_json({"method": "dfu", "usb": "0483:df11", **body}, {})
    assert target.quick is quick
