"""Simulated AVR boards running real bootloaders (optiboot, Debian's stk500v2) in simavr.

Each :class:`SimBoard` is one ``simboard`` process (C, ``tests/simavr/simboard.c``): a
16 MHz ATmega in real time behind a pty that resets the chip when a host opens the port, as
DTR auto-reset does on a real board. Hosts (avrdude, our flashers, OctoPrint) talk to
:attr:`SimBoard.port` like to a USB-serial adapter.

Everything the boards need is built on demand into ``build/avr/`` by :func:`build_all` and
:func:`build_test_firmware`, cached by a hash of the sources and the recipe, so a fresh clone's
test run builds it. Builds hold a file lock, so parallel test processes do not race.

A board needs one CPU core in real time: hold the ``realtime_lock`` fixture (or flock
``/tmp/octoprint-flasher-realtime.lock`` in scripts) for its whole life.
"""

from __future__ import annotations

import binascii
import fcntl
import hashlib
import os
import random
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Callable, Dict, List, Optional, Type

import serial

REPO = Path(__file__).resolve().parents[2]
SRC = Path(os.environ.get("FLASHER_AVR_SRC", REPO / "tests" / "simavr"))
BUILD = Path(os.environ.get("FLASHER_AVR_BUILD", REPO / "build" / "avr"))
DEBIAN_AVR = Path("/usr/share/arduino/hardware/arduino/avr")
OPTIBOOT_SRC = DEBIAN_AVR / "bootloaders" / "optiboot"
STK500V2_SRC = DEBIAN_AVR / "bootloaders" / "stk500v2"
STK500V2_HEX = STK500V2_SRC / "stk500boot_v2_mega2560.hex"
#: Debian's Mega stk500v2 source + our Prusa patch (the 0x71 command), built by build_all()
EINSY_BOOT_HEX = BUILD / "bootloaders" / "stk500v2_prusa_atmega2560.hex"
F_CPU = 16_000_000


@dataclass(frozen=True)
class McuInfo:
    """Facts about a simulated part (datasheet values)."""

    name: str  # simavr / avr-gcc name
    avrdude_part: str
    flash_size: int
    page_size: int
    nrww_start: int  # start of the no-read-while-write section (largest boot section)
    signature: bytes


MCUS: Dict[str, McuInfo] = {
    "atmega328p": McuInfo("atmega328p", "m328p", 32 * 1024, 128, 0x7000, b"\x1e\x95\x0f"),
    "atmega1284p": McuInfo("atmega1284p", "m1284p", 128 * 1024, 256, 0x1E000, b"\x1e\x97\x05"),
    "atmega2560": McuInfo("atmega2560", "m2560", 256 * 1024, 256, 0x3E000, b"\x1e\x98\x01"),
}


@dataclass(frozen=True)
class OptibootBuild:
    """How we build one optiboot variant from Debian's source (see research/avr.md §4.4)."""

    mcu: str
    baud: int
    text_start: int
    bigboot: bool

    @property
    def hex_name(self) -> str:
        return f"optiboot_{self.mcu}_{self.baud}.hex"


@dataclass(frozen=True)
class BoardConfig:
    """One simulated board: chip, bootloader image, where it starts and how it talks."""

    name: str
    mcu: str
    bootloader: Path
    boot_start: int  # byte address the BOOTRST fuse points at
    baud: int  # the bootloader's (and the test firmware's) nominal baud rate
    protocol: str  # "stk500v1" (optiboot, avrdude -c arduino) or "stk500v2" (-c wiring)
    optiboot: Optional[OptibootBuild] = None
    #: a W25X20CL SPI flash with /CS on this port pin (the Einsy's language flash: "C5")
    spi_flash: Optional[str] = None
    #: BOOTRST: every reset, the watchdog's too, starts the bootloader (Einsy fuses H=0xD8)
    bootrst: bool = False

    @property
    def info(self) -> McuInfo:
        return MCUS[self.mcu]

    @property
    def avrdude_programmer(self) -> str:
        return "arduino" if self.protocol == "stk500v1" else "wiring"


