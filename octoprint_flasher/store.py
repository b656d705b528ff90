"""Durable state under one data folder: uploaded images, backups and the flash history.

An upload is parsed before it is kept (a bad file never lands in the store), then kept until a
flash with it succeeds, so a failed flash can be retried without uploading again. Backups
(read-backs) are saved as Intel HEX and kept for a rollback. The history is a JSON-lines file,
appended one record per job, so it survives restarts and a torn last line loses one record.
"""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from intelhex import IntelHex

from .errors import ImageError
from .image import load as loaders
from .image.model import FirmwareImage

DEFAULT_MAX_SIZE = loaders.DEFAULT_MAX_SIZE
HISTORY_FILE = "history.jsonl"


@dataclass
class StoredImage:
    """A kept firmware file and what we learnt from parsing it."""

    id: str
    filename: str
    sha256: str
    size: int
    kind: str
    added: float
    summary: dict[str, Any] = field(default_factory=dict)
    base_address: Optional[int] = None
    backup: bool = False
    target: str = ""  # for backups: the board it was read from
    stored_name: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("stored_name", None)
        return d


def _safe_name(filename: str) -> str:
    """The upload's base name with anything odd replaced: it becomes part of a path."""
    base = os.path.basename(filename.replace("\\", "/")) or "firmware"
    cleaned = re.sub(r"[^A-Za-z0-9._+-]", "_", base).lstrip(".")
    return cleaned[:120] or "firmware"


class Store:
    """Images and history in ``folder`` (created if missing)."""

    def __init__(self, folder: Union[str, Path], max_size: int = DEFAULT_MAX_SIZE) -> None:
        self.folder = Path(folder)
        self.max_size = max_size
        self.images_dir = self.folder / "images"
        self.images_dir.mkdir(parents=True, exist_ok=True)
        self.history_path = self.folder / HISTORY_FILE
        self._lock = threading.RLock()

    # --- images ------------------------------------------------------------------------

    def add_image(
        self, src_path: Union[str, Path], filename: str, *, base_address: Optional[int] = None
    ) -> StoredImage:
        """Parse ``src_path`` (ImageError if bad: nothing is kept) and keep a copy."""
        name = _safe_name(filename)
        src = Path(src_path)
        if src.is_file():  # refuse a huge upload before copying it
            loaders.check_size(name, src.stat().st_size, self.max_size)
        image_id = self._new_id()
        stored_name = f"{image_id}-{name}"
        tmp = self.images_dir / (stored_name + ".part")
        try:
            # parse the copy, not the source: what is kept is exactly what was checked
            shutil.copyfile(src, tmp)
            image = loaders.load(
                tmp, base_address=base_address, max_size=self.max_size, filename=name
            )
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, self.images_dir / stored_name)
        meta = StoredImage(
            id=image_id,
            filename=name,
            sha256=image.sha256,
            size=image.size,
            kind=image.kind,
            added=time.time(),
            summary=image.summary(),
            base_address=base_address,
            stored_name=stored_name,
        )
        self._write_meta(meta)
        return meta

    def add_backup(self, image: FirmwareImage, target_desc: str) -> StoredImage:
        """Save a read-back as Intel HEX (addresses included) and keep it for a rollback."""
        image_id = self._new_id()
        stamp = time.strftime("%Y%m%d-%H%M%S")
        name = _safe_name(f"backup-{stamp}.hex")
        stored_name = f"{image_id}-{name}"
        path = self.images_dir / stored_name
        write_image_file(image, path)
        reloaded = loaders.load(path, max_size=max(self.max_size, path.stat().st_size))
        meta = StoredImage(
            id=image_id,
            filename=name,
            sha256=reloaded.sha256,
            size=reloaded.size,
            kind="hex",
            added=time.time(),
            summary=reloaded.summary(),
            backup=True,
            target=target_desc,
            stored_name=stored_name,
        )
        self._write_meta(meta)
        return meta

    def get_image(self, image_id: str) -> StoredImage:
        meta_path = self._meta_path(image_id)
        try:
            data = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            raise ImageError(
                f"The firmware file {image_id!r} is no longer stored.",
                cause="It was removed after a successful flash, or deleted.",
                hint="Upload the firmware file again.",
            ) from None
        return StoredImage(**data)

    def image_path(self, image_id: str) -> Path:
        return self.images_dir / self.get_image(image_id).stored_name

    def load_image(self, image_id: str) -> FirmwareImage:
        meta = self.get_image(image_id)
        path = self.images_dir / meta.stored_name
        limit = max(self.max_size, path.stat().st_size) if meta.backup else self.max_size
        return loaders.load(
            path, base_address=meta.base_address, max_size=limit, filename=meta.filename
        )

    def remove_image(self, image_id: str) -> None:
        with self._lock:
            try:
                meta = self.get_image(image_id)
            except ImageError:
                return
            for p in (self.images_dir / meta.stored_name, self._meta_path(image_id)):
                try:
                    p.unlink()
                except FileNotFoundError:
                    pass

    def images(self) -> list[StoredImage]:
        out = []
        for meta_path in self.images_dir.glob("*.json"):
            try:
                out.append(StoredImage(**json.loads(meta_path.read_text())))
            except (OSError, ValueError, TypeError):
                continue
        return sorted(out, key=lambda m: m.added)

    def _new_id(self) -> str:
        return time.strftime("%Y%m%d%H%M%S") + "-" + secrets.token_hex(4)

    def _meta_path(self, image_id: str) -> Path:
        if not re.fullmatch(r"[0-9A-Za-z-]{1,64}", image_id):
            raise ImageError(f"Invalid image id {image_id!r}.", hint="Upload the file again.")
        return self.images_dir / f"{image_id}.json"

    def _write_meta(self, meta: StoredImage) -> None:
        path = self._meta_path(meta.id)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(meta), indent=1))
        os.replace(tmp, path)

    # --- history -----------------------------------------------------------------------

    def append_history(self, record: dict[str, Any]) -> None:
        rec = dict(record)
        rec.setdefault("time", time.time())
        line = json.dumps(rec, sort_keys=True, default=str)
        with self._lock, self.history_path.open("a+b") as fh:
            # a crash mid-write leaves a torn last line: start on a fresh line, lose only it
            if fh.tell() > 0:
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    fh.write(b"\n")
            fh.write(line.encode("utf-8") + b"\n")
            fh.flush()
            os.fsync(fh.fileno())

    def history(self, limit: int = 100) -> list[dict[str, Any]]:
        """The last ``limit`` records, newest first; unreadable lines are skipped."""
        try:
            lines = self.history_path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        out: list[dict[str, Any]] = []
        for line in reversed(lines):
            if len(out) >= limit:
                break
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
        return out


def write_image_file(image: FirmwareImage, path: Union[str, Path]) -> None:
    """Write ``.bin`` (the span, holes 0xFF) or Intel HEX (anything else) by extension."""
    p = Path(path)
    if p.suffix.lower() == ".bin":
        data = image.to_bytes()
    else:
        ih = IntelHex()
        for seg in image.segments:
            ih.frombytes(seg.data, offset=seg.address)
        buf = io.StringIO()
        ih.write_hex_file(buf, byte_count=16)
        data = buf.getvalue().encode("ascii")
    tmp = p.with_name(p.name + ".part")
    tmp.write_bytes(data)
    os.replace(tmp, p)
