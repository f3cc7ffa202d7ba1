"""``python -m bench``: run every benchmark and print its figures."""

from __future__ import annotations

import sys

from bench.fanout import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
