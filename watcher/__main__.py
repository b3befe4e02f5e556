"""``python -m watcher``: the same as the ``watcher`` command."""

from .launch import run

run()
