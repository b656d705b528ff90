"""The page names a .uf2's chip family the way the UF2 spec writes the id."""

from __future__ import annotations

from tests.plugin.test_format_js import run_node


def test_uf2_family_ids_are_eight_hex_digits_and_a_missing_one_says_none() -> None:
    got = run_node(
        {
            "rp2040": "F.uf2Family(0xe48bff56)",
            "samd21": "F.uf2Family(0x68ed2b88)",
            "small": "F.uf2Family(0x1234)",
            "missing": "F.uf2Family(null)",
        }
    )
    assert got == {
        "rp2040": "0xe48bff56",
        "samd21": "0x68ed2b88",
        "small": "0x00001234",
        "missing": "none",
    }
