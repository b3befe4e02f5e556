"""The status page in a real browser (Debian's chromium through chromedriver and Selenium)
against a real daemon processing real images: the token is enforced, the counts move, a
quarantined file appears with its reason, Requeue puts it back through the inbox and Delete
removes it. Screenshots of the states that matter are taken (and copied into the folder
``WATCHER_TEST_SCREENSHOTS`` names: docs/ when refreshing the documentation's)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import crashers
from tests.conftest import fill, make_image, wait_until
from tests.test_ops import free_port
from tests.test_status import bad_file
from tests.test_watch import SLOW_TOML, Daemon, drop

pytestmark = pytest.mark.integration

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
webdriver = pytest.importorskip("selenium.webdriver")
if not (CHROMIUM and DRIVER):
    pytest.skip("needs Debian's chromium and chromium-driver (scripts/test installs them)",
                allow_module_level=True)

from selenium.common.exceptions import (  # noqa: E402
    NoSuchElementException,
    StaleElementReferenceException,
)
from selenium.webdriver.common.by import By  # noqa: E402

TOKEN = "page-test-token"


@pytest.fixture
def browser() -> Iterator[Any]:
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1700", "--hide-scrollbars"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER),
                              options=opts)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def shot(driver: Any, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    assert driver.save_screenshot(str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    keep = os.environ.get("WATCHER_TEST_SCREENSHOTS")
    if keep:
        shutil.copy(path, Path(keep) / name)
    return path


def text(driver: Any, css: str) -> str:
    """What an element shows, read at once (the page redraws every second: no element is
    held between two calls)."""
    return driver.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.innerText : ''", css)


def count(driver: Any, name: str) -> int:
    return int(text(driver, f"#count-{name} b") or 0)


def quarantine_rows(driver: Any) -> dict[str, dict[str, str]]:
    """name -> {reason, text} of each quarantine row, read at once (the page redraws)."""
    rows = driver.execute_script(
        "return [...document.querySelectorAll('#quarantine tbody tr[data-name]')]"
        ".map(r => [r.dataset.name, r.dataset.reason, r.innerText])")
    return {name: {"reason": reason, "text": text} for name, reason, text in rows}


def press(driver: Any, name: str, action: str) -> None:
    """Click a row's button (found again if the page redrew the row meanwhile)."""
    def attempt() -> bool:
        try:
            driver.find_element(By.CSS_SELECTOR, f'#quarantine tr[data-name="{name}"] '
                                                 f"button[data-action={action}]").click()
        except (StaleElementReferenceException, NoSuchElementException):
            return False
        return True
    wait_until(attempt, 10, f"the {action} button of {name}")


