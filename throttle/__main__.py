"""``python -m throttle``: the ``throttle`` command, where the script is not on PATH."""

import sys

from .cli import main

sys.exit(main(prog_name="python -m throttle"))
