"""OctoPrint-Flasher: flash printer mainboard firmware from OctoPrint, in pure Python.

The package is also a command-line tool and a library; this module only holds OctoPrint's
control properties and the plugin's entry points. The plugin itself lives in :mod:`.plugin`,
the OctoPrint-free core beside it (``job``, ``store``, ``flashers``, ``links``, ``image``).
"""

from __future__ import annotations

import importlib.util

__plugin_name__ = "Firmware Updater"
__plugin_description__ = (
    "Flash printer mainboard firmware (AVR STK500, STM32 DFU, Katapult) without external tools"
)
__plugin_license__ = "AGPLv3"
__plugin_pythoncompat__ = ">=3.9,<4"

# The package is also the CLI and a library: only the plugin part below needs OctoPrint.
HAVE_OCTOPRINT = importlib.util.find_spec("octoprint") is not None

if HAVE_OCTOPRINT:
    from .plugin.flasher_plugin import FlasherPlugin, register_custom_events

    __plugin_implementation__ = FlasherPlugin()
    __plugin_hooks__ = {
        "octoprint.access.permissions": __plugin_implementation__.get_additional_permissions,
        "octoprint.server.http.bodysize": __plugin_implementation__.bodysize_hook,
        "octoprint.printer.handle_connect": __plugin_implementation__.handle_connect,
        "octoprint.events.register_custom_events": register_custom_events,
        "octoprint.server.sockjs.emit": __plugin_implementation__.socket_emit_hook,
        "octoprint.comm.protocol.firmware.info": __plugin_implementation__.firmware_info_hook,
        "octoprint.comm.protocol.firmware.capabilities": (
            __plugin_implementation__.firmware_capability_hook
        ),
        "octoprint.plugin.softwareupdate.check_config": (
            __plugin_implementation__.get_update_information
        ),
    }
