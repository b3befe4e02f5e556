"""``python -m watcher``: the same as the ``watcher`` command."""

from watcher.launch import run

run()
