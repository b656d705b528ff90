"""The page's pure helpers (static/js/flasher_format.js), run in node; flasher.js must parse."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

STATIC = Path(__file__).resolve().parents[2] / "octoprint_flasher" / "static" / "js"
NODE = shutil.which("node")  # scripts/bootstrap.sh installs Debian's nodejs when it is missing


def run_node(expressions: dict[str, str]) -> dict[str, object]:
    """Evaluate each expression with ``F`` bound to the module and return the results."""
    body = ",".join(f"{json.dumps(k)}: ({v})" for k, v in expressions.items())
    script = (
        f"const F = require({json.dumps(str(STATIC / 'flasher_format.js'))});"
        f"process.stdout.write(JSON.stringify({{{body}}}));"
    )
    out = subprocess.run([str(NODE), "-e", script], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_progress_percent_is_whole_and_clamped() -> None:
    got = run_node(
        {
            "half": "F.percent(512, 1024)",
            "almost": "F.percent(1023, 1024)",
            "over": "F.percent(2000, 1024)",
            "nothing": "F.percent(0, 0)",
            "text": "F.percentText(42)",
        }
    )
    assert got == {"half": 50, "almost": 99, "over": 100, "nothing": 0, "text": "42 %"}


def test_sizes_rates_and_durations_read_like_a_human_wrote_them() -> None:
    got = run_node(
        {
            "bytes": "F.size(512)",
            "kib": "F.size(116932)",
            "mib": "F.size(16 * 1024 * 1024)",
            "rate": "F.rate(10240)",
            "norate": "F.rate(0)",
            "eta": "F.duration(65)",
            "long": "F.duration(3725)",
            "none": "F.duration(null)",
        }
    )
    assert got == {
        "bytes": "512 B",
        "kib": "114.2 KiB",
        "mib": "16.00 MiB",
        "rate": "10.0 KiB/s",
        "norate": "",
        "eta": "1:05",
        "long": "1:02:05",
        "none": "",
    }


def test_addresses_and_hashes() -> None:
    got = run_node(
        {
            "addr": "F.hex(0x08002000)",
            "zero": "F.hex(0)",
            "hash": "F.shortHash('a'.repeat(64))",
        }
    )
    assert got == {"addr": "0x08002000", "zero": "0x00000000", "hash": "aaaaaaaaaaaa"}


def test_client_side_file_check_refuses_before_uploading() -> None:
    got = run_node(
        {
            "ok": "F.checkFile('Marlin.HEX', 116932, 16 * 1024 * 1024)",
            "type": "F.checkFile('benchy.gcode', 1000, 1e9)",
            "empty": "F.checkFile('x.bin', 0, 1e9)",
            "size": "F.checkFile('big.bin', 20 * 1024 * 1024, 16 * 1024 * 1024)",
            "none": "F.checkFile('', 0, 1)",
        }
    )
    assert got["ok"] is None
    assert got["type"] == {"code": "type", "ext": ".gcode"}
    assert got["empty"] == {"code": "empty"}
    assert got["size"] == {"code": "size", "size": 20971520, "max": 16777216}
    assert got["none"] == {"code": "none"}


def test_device_labels_name_port_description_usb_id_and_chip() -> None:
    got = run_node(
        {
            "serial": "F.deviceLabel({id: 'a', port: '/dev/ttyUSB0', description: 'CH340',"
            " usb_id: '1a86:7523', chip: null})",
            "can": "F.deviceLabel({id: 'c', uuid: '0e2f3a4b5c6d', description: 'Katapult'})",
            "printer": "F.deviceLabel({id: 'p', port: '/tmp/ttyFLASHER0', printer: true})",
        }
    )
    assert got == {
        "serial": "/dev/ttyUSB0 · CH340 · [1a86:7523]",
        "can": "0e2f3a4b5c6d · Katapult",
        "printer": "/tmp/ttyFLASHER0 ← printer",
    }


def test_the_view_model_parses() -> None:
    out = subprocess.run(
        [str(NODE), "--check", str(STATIC / "flasher.js")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
