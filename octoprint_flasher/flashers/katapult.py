"""Katapult flasher over CAN (any python-can interface) or a serial port (USB-CDC, UART).

Flow: enter Katapult if Klipper runs (CAN request, 1200-baud touch, serial request string or
USB-CAN bridge follow; see :mod:`octoprint_flasher.links.bootloader_entry`), CONNECT, check the file
against what CONNECT reports, write blocks, SEND_EOF, read every written block back, and only
then COMPLETE. After any failure COMPLETE is never sent: the board waits in Katapult for a
retry, because Katapult starts whatever sits at the application address without checking it.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

from .. import chips
from ..discovery import KIND_CAN, Device
from ..errors import ConnectError, FlashError, PreflightError, ProtocolError, VerifyError
from ..flasher import (
    STAGE_READING,
    STAGE_VERIFYING,
    STAGE_WRITING,
    CancelToken,
    Flasher,
    FlashResult,
    LogCallback,
    Progress,
    ProgressCallback,
    TargetInfo,
    no_progress,
)
from ..image.klipper import (
    KlipperBuild,
    check_reset_vector,
    klipper_build,
    looks_like_katapult,
)
from ..image.model import FirmwareImage, Segment
from ..links import bootloader_entry as entry
from ..protocols import katapult as kp
from ..protocols import klipper_can
from ..protocols import klipper_serial as ks
from ..target import Target

UART_BAUD = 250000
UNKNOWN_FLASH_SPAN = 16 * 1024 * 1024
#: STM32 USB-FS parts (all but F2/F4/H7) lose the first reply after enumeration
_PRIME_EXEMPT = ("stm32f2", "stm32f4", "stm32h7")


class SerialByteLink:
    """A pyserial port as a :class:`~octoprint_flasher.protocols.katapult.ByteLink`."""

    def __init__(self, ser: Any) -> None:
        self.ser = ser

    def write(self, data: bytes) -> None:
        try:
            self.ser.write(data)
        except Exception as exc:
            raise ConnectError(
                f"Lost the serial port during the flash: {exc}",
                cause="The board reset or the cable was unplugged.",
                hint="Reconnect; the board stays in Katapult (double-tap reset if not) "
                "and can be flashed again.",
            ) from exc

    def read(self, timeout: float) -> bytes:
        try:
            self.ser.timeout = max(0.0, timeout)
            first = self.ser.read(1)
            if not first:
                return b""
            waiting = self.ser.in_waiting
            return first + (self.ser.read(waiting) if waiting else b"")
        except Exception as exc:
            raise ConnectError(
                f"Lost the serial port during the flash: {exc}",
                cause="The board reset or the cable was unplugged.",
                hint="Reconnect; the board stays in Katapult and can be flashed again.",
            ) from exc

    def flush_input(self) -> None:
        try:
            self.ser.reset_input_buffer()
        except Exception:
            pass

    def close(self) -> None:
        try:
            self.ser.close()
        except Exception:
            pass


def _opt(target: Target, key: str, default: Any) -> Any:
    value = target.options.get(key)
    return default if value is None else value


class KatapultFlasher(Flasher):
    method = "katapult"

    def __init__(self, target: Target, log: Optional[LogCallback] = None) -> None:
        super().__init__(log)
        self.target = target
        self.timeouts = kp.Timeouts(
            command=float(_opt(target, "command_timeout", 2.0)),
            send_block=float(_opt(target, "block_timeout", 5.0)),
            tries=int(_opt(target, "tries", 3)),
        )
        self.entry_timeout = float(_opt(target, "entry_timeout", 5.0))
        self.lister: Callable[[], list[Any]] = _opt(target, "list_ports", entry.list_serial_ports)
        self.bridge_finder: Callable[[str], Optional[entry.BridgeInfo]] = _opt(
            target, "find_usb_can_bridge", entry.find_usb_can_bridge
        )
        self.open_serial: Optional[Callable[..., Any]] = target.options.get("open_serial")
        self.can_facts: Optional[Callable[[str], Any]] = target.options.get("can_facts")
        self.transport = "serial" if target.port and not target.uuid else "can"
        self.can_link: Any = None
        self.serial: Optional[SerialByteLink] = None
        self.port: Optional[str] = target.port
        self.client: Optional[kp.KatapultClient] = None
        self.info: Optional[kp.ConnectInfo] = None
        self.uuid: Optional[bytes] = None
        self.target_info: Optional[TargetInfo] = None
        self._failed = False
        #: the Katapult USB device we talk to (its USB path and serial find Klipper again)
        self.katapult_usb: Any = None
        #: what was flashed, to recognise the new application when it answers
        self.flashed: Optional[bytes] = None
        self.build: Optional[KlipperBuild] = None
        if self.transport == "can":
            if not target.uuid:
                raise ConnectError(
                    "A CAN flash needs the node's UUID.",
                    hint="List the nodes with: octoprint-flasher detect --can, then pass "
                    "--uuid (12 hex digits).",
                )
            try:
                self.uuid = klipper_can.parse_uuid(target.uuid)
            except ValueError as exc:
                raise ConnectError(str(exc), hint="Copy the UUID from the CAN query.") from exc

    # -- transports --------------------------------------------------------------------------
    def _open_can(self) -> None:
        from ..links.can_bus import CanLink, open_bus

        t = self.target
        self.can_link = CanLink(
            open_bus(t.can_interface, t.can_channel, t.can_bitrate, t.can_bus_factory)
        )

    def _open_serial(self, port: str, baud: int) -> SerialByteLink:
        if self.open_serial is not None:
            ser = self.open_serial(port, baud, timeout=0.1)
        else:
            from ..links.serial_port import open_port

            ser = open_port(port, baud, timeout=0.1)
        self.serial = SerialByteLink(ser)
        self.port = port
        return self.serial

    def _port_info(self, port: str) -> Any:
        try:
            ports = self.lister()
        except Exception:
            return None
        for info in ports:
            if getattr(info, "device", None) == port:
                return info
        return None

    # -- identify ----------------------------------------------------------------------------
    def identify(self) -> TargetInfo:
        if self.target_info is not None:
            return self.target_info
        if self.transport == "can":
            self._identify_can()
        else:
            self._identify_serial(self.target.port or "")
        assert self.client is not None and self.info is not None
        info = self.info
        self.log(
            f"Katapult {info.version or '(no version)'} protocol {info.protocol_text} on "
            f"{info.mcu}: application at 0x{info.app_start:08X}, {info.block_size}-byte blocks"
        )
        chip = chips.find_stm32(info.mcu) if info.mcu else None
        if chip is not None:
            flash_start, flash_size = chip.flash_start, chip.flash_size
            sector = chip.sector_at(info.app_start)
            page = sector[1] if sector else info.block_size
        else:
            # unknown part (RP2040, LPC176x, ...): no upper bound from us; Katapult's own
            # write checks still apply, and read() refuses without an explicit size
            flash_start, flash_size, page = info.app_start, 0, info.block_size
        known = bool(flash_size)
        if not known:
            flash_size = UNKNOWN_FLASH_SPAN
        app_end = flash_start + flash_size
        self.target_info = TargetInfo(
            method=self.method,
            chip=info.mcu,
            flash_start=flash_start,
            flash_size=flash_size,
            app_start=info.app_start,
            app_end=app_end,
            page_size=page,
            bootloader=f"Katapult {info.version}".strip(),
            details={
                "protocol": info.protocol_text,
                "block_size": info.block_size,
                "transport": self.transport,
                "port": self.port,
                "uuid": self.uuid.hex() if self.uuid else None,
                "flash_size_known": known,
            },
        )
        return self.target_info

    def _identify_can(self) -> None:
        assert self.uuid is not None
        if self.can_link is None:
            self._open_can()
        admin = klipper_can.Admin(self.can_link)
        bridge = None
        try:
            bridge = self.bridge_finder(self.target.can_channel)
        except Exception:
            bridge = None
        if bridge is not None and bridge.uuid != self.uuid:
            bridge = None
        try:
            result = entry.enter_from_can(
                admin,
                self.uuid,
                self.log,
                timeout=self.entry_timeout,
                bridge=bridge,
                lister=self.lister,
            )
        except ConnectError as exc:
            exc.cause += self._can_advice()
            raise
        self.entered_from_app = result.requested
        if result.serial_port is not None:
            # the bridge is gone with its CAN interface; Katapult waits on USB serial
            self.can_link.close()
            self.can_link = None
            self.transport = "serial"
            self._identify_serial(result.serial_port.device, known=result.serial_port)
            return
        from ..links.can_bus import NodeStream

        nodeid = klipper_can.KATAPULT_NODEID
        admin.assign_katapult(self.uuid, nodeid)
        stream = NodeStream(
            self.can_link, klipper_can.node_tx_id(nodeid), klipper_can.node_rx_id(nodeid)
        )
        self.client = kp.KatapultClient(stream, self.timeouts)
        self.info = self._guarded(self.client.connect, "CONNECT")
        reported = self._guarded(self.client.get_canbus_id, "GET_CANBUS_ID")
        if reported != self.uuid.hex():
            raise ConnectError(
                f"The node that answered reports UUID {reported}, not {self.uuid.hex()}.",
                cause="Two nodes answered to the same id, or the UUID belongs to another board.",
                hint="Run the CAN query again and use the UUID it prints.",
            )

    def _identify_serial(self, port: str, known: Any = None) -> None:
        if not port:
            raise ConnectError("No serial port given.", hint="Pass --port, e.g. /dev/ttyACM0.")
        info = known or self._port_info(port)
        usb_id = (getattr(info, "vid", None), getattr(info, "pid", None))
        if usb_id == entry.KLIPPER_USB:
            self.log(f"{port} is Klipper over USB: sending the 1200-baud bootloader request.")
            info = entry.enter_from_usb_klipper(
                port, self.lister, self.entry_timeout, self.open_serial
            )
            self.entered_from_app = True
            port = info.device
            usb_id = entry.KATAPULT_USB
            self.log(f"Katapult re-enumerated as {port}.")
        elif usb_id == entry.KLIPPER_BRIDGE_USB:
            raise ConnectError(
                f"{port} is a Klipper USB-CAN bridge, not a serial port.",
                hint="Flash it over CAN with its UUID (detect --can lists it).",
            )
        baud = self.target.baud or UART_BAUD
        link = self._open_serial(port, baud)
        self.client = kp.KatapultClient(link, self.timeouts)
        product = (getattr(info, "product", None) or "").lower()
        if usb_id == entry.KATAPULT_USB and product.startswith("stm32"):
            if not product.startswith(_PRIME_EXEMPT):
                self.client.prime()
        if usb_id == entry.KATAPULT_USB:
            self.katapult_usb = info
            self.info = self._guarded(self.client.connect, "CONNECT")
            return
        # UART (or unknown USB): Katapult already? If not, ask Klipper for the bootloader.
        try:
            self.info = self.client.connect(timeout=0.3, tries=1)
            return
        except FlashError:
            pass
        self.log(f"No Katapult on {port}: sending Klipper's serial bootloader request.")
        link.write(entry.SERIAL_BOOTLOADER_REQUEST)
        self.entered_from_app = True
        deadline = time.monotonic() + self.entry_timeout
        while True:
            try:
                link.flush_input()
                self.client.decoder = kp.FrameDecoder()
                self.info = self.client.connect(timeout=0.1, tries=1)
                return
            except FlashError as exc:
                if time.monotonic() >= deadline:
                    raise ConnectError(
                        f"Katapult did not answer on {port} at {baud} baud.",
                        cause="Katapult is not installed, the baud rate differs from "
                        "Katapult's build (default 250000), TX/RX are swapped, or the "
                        "running firmware is not Klipper (>= Sep 2022).",
                        hint="Double-tap reset to enter Katapult and retry; check --baud.",
                    ) from exc

    # -- error refinement ----------------------------------------------------------------------
    def _guarded(self, fn: Callable[..., Any], what: str, *args: Any) -> Any:
        try:
            return fn(*args)
        except ConnectError as exc:
            raise self._explain_silence(exc, what) from exc

    def _explain_silence(self, exc: ConnectError, what: str) -> ConnectError:
        """Katapult said nothing. On CAN, ask the admin layer whether the node is still there:
        a node that answers QUERY but not its data stream has a wedged command parser."""
        if self.transport != "can" or self.can_link is None or self.uuid is None:
            return exc
        admin = klipper_can.Admin(self.can_link)
        try:
            # an assigned node never answers a query: if ours does, it has rebooted
            rebooted = admin.wait_for(self.uuid, klipper_can.APP_KATAPULT, timeout=0.15)
            if rebooted is not None:
                return NodeResetError(
                    f"Node {self.uuid.hex()} restarted Katapult during {what}.",
                    cause="The board was reset (button, brown-out, watchdog) and lost its CAN id.",
                    hint="Flash again; check the power supply if it repeats.",
                )
            admin.clear_katapult()
            alive = admin.wait_for(self.uuid, None, timeout=0.3)
        except FlashError:
            alive = None
        extra = self._can_advice()
        if alive is not None and alive.app == klipper_can.APP_KATAPULT:
            return ConnectError(
                f"Katapult stopped answering {what}, although node {self.uuid.hex()} is "
                "still on the bus.",
                cause=kp.PARSER_STALL + extra,
                hint="Press reset twice quickly (or power-cycle) to restart Katapult, then "
                "flash again. Nothing was committed: the board stays in its bootloader.",
            )
        return ConnectError(
            f"No answer to {what}: node {self.uuid.hex()} has left the bus.",
            cause="The node reset, lost power or went bus-off (wiring, termination, bitrate)."
            + extra,
            hint="Check the CAN wiring and termination (two 120 ohm resistors), then "
            "double-tap reset to enter Katapult and flash again.",
        )

    def _can_advice(self) -> str:
        if self.target.can_interface != "socketcan":
            return ""
        try:
            from ..links import can_diagnostics

            advice = can_diagnostics.advise(
                can_diagnostics.read_facts(self.target.can_channel, reader=self.can_facts),
                expected_bitrate=self.target.can_bitrate,
            )
        except Exception:
            return ""
        return "".join(f" {a.message}" for a in advice)

    # -- checks ------------------------------------------------------------------------------
    def placed(self, image: FirmwareImage) -> FirmwareImage:
        """A raw .bin has no address: it belongs at Katapult's application start."""
        t = self.identify()
        if not image.address_given:
            return image.placed_at(t.app_start)
        return image

    def check(self, image: FirmwareImage, target: TargetInfo) -> list[str]:
        """Board checks: the image against the application area Katapult reports and the MCU
        it names. The image checks (:func:`check_image`) ran before the node was touched."""
        warnings: list[str] = []
        img = self.placed(image)
        if not img.segments:
            raise PreflightError("The firmware file is empty.", hint="Pick the built klipper.bin.")
        offset = target.app_start - target.flash_start
        linked = image.extra.get("link_base")
        if linked is not None and linked != target.app_start:
            raise PreflightError(
                f"This build is linked for 0x{linked:08X}, but Katapult on this board starts "
                f"applications at 0x{target.app_start:08X}.",
                cause="The firmware was built with a different 'Bootloader offset' than the "
                "Katapult installed on this board; Katapult would jump into the wrong code.",
                hint=f"Rebuild Klipper with 'Bootloader offset' = {offset // 1024} KiB "
                f"(application at 0x{target.app_start:08X}). Nothing was written.",
            )
        if img.start < target.app_start:
            raise PreflightError(
                f"The image starts at 0x{img.start:08X}, inside the Katapult bootloader "
                f"(the application area starts at 0x{target.app_start:08X}).",
                cause="The file was built for a board without a bootloader or with a "
                "different bootloader offset.",
                hint=f"Rebuild with a bootloader offset of {offset // 1024} KiB.",
            )
        if img.end > target.app_end:
            raise PreflightError(
                f"The image ends at 0x{img.end:08X}, past the end of flash "
                f"(0x{target.app_end:08X}).",
                cause="It was built for a larger chip.",
                hint=f"Build for {target.chip}.",
            )
        vec = check_reset_vector(img.read(img.start, 8), target.app_start, img.end)
        if img.start == target.app_start and not vec.ok:
            raise PreflightError(
                f"The image's reset vector ({vec.describe()}) points outside the application "
                f"area 0x{target.app_start:08X}-0x{target.app_end - 1:08X}.",
                cause="The firmware was linked for a different bootloader offset (or is not "
                "an application for this board); Katapult would jump into nowhere.",
                hint=f"Rebuild Klipper with 'Bootloader offset' = {offset // 1024} KiB "
                f"(Katapult reports its application at 0x{target.app_start:08X}).",
            )
        if img.start != target.app_start:
            warnings.append(
                f"The image starts at 0x{img.start:08X}, after the application start "
                f"0x{target.app_start:08X}; its vector table could not be checked."
            )
        build = klipper_build(img.to_bytes())
        if build is not None and build.mcu and not chips.same_chip(build.mcu, target.chip):
            raise PreflightError(
                f"This Klipper build is for {build.mcu}, but the board is {target.chip}.",
                cause="The wrong 'Processor model' was selected in make menuconfig, or this is "
                "another board's file.",
                hint=f"Rebuild Klipper for {target.chip}.",
            )
        return warnings

    # -- flash -------------------------------------------------------------------------------
    def flash(
        self,
        image: FirmwareImage,
        progress: ProgressCallback = no_progress,
        cancel: Optional[CancelToken] = None,
        quick: bool = False,
    ) -> FlashResult:
        target = self.identify()
        assert self.client is not None
        quick = quick or bool(self.target.quick)
        started = time.monotonic()
        img = self.placed(image)
        bs = self.client.block_size
        # every block from the first to the last, holes filled with 0xFF: Katapult erases a
        # page only when that page's first block arrives, so a skipped hole block could
        # leave old data between new blocks (a later block would then be refused)
        first = target.app_start + (img.start - target.app_start) // bs * bs
        blocks = [(addr, img.read(addr, bs)) for addr in range(first, img.end, bs)]
        for attempt in (1, 2):
            try:
                to_write, skipped = self._write_and_verify(blocks, target, quick, progress, cancel)
                break
            except NodeResetError:
                if attempt == 2 or self.uuid is None:
                    raise
                # Katapult restarted: rewriting from the first block is safe, because a page
                # whose first block arrives again is erased and rewritten whole
                self.log("The node restarted mid-flash: reconnecting and writing again.")
                self._reconnect_can()
        self._failed = False
        self.flashed = img.to_bytes()
        self.build = klipper_build(self.flashed)
        return FlashResult(
            bytes_written=len(to_write) * bs,
            bytes_verified=len(blocks) * bs,
            blocks_written=len(to_write),
            blocks_skipped=skipped,
            seconds=time.monotonic() - started,
        )

    def _reconnect_can(self) -> None:
        assert self.uuid is not None and self.client is not None
        admin = klipper_can.Admin(self.can_link)
        admin.assign_katapult(self.uuid, klipper_can.KATAPULT_NODEID)
        self.client.decoder = kp.FrameDecoder()
        self._guarded(self.client.connect, "CONNECT")

    def _write_and_verify(
        self,
        blocks: list[tuple[int, bytes]],
        target: TargetInfo,
        quick: bool,
        progress: ProgressCallback,
        cancel: Optional[CancelToken],
    ) -> tuple[list[tuple[int, bytes]], int]:
        assert self.client is not None
        bs = self.client.block_size
        try:
            to_write, skipped = self._plan(blocks, target, quick, progress, cancel)
            total = len(to_write) * bs
            self._failed = True  # from the first write on, never COMPLETE until verified
            for n, (addr, data) in enumerate(to_write, 1):
                if cancel is not None:
                    cancel.check()
                self._guarded(self.client.send_block, f"SEND_BLOCK 0x{addr:08X}", addr, data)
                progress(Progress(STAGE_WRITING, n * bs, total))
            pages = self._guarded(self.client.send_eof, "SEND_EOF")
            self.log(f"Wrote {len(to_write)} blocks ({pages} pages started).")
            for n, (addr, data) in enumerate(to_write, 1):
                if cancel is not None:
                    cancel.check()
                back = self._guarded(self.client.request_block, f"REQUEST_BLOCK 0x{addr:08X}", addr)
                if back != data:
                    bad = next(i for i in range(bs) if back[i] != data[i])
                    raise VerifyError(
                        f"Verify failed at 0x{addr + bad:08X}: wrote 0x{data[bad]:02X}, read "
                        f"0x{back[bad]:02X}.",
                        cause="The flash did not take the data (worn or protected flash, or on "
                        "STM32H7 the IAP erratum).",
                        hint="The board stays in Katapult: flash again; on H7 a full chip "
                        "erase (DFU) before reinstalling Katapult fixes repeated failures.",
                    )
                progress(Progress(STAGE_VERIFYING, n * bs, total))
        except FlashError as exc:
            self._failed = True
            if not exc.hint.endswith(_STAY):
                exc.hint = (exc.hint + " " + _STAY).strip()
            raise
        return to_write, skipped

    def _plan(
        self,
        blocks: list[tuple[int, bytes]],
        target: TargetInfo,
        quick: bool,
        progress: ProgressCallback,
        cancel: Optional[CancelToken],
    ) -> tuple[list[tuple[int, bytes]], int]:
        """Which blocks to send. A quick flash may skip a *whole page* whose blocks already
        match: Katapult erases a page when its first block arrives (unless that block is
        identical and the rest of the page erased), after which every block of the page must
        be sent again, so pages are the unit, never single blocks. Without a known page
        layout everything is written. Skipped blocks count as verified: they were read back."""
        chip = chips.find_stm32(target.chip) if target.chip else None
        if not quick:
            return blocks, 0
        if chip is None:
            self.log("Quick flash: page layout of this MCU unknown, writing every block.")
            return blocks, 0
        assert self.client is not None
        bs = self.client.block_size
        pages: dict[int, list[tuple[int, bytes]]] = {}
        for addr, data in blocks:
            sector = chip.sector_at(addr)
            pages.setdefault(sector[0] if sector else addr, []).append((addr, data))
        changed: list[tuple[int, bytes]] = []
        done = 0
        total = len(blocks) * bs
        for page_blocks in pages.values():
            same = True
            for addr, data in page_blocks:
                if cancel is not None:
                    cancel.check()
                current = self._guarded(self.client.request_block, "REQUEST_BLOCK", addr)
                done += bs
                progress(Progress(STAGE_READING, done, total))
                if current != data:
                    same = False
                    break
            if not same:
                changed.extend(page_blocks)
        skipped = len(blocks) - len(changed)
        self.log(f"Quick flash: {skipped} of {len(blocks)} blocks already on the board.")
        return changed, skipped

    # -- read --------------------------------------------------------------------------------
    def read(
        self, progress: ProgressCallback = no_progress, cancel: Optional[CancelToken] = None
    ) -> FirmwareImage:
        target = self.identify()
        assert self.client is not None
        size = int(_opt(self.target, "read_size", 0)) or (
            target.app_end - target.app_start if target.details.get("flash_size_known") else 0
        )
        if not size:
            raise ProtocolError(
                f"The flash size of {target.chip} is unknown, and Katapult reads any address "
                "without checking (an unmapped one crashes the board).",
                hint="Pass the number of bytes to read (read_size option / --size).",
            )
        bs = self.client.block_size
        out = bytearray()
        for addr in range(target.app_start, target.app_start + size, bs):
            if cancel is not None:
                cancel.check()
            out += self._guarded(self.client.request_block, "REQUEST_BLOCK", addr)
            progress(Progress(STAGE_READING, len(out), size))
        return FirmwareImage([Segment(target.app_start, bytes(out))], filename="backup.bin")

    # -- leave -------------------------------------------------------------------------------
    def leave(self) -> Optional[str]:
        if self.client is None:
            return None
        if self._failed:
            self.log(
                "Not starting the application: the last write was not verified. "
                "The board stays in Katapult."
            )
            return None
        self._guarded(self.client.complete, "COMPLETE")
        self.log("Katapult acknowledged COMPLETE: the application starts.")
        if self.transport == "can" and self.uuid is not None and self.can_link is not None:
            wait = float(_opt(self.target, "confirm_seconds", 2.0))
            if wait > 0:
                admin = klipper_can.Admin(self.can_link)
                seen = admin.wait_for(self.uuid, klipper_can.APP_KLIPPER, wait, interval=0.1)
                if seen is not None:
                    return f"Klipper answers on the CAN bus as {self.uuid.hex()}."
                return (
                    f"Klipper did not announce itself on the bus within {wait:.0f} s "
                    "(normal if klippy already assigned it an id)."
                )
            return None
        if self.transport == "serial":
            return self._confirm_serial()
        return None

    # -- confirmation over serial ----------------------------------------------------------------
    def _confirm_serial(self) -> Optional[str]:
        """After COMPLETE Katapult resets (100 ms), waits its 0.5 s double-reset window and
        starts the application. Wait until that application is seen: on USB, Klipper's own
        device 1d50:614e re-enumerating for the same board; on a UART, Klipper answering
        ``identify`` at its baud. The firmware is written and verified either way, so a board
        that stays silent gets a sentence saying what to check, never an exception."""
        wait = float(_opt(self.target, "confirm_seconds", 5.0))
        if wait <= 0:
            return None
        interface = self.build.interface if self.build is not None else None
        usb = self.katapult_usb is not None
        if interface == "can":
            return (
                "The new build talks CAN, not over this port: check that it answers with "
                "the CAN query (octoprint-flasher detect --can)."
            )
        if interface == "usb-can-bridge":
            return self._confirm_bridge(wait)
        if usb and interface == "serial":
            return (
                "The new build talks over a UART, not USB, so it cannot be seen on this USB "
                "port: connect to the board's UART to check that Klipper answers."
            )
        if not usb and interface == "usb":
            return (
                "The new build talks USB, not over this UART: check that the board shows up "
                "as Klipper's USB device 1d50:614e."
            )
        if usb:
            if self.serial is not None:
                self.serial.close()  # the Katapult device is gone once the board resets
                self.serial = None
            return self._confirm_usb(wait)
        return self._confirm_uart(wait)

    def _confirm_usb(self, wait: float) -> str:
        known = self.katapult_usb
        location = getattr(known, "location", None)
        serial = getattr(known, "serial_number", None)
        before = {getattr(p, "device", None) for p in self._ports()} - {self.port}
        deadline = time.monotonic() + wait
        while True:
            klippers = [p for p in self._ports() if _usb_id(p) == entry.KLIPPER_USB]
            mine = [p for p in klippers if location and getattr(p, "location", None) == location]
            mine = mine or [
                p for p in klippers if serial and getattr(p, "serial_number", None) == serial
            ]
            if not mine and not location and not serial:
                mine = [p for p in klippers if p.device not in before]
            if mine:
                self.port = mine[0].device
                return f"Klipper is back on USB as {mine[0].device} (1d50:614e)."
            if time.monotonic() >= deadline:
                where = f" at USB path {location}" if location else ""
                return (
                    f"Klipper did not come back on USB (1d50:614e){where} within {wait:.0f} s. "
                    "The firmware was written and verified; if the board stays silent, the "
                    "build may not be a Klipper USB build for this board (check 'Communication "
                    "interface' in make menuconfig), or it crashes at start: double-tap reset "
                    "to return to Katapult."
                )
            time.sleep(0.05)

    def _confirm_bridge(self, wait: float) -> str:
        channel = self.target.can_channel
        deadline = time.monotonic() + wait
        while True:
            try:
                bridge = self.bridge_finder(channel)
            except Exception:
                bridge = None
            if bridge is not None:
                return f"Klipper is back as the USB-CAN bridge that owns {channel}."
            if time.monotonic() >= deadline:
                return (
                    f"No Klipper USB-CAN bridge owns {channel} {wait:.0f} s after the flash. "
                    "The firmware was written and verified; check `ip link show` and the "
                    "bridge's CAN settings in make menuconfig."
                )
            time.sleep(0.05)

    def _confirm_uart(self, wait: float) -> str:
        baud = (
            self.build.serial_baud
            if self.build is not None and self.build.serial_baud
            else (self.target.baud or UART_BAUD)
        )
        port = self.port or "the serial port"
        link = self.serial
        if link is None:
            return f"Klipper could not be asked on {port}: the port is closed."
        if getattr(link.ser, "baudrate", baud) != baud:
            try:
                link.ser.baudrate = baud
            except Exception as exc:
                return (
                    f"Could not switch {port} to Klipper's {baud} baud to confirm it started "
                    f"({exc}); the firmware was written and verified."
                )
        # Katapult resets 100 ms after its ACK: a request sent before that lands in Katapult
        time.sleep(min(0.15, wait / 4))
        window = float(_opt(self.target, "identify_window", 0.25))
        result = ks.probe_identify(link, wait, window)
        if result is None:
            return (
                f"Klipper did not answer on {port} at {baud} baud within {wait:.0f} s. The "
                "firmware was written and verified; if the board stays silent, check that the "
                "build's 'Communication interface' is this UART and its baud rate is "
                f"{baud}, or the application crashes at start: double-tap reset to return to "
                "Katapult."
            )
        data = result.response.data
        if self.flashed is not None and len(data) >= 8 and data not in self.flashed:
            return (
                f"A Klipper answers on {port} at {baud} baud, but its data dictionary is not "
                "the one in the file just flashed: check that the board started the new "
                "application."
            )
        return f"Klipper answers on {port} at {baud} baud (identify)."

    def _ports(self) -> list[Any]:
        try:
            return list(self.lister())
        except Exception:
            return []

    def close(self) -> None:
        if self.serial is not None:
            self.serial.close()
            self.serial = None
        if self.can_link is not None:
            self.can_link.close()
            self.can_link = None


