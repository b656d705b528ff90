"""Facts about the chips, bootloaders and USB ids met on 3D-printer mainboards.

Data tables, not logic: preflight checks, discovery and the flashers all need the same facts
(an AVR's signature and boot-section sizes, an STM32's sector layout and usual application
offsets, what a USB id is and how to flash it), so they live here once. Sources: the AVR
datasheets, ST reference manuals, Klipper/Katapult Kconfig and the project research notes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional, Union

KIB = 1024
MIB = 1024 * 1024


@dataclass(frozen=True)
class AvrChip:
    """An AVR part. ``boot_sizes`` are the BOOTSZ fuse choices in bytes, smallest first."""

    name: str
    signature: bytes
    flash_size: int
    page_size: int
    eeprom_size: int
    boot_sizes: tuple[int, ...]
    aliases: tuple[str, ...] = ()
    family: str = "avr"
    #: interrupt vectors incl. reset; avr-gcc's start-up code fills each with a 4-byte JMP,
    #: so an image's vector table says which chip it was built for
    vectors: int = 0

    @property
    def flash_start(self) -> int:
        return 0

    def app_end(self, bootloader_size: int) -> int:
        """First address a bootloader of ``bootloader_size`` bytes occupies."""
        return self.flash_size - bootloader_size


@dataclass(frozen=True)
class AvrBootloader:
    """A bootloader found on real boards: what it speaks, how big it is, at which bauds."""

    name: str
    protocol: str  # a methods.py method name, or "avr109" (not supported)
    size: int
    bauds: tuple[int, ...]
    chips: tuple[str, ...]
    boards: str = ""
    notes: str = ""


@dataclass(frozen=True)
class Stm32Chip:
    """An STM32 line. ``sectors`` lists (count, size) erase units from ``flash_start``;
    ``flash_size`` is the largest variant's (smaller parts just have fewer sectors).
    ``app_offsets`` are the application offsets boards use: 0 (no bootloader) first, then
    the most common bootloader size on printer boards, then the others."""

    name: str
    katapult_mcu: str
    flash_size: int
    sectors: tuple[tuple[int, int], ...]
    write_word: int
    app_offsets: tuple[int, ...]
    aliases: tuple[str, ...] = ()
    flash_start: int = 0x08000000
    family: str = "stm32"
    notes: str = ""

    def sector_starts(self) -> list[tuple[int, int]]:
        """``(address, size)`` of every erase unit, in order."""
        out: list[tuple[int, int]] = []
        addr = self.flash_start
        for count, size in self.sectors:
            for _ in range(count):
                out.append((addr, size))
                addr += size
        return out

    def sector_at(self, address: int) -> Optional[tuple[int, int]]:
        for start, size in self.sector_starts():
            if start <= address < start + size:
                return start, size
        return None

    def default_app_address(self, bootloader_size: Optional[int] = None) -> int:
        """Application start for a bootloader of that size (the usual one when None)."""
        offset = self.app_offsets[1] if bootloader_size is None else bootloader_size
        return self.flash_start + offset


Chip = Union[AvrChip, Stm32Chip]


def _boot(*words: int) -> tuple[int, ...]:
    return tuple(w * 2 for w in words)


AVR_CHIPS: tuple[AvrChip, ...] = (
    AvrChip(
        "ATmega328P",
        b"\x1e\x95\x0f",
        32 * KIB,
        128,
        1024,
        _boot(256, 512, 1024, 2048),
        vectors=26,
    ),
    AvrChip(
        "ATmega328",
        b"\x1e\x95\x14",
        32 * KIB,
        128,
        1024,
        _boot(256, 512, 1024, 2048),
        vectors=26,
    ),
    AvrChip(
        "ATmega32U4",
        b"\x1e\x95\x87",
        32 * KIB,
        128,
        1024,
        _boot(256, 512, 1024, 2048),
        vectors=43,
    ),
    AvrChip(
        "ATmega644P",
        b"\x1e\x96\x0a",
        64 * KIB,
        256,
        2048,
        _boot(512, 1024, 2048, 4096),
        vectors=31,
    ),
    AvrChip(
        "ATmega1280",
        b"\x1e\x97\x03",
        128 * KIB,
        256,
        4096,
        _boot(512, 1024, 2048, 4096),
        vectors=57,
    ),
    AvrChip(
        "ATmega1284P",
        b"\x1e\x97\x05",
        128 * KIB,
        256,
        4096,
        _boot(512, 1024, 2048, 4096),
        vectors=35,
    ),
    AvrChip(
        "ATmega1284",
        b"\x1e\x97\x06",
        128 * KIB,
        256,
        4096,
        _boot(512, 1024, 2048, 4096),
        vectors=35,
    ),
    AvrChip(
        "ATmega2560",
        b"\x1e\x98\x01",
        256 * KIB,
        256,
        4096,
        _boot(512, 1024, 2048, 4096),
        vectors=57,
    ),
)

AVR_BOOTLOADERS: tuple[AvrBootloader, ...] = (
    AvrBootloader(
        "optiboot",
        "stk500v1",
        512,
        (115200,),
        ("ATmega328P", "ATmega328"),
        boards="Arduino Uno, Nano (new bootloader), Creality Melzi (some)",
    ),
    AvrBootloader(
        "optiboot (BIGBOOT)",
        "stk500v1",
        1 * KIB,
        (115200, 57600),
        ("ATmega644P", "ATmega1284P", "ATmega1284", "ATmega1280", "ATmega2560", "ATmega328P"),
        boards="MightyCore 1284P boards, Anet A8 (57600 or 115200), Melzi, optiboot on Mega",
        notes="optiboot 4.4 reaches only 128 KiB (RAMPZ from the word address)",
    ),
    AvrBootloader(
        "ATmegaBOOT",
        "stk500v1",
        2 * KIB,
        (57600, 19200),
        ("ATmega328P", "ATmega328", "ATmega644P", "ATmega1284P"),
        boards="Arduino Duemilanove / old Nano (57600), Diecimila (19200), Sanguino, Anet A8",
    ),
    AvrBootloader(
        "stk500v2 (Arduino Mega)",
        "stk500v2",
        8 * KIB,
        (115200,),
        ("ATmega2560", "ATmega1280"),
        boards="Arduino Mega 2560, RAMPS, MKS Gen, Ultimaker, Prusa Einsy (Rambo)",
        notes="CHIP_ERASE is refused on purpose; pages must be written in ascending order",
    ),
    AvrBootloader(
        "Caterina",
        "avr109",
        4 * KIB,
        (57600,),
        ("ATmega32U4",),
        boards="Arduino Leonardo, Micro, Printrboard-class 32U4 boards",
        notes="enters on a 1200-baud touch; speaks AVR109, which this plugin does not support",
    ),
)

STM32_CHIPS: tuple[Stm32Chip, ...] = (
    Stm32Chip(
        "STM32F103",
        "stm32f103",
        128 * KIB,
        ((128, 1 * KIB),),
        2,
        (0, 8 * KIB),
        aliases=("stm32f103xb", "stm32f103c8"),
        notes="medium density (64/128 KiB, 1 KiB pages)",
    ),
    Stm32Chip(
        "STM32F103xE",
        "stm32f103xe",
        512 * KIB,
        ((256, 2 * KIB),),
        2,
        (0, 28 * KIB, 8 * KIB, 34 * KIB),
        aliases=("stm32f103rc", "stm32f103re", "stm32f103vc", "stm32f103ve", "stm32f103ze"),
        notes="high density (256/512 KiB, 2 KiB pages): SKR Mini E3 V1/V2, Creality 4.2.x",
    ),
    Stm32Chip(
        "STM32F407",
        "stm32f407xx",
        1 * MIB,
        ((4, 16 * KIB), (1, 64 * KIB), (7, 128 * KIB)),
        4,
        (0, 32 * KIB, 16 * KIB, 64 * KIB),
        notes="SKR 2, SKR Pro, Octopus F407",
    ),
    Stm32Chip(
        "STM32F429",
        "stm32f429xx",
        2 * MIB,
        (
            (4, 16 * KIB),
            (1, 64 * KIB),
            (7, 128 * KIB),
            (4, 16 * KIB),
            (1, 64 * KIB),
            (7, 128 * KIB),
        ),
        4,
        (0, 32 * KIB, 16 * KIB, 64 * KIB),
        notes="Octopus Pro F429 (1 MiB part); the ROM truncates its DFU layout string",
    ),
    Stm32Chip(
        "STM32F446",
        "stm32f446xx",
        512 * KIB,
        ((4, 16 * KIB), (1, 64 * KIB), (3, 128 * KIB)),
        4,
        (0, 32 * KIB, 16 * KIB, 64 * KIB),
        notes="BTT Octopus / Octopus Pro F446",
    ),
    Stm32Chip(
        "STM32G0B1",
        "stm32g0b1xx",
        512 * KIB,
        ((256, 2 * KIB),),
        8,
        (0, 8 * KIB),
        notes="SKR Mini E3 V3, Manta M8P, EBB36/42 toolheads",
    ),
    Stm32Chip(
        "STM32H723",
        "stm32h723xx",
        1 * MIB,
        ((8, 128 * KIB),),
        32,
        (0, 128 * KIB),
        notes="Octopus Pro H723, SKR 3 EZ; 256-bit ECC flash words cannot be rewritten",
    ),
    Stm32Chip(
        "STM32H743",
        "stm32h743xx",
        2 * MIB,
        ((16, 128 * KIB),),
        32,
        (0, 128 * KIB),
        notes="SKR 3, Manta M8P H743 variants; 256-bit ECC flash words",
    ),
)


def _canonical(name: str) -> str:
    """Fold the spellings users and tools produce: "m1284p" (avrdude), "atmega1284p"
    (Klipper), "ATmega1284P" (datasheet), "stm32f446xx" (Katapult), "STM32F446RE"."""
    s = re.sub(r"[\s_\-]", "", name.strip().lower())
    if re.fullmatch(r"m\d+[a-z]*", s):
        s = "atmega" + s[1:]
    return s


def _avr_keys(chip: AvrChip) -> set[str]:
    return {_canonical(chip.name), *(_canonical(a) for a in chip.aliases)}


def _stm32_keys(chip: Stm32Chip) -> set[str]:
    return {
        _canonical(chip.name),
        _canonical(chip.katapult_mcu),
        *(_canonical(a) for a in chip.aliases),
    }


def find_avr(name: str) -> Optional[AvrChip]:
    key = _canonical(name)
    for chip in AVR_CHIPS:
        if key in _avr_keys(chip):
            return chip
    return None


def find_stm32(name: str) -> Optional[Stm32Chip]:
    """Exact names first, then a longer part number ("stm32f446ret6") by its line prefix."""
    key = _canonical(name)
    for chip in STM32_CHIPS:
        if key in _stm32_keys(chip):
            return chip
    best: Optional[Stm32Chip] = None
    best_len = 0
    for chip in STM32_CHIPS:
        for k in _stm32_keys(chip):
            base = k[:-2] if k.endswith("xx") else k
            if key.startswith(base) and len(base) > best_len:
                best, best_len = chip, len(base)
    return best


def find_chip(name: Optional[str]) -> Optional[Chip]:
    """Look a chip up by any common spelling; None when unknown (or no name)."""
    if not name:
        return None
    return find_avr(name) or find_stm32(name)


def avr_by_signature(signature: bytes) -> Optional[AvrChip]:
    for chip in AVR_CHIPS:
        if chip.signature == bytes(signature[:3]):
            return chip
    return None


def same_chip(a: str, b: str) -> bool:
    """Whether two names denote the same part (known chips by table, others by spelling)."""
    ca, cb = find_chip(a), find_chip(b)
    if ca is not None and cb is not None:
        return ca.name == cb.name
    return _canonical(a) == _canonical(b)


def chip_matches(expected: str, reported: str) -> Optional[bool]:
    """Whether the board's ``reported`` chip can be the ``expected`` one. Bootloaders do not
    always know exactly (the STM32 DFU ROM only shows a sector layout: "STM32F407/F429",
    "STM32H7 (unknown variant)"), so: True/False when sure, None when it cannot be told."""
    exp = find_chip(expected)
    base = re.sub(r"\s*\(.*?\)", "", reported).strip()
    parts = [p.strip() for p in base.split("/") if p.strip()]
    if not parts:
        return None
    family = re.match(r"(?i)(stm32|atmega)", parts[0])
    candidates: list[Chip] = []
    for i, part in enumerate(parts):
        chip = find_chip(part)
        if chip is None and i > 0 and family:
            chip = find_chip(family.group(1) + part)
        if chip is None:
            return None if exp is not None else _canonical(expected) == _canonical(reported)
        candidates.append(chip)
    if exp is None:
        return None
    return any(c.name == exp.name for c in candidates)


def bootloaders_for(chip_name: str) -> list[AvrBootloader]:
    chip = find_avr(chip_name)
    if chip is None:
        return []
    return [b for b in AVR_BOOTLOADERS if chip.name in b.chips]


# --- USB ids -----------------------------------------------------------------------------


@dataclass(frozen=True)
class UsbId:
    """A USB id seen on printer boards. ``pid`` None matches every product of the vendor.
    ``method`` is the flashing method to suggest (None: not flashable this way)."""

    vid: int
    pid: Optional[int]
    description: str
    method: Optional[str]
    hint: str = ""
    kind: str = "serial"  # serial | usb-dfu | usb-picoboot | can-bridge | other
    tags: tuple[str, ...] = field(default=())


USB_IDS: tuple[UsbId, ...] = (
    UsbId(
        0x0483,
        0xDF11,
        "STM32 ROM bootloader (USB DFU)",
        "dfu",
        "The board is in DFU mode and can be flashed over USB. After flashing, remove the BOOT0 "
        "jumper (if fitted) and reset.",
        kind="usb-dfu",
    ),
    UsbId(
        0x1D50,
        0x614E,
        "Klipper firmware (USB serial)",
        "katapult",
        "Running Klipper. With Katapult installed it can be asked to enter Katapult (1200-baud "
        "touch); without it, enter DFU with the BOOT0 jumper. Stop Klipper first.",
    ),
    UsbId(
        0x1D50,
        0x6177,
        "Katapult bootloader (USB serial)",
        "katapult",
        "The board waits in Katapult and can be flashed with the katapult method.",
    ),
    UsbId(
        0x1D50,
        0x606F,
        "Klipper USB-CAN bridge (gs_usb)",
        "katapult",
        "This board runs Klipper as a USB-to-CAN bridge: it has no serial port. Flash it over "
        "CAN with its UUID (katapult method, detect --can), or use the BOOT0 jumper for DFU.",
        kind="can-bridge",
    ),
    UsbId(
        0x0483,
        0x5740,
        "STM32 virtual COM port (e.g. Marlin on STM32)",
        "dfu",
        "STM32 firmware cannot be replaced over this serial port. Put the board in DFU mode "
        "(BOOT0 jumper, then reset) or copy firmware.bin to its SD card.",
    ),
    UsbId(
        0x2341,
        0x0042,
        "Arduino Mega 2560 R3",
        "stk500v2",
        "ATmega2560 with the stk500v2 bootloader at 115200 baud.",
    ),
    UsbId(
        0x2341,
        0x0010,
        "Arduino Mega 2560",
        "stk500v2",
        "ATmega2560 with the stk500v2 bootloader at 115200 baud.",
    ),
    UsbId(
        0x2341,
        0x0043,
        "Arduino Uno R3",
        "stk500v1",
        "ATmega328P with optiboot at 115200 baud.",
    ),
    UsbId(
        0x2341,
        0x0001,
        "Arduino Uno",
        "stk500v1",
        "ATmega328P with optiboot at 115200 baud.",
    ),
    UsbId(
        0x2341,
        0x8036,
        "Arduino Leonardo (ATmega32U4, Caterina)",
        "avr109",
        "Caterina (avr109) bootloader on the reset button. An MMU2S/MMU3 board re-flashed with "
        "Arduino's bootloader shows up as this: press its reset button when asked.",
    ),
    UsbId(
        0x2341,
        0x0036,
        "Arduino Leonardo bootloader (Caterina)",
        "avr109",
        "The Caterina bootloader is waiting (about 8 s): flash now with the avr109 method.",
    ),
    UsbId(
        0x2341,
        None,
        "Arduino board",
        "auto",
        "An Arduino-compatible AVR board; auto-detection finds the bootloader and baud.",
    ),
    UsbId(
        0x1A86,
        0x7523,
        "CH340 USB-serial adapter",
        "auto",
        "Common on AVR printer boards (Anet A8: ATmega1284P, optiboot at 57600 or 115200). "
        "Creality 4.2.x boards also use it but have an STM32: flash those from the SD card.",
    ),
    UsbId(
        0x0403,
        0x6001,
        "FTDI FT232R USB-serial adapter",
        "auto",
        "Classic AVR boards (older RAMPS clones, Printrboard-era boards).",
    ),
    UsbId(
        0x0403,
        0x6015,
        "FTDI FT231X USB-serial adapter",
        "auto",
        "AVR boards such as the Ultimaker/Rambo family.",
    ),
    UsbId(
        0x10C4,
        0xEA60,
        "Silicon Labs CP210x USB-serial adapter",
        "auto",
        "AVR boards (e.g. some MKS and Anycubic boards) and ESP32 boards.",
    ),
    UsbId(
        0x2C99,
        0x0002,
        "Prusa i3 MK3/MK3S/MK3S+ (Einsy RAMBo, ATmega2560)",
        "prusa",
        "Prusa's stk500v2 bootloader at 115200 baud; the MULTILANG .hex writes the firmware and "
        "then the languages through the firmware (both verified).",
    ),
    UsbId(
        0x2C99,
        0x0001,
        "Prusa i3 MK2/MK2S/MK2.5/MK2.5S (miniRAMBo, ATmega2560)",
        "prusa",
        "Prusa's stk500v2 bootloader at 115200 baud; use the printer's .hex from prusa3d.com.",
    ),
    UsbId(
        0x2C99,
        0x0004,
        "Prusa MMU2S/MMU3 (ATmega32U4)",
        "avr109",
        "Flashed through its Caterina bootloader (avr109): the 1200-baud touch reboots it into "
        "the bootloader, which re-enumerates as 2c99:0003. Use the MMU2S_MMU3_FW….hex, not the "
        "…BOOTLOADER… one.",
    ),
    UsbId(
        0x2C99,
        0x0003,
        "Prusa MMU2S/MMU3 bootloader (Caterina)",
        "avr109",
        "The MMU's bootloader is waiting (it leaves after 8 s without a command): flash now "
        "with the avr109 method.",
    ),
    UsbId(
        0x2C99,
        0x0008,
        "Prusa CW1 (ATmega32U4)",
        "avr109",
        "Flashed through its avr109 bootloader after a 1200-baud touch (re-enumerates as "
        "2c99:0007).",
    ),
    UsbId(
        0x2C99,
        0x0007,
        "Prusa CW1 bootloader",
        "avr109",
        "The CW1's bootloader is waiting: flash now with the avr109 method.",
    ),
    UsbId(
        0x2C99,
        0x000F,
        "Prusa CW1S (ATmega32U4)",
        "avr109",
        "Flashed through its avr109 bootloader after a 1200-baud touch (re-enumerates as "
        "2c99:000e).",
    ),
    UsbId(
        0x2C99,
        0x000E,
        "Prusa CW1S bootloader",
        "avr109",
        "The CW1S's bootloader is waiting: flash now with the avr109 method.",
    ),
    UsbId(
        0x2C99,
        0x000C,
        "Prusa MINI/MINI+ (Buddy)",
        None,
        "Not supported here: use the USB stick or PrusaLink (Buddy-board printers take .bbf "
        "firmware files).",
    ),
    UsbId(
        0x2C99,
        0x000D,
        "Prusa MK4 (Buddy)",
        None,
        "Not supported here: use the USB stick or PrusaLink (Buddy-board printers take .bbf "
        "firmware files).",
    ),
    UsbId(
        0x2C99,
        0x001A,
        "Prusa MK4S (Buddy)",
        None,
        "Not supported here: use the USB stick or PrusaLink (Buddy-board printers take .bbf "
        "firmware files).",
    ),
    UsbId(
        0x2C99,
        0x0015,
        "Prusa MK3.9 (Buddy)",
        None,
        "Not supported here: use the USB stick or PrusaLink (Buddy-board printers take .bbf "
        "firmware files).",
    ),
    UsbId(
        0x2C99,
        0x001B,
        "Prusa MK3.9S (Buddy)",
        None,
        "Not supported here: use the USB stick or PrusaLink (Buddy-board printers take .bbf "
        "firmware files).",
    ),
    UsbId(
        0x2C99,
        0x0017,
        "Prusa MK3.5 (Buddy)",
        None,
        "Not supported here: use the USB stick or PrusaLink (Buddy-board printers take .bbf "
        "firmware files).",
    ),
    UsbId(
        0x2C99,
        0x001C,
        "Prusa MK3.5S (Buddy)",
        None,
        "Not supported here: use the USB stick or PrusaLink (Buddy-board printers take .bbf "
        "firmware files).",
    ),
    UsbId(
        0x2C99,
        0x0010,
        "Prusa iX (Buddy)",
        None,
        "Not supported here: use the USB stick or PrusaLink (Buddy-board printers take .bbf "
        "firmware files).",
    ),
    UsbId(
        0x2C99,
        0x0011,
        "Prusa XL (Buddy)",
        None,
        "Not supported here: use the USB stick or PrusaLink (Buddy-board printers take .bbf "
        "firmware files).",
    ),
    UsbId(
        0x2C99,
        0x001F,
        "Prusa CORE One (Buddy)",
        None,
        "Not supported here: use the USB stick or PrusaLink (Buddy-board printers take .bbf "
        "firmware files).",
    ),
    UsbId(
        0x2C99,
        None,
        "Prusa printer",
        None,
        "Not supported here: use the USB stick or PrusaLink (Prusa MK4/XL/MINI and other "
        "Buddy-board printers take .bbf firmware files).",
    ),
    UsbId(
        0x27B1,
        0x0001,
        "UltiMachine RAMBo/Einsy (ATmega2560)",
        "stk500v2",
        "stk500v2 bootloader at 115200 baud. If this is a Prusa MK3 Einsy, choose the prusa "
        "method so the languages are written too.",
    ),
    UsbId(
        0x2E8A,
        0x0003,
        "RP2040 boot ROM (BOOTSEL)",
        "picoboot",
        "Waiting in BOOTSEL: flashed over PICOBOOT (.uf2, or a no-bootloader .bin) with a "
        "read-back verify.",
        kind="usb-picoboot",
    ),
    UsbId(
        0x2E8A,
        0x000F,
        "RP2350 boot ROM (BOOTSEL)",
        "picoboot",
        "Waiting in BOOTSEL: flashed over PICOBOOT (.uf2) with a read-back verify.",
        kind="usb-picoboot",
    ),
)


def lookup_usb(vid: Optional[int], pid: Optional[int]) -> Optional[UsbId]:
    """The table row for a USB id: the exact product first, then the vendor wildcard."""
    if vid is None:
        return None
    for row in USB_IDS:
        if row.vid == vid and row.pid is not None and row.pid == pid:
            return row
    for row in USB_IDS:
        if row.vid == vid and row.pid is None:
            return row
    return None


def format_usb_id(vid: Optional[int], pid: Optional[int]) -> str:
    if vid is None or pid is None:
        return ""
    return f"{vid:04x}:{pid:04x}"


def parse_usb_id(text: str) -> tuple[int, int]:
    """Parse "VID:PID" (hex, as lsusb prints it); ValueError on anything else."""
    m = re.fullmatch(r"\s*(?:0x)?([0-9a-fA-F]{1,4})\s*:\s*(?:0x)?([0-9a-fA-F]{1,4})\s*", text)
    if not m:
        raise ValueError(f"{text!r} is not a USB id like 0483:df11")
    return int(m.group(1), 16), int(m.group(2), 16)


def avr_vector_count(image_start: bytes) -> int:
    """How many 4-byte JMP vectors (``0C 94 ..``) open an AVR image; 0 if none."""
    n = 0
    while image_start[n * 4 : n * 4 + 2] == b"\x0c\x94":
        n += 1
    return n


def avr_chips_with_vectors(count: int) -> list[str]:
    """Names of the AVR parts whose vector table has ``count`` entries."""
    return [c.name for c in AVR_CHIPS if c.vectors == count]