_OPTIBOOTS = {
    # Debian's own optiboot_atmega328.hex overflows its 512-byte boot section (research §4.4),
    # so the 328P gets a 1 KiB boot section.
    "m328p": OptibootBuild("atmega328p", 115200, 0x7C00, False),
    "m1284p-115200": OptibootBuild("atmega1284p", 115200, 0x1FC00, True),
    "m1284p-57600": OptibootBuild("atmega1284p", 57600, 0x1FC00, True),
    "m2560": OptibootBuild("atmega2560", 115200, 0x3FC00, True),
}


def _optiboot_config(name: str, key: str) -> BoardConfig:
    ob = _OPTIBOOTS[key]
    return BoardConfig(
        name, ob.mcu, BUILD / "bootloaders" / ob.hex_name, ob.text_start, ob.baud, "stk500v1", ob
    )


CONFIGS: Dict[str, BoardConfig] = {
    "m328p-optiboot": _optiboot_config("m328p-optiboot", "m328p"),
    "m1284p-optiboot-115200": _optiboot_config("m1284p-optiboot-115200", "m1284p-115200"),
    "m1284p-optiboot-57600": _optiboot_config("m1284p-optiboot-57600", "m1284p-57600"),
    "m2560-optiboot": _optiboot_config("m2560-optiboot", "m2560"),
    "m2560-stk500v2": BoardConfig(
        "m2560-stk500v2", "atmega2560", STK500V2_HEX, 0x3E000, 115200, "stk500v2"
    ),
    # Prusa MK3 Einsy RAMBo: stk500v2 built from Debian's source with our Prusa patch, the
    # W25X20CL language flash on SPI with /CS on PC5 (research/prusa.md §5.1-5.2)
    "einsy-prusa": BoardConfig(
        "einsy-prusa",
        "atmega2560",
        EINSY_BOOT_HEX,
        0x3E000,
        115200,
        "stk500v2",
        spi_flash="C5",
        bootrst=True,
    ),
}


class BuildError(RuntimeError):
    """A tool of the AVR test bed could not be built."""


# --------------------------------------------------------------------------- building


class _BuildLock:
    """Exclusive lock over build/avr/ so parallel test processes build each thing once."""

    def __enter__(self) -> None:
        BUILD.mkdir(parents=True, exist_ok=True)
        self._fh = (BUILD / ".build.lock").open("w")
        fcntl.flock(self._fh, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._fh, fcntl.LOCK_UN)
        self._fh.close()


def _digest(*parts: object) -> str:
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            h.update(part.read_bytes())
        else:
            h.update(repr(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _run(cmd: List[str], cwd: Optional[Path] = None) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}\n"
            "Is the toolchain installed? Run scripts/bootstrap.sh (gcc-avr, avr-libc, "
            "libsimavr-dev, libelf-dev, arduino-core-avr)."
        )


def _cached(out: Path, key: str) -> bool:
    stamp = out.with_name(out.name + ".key")
    return out.exists() and stamp.exists() and stamp.read_text() == key


def _stamp(out: Path, key: str) -> None:
    out.with_name(out.name + ".key").write_text(key)


_SIMBOARD_CMD = ["gcc", "-O2", "-Wall", "-Wextra", "-Werror"]
_SIMBOARD_LIBS = ["-lsimavr", "-lelf", "-lpthread", "-lutil"]


def simboard_binary() -> Path:
    """Build (if needed) and return the simboard executable."""
    out = BUILD / "simboard"
    srcs = [SRC / "simboard.c", SRC / "spiflash.c"]
    key = _digest(*srcs, SRC / "spiflash.h", _SIMBOARD_CMD, _SIMBOARD_LIBS)
    with _BuildLock():
        if not _cached(out, key):
            tmp = out.with_name("simboard.tmp")
            _run([*_SIMBOARD_CMD, "-o", str(tmp), *map(str, srcs), *_SIMBOARD_LIBS])
            tmp.replace(out)
            _stamp(out, key)
    return out


_OPTIBOOT_CFLAGS = [
    "-g",
    "-Wall",
    "-Os",
    "-fno-inline-small-functions",
    "-fno-split-wide-types",
    "-DF_CPU=16000000L",
    "-DLED_START_FLASHES=3",
]
_OPTIBOOT_FILES = ("optiboot.c", "pin_defs.h", "boot.h", "stk500.h")


