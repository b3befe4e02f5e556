"""The rules a watch-mode folder layout must obey: the five folders (and the folder holding every
instance's work folder) pairwise distinct, none inside another.

A layout that breaks them loses data (outputs taken for new inputs, archived files for claims):
``check_layout`` refuses it with the pair named and what would go wrong.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from watcher.errors import ConfigError

# What goes wrong when two folders overlap, by pair (either order).
_OVERLAP = {
    frozenset(("inbox", "output")): "outputs would be picked up as new inputs, endlessly",
    frozenset(("inbox", "archive")): "archived files would be picked up again, endlessly",
    frozenset(("inbox", "quarantine")): "quarantined files would be picked up again",
    frozenset(("inbox", "work")): "claimed files would be seen as new arrivals",
    frozenset(("output", "archive")): "an archived original could replace an output of the "
                                      "same name, or the other way round",
    frozenset(("output", "work")): "outputs would be taken for claims at the next start",
    frozenset(("output", "quarantine")): "a quarantined file could take an output's name",
    frozenset(("archive", "quarantine")): "requeue --all would push archived files back",
    frozenset(("archive", "work")): "archived files would be taken for claims at the next "
                                    "start",
    frozenset(("quarantine", "work")): "quarantined files would be taken for claims at the "
                                       "next start",
}


def check_layout(named: Mapping[str, str], work_root: str | None = None) -> None:
    """Refuse a folder layout that loses data: the five folders must be pairwise distinct and
    none inside another (compared after resolving links). With instances, the folder holding
    every instance's work folder obeys the same rule towards the other four."""
    items = list(named.items())
    if work_root is not None:
        items.append(("work", work_root))  # the instances' parent: one more "work" folder
    for i, (k1, p1) in enumerate(items):
        for k2, p2 in items[i + 1:]:
            if k1 == k2:
                continue
            if within(p1, p2) or within(p2, p1):
                how = "the same folder" if os.path.realpath(p1) == os.path.realpath(p2) else (
                    f"{p1} is inside the {k2} {p2}" if within(p1, p2)
                    else f"{p2} is inside the {k1} {p1}")
                key = k2 if k1 == "inbox" else k1
                raise ConfigError(f"watch.{key}", f"watch.{k1} ({p1}) and watch.{k2} ({p2}) "
                                  f"overlap ({how}): {_OVERLAP[frozenset((k1, k2))]}; give "
                                  "each its own folder")


def within(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip("/") + "/")
