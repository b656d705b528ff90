"""Firmware image model.

A :class:`FirmwareImage` is what every flasher consumes: ordered, non-overlapping segments of
bytes at absolute addresses, plus where it came from. Loaders for Intel HEX, raw ``.bin`` and
DfuSe ``.dfu`` live beside it in :mod:`octoprint_flasher.image`; this module only models the result.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

#: The advice for a file that is damaged or not what the build produced.
REBUILD_HINT = "Rebuild or download the firmware again and upload the .hex (or .bin) file."


@dataclass(frozen=True)
class Segment:
    """A contiguous run of bytes at an absolute address."""

    address: int
    data: bytes

    @property
    def end(self) -> int:
        return self.address + len(self.data)


@dataclass
class FirmwareImage:
    """An application image: segments sorted by address, never overlapping.

    ``sha256`` is the hash of the uploaded file as the user has it (so it matches
    ``sha256sum`` on their machine); ``kind`` is ``hex``, ``bin`` or ``dfu``.
    ``address_given`` is False for a raw ``.bin`` loaded without a base address: its single
    segment sits at 0 as a placeholder and a flasher must place it (:meth:`placed_at`) at the
    board's application start, because a .bin does not say where it belongs.
    """

    segments: list[Segment]
    filename: str = ""
    kind: str = "bin"
    sha256: str = ""
    notes: list[str] = field(default_factory=list)
    address_given: bool = True
    #: a second memory's content, written by another path after the flash (a Prusa
    #: MULTILANG file's language catalogs, at addresses in the printer's external SPI flash)
    external: list[Segment] = field(default_factory=list)
    #: what a format-specific loader learned from the file (``{"prusa": {...}}``)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.segments = merge_segments(self.segments)
        self.external = merge_segments(self.external)

    @property
    def start(self) -> int:
        return self.segments[0].address if self.segments else 0

    @property
    def end(self) -> int:
        """First address after the last byte (exclusive)."""
        return self.segments[-1].end if self.segments else 0

    @property
    def size(self) -> int:
        """Number of data bytes (holes not counted)."""
        return sum(len(s.data) for s in self.segments)

    @property
    def span(self) -> int:
        return self.end - self.start

    def read(self, address: int, length: int, fill: int = 0xFF) -> bytes:
        """Bytes of ``[address, address+length)``, holes filled with ``fill``."""
        out = bytearray([fill]) * length
        stop = address + length
        for seg in self.segments:
            if seg.end <= address or seg.address >= stop:
                continue
            lo = max(seg.address, address)
            hi = min(seg.end, stop)
            out[lo - address : hi - address] = seg.data[lo - seg.address : hi - seg.address]
        return bytes(out)

    def to_bytes(self, fill: int = 0xFF) -> bytes:
        """The whole span from :attr:`start` to :attr:`end`, holes filled."""
        return self.read(self.start, self.span, fill)

    def blocks(self, size: int, fill: int = 0xFF, base: int = 0) -> Iterator[tuple[int, bytes]]:
        """Yield ``(address, bytes)`` for every ``size``-aligned block (relative to ``base``)
        that holds at least one image byte, padded with ``fill``. Pages a bootloader writes
        whole are exactly these blocks."""
        if size <= 0:
            raise ValueError("block size must be positive")
        seen: set[int] = set()
        for seg in self.segments:
            first = base + ((seg.address - base) // size) * size
            addr = first
            while addr < seg.end:
                if addr not in seen:
                    seen.add(addr)
                    yield addr, self.read(addr, size, fill)
                addr += size

    def block_addresses(self, size: int, base: int = 0) -> list[int]:
        return [a for a, _ in self.blocks(size, base=base)]

    def padded(self, size: int, fill: int = 0xFF, base: int = 0) -> FirmwareImage:
        """A copy whose segments are whole ``size``-aligned blocks."""
        return self._with_segments([Segment(a, d) for a, d in self.blocks(size, fill, base)])

    def relocated(self, offset: int) -> FirmwareImage:
        return self._with_segments([Segment(s.address + offset, s.data) for s in self.segments])

    def _with_segments(self, segments: list[Segment]) -> FirmwareImage:
        """A copy with other segments; its notes, languages and extras are its own."""
        return dataclasses.replace(
            self,
            segments=segments,
            notes=list(self.notes),
            external=list(self.external),
            extra=dict(self.extra),
        )

    def placed_at(self, address: int) -> FirmwareImage:
        """A copy whose first byte is at ``address``, marked as placed (for address-less .bin)."""
        moved = self.relocated(address - self.start)
        moved.address_given = True
        return moved

    def summary(self) -> dict[str, object]:
        return {
            "filename": self.filename,
            "kind": self.kind,
            "sha256": self.sha256,
            "start": self.start,
            "end": self.end,
            "size": self.size,
            "segments": [{"address": s.address, "size": len(s.data)} for s in self.segments],
            "notes": list(self.notes),
            "address_given": self.address_given,
            "external": [{"address": s.address, "size": len(s.data)} for s in self.external],
            "extra": dict(self.extra),
        }


def merge_segments(segments: Sequence[Segment]) -> list[Segment]:
    """Sort and join touching segments; overlapping ones are a caller bug."""
    ordered = sorted((s for s in segments if s.data), key=lambda s: s.address)
    out: list[Segment] = []
    for seg in ordered:
        if out and seg.address < out[-1].end:
            raise ValueError(
                f"segments overlap at 0x{seg.address:X} (previous ends at 0x{out[-1].end:X})"
            )
        if out and seg.address == out[-1].end:
            out[-1] = Segment(out[-1].address, out[-1].data + seg.data)
        else:
            out.append(seg)
    return out


def image_from_bytes(
    data: bytes, address: int, filename: str = "", kind: str = "bin", sha256: Optional[str] = None
) -> FirmwareImage:
    """Convenience for tests and raw reads: one segment at ``address``."""
    return FirmwareImage(
        [Segment(address, bytes(data))],
        filename=filename,
        kind=kind,
        sha256=sha256 if sha256 is not None else hashlib.sha256(data).hexdigest(),
    )