def build_optiboot(ob: OptibootBuild) -> Path:
    """Build one optiboot variant from Debian's source plus our patch (LED pins for the
    1284P/2560, RAMSTART, ELPM for READ_PAGE above 64 KiB)."""
    out = BUILD / "bootloaders" / ob.hex_name
    patch = SRC / "optiboot-simboard.patch"
    key = _digest(*(OPTIBOOT_SRC / f for f in _OPTIBOOT_FILES), patch, ob, _OPTIBOOT_CFLAGS)
    with _BuildLock():
        if _cached(out, key):
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="optiboot-", dir=BUILD))
        try:
            for f in _OPTIBOOT_FILES:
                shutil.copy(OPTIBOOT_SRC / f, work / f)
            _run(["patch", "-p1", "--quiet", "-i", str(patch)], cwd=work)
            flash_end = MCUS[ob.mcu].flash_size
            defs = [f"-DBAUD_RATE={ob.baud}"] + (["-DBIGBOOT"] if ob.bigboot else [])
            ldflags = [
                f"-Wl,--section-start=.text=0x{ob.text_start:x}",
                f"-Wl,--section-start=.version=0x{flash_end - 2:x}",
                "-Wl,--relax",
                "-Wl,--gc-sections",
                "-nostartfiles",
                "-nostdlib",
            ]
            elf = work / "optiboot.elf"
            _run(
                ["avr-gcc", *_OPTIBOOT_CFLAGS, f"-mmcu={ob.mcu}", *defs, *ldflags]
                + ["-o", str(elf), "optiboot.c"],
                cwd=work,
            )
            size = _elf_text_size(elf)
            room = flash_end - 2 - ob.text_start
            if size > room:
                raise BuildError(f"optiboot for {ob.mcu} is {size} bytes, boot section has {room}")
            tmp = out.with_name(out.name + ".tmp")
            _run(
                ["avr-objcopy", "-j", ".text", "-j", ".data", "-j", ".version"]
                + ["--set-section-flags", ".version=alloc,load", "-O", "ihex", str(elf), str(tmp)]
            )
            tmp.replace(out)
            _stamp(out, key)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return out


def _elf_text_size(elf: Path) -> int:
    proc = subprocess.run(["avr-size", "-A", str(elf)], capture_output=True, text=True, check=True)
    for line in proc.stdout.splitlines():
        fields = line.split()
        if fields and fields[0] in (".text",):
            return int(fields[1])
    raise BuildError(f"no .text section in {elf}")


# Debian's Makefile, target mega2560 (avr-gcc 5.4 takes these flags unchanged)
_STK500V2_CFLAGS = [
    "-mmcu=atmega2560",
    "-g",
    "-DF_CPU=16000000UL",
    "-Os",
    "-funsigned-char",
    "-funsigned-bitfields",
    "-fpack-struct",
    "-fshort-enums",
    "-fno-jump-tables",
    "-Wall",
    "-Wstrict-prototypes",
    "-std=gnu99",
    "-D_MEGA_BOARD_",
    "-Wl,--section-start=.text=0x3e000",
]
_STK500V2_FILES = ("stk500boot.c", "command.h", "avr_cpunames.h", "avrinterruptnames.h")


def build_stk500v2_prusa() -> Path:
    """The Einsy bootloader: Debian's Mega stk500v2 source plus ``stk500v2-prusa.patch``
    (Prusa's 0x71 upload-size command), compiled as Debian's Makefile does for mega2560."""
    out = EINSY_BOOT_HEX
    patch = SRC / "stk500v2-prusa.patch"
    missing = [f for f in _STK500V2_FILES if not (STK500V2_SRC / f).exists()]
    if missing:
        raise BuildError(
            f"{STK500V2_SRC} lacks {', '.join(missing)}: install Debian's arduino-core-avr"
        )
    key = _digest(*(STK500V2_SRC / f for f in _STK500V2_FILES), patch, _STK500V2_CFLAGS)
    with _BuildLock():
        if _cached(out, key):
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="stk500v2-", dir=BUILD))
        try:
            for f in _STK500V2_FILES:
                shutil.copy(STK500V2_SRC / f, work / f)
            _run(["patch", "-p1", "--quiet", "-i", str(patch)], cwd=work)
            elf = work / "stk500boot.elf"
            _run(["avr-gcc", *_STK500V2_CFLAGS, "-I.", "-o", str(elf), "stk500boot.c"], cwd=work)
            size = _elf_text_size(elf)
            if size > 0x40000 - 0x3E000:
                raise BuildError(f"stk500v2 for the Einsy is {size} bytes, boot section 8192")
            tmp = out.with_name(out.name + ".tmp")
            _run(["avr-objcopy", "-j", ".text", "-j", ".data", "-O", "ihex", str(elf), str(tmp)])
            tmp.replace(out)
            _stamp(out, key)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return out


