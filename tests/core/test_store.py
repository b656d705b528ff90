"""The store: uploads are parsed before they are kept; history survives restarts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from octoprint_flasher.errors import ImageError
from octoprint_flasher.image import load as loaders
from octoprint_flasher.image.model import FirmwareImage, Segment
from octoprint_flasher.store import Store, write_image_file

DATA = Path(__file__).resolve().parent.parent / "data"


def test_add_image_copies_parses_and_summarises(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    src = DATA / "two_elements.dfu"
    meta = store.add_image(src, "two_elements.dfu")
    assert meta.kind == "dfu" and meta.size == 4000 and meta.filename == "two_elements.dfu"
    assert meta.summary["segments"][1] == {"address": 0x08020000, "size": 1000}
    assert store.image_path(meta.id).read_bytes() == src.read_bytes()
    assert store.load_image(meta.id).to_bytes() == loaders.load(src).to_bytes()
    assert [m.id for m in Store(tmp_path / "s").images()] == [meta.id]


def test_a_bad_upload_is_not_kept(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    with pytest.raises(ImageError, match="G-code"):
        store.add_image(DATA / "bad" / "print.gcode", "print.gcode")
    assert list(store.images_dir.iterdir()) == []


def test_size_limit_applies_to_uploads(tmp_path: Path) -> None:
    store = Store(tmp_path / "s", max_size=1024)
    with pytest.raises(ImageError, match="over the 1 KiB limit"):
        store.add_image(DATA / "small_stm32.bin", "small.bin")


def test_upload_names_cannot_escape_the_folder(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    meta = store.add_image(
        DATA / "small_stm32.bin", "../../etc/passwd .bin", base_address=0x08008000
    )
    assert meta.filename == "passwd_.bin"
    assert store.image_path(meta.id).parent == store.images_dir
    assert store.load_image(meta.id).start == 0x08008000


def test_remove_and_missing_images(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    meta = store.add_image(DATA / "small_stm32.bin", "k.bin")
    store.remove_image(meta.id)
    store.remove_image(meta.id)  # twice is fine
    with pytest.raises(ImageError, match="no longer stored") as info:
        store.get_image(meta.id)
    assert "Upload" in info.value.hint
    with pytest.raises(ImageError, match="Invalid image id"):
        store.get_image("../x")


def test_backup_round_trips_as_hex(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    image = FirmwareImage([Segment(0x08008000, bytes(range(256)) * 10)], "read", "bin")
    meta = store.add_backup(image, "STM32F446 via DFU")
    assert meta.backup and meta.kind == "hex" and meta.target == "STM32F446 via DFU"
    assert store.load_image(meta.id).read(0x08008000, 2560) == image.to_bytes()


def test_write_image_file_by_extension(tmp_path: Path) -> None:
    image = FirmwareImage([Segment(0x100, b"\x01\x02"), Segment(0x104, b"\x03")])
    write_image_file(image, tmp_path / "a.bin")
    assert (tmp_path / "a.bin").read_bytes() == b"\x01\x02\xff\xff\x03"
    write_image_file(image, tmp_path / "a.hex")
    again = loaders.load(tmp_path / "a.hex")
    assert [(s.address, s.data) for s in again.segments] == [(0x100, b"\x01\x02"), (0x104, b"\x03")]


def test_history_is_newest_first_limited_and_skips_torn_lines(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    for i in range(5):
        store.append_history({"id": str(i), "result": "success"})
    with store.history_path.open("a") as fh:
        fh.write('{"id": "torn", "res')  # a crash mid-write
    reopened = Store(tmp_path / "s")
    assert [h["id"] for h in reopened.history()] == ["4", "3", "2", "1", "0"]
    assert [h["id"] for h in reopened.history(limit=2)] == ["4", "3"]
    assert all("time" in h for h in reopened.history())
    reopened.append_history({"id": "5"})
    # the record after a torn line is not glued to it
    assert json.loads(reopened.history_path.read_text().splitlines()[-1])["id"] == "5"
    assert reopened.history()[0]["id"] == "5"
