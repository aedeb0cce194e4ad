"""`python -m server.loadtest ARGS` runs the load tester."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