def build_all() -> None:
    """Build simboard and every bootloader we compile ourselves (idempotent, cached)."""
    simboard_binary()
    for ob in _OPTIBOOTS.values():
        build_optiboot(ob)
    build_stk500v2_prusa()
    if not STK500V2_HEX.exists():
        raise BuildError(f"{STK500V2_HEX} is missing: install Debian's arduino-core-avr")


# --------------------------------------------------------------------------- test firmware

_NAME_RE = re.compile(r"^[A-Za-z0-9_.+-]{1,32}$")
CRC_SIZE = 2  # CRC-16/XMODEM stored right after the image


def _pad_bytes(seed: str, n: int) -> bytes:
    """Deterministic pseudo-random padding: pages differ, rebuilds are byte-identical."""
    return random.Random(seed).randbytes(n)


def _write_ihex(data: bytes, path: Path, base: int = 0) -> None:
    lines = []
    upper = -1
    for off in range(0, len(data), 16):
        addr = base + off
        if addr >> 16 != upper:
            upper = addr >> 16
            rec = bytes([2, 0, 0, 4, upper >> 8, upper & 0xFF])
            lines.append(":" + (rec + bytes([-sum(rec) & 0xFF])).hex().upper())
        chunk = data[off : off + 16]
        rec = bytes([len(chunk), (addr >> 8) & 0xFF, addr & 0xFF, 0]) + chunk
        lines.append(":" + (rec + bytes([-sum(rec) & 0xFF])).hex().upper())
    lines.append(":00000001FF")
    path.write_text("\n".join(lines) + "\n")


def _compile_fw(
    mcu: str, name: str, baud: int, pad: Path, elf: Path, defines: Optional[List[str]] = None
) -> int:
    """Compile the test firmware; return where its image ends (the CRC goes there)."""
    _run(
        [
            "avr-gcc",
            "-Os",
            "-Wall",
            "-Werror",
            f"-mmcu={mcu}",
            f"-DF_CPU={F_CPU}UL",
            f"-DBAUD_RATE={baud}UL",
            f'-DFW_NAME="{name}"',
            f'-DPAD_FILE="{pad}"',
            *(defines or []),
            "-o",
            str(elf),
            str(SRC / "testfw.c"),
        ]
    )
    proc = subprocess.run(["avr-nm", str(elf)], capture_output=True, text=True, check=True)
    for line in proc.stdout.splitlines():
        fields = line.split()
        if len(fields) == 3 and fields[2] == "__data_load_end":
            return int(fields[0], 16)
    raise BuildError(f"__data_load_end not found in {elf}")


#: Einsy firmware behaviours (testfw.c XFLASH_MODE): the MK3 firmware's start-up variants
XFLASH_MODES = {"prusa": 1, "old": 2, "silent": 3}


