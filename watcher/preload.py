"""Imported by the worker forkserver before it forks any worker: Pillow and the default formats'
plugins are loaded once there, so a worker starts with them (see ``watcher.pil``)."""

from .pil import load_plugins

load_plugins()
