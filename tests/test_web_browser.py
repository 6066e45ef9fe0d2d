"""The status pages in a real browser: Debian's headless Chromium, driven by Selenium.

The test sends real policy requests to the daemon, loads the overview, checks that the
numbers shown are the database's, follows the link to a user's page and checks it
too, and saves screenshots at a laptop's and a phone's width (docs/screenshots/ when
POLICYD_UPDATE_SCREENSHOTS=1: the README shows them).  One browser for the session.

Outside CI a missing Chromium, chromedriver or Selenium skips; in CI it fails.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from policyd.storage import create_storage
from tests.conftest import RunningDaemon, make_settings, run_daemon, skip_or_fail

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# As root (CI), Chromium needs --no-sandbox; the rest keeps it from calling anywhere.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)
SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
DESKTOP = (1280, 1000)
PHONE = (390, 844)
HOSTILE = '<img src=x onerror="document.title=1">&amp;"\''


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        skip_or_fail("selenium is not installed (pip install -e '.[test]')")
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            skip_or_fail(f"{path} is missing (apt-get install {package})")
    profile = tempfile.mkdtemp(prefix="policyd-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={DESKTOP[0]},{DESKTOP[1]}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def screenshot(driver: Any, name: str, tmp_path: Path, size: tuple[int, int]) -> Path:
    driver.set_window_size(*size)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(size[0], min(max(size[1], int(height) + 140), 4000))
    path = tmp_path / f"{name}.png"
    assert driver.save_screenshot(str(path)), path
    assert path.stat().st_size > 10_000  # a page, not a blank
    if os.environ.get("POLICYD_UPDATE_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(exist_ok=True)
        shutil.copy(path, SCREENSHOTS / path.name)
    driver.set_window_size(*size)
    return path


async def send_traffic(running: RunningDaemon) -> None:
    client = await running.client()
    for user, count, sender, ip in (
        ("alice@example.org", 40, "alice@example.org", "192.0.2.10"),
        ("bob@example.org", 60, "bob@example.org", "192.0.2.11"),
        ("bob@example.org", 70, "news@example.org", "192.0.2.12"),  # bob: held (130)
        ("carol@example.org", 260, "carol@example.org", "2001:db8::7"),  # rejected
        ("carol@example.org", 3, "carol@example.org", "2001:db8::7"),
        (HOSTILE, 9, "<b>bold</b>@example.org", "198.51.100.1"),
        ("dave@example.org", 90, "dave@example.org", "192.0.2.13"),  # near
    ):
        await client.ask(sasl_username=user, recipient_count=count, sender=sender, client_address=ip)
    await client.close()
    assert running.daemon.writer is not None
    await asyncio.wait_for(running.daemon.writer.caught_up.wait(), 5)
    for _ in range(100):
        if running.daemon.stats.events_written == 7:
            return
        await asyncio.sleep(0.02)


async def in_thread(function: Any, *args: Any) -> Any:
    """Selenium blocks: it runs beside the daemon's event loop, not on it."""
    return await asyncio.get_running_loop().run_in_executor(None, function, *args)


