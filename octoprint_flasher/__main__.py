"""``python -m octoprint_flasher``: the same as the ``octoprint-flasher`` command."""

import sys

from .cli import main

sys.exit(main())
