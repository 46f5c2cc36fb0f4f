"""The three-stage one-head benchmark: ``python benchmarks/unified_onehead.py [--help]``.

A thin wrapper over :mod:`clreg.onehead.cli` (also ``python -m clreg.onehead`` and the
``clreg-onehead`` console script).
"""

import sys

from clreg.onehead.cli import main

if __name__ == "__main__":
    sys.exit(main())