def build_test_firmware(
    mcu: str,
    name: str,
    size: Optional[int] = None,
    baud: int = 115200,
    *,
    xflash: Optional[str] = None,
    signature: Optional[int] = None,
) -> Path:
    """Build the test firmware for ``mcu`` as Intel HEX in ``build/avr/fw/``.

    ``size`` asks for an image of exactly that many bytes (padding fills the difference);
    without it the image is as small as the firmware (about 2 KiB). The firmware prints
    ``ok crc`` only if every byte of it arrived intact.

    ``xflash`` (ATmega2560 only) builds the Einsy variant: ``"prusa"`` serves the MK3
    language-flash handshake and handler after ``start``, ``"old"`` prints ``start`` without
    a handler, ``"silent"`` never prints ``start``. ``signature`` is stored in flash as the
    firmware's language signature (catalogs carry the same 4 bytes).
    """
    if mcu not in MCUS:
        raise ValueError(f"unknown mcu {mcu!r}; known: {', '.join(MCUS)}")
    defines: List[str] = []
    if xflash is not None:
        if mcu != "atmega2560" or xflash not in XFLASH_MODES:
            raise ValueError(f"xflash={xflash!r} needs atmega2560 and one of {list(XFLASH_MODES)}")
        defines = [f"-DXFLASH_MODE={XFLASH_MODES[xflash]}", f"-DLANG_SIGNATURE={signature or 0}UL"]
    if not _NAME_RE.match(name):
        raise ValueError(f"firmware name {name!r} must match {_NAME_RE.pattern}")
    room = max(c.boot_start for c in CONFIGS.values() if c.mcu == mcu)
    if size is not None and size > room:
        raise ValueError(f"{size} bytes do not fit below any {mcu} bootloader ({room} bytes)")
    key = _digest(SRC / "testfw.c", mcu, name, size, baud, F_CPU, CRC_SIZE, *defines)
    variant = f"-{xflash}" if xflash else ""
    out = BUILD / "fw" / f"testfw-{mcu}{variant}-{name}-{size or 'min'}-{baud}-{key[:8]}.hex"
    if out.exists():
        return out
    with _BuildLock():
        if out.exists():
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="testfw-", dir=BUILD))
        try:
            pad = work / "pad.bin"
            elf = work / "fw.elf"
            seed = f"{mcu}/{name}/{size}"
            pad.write_bytes(_pad_bytes(seed, 16))
            end = _compile_fw(mcu, name, baud, pad, elf, defines)
            if size is not None:
                # the padding array sits before the code, which the linker aligns to a word:
                # retry once to absorb that alignment byte
                for _ in range(3):
                    want = 16 + (size - CRC_SIZE - end)
                    if want < 1:
                        raise ValueError(
                            f"size {size} is smaller than the firmware itself ({end + CRC_SIZE})"
                        )
                    pad.write_bytes(_pad_bytes(seed, want))
                    end = _compile_fw(mcu, name, baud, pad, elf, defines)
                    if end + CRC_SIZE == size:
                        break
                else:
                    raise ValueError(f"cannot build an image of exactly {size} bytes (got {end})")
            binary = work / "fw.bin"
            _run(
                ["avr-objcopy", "-j", ".text", "-j", ".data", "-O", "binary", str(elf), str(binary)]
            )
            image = binary.read_bytes()
            if len(image) != end:
                raise BuildError(f"objcopy gave {len(image)} bytes, linker says {end}")
            crc = binascii.crc_hqx(image, 0)
            tmp = out.with_name(out.name + ".tmp")
            _write_ihex(image + crc.to_bytes(2, "little"), tmp)
            tmp.replace(out)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return out


# --------------------------------------------------------------------------- the board


def serial_read_until(ser: serial.Serial, pattern: bytes, timeout: float) -> bytes:
    """Read from ``ser`` until ``pattern`` shows up; raise TimeoutError with what came."""
    deadline = time.monotonic() + timeout
    data = b""
    while pattern not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{pattern!r} not seen within {timeout} s; got {data!r}")
        ser.timeout = min(left, 0.1)
        data += ser.read(ser.in_waiting or 1)
    return data


