"""``python -m clreg.onehead``: the three-stage one-head benchmark (see :mod:`clreg.onehead.benchmark`)."""

import sys

from .benchmark import main

if __name__ == "__main__":
    sys.exit(main())