def _usb_id(port: Any) -> tuple[Any, Any]:
    return getattr(port, "vid", None), getattr(port, "pid", None)


class NodeResetError(ConnectError):
    """The CAN node came back unassigned in the middle of a session: it rebooted."""


_STAY = "The board stays in Katapult until you flash again (COMPLETE was not sent)."


def check_image(image: FirmwareImage, target: Target) -> list[str]:
    """What the file alone tells, before any node is asked to enter Katapult: the bootloader
    itself (canboot.bin / katapult.bin) is refused, and a Klipper build's dictionary must name
    the MCU the user gave and, on CAN, the interface's bitrate."""
    if not image.segments:
        raise PreflightError("The firmware file is empty.", hint="Pick the built klipper.bin.")
    data = image.to_bytes()
    if looks_like_katapult(data):
        base = image.extra.get("link_base", image.start if image.address_given else None)
        if base is not None and base & 0x000FFFFF == 0:
            raise PreflightError(
                f"{image.filename or 'This file'} is the Katapult bootloader itself "
                "(katapult.bin / canboot.bin), not an application.",
                cause=f"It is linked for the start of flash (0x{base:08X}). Written through "
                "Katapult it would sit at the application start, and on start Katapult would "
                "jump back into itself: the board would reboot in a loop, silent on the bus.",
                hint="To update Katapult through Katapult, flash deployer.bin built with the "
                "same application offset; to install katapult.bin use DFU or SWD. For "
                "Klipper, flash out/klipper.bin. Nothing was sent to the board.",
            )
        return [
            "This is a Katapult deployer (deployer.bin): once started it rewrites the "
            "bootloader. Do not interrupt power until the board is back in Katapult."
        ]
    build = klipper_build(data)
    if build is None:
        return [
            "No Klipper data dictionary found in the file, so its MCU could not be checked "
            "against the board."
        ]
    if target.mcu and build.mcu and not chips.same_chip(build.mcu, target.mcu):
        raise PreflightError(
            f"This Klipper build is for {build.mcu}, but the board is {target.mcu}.",
            cause="The wrong 'Processor model' was selected in make menuconfig, or this is "
            "another board's file.",
            hint=f"Rebuild Klipper for {target.mcu}.",
        )
    if target.port and not target.uuid:
        if build.interface == "can":
            return [
                "This Klipper build talks CAN, not over this serial port: after flashing the "
                "board will appear on the CAN bus, not here."
            ]
        return []
    return _check_can_build(target, build.interface, build.canbus_frequency)


