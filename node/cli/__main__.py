"""``python -m node.cli``: the same as the ``ainode`` command."""

import sys

from node.cli import main

sys.exit(main())
