"""``python -m watcher``: the same as the ``watcher`` command."""

import sys

from .launch import main

sys.exit(main())