def test_the_page_in_a_real_browser(tmp_path: Path, browser: Any) -> None:
    port = free_port()
    (tmp_path / "watcher.toml").write_text(
        SLOW_TOML.replace('pipelines = ["slow"]', 'pipelines = ["slow", "web"]')
        + f'[ops]\nstatus_host = "127.0.0.2"\nstatus_port = {port}\n')
    d = Daemon(tmp_path, "--config", str(tmp_path / "watcher.toml"), "--workers", "2",
               env={"WATCHER_STATUS_TOKEN": TOKEN})
    base = f"http://127.0.0.2:{port}"
    try:
        # the token: without it, every path is refused; with it (once), the page loads
        browser.get(base + "/")
        assert "a token is required" in text(browser, "body")
        browser.get(base + "/status")
        assert "a token is required" in text(browser, "body")
        browser.get(base + "/?token=wrong")
        assert "wrong token" in text(browser, "body")
        browser.get(f"{base}/?token={TOKEN}")
        assert browser.current_url == base + "/"  # the token left the address bar
        wait_until(lambda: text(browser, "#state") == "running", 15,
                   "the page to show the state")
        assert count(browser, "processed") == 0

        # the counts move as real files go through; a bad one appears with its reason
        for i in range(8):
            drop(tmp_path, f"photo_{i:02d}.jpg", size=(640, 480), seed=i)
        bad_file(tmp_path, "broken.jpg")
        outside = tmp_path / "elsewhere.png"
        make_image(outside, size=(300, 200), seed=9)
        os.link(outside, tmp_path / "inbox" / "linked.png")  # two names: quarantined
        crashers.slow_image(str(tmp_path / "inbox" / "slow_scan.png"), 20.0)
        wait_until(lambda: count(browser, "processed") >= 8, 40, "8 processed on the page")
        rows = wait_until(lambda: (r := quarantine_rows(browser)).keys() >=
                          {"broken.jpg", "linked.png"} and r, 20, "the quarantined files")
        assert rows["broken.jpg"]["reason"] == "truncated"
        assert "truncated" in rows["broken.jpg"]["text"]
        assert "hard-link" in rows["linked.png"]["text"]
        wait_until(lambda: "slow_scan.png" in text(browser, "#workers"),
                   15, "a worker on slow_scan.png")
        recent = text(browser, "#recent")
        assert "photo_00.jpg" in recent and "broken.jpg" in recent
        wait_until(lambda: browser.execute_script(
            "const i = [...document.querySelectorAll('#recent img.thumb')];"
            "return i.length >= 8 && i.every(t => t.complete && t.naturalWidth > 0)"), 10,
            "the thumbnails of the outputs to load")
        assert "files/s" in text(browser, "#rate")
        shot(browser, tmp_path, "status-page.png")

        # Requeue: back through the inbox; its other name gone, it is processed this time
        outside.unlink()
        press(browser, "linked.png", "requeue")
        d.wait_for("quarantine.requeued", input="linked.png")
        d.wait_for("file.processed", input="linked.png", timeout=30)
        wait_until(lambda: "linked.png" not in quarantine_rows(browser), 10,
                   "the row to go")
        assert "requeued linked.png" in text(browser, "#q-msg")
        assert (tmp_path / "archive" / "linked.png").exists()
        # Requeue a file that is still bad: quarantined again, and back on the page
        press(browser, "broken.jpg", "requeue")
        d.wait_for("quarantine.requeued", input="broken.jpg")
        wait_until(lambda: len(d.seen("file.quarantined", input="broken.jpg")) == 2, 30,
                   "broken.jpg quarantined again")
        wait_until(lambda: "broken.jpg" in quarantine_rows(browser), 15,
                   "broken.jpg back on the page")
        # Delete, confirmed in the browser's dialog
        press(browser, "broken.jpg", "delete")
        browser.switch_to.alert.accept()
        wait_until(lambda: not quarantine_rows(browser), 10, "an empty quarantine")
        assert not (tmp_path / "quarantine" / "broken.jpg").exists()
        assert "the quarantine is empty" in text(browser, "#quarantine")
        wait_until(lambda: count(browser, "requeued") == 2 and count(browser, "deleted") == 1,
                   10, "the counts of the page's actions")
        shot(browser, tmp_path, "status-page-after-requeue.png")
    finally:
        assert d.stop() == 0
    # the daemon gone: the page says so rather than showing stale numbers
    wait_until(lambda: text(browser, "#state") == "unreachable", 15,
               "the page to notice")


def test_the_page_shows_a_degraded_daemon_and_what_waits_to_retry(tmp_path: Path, browser: Any,
                                                                  tmpfs: Any) -> None:
    fill(tmpfs("processed", size="1m"))  # a full output disk: writes fail, inputs wait
    port = free_port()
    d = Daemon(tmp_path, "--status-port", str(port), "--retry-backoff", "20",
               "--retry-max", "50")
    try:
        browser.get(f"http://127.0.0.1:{port}/")
        for i in range(3):
            drop(tmp_path, f"scan_{i}.png", size=(500, 400), seed=i)
        d.wait_for("file.retried", count=3)
        wait_until(lambda: text(browser, "#state") == "degraded", 15,
                   "the page to say degraded")
        problems = text(browser, "#problems")
        assert "waiting to retry after failures not their own" in problems
        queue = wait_until(lambda: (q := text(browser, "#queue")).count(
            "waiting to retry") >= 3 and q, 10, "the retries in the queue")
        assert "scan_0.png" in queue and "in " in queue
        assert count(browser, "waiting-to-retry") == 3
        shot(browser, tmp_path, "status-page-degraded.png")
    finally:
        assert d.stop() == 0
