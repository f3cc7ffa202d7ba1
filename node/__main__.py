"""``python -m node``: the same as the ``rtnode`` command."""

import sys

from node.cli import main

sys.exit(main())
