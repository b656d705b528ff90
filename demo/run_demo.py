"""The demo: a real OctoPrint with the Firmware Updater, a simulated printer and emulated boards.

Run through ``scripts/demo.sh`` (which installs everything first). It

1. builds the simulated boards (simavr harness, real optiboot, the printer-like test firmware),
2. prepares a persistent OctoPrint basedir in ``demo-data/octoprint`` (wizards skipped, no
   online checks, the pty ``/tmp/ttyFLASHER0`` as an extra port, autoconnect to it) with an
   ``admin`` user whose fresh password it prints,
3. starts the simulated printer — an ATmega1284P running real optiboot and the test firmware
   "Demo-1" on the pty; OctoPrint's connect resets it as DTR would; and a second printer, a
   Creality-style 32-bit board running Marlin with an SD card (``/tmp/ttyFLASHER1``),
4. drops the demo transport plugin in so the page also lists an emulated STM32 DFU device, an
   emulated Katapult CAN node, an emulated BTT SKR Pico (RP2040) running Klipper and an
   emulated Prusa MMU3 on USB; the demo also runs a Prusa MK3S (Einsy) on ``/tmp/ttyFLASHER2``,
5. writes sample firmware files to ``demo-data/samples/``,
6. starts ``octoprint serve`` on http://127.0.0.1:5000 and waits until it answers.

Ctrl-C stops OctoPrint and the simulated printer. The simulated AVR needs one core in real
time, so the demo holds the machine-wide real-time lock while the printer runs.
"""

from __future__ import annotations

import argparse
import fcntl
import http.client
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Any, Optional

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PORT_LINK = Path("/tmp/ttyFLASHER0")
REALTIME_LOCK = Path(
    os.environ.get("FLASHER_REALTIME_LOCK", "/tmp/octoprint-flasher-realtime.lock")
)
BOARD_CONFIG = "m1284p-optiboot-115200"
PLUGIN_FILE = REPO / "demo" / "flasher_demo_transports.py"


def config_yaml(port_link: Path) -> str:
    """OctoPrint settings for a quiet, offline, ready-to-use demo server."""
    return f"""\
accessControl:
  autologinLocal: false
plugins:
  _disabled: [announcements]
  softwareupdate:
    checks:
      octoprint: {{disabled: true}}
  tracking: {{enabled: false}}
serial:
  additionalPorts: ["{port_link.parent}/ttyFLASHER*"]
  port: {port_link}
  baudrate: 115200
  autoconnect: true
server:
  firstRun: false
  onlineCheck: {{enabled: false}}
  pluginBlacklist: {{enabled: false}}
  seenWizards: {{backup: null, corewizard: 4, file_check: 1, tracking: null}}
"""


def octoprint_bin() -> str:
    candidate = Path(sys.executable).parent / "octoprint"
    return str(candidate) if candidate.exists() else "octoprint"