def _check_can_build(target: Target, interface: str, frequency: Optional[int]) -> list[str]:
    if interface != "can":
        kind = "a USB-CAN bridge" if interface == "usb-can-bridge" else f"a {interface}"
        return [
            f"This Klipper build is {kind} build, but the board is flashed over CAN: "
            "after flashing it leaves the CAN bus. Make sure that is what you want."
        ]
    bitrate = target.can_bitrate or _interface_bitrate(target)
    if bitrate is None:
        return [
            f"Klipper was built for {frequency} bit/s; the CAN interface bitrate could "
            "not be read to confirm it matches."
        ]
    if frequency != bitrate:
        raise PreflightError(
            f"This Klipper build runs CAN at {frequency} bit/s, but {target.can_channel} "
            f"runs at {bitrate} bit/s.",
            cause="After flashing, the node would be deaf on this bus (and could not be "
            "asked to enter Katapult again).",
            hint=f"Rebuild Klipper with 'CAN bus speed' = {bitrate}, or change the "
            "interface bitrate. Nothing was sent to the board.",
        )
    return []


def _interface_bitrate(target: Target) -> Optional[int]:
    if target.can_interface != "socketcan":
        return None
    try:
        from ..links import can_diagnostics

        return can_diagnostics.read_facts(
            target.can_channel, reader=target.options.get("can_facts")
        ).bitrate
    except Exception:
        return None