@pytest.mark.slow
async def test_status_pages_in_chromium(browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    url = f"sqlite://{tmp_path}/policyd.sqlite"
    settings = make_settings(url, quota=100, reject_quota=200, http_listen=("127.0.0.1", 0))
    async with run_daemon(settings) as running:
        await send_traffic(running)
        store = create_storage(url, "events")
        await store.open()
        try:
            since = running.daemon.clock() - timedelta(hours=24)
            top = await store.top_senders(since, 20)
            bob_events = await store.user_events("bob@example.org", since, 100)
        finally:
            await store.close()

        await in_thread(browser.get, running.web_url + "/")
        assert browser.title == "policyd status"
        rows = await in_thread(browser.find_elements, By.CSS_SELECTOR, "#top-senders tbody tr")

        def read_rows() -> list[tuple[str, int, int, int, int]]:
            return [
                (
                    row.find_element(By.CSS_SELECTOR, "a.user").get_attribute("title"),
                    int(row.find_element(By.CSS_SELECTOR, ".recipients").text),
                    int(row.find_element(By.CSS_SELECTOR, ".messages").text),
                    int(row.find_element(By.CSS_SELECTOR, ".held-count").text),
                    int(row.find_element(By.CSS_SELECTOR, ".rejected-count").text),
                )
                for row in rows
            ]

        shown = await in_thread(read_rows)
        assert shown == [(s.sasl_username, s.recipients, s.messages, s.held, s.rejected) for s in top]
        assert len(shown) == 5
        # The hostile name is text on the page, not markup: no image, the title untouched.
        assert HOSTILE in [name for name, *_ in shown]
        assert await in_thread(browser.execute_script, "return document.images.length") == 0
        assert browser.title == "policyd status"
        states = await in_thread(
            browser.execute_script,
            "return Array.from(document.querySelectorAll('#top-senders tbody tr'))"
            ".map(r => [r.dataset.user, r.querySelector('.meter .fill').className])",
        )
        assert dict(states) == {
            "carol@example.org": "fill rejected",
            "bob@example.org": "fill held",
            "dave@example.org": "fill near",
            "alice@example.org": "fill ok",
            HOSTILE: "fill ok",
        }
        assert (await in_thread(browser.find_element, By.ID, "held-count")).text == "1"
        assert (await in_thread(browser.find_element, By.ID, "rejected-count")).text == "1"
        assert (await in_thread(browser.find_element, By.ID, "health")).text == "ok"
        assert (await in_thread(browser.find_element, By.ID, "decisions-total")).text == "7"
        bars = await in_thread(browser.find_elements, By.CSS_SELECTOR, "#decisions svg g.bar")
        assert len(bars) >= 60
        screenshot(browser, "status-desktop", tmp_path, DESKTOP)
        screenshot(browser, "status-phone", tmp_path, PHONE)
        # A phone: nothing wider than the screen (wide tables scroll inside their box).
        overflow = await in_thread(
            browser.execute_script, "return document.documentElement.scrollWidth - window.innerWidth"
        )
        assert overflow <= 0
        browser.set_window_size(*DESKTOP)

        link = await in_thread(
            browser.find_element, By.CSS_SELECTOR, '#top-senders a[title="bob@example.org"]'
        )
        await in_thread(link.click)
        assert (await in_thread(browser.find_element, By.ID, "heading")).text == "User bob@example.org"
        recent = await in_thread(
            browser.execute_script,
            "return Array.from(document.querySelectorAll('#recent-events tbody tr'))"
            ".map(r => Array.from(r.cells).map(c => c.textContent))",
        )
        assert recent == [
            [
                f"{e.ts:%Y-%m-%d %H:%M:%S}",
                e.sender,
                e.client_address,
                str(e.recipient_count),
                e.outcome.value,
                e.queue_id,
            ]
            for e in bob_events
        ]
        assert [row[4] for row in recent] == ["HOLD", "DUNNO"]
        counted = await in_thread(browser.find_element, By.CSS_SELECTOR, "#summary .counted")
        assert counted.text == "130"
        assert "UTC" in (await in_thread(browser.find_element, By.ID, "back-at")).text
        senders = await in_thread(browser.find_elements, By.CSS_SELECTOR, "#senders tbody tr")
        assert sorted(row.text.split()[0] for row in senders) == ["bob@example.org", "news@example.org"]
        for chart in ("hourly", "daily"):
            limits = await in_thread(browser.find_elements, By.CSS_SELECTOR, f"#{chart} svg line.limit")
            assert len(limits) == 2
        screenshot(browser, "user-desktop", tmp_path, DESKTOP)
        screenshot(browser, "user-phone", tmp_path, PHONE)
        overflow = await in_thread(
            browser.execute_script, "return document.documentElement.scrollWidth - window.innerWidth"
        )
        assert overflow <= 0
        browser.set_window_size(*DESKTOP)

        # The hostile user's own page: its name in the heading as text.
        await in_thread(browser.get, running.web_url + "/")
        hostile_link = [
            element
            for element in await in_thread(browser.find_elements, By.CSS_SELECTOR, "#top-senders a.user")
            if element.get_attribute("title") == HOSTILE
        ]
        assert len(hostile_link) == 1
        await in_thread(hostile_link[0].click)
        assert (await in_thread(browser.find_element, By.ID, "heading")).text == f"User {HOSTILE}"
        assert await in_thread(browser.execute_script, "return document.images.length") == 0
        sender = await in_thread(browser.find_element, By.CSS_SELECTOR, "#recent-events tbody td.name")
        assert sender.text == "<b>bold</b>@example.org"
