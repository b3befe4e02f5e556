"""The documentation lists every failure reason and every event the daemon logs at start."""

from __future__ import annotations

import re

from tests.conftest import ROOT
from watcher.errors import REASONS


def test_every_reason_is_in_the_reasons_table() -> None:
    text = (ROOT / "docs" / "cli.md").read_text()
    table = set(re.findall(r"^\| `([a-z-]+)` \| ", text, re.M))
    missing = [r for r in REASONS if r not in table]
    assert missing == [], missing


def test_the_daemons_start_events_are_in_the_events_table() -> None:
    text = (ROOT / "docs" / "operations.md").read_text()
    rows = re.findall(r"^\| (`[a-z_.]+`(?:, `[a-z_.]+`)*) \|", text, re.M)
    table = {name for row in rows for name in re.findall(r"`([a-z_.]+)`", row)}
    for event in ("daemon.started", "metrics.listening", "daemon.stopped"):
        assert event in table, event
