"""``python -m shardkl.bench``."""

from __future__ import annotations

import sys

from shardkl.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
