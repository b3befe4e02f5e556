"""``python -m watcher``: the same as the ``watcher`` command."""

import sys

from .cli import main

sys.exit(main())
