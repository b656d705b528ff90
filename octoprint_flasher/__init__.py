"""OctoPrint-Flasher: flash printer mainboard firmware from OctoPrint, in pure Python."""

from __future__ import annotations

__plugin_name__ = "Firmware Updater"
__plugin_pythoncompat__ = ">=3.9,<4"