def prepare_basedir(basedir: Path, port_link: Path) -> str:
    """Write the config (keeping an existing one) and (re)set the admin password."""
    basedir.mkdir(parents=True, exist_ok=True)
    config = basedir / "config.yaml"
    if not config.exists():
        config.write_text(config_yaml(port_link))
    plugins = basedir / "plugins"
    plugins.mkdir(exist_ok=True)
    shutil.copy(PLUGIN_FILE, plugins / PLUGIN_FILE.name)
    password = secrets.token_urlsafe(9)
    users = basedir / "users.yaml"
    base = [octoprint_bin(), "--basedir", str(basedir), "user"]
    if users.exists() and "admin:" in users.read_text():
        cmd = base + ["password", "admin", "--password", password]
    else:
        cmd = base + ["add", "admin", "--password", password, "--admin"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return password


#: the sample files, in the order a newcomer tries them: for each board the file a newcomer
#: could wrongly pick up (refused before that board is touched), then the one that flashes
SAMPLES = (
    ("wrong-chip-klipper-stm32f407.bin", "dfu", False,
     "Klipper built for an STM32F407: refused from the file, the board stays in DFU"),
    ("klipper-stm32f446-dfu.bin", "dfu", True,
     "Klipper for the STM32F446 ('no bootloader' build, linked at 0x08000000)"),
    ("wrong-canboot.bin", "katapult", False,
     "the Katapult bootloader itself, not Klipper: refused from the file, the node is not "
     "rebooted"),
    ("klipper-stm32g0b1-katapult.bin", "katapult", True,
     "Klipper for the STM32G0B1 behind Katapult (linked at 0x08002000, CAN 1 Mbit/s)"),
    ("wrong-chip-klipper-rp2350.uf2", "pico", False,
     "Klipper built for the RP2350 (Pico 2): refused from the file's UF2 family, the SKR Pico "
     "keeps running Klipper"),
    ("klipper-rp2040-skr-pico.uf2", "pico", True,
     "Klipper for the RP2040: the SKR Pico reboots into its boot ROM, is flashed, read back "
     "and runs Klipper again"),
    ("marlin-ender3-atmega1284p.hex", "creality", False,
     "Marlin for the original Ender-3 (8-bit ATmega1284P, a .hex): refused from the file, the "
     "32-bit board is not disconnected or touched"),
    ("firmware-ender3v2-marlin-2.1.2.8.bin", "creality", True,
     "Marlin 2.1.2.8 for the Ender-3 V2's 32-bit board: uploaded to its SD card over the serial "
     "link, the board resets, flashes it and answers M115 with the new build"),
    ("prusa-mk3s-languages-of-another-build.hex", "mk3s", False,
     "a MULTILANG file whose language catalogs belong to another firmware build: refused from "
     "the file (the printer would ask for a language again and again)"),
    ("prusa-mk3s-multilang-demo.hex", "mk3s", True,
     "Prusa firmware + 3 language catalogs: pass 1 writes the firmware through the bootloader, "
     "pass 2 the languages through the new firmware into the SPI flash; both read back"),
    ("MMU2S_MMU3_BOOTLOADER_demo.hex", "mmu", False,
     "the MMU's ISP image (firmware + Caterina bootloader): refused by name, the MMU is not "
     "rebooted"),
    ("prusa-mmu3-demo.hex", "mmu", True,
     "MMU3 firmware ('; device = mm-control'): 1200-baud touch, the bootloader is followed to "
     "its new port, written over avr109, read back, and the MMU runs again"),
    ("wrong-chip-atmega2560.hex", "printer", False,
     "built for the ATmega2560 and bigger than the 1284P's flash: refused"),
    ("printer-demo2-atmega1284p.hex", "printer", True,
     "new printer firmware 'Demo-2' for the ATmega1284P"),
)  # fmt: skip
BOARDS = {
    "dfu": "the STM32F446 in DFU mode (device 'STM32 ROM bootloader (USB DFU): STM32F446')",
    "katapult": "the Katapult CAN node (device 'CAN node ... (Klipper) on flasher-demo')",
    "pico": "the BTT SKR Pico running Klipper (device 'Klipper on an RP2040 (USB)')",
    "mk3s": "the Prusa MK3S's port (/tmp/ttyFLASHER2)",
    "mmu": "the Prusa MMU (device 'Prusa MMU2S/MMU3 …')",
    "printer": "the printer's port",
    "creality": "the 32-bit printer's port (/tmp/ttyFLASHER1)",
}


def make_samples(folder: Path) -> dict[str, Path]:
    """Write the sample firmware files; returns {description: path} in :data:`SAMPLES` order.

    Each board gets the file that flashes on the first try and one a newcomer could plausibly
    pick up instead, which the page refuses before that board is touched."""
    from tests.emulators import klipper_firmware
    from tests.emulators.simboard import build_test_firmware

    folder.mkdir(parents=True, exist_ok=True)
    content = {
        "klipper-stm32f446-dfu.bin": klipper_firmware.make_klipper_bin(
            mcu="stm32f446xx",
            app_start=0x08000000,
            size=32 * 1024,
            canbus_frequency=None,
            serial_baud=250000,
        ),
        "wrong-chip-klipper-stm32f407.bin": klipper_firmware.make_klipper_bin(
            mcu="stm32f407xx",
            app_start=0x08000000,
            size=32 * 1024,
            canbus_frequency=None,
            serial_baud=250000,
            seed=2,
        ),
        "klipper-stm32g0b1-katapult.bin": klipper_firmware.make_klipper_bin(),
        "wrong-canboot.bin": klipper_firmware.make_katapult_bin(),
        **rp2040_samples(),
        **prusa_samples(),
        **creality_samples(),
    }
    samples: dict[str, Path] = {}
    for name, board, _right, what in SAMPLES:
        path = folder / name
        if name in content:
            path.write_bytes(content[name])
        elif name == "printer-demo2-atmega1284p.hex":
            shutil.copy(build_test_firmware("atmega1284p", "Demo-2"), path)
        else:  # bigger than the whole ATmega1284P: refused whatever is known about the board
            shutil.copy(build_test_firmware("atmega2560", "Wrong-Chip", size=136 * 1024), path)
        samples[f"{BOARDS[board]}: {what}"] = path
    return samples


def rp2040_samples() -> dict[str, bytes]:
    """The SKR Pico's files: Klipper's out/klipper.uf2 for the RP2040 (60 KiB, larger than
    the Klipper the emulated board starts with) and one built for the RP2350."""
    from octoprint_flasher.image import uf2
    from octoprint_flasher.image.model import Segment
    from tests.emulators.picoboot_device import FLASH_BASE, klipper_like_rp2040

    right = klipper_like_rp2040(60 * 1024, seed=21)
    wrong = klipper_like_rp2040(60 * 1024, seed=22, mcu="rp2350")
    return {
        "klipper-rp2040-skr-pico.uf2": uf2.write_uf2([Segment(FLASH_BASE, right)]),
        "wrong-chip-klipper-rp2350.uf2": uf2.write_uf2(
            [Segment(FLASH_BASE, wrong)], uf2.FAMILY_RP2350_ARM_S
        ),
    }


#: the 32-bit printer: what it runs when the demo starts, and what its sample firmware.bin is
CREALITY_OLD = "Marlin 2.1.2.7 (Dec  6 2026 05:42:29)"
CREALITY_NEW = "Marlin 2.1.2.8 (Jan 20 2027 10:15:00)"
CREALITY_MACHINE = "Ender-3 V2"


def creality_samples() -> dict[str, bytes]:
    """The 32-bit printer's files: a Marlin firmware.bin for its board (64 KiB linked above
    the 28 KiB SD bootloader, FIRMWARE_NAME 2.1.2.8) and the .hex of the 8-bit Ender-3."""
    from tests.emulators.marlin_printer import make_marlin_bin
    from tests.emulators.simboard import build_test_firmware

    right = make_marlin_bin(
        CREALITY_NEW, size=64 * 1024, base=0x08007000, seed=28, machine=CREALITY_MACHINE
    )
    wrong = build_test_firmware("atmega1284p", "Ender3-Melzi").read_bytes()
    return {
        "firmware-ender3v2-marlin-2.1.2.8.bin": right,
        "marlin-ender3-atmega1284p.hex": wrong,
    }


def start_creality_printer(link: Path, time_scale: float = 1.0) -> Any:
    """A Creality 4.2.x-style board (STM32F103, CH340 USB-UART: the port stays through a
    reset) running Marlin 2.1.2.7 with BINARY_FILE_TRANSFER and M997, an SD card and
    Creality's bootloader (flashes a .bin with a name it has not flashed before), on its own
    pty behind ``link``. The emulator runs in this process, in real time at ``time_scale`` 1."""
    import tempfile

    from tests.emulators.marlin_printer import MarlinPrinter

    printer = MarlinPrinter(
        family="creality",
        firmware_name=CREALITY_OLD,
        machine=CREALITY_MACHINE,
        transport="uart",
        time_scale=time_scale,
        port_dir=tempfile.mkdtemp(prefix="creality-"),
    ).start()
    tmp = link.with_name(link.name + ".new")
    if os.path.lexists(tmp):
        tmp.unlink()
    os.symlink(printer.port, tmp)
    os.replace(tmp, link)
    return printer


def stop_creality_printer(printer: Any, link: Path) -> None:
    printer.stop()
    if os.path.islink(link) and os.readlink(link) == printer.port:
        link.unlink()
    shutil.rmtree(os.path.dirname(printer.port), ignore_errors=True)


#: the Prusa MK3S: its pty link next to the printer's, and the build its Einsy starts with
PRUSA_LINK_NAME = "ttyFLASHER2"
PRUSA_SIGNATURE = 0x1F2E3D4C  # the language signature of the sample's firmware build


def prusa_samples() -> dict[str, bytes]:
    """The MK3S's and the MMU's files in Prusa's real layouts (``tests/prusa/samples.py``),
    small so both passes take seconds: 24 KiB of firmware with three 4 KB catalogs of its
    build (and the same with another build's catalogs), the MMU3's 16 KiB ``; device =
    mm-control`` file and its ISP image (firmware padded to 0x7000 + a bootloader)."""
    from tests.prusa import samples

    firmware = samples.firmware(24 * 1024, signature=PRUSA_SIGNATURE, seed=31)
    codes = ("cs", "de", "fr")
    mmu = samples.mmu_app(16 * 1024, seed=7)
    isp = samples.mmu_app(0x7000, seed=7) + bytes(range(256)) * 16
    return {
        "prusa-mk3s-multilang-demo.hex": samples.multilang(
            firmware, samples.languages(codes, 4000, PRUSA_SIGNATURE)
        ),
        "prusa-mk3s-languages-of-another-build.hex": samples.multilang(
            firmware, samples.languages(codes, 4000, 0x5A5A0001)
        ),
        "prusa-mmu3-demo.hex": samples.device_file("mm-control", mmu),
        "MMU2S_MMU3_BOOTLOADER_demo.hex": samples.device_file("mm-control", isp),
    }


def start_prusa_printer(link: Path, time_scale: float = 1.0) -> Any:
    """A Prusa MK3S's Einsy RAMBo (``tests/emulators/prusa_einsy.py``: Prusa's stk500v2
    bootloader, the W25X20CL language flash, a firmware model that answers OctoPrint and
    serves the language pass) running an older 20 KiB build, on its own pty behind ``link``.
    Opening the port resets it, as the Einsy's DTR does; it runs in this process."""
    from tests.emulators.prusa_einsy import PrusaEinsy
    from tests.prusa import samples

    old = samples.firmware(20 * 1024, signature=0x0BADC0DE, seed=30)
    board = PrusaEinsy(semicolon_defect=False, timing=True, time_scale=time_scale, app=old)
    tmp = link.with_name(link.name + ".new")
    if os.path.lexists(tmp):
        tmp.unlink()
    os.symlink(board.port, tmp)
    os.replace(tmp, link)
    return board


def stop_prusa_printer(board: Any, link: Path) -> None:
    board.close()
    if os.path.islink(link) and os.readlink(link) == board.port:
        link.unlink()


def check_port_free(host: str, port: int) -> None:
    """Fail early and clearly: OctoPrint would die on a busy port and start the next run in
    safe mode (without our plugin)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise SystemExit(
                f"Port {port} on {host} is in use ({exc.strerror}); stop whatever uses it or "
                f"run ./scripts/demo.sh --port <another port>."
            ) from None


def clear_stale_startup_flag(basedir: Path) -> None:
    """An interrupted earlier start leaves OctoPrint's flag that starts it in safe mode, which
    disables third-party plugins — the Firmware Updater among them."""
    flag = basedir / ".incomplete_startup"
    if flag.exists():
        print("   (an earlier start was interrupted: clearing OctoPrint's safe-mode flag)")
        flag.unlink()


def wait_online(url: str, proc: subprocess.Popen[bytes], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"OctoPrint exited with code {proc.returncode}; see its log above.")
        try:
            with urllib.request.urlopen(url + "/online.txt", timeout=2) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError, http.client.HTTPException):
            pass
        time.sleep(0.5)
    raise SystemExit(f"OctoPrint did not answer on {url} within {timeout:.0f} s.")


def acquire_realtime_lock() -> IO[str]:
    REALTIME_LOCK.touch(exist_ok=True)
    handle = REALTIME_LOCK.open("w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print("Waiting for another real-time simulation (tests?) to finish...", flush=True)
        fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO / "demo-data")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--port-link", type=Path, default=PORT_LINK)
    parser.add_argument(
        "--check", action="store_true", help="start everything, verify it answers, then stop"
    )
    args = parser.parse_args(argv)

    from tests.emulators.simboard import SimBoard, build_all, build_test_firmware

    print("== building the simulated boards (cached after the first run)", flush=True)
    build_all()
    check_port_free(args.host, args.port)
    basedir = args.data / "octoprint"
    password = prepare_basedir(basedir, args.port_link)
    samples = make_samples(args.data / "samples")

    lock = acquire_realtime_lock()
    board: Any = None
    creality: Any = None
    creality_link = args.port_link.parent / "ttyFLASHER1"
    prusa: Any = None
    prusa_link = args.port_link.parent / PRUSA_LINK_NAME
    server: Optional[subprocess.Popen[bytes]] = None
    stopping = False

    def stop(*_args: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    try:
        print(f"== starting the simulated printer on {args.port_link}", flush=True)
        board = SimBoard(
            BOARD_CONFIG,
            app_hex=build_test_firmware("atmega1284p", "Demo-1"),
            port_link=args.port_link,
        )
        board.start()
        print(f"== starting the 32-bit Marlin printer on {creality_link}", flush=True)
        creality = start_creality_printer(creality_link)
        print(f"== starting the Prusa MK3S (Einsy) on {prusa_link}", flush=True)
        prusa = start_prusa_printer(prusa_link)
        clear_stale_startup_flag(basedir)
        env = dict(os.environ, FLASHER_REPO=str(REPO), PYTHONUNBUFFERED="1")
        url = f"http://{args.host}:{args.port}"
        print(f"== starting OctoPrint on {url}", flush=True)
        server = subprocess.Popen(
            [
                octoprint_bin(),
                "--basedir",
                str(basedir),
                "serve",
                "--host",
                args.host,
                "--port",
                str(args.port),
                "--iknowwhatimdoing",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        wait_online(url, server)
        print_banner(url, password, samples, basedir, args.port_link)
        if args.check:
            return 0
        while not stopping and server.poll() is None:
            time.sleep(0.5)
        return 0 if stopping else (server.returncode or 0)
    except KeyboardInterrupt:
        return 0
    finally:
        print("\n== stopping", flush=True)
        if server is not None and server.poll() is None:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        if board is not None:
            board.stop()
        if creality is not None:
            stop_creality_printer(creality, creality_link)
        if prusa is not None:
            stop_prusa_printer(prusa, prusa_link)
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()


def print_prusa_boards(port_link: Path) -> None:
    print(f"  Prusa MK3S (Einsy RAMBo, language flash) on {port_link.parent / PRUSA_LINK_NAME}")
    print("  Prusa MMU3 (ATmega32U4, Caterina bootloader) on emulated USB 2c99:0004; after")
    print("  its flash: reconnect the printer so the MK3S sees the MMU. After the MK3S's:")
    print("  choose a language on the printer (a real one restarts a few times).")


def print_banner(
    url: str, password: str, samples: dict[str, Path], basedir: Path, port_link: Path
) -> None:
    width = 72
    folder = next(iter(samples.values())).parent
    print("=" * width)
    print(f"OctoPrint with the Firmware Updater is running: {url}")
    print(f"  user: admin    password: {password}")
    print(f"  simulated printer: ATmega1284P + optiboot on {port_link} (firmware 'Demo-1')")
    print(
        f"  second printer: Ender-3 V2-style 32-bit board, Marlin + SD card on "
        f"{port_link.parent / 'ttyFLASHER1'}"
    )
    print("  emulated boards: STM32F446 in DFU mode, Katapult node on CAN 'flasher-demo',")
    print("                   BTT SKR Pico (RP2040) running Klipper on USB")
    print_prusa_boards(port_link)
    print(f"Sample firmware files are in {folder}. Try them board by board in")
    print("Settings (wrench) -> Firmware Updater: pick the Device, choose the file, press")
    print("Flash. Each board's wrong file is refused before that board is touched; the right")
    print("file then flashes, with nothing to restart:")
    step = 0
    for board, label in BOARDS.items():
        step += 1
        print(f"  {step}. Device: {label}")
        if board == "printer":
            print("     (type atmega1284p in 'Chip' so the page can refuse the wrong chip)")
        if board == "creality":
            print("     (first connect OctoPrint to it: Connection panel, port")
            print(f"      {port_link.parent / 'ttyFLASHER1'}, 115200, Connect; its M115 tells the")
            print("      page it takes a firmware.bin over the serial link)")
        if board == "mk3s":
            print("     (connect OctoPrint to it first if you like: port")
            print(f"      {port_link.parent / PRUSA_LINK_NAME}, 115200; it is then disconnected")
            print("      for the flash and reconnected afterwards)")
        for name, where, right, what in SAMPLES:
            if where == board:
                print(f"     {'then' if right else 'first'}: {name}\n         {what}")
    print("The printer stays connected while the DFU board, the CAN node and the SKR Pico")
    print("are flashed. The SKR Pico needs no button: Klipper is asked to reboot into the")
    print("boot ROM, and runs again after the flash (flash it as often as you like).")
    print("After its flash the DFU board runs Klipper; restart the demo to flash it again.")
    print("The 32-bit printer is disconnected for its flash and reconnected once its new")
    print("firmware answers; the same file again ends 'not confirmed' (same build reported).")
    print(f"OctoPrint log: {basedir / 'logs' / 'octoprint.log'}")
    print("Press Ctrl-C to stop.")
    print("=" * width, flush=True)


if __name__ == "__main__":
    sys.exit(main())
