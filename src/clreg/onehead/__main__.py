"""``python -m clreg.onehead``: the three-stage one-head benchmark (see :mod:`clreg.onehead.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
