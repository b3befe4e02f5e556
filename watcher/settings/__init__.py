"""Every setting, declared once.

``setting`` is the ``Setting`` declaration (section, name, type, range or choices, default,
environment variable, flag, help) and how one value is checked; ``schema`` declares every
setting of watcher and builds the frozen settings types from the declarations. The TOML loader,
the ``WATCHER_*`` environment, the command line's flags, ``process_images``' keywords,
``check-config`` and docs/configuration.md are all derived from ``schema.SETTINGS``.

This package imports only the standard library (and ``watcher.errors``): the worker processes'
imaging code takes its option types from here.
"""