def open_flasher(target: Target, log: Optional[LogCallback] = None) -> KatapultFlasher:
    """Build the flasher; the transport opens (and Klipper is asked to jump) in identify()."""
    return KatapultFlasher(target, log)


def discover(
    can_bus_factory: Optional[Callable[[], Any]] = None,
    can_interface: str = "socketcan",
    can_channel: str = "can0",
    query_seconds: float = 0.3,
) -> list[Device]:
    """CAN nodes that answer QUERY_UNASSIGNED. Only a query is sent: assigned nodes (Klipper
    with klippy running, a Katapult node being flashed) stay silent and undisturbed."""
    from ..links.can_bus import CanLink, open_bus

    link = CanLink(open_bus(can_interface, can_channel, None, can_bus_factory))
    try:
        answers = klipper_can.Admin(link).query(query_seconds)
    finally:
        link.close()
    devices = []
    for answer in answers:
        in_katapult = answer.app == klipper_can.APP_KATAPULT
        devices.append(
            Device(
                id=f"can:{answer.uuid}",
                kind=KIND_CAN,
                uuid=answer.uuid,
                description=f"CAN node {answer.uuid} ({answer.app}) on {can_channel}",
                method="katapult",
                hint=(
                    "Waiting in Katapult: ready to flash."
                    if in_katapult
                    else "Running Klipper without an assigned id: it will be asked to "
                    "enter Katapult."
                ),
                details={"app": answer.app, "interface": can_interface, "channel": can_channel},
            )
        )
    return devices