class SimBoard:
    """A simulated board; use as a context manager or call start()/stop()."""

    def __init__(
        self,
        config: str,
        *,
        app_hex: Optional[Path] = None,
        port_link: Optional[Path] = None,
        auto_reset: bool = True,
        latency: Optional[str] = None,
        log_path: Optional[Path] = None,
        flash_bin: Optional[Path] = None,
        spm_time_us: int = 4000,
        spi_bin: Optional[Path] = None,
        semicolon_defect: bool = False,
    ) -> None:
        """``latency``: None, ``"fixed:<ms>"`` (each direction) or ``"ftdi16"`` (FTDI latency
        timer). ``flash_bin`` preloads a raw flash image (e.g. an earlier flash_dump()).
        ``spm_time_us`` is the flash page erase/write time (datasheet 3.7–4.5 ms; 0 = instant).
        ``spi_bin`` preloads the SPI flash of a config that has one; ``semicolon_defect``
        starts with the early Einsy 32U2's extra 0xFF after every ';' from the host.
        """
        if config not in CONFIGS:
            raise ValueError(f"unknown board config {config!r}; known: {', '.join(CONFIGS)}")
        if latency is not None and not re.match(r"^(fixed:\d+(\.\d+)?|ftdi16)$", latency):
            raise ValueError(f"latency must be None, 'fixed:<ms>' or 'ftdi16', not {latency!r}")
        self.cfg = CONFIGS[config]
        self.config = config
        self.mcu = self.cfg.mcu
        self.baud = self.cfg.baud
        self.protocol = self.cfg.protocol
        self.app_hex = app_hex
        self.auto_reset = auto_reset
        self.latency = latency
        self.flash_bin = flash_bin
        self.spm_time_us = spm_time_us
        self.spi_bin = spi_bin
        self.semicolon_defect = semicolon_defect
        if (spi_bin is not None) and not self.cfg.spi_flash:
            raise ValueError(f"board config {config!r} has no SPI flash")
        self._dir = Path(tempfile.mkdtemp(prefix=f"simboard-{config}-"))
        self.port = str(port_link or self._dir / "tty")
        self.log_path = log_path or self._dir / "simboard.log"
        self._dump = self._dir / "flash.bin"
        self._spi_dump = self._dir / "spiflash.bin"
        self._proc: Optional[subprocess.Popen[str]] = None
        self._lines: List[str] = []
        self._cond = threading.Condition()
        self._reader: Optional[threading.Thread] = None
        self._log: Optional[IO[str]] = None

    # life cycle -------------------------------------------------------------------------

    def command_line(self) -> List[str]:
        cmd = [
            str(simboard_binary()),
            "--mcu",
            self.mcu,
            "--boot",
            str(self.cfg.bootloader),
            "--boot-start",
            hex(self.cfg.boot_start),
            "--nrww",
            hex(self.cfg.info.nrww_start),
            "--port-link",
            self.port,
            "--dump",
            str(self._dump),
            "--spm-us",
            str(self.spm_time_us),
            "--latency",
            self.latency or "none",
        ]
        if self.app_hex:
            cmd += ["--app", str(self.app_hex)]
        if self.flash_bin:
            cmd += ["--load-bin", str(self.flash_bin)]
        if not self.auto_reset:
            cmd.append("--no-auto-reset")
        if self.cfg.spi_flash:
            cmd += ["--spi-flash", self.cfg.spi_flash, "--spi-dump", str(self._spi_dump)]
            if self.spi_bin:
                cmd += ["--spi-load", str(self.spi_bin)]
        if self.cfg.bootrst:
            cmd.append("--bootrst")
        if self.semicolon_defect:
            cmd.append("--semicolon-defect")
        cmd.append("--control")
        return cmd

    def start(self, timeout: float = 10) -> None:
        build_all()
        self._log = open(self.log_path, "a", buffering=1)
        self._proc = subprocess.Popen(
            self.command_line(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            bufsize=1,
        )
        self._reader = threading.Thread(target=self._read_events, daemon=True)
        self._reader.start()
        try:
            self._wait_event(lambda line: line.startswith("READY"), timeout)
        except Exception:
            self.stop()
            raise

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if self._reader:
                self._reader.join(5)
        if self._log:
            self._log.close()
            self._log = None
        # the log stays (it is what explains a failure); the flash dump can be large
        self._dump.unlink(missing_ok=True)
        self._spi_dump.unlink(missing_ok=True)
        if self.log_path.parent != self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> SimBoard:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.stop()

    # events -----------------------------------------------------------------------------

    def _read_events(self) -> None:
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip("\n")
            if self._log:
                self._log.write(f"{time.monotonic():.3f} {line}\n")
            with self._cond:
                self._lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def _wait_event(self, match: Callable[[str], bool], timeout: float, after: int = 0) -> str:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self._lines[after:]:
                    if match(line):
                        return line
                if self._proc is None or self._proc.poll() is not None:
                    raise RuntimeError(f"simboard exited; log:\n{self.log_text()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"simboard event not seen in {timeout} s; log:\n{self.log_text()}"
                    )
                self._cond.wait(min(left, 0.2))

    def mark(self) -> int:
        """A position in the event list, for wait_for(after=...)."""
        with self._cond:
            return len(self._lines)

    def wait_for(self, prefix: str, timeout: float, after: int = 0) -> str:
        """Wait for an event line starting with ``prefix`` (e.g. "OPEN", "RESET open")."""
        return self._wait_event(lambda line: line.startswith(prefix), timeout, after)

    def events(self) -> List[str]:
        """Every event line the board printed so far (READY, RESET open, WARN ..., LAG ...)."""
        with self._cond:
            return list(self._lines)

    def warnings(self) -> List[str]:
        """Board-level warnings, e.g. "page 0x01000 written without erase (...)"."""
        return [line[5:] for line in self.events() if line.startswith("WARN ")]

    def resets(self, watchdog: bool = False) -> List[str]:
        """Why the chip was reset each time: "open" (port opened) or "signal" (reset()); with
        ``watchdog``, also the chip's own watchdog resets (optiboot starts the application
        through one, the Einsy firmware reboots through one)."""
        reasons = [line[6:] for line in self.events() if line.startswith("RESET ")]
        return reasons if watchdog else [r for r in reasons if r != "watchdog"]

    def log_text(self) -> str:
        try:
            return self.log_path.read_text()
        except OSError:
            return ""

    # control ----------------------------------------------------------------------------

    def _signal(self, sig: int) -> int:
        if self._proc is None or self._proc.poll() is not None:
            raise RuntimeError("simboard is not running")
        with self._cond:
            mark = len(self._lines)
        self._proc.send_signal(sig)
        return mark

    def flash_dump(self) -> bytes:
        """The whole flash as the chip holds it now."""
        mark = self._signal(signal.SIGUSR1)
        self._wait_event(lambda line: line.startswith("DUMPED"), 10, after=mark)
        return self._dump.read_bytes()

    def spi_flash_dump(self) -> bytes:
        """The whole SPI flash (the Einsy's W25X20CL, 256 KiB) as the chip holds it now."""
        if not self.cfg.spi_flash:
            raise ValueError(f"board config {self.config!r} has no SPI flash")
        self.flash_dump()  # SIGUSR1 writes the SPI flash first, then the AVR's flash
        return self._spi_dump.read_bytes()

    def control(self, command: str) -> None:
        """One line to simboard's control input: "drop N", "semicolon on|off", "spistats"."""
        proc = self._proc
        if proc is None or proc.poll() is not None or proc.stdin is None:
            raise RuntimeError("simboard is not running")
        proc.stdin.write(command + "\n")
        proc.stdin.flush()

    def drop_host_byte(self, nth: int) -> None:
        """Lose the ``nth`` byte the host sends from now on (fault injection)."""
        mark = self.mark()
        self.control(f"drop {nth}")
        self.wait_for("CONTROL drop", 5, after=mark)

    def set_semicolon_defect(self, on: bool) -> None:
        """Switch the early Einsy 32U2's ';' defect (extra 0xFF after every 0x3B) on or off."""
        mark = self.mark()
        self.control(f"semicolon {'on' if on else 'off'}")
        self.wait_for("CONTROL semicolon", 5, after=mark)

    def spi_stats(self) -> Dict[str, int]:
        """Counters of the SPI flash model: programs, erase4k/32k/64k, chip_erase, stale
        (a program that needed a 1 bit where the chip held 0), ignored_busy."""
        mark = self.mark()
        self.control("spistats")
        line = self.wait_for("SPISTATS ", 5, after=mark)
        return {k: int(v) for k, v in (f.split("=") for f in line.split()[1:])}

    def faults(self) -> List[str]:
        """Faults the board injected ("host byte 0x.. lost")."""
        return [line[6:] for line in self.events() if line.startswith("FAULT ")]

    def reset(self) -> None:
        """External reset (as the reset button or a DTR pulse would give)."""
        mark = self._signal(signal.SIGUSR2)
        self._wait_event(lambda line: line == "RESET signal", 5, after=mark)

    def open_serial(self, baud: Optional[int] = None) -> serial.Serial:
        """Open the board's port as a host would (with auto-reset this resets the chip)."""
        return serial.Serial(self.port, baud or self.baud, timeout=0.1)

    def read_until(self, pattern: bytes, timeout: float, baud: Optional[int] = None) -> bytes:
        """Open the port, read the application's output until ``pattern``, close the port."""
        with self.open_serial(baud) as ser:
            return serial_read_until(ser, pattern, timeout)
