"""The console in a real headless Debian chromium (Selenium + chromium-driver, as .ci/run
installs them): login required, a record appears after a webhook, a dead letter is replayed by
clicking its button. Skipped only where the browser is absent and CI is not set."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.conftest import AiohttpServer, GatewayFactory
from tests.test_console import (
    CONSOLE_PASSWORD,
    CONSOLE_USER,
    HANDSET,
    HOOK,
    console_cfg,
    mo,
    start_receiver,
)

try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.chrome.webdriver import WebDriver
    from selenium.webdriver.common.by import By
except ImportError:  # pragma: no cover - CI installs it with the test extras
    webdriver = None  # type: ignore[assignment]

DRIVER = shutil.which("chromedriver")
BROWSER = next(
    (p for p in ("/usr/lib/chromium/chromium", shutil.which("chromium")) if p and Path(p).exists()),
    None,
)
MISSING = webdriver is None or DRIVER is None or BROWSER is None
if MISSING and os.environ.get("CI") == "true":
    raise RuntimeError("CI: chromium, chromium-driver and selenium must be installed (.ci/run)")
pytestmark = pytest.mark.skipif(MISSING, reason="chromium / chromium-driver / selenium absent")

T = TypeVar("T")


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    """A headless chromium driven through chromedriver, recording network events."""
    assert BROWSER is not None
    assert DRIVER is not None
    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=DRIVER))
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()


async def run(fn: Callable[[], T]) -> T:
    """A blocking browser step, off the event loop that serves the gateway."""
    return await asyncio.to_thread(fn)


def statuses(driver: WebDriver, path: str) -> list[int]:
    """HTTP statuses the browser received for documents at `path` since the last call."""
    out = []
    entries: list[dict[str, Any]] = driver.get_log("performance")  # type: ignore[no-untyped-call]
    for entry in entries:
        message = json.loads(entry["message"])["message"]
        if message.get("method") != "Network.responseReceived":
            continue
        response: dict[str, Any] = message["params"]["response"]
        if response["url"].split("?")[0].endswith(path):
            out.append(int(response["status"]))
    return out


async def until(check: Callable[[], bool], within: float, what: str) -> None:
    for _ in range(int(within / 0.2)):
        if await run(check):
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"{what} did not happen within {within} s")


async def test_console_in_a_real_browser(
    browser: WebDriver,
    aiohttp_server: AiohttpServer,
    gateway: GatewayFactory,
    cfg: dict[str, Any],
) -> None:
    """Login required (401), a webhook's record shows up by refresh, a click replays it."""
    receiver = await start_receiver(aiohttp_server)
    client = await gateway(console_cfg(cfg, receiver))
    host, port = client.server.host, client.server.port
    plain = f"http://{host}:{port}/console"

    await run(lambda: browser.get(plain))
    assert await run(lambda: statuses(browser, "/console")) == [401]
    assert "bc-proxy console" not in await run(lambda: browser.page_source)

    await run(
        lambda: browser.get(f"http://{CONSOLE_USER}:{CONSOLE_PASSWORD}@{host}:{port}/console")
    )
    assert await run(lambda: browser.title) == "bc-proxy console"
    assert await run(lambda: statuses(browser, "/console")) == [200]
    assert "No dead letters." in await run(lambda: browser.page_source)

    assert (await client.post(HOOK, json=mo("b-1", "browser record"))).status == 200
    # no reload by the test: the page's own meta refresh brings the record in
    await until(lambda: "Replay all" in browser.page_source, 20, "the dead letter row")
    source = await run(lambda: browser.page_source)
    assert "acme" in source
    assert HANDSET not in source  # masked
    assert "/webhooks/connexus/{secret}" in source  # the route template, never the secret

    receiver.status = 200
    buttons = await run(
        lambda: browser.find_elements(By.CSS_SELECTOR, 'button[value]:not([value="all"])')
    )
    assert len(buttons) == 1
    await run(buttons[0].click)
    await until(lambda: "No dead letters." in browser.page_source, 10, "the replay")
    assert (await run(lambda: browser.current_url)).endswith(f"@{host}:{port}/console")
    for _ in range(100):
        if receiver.got:
            break
        await asyncio.sleep(0.05)
    assert receiver.got == ["browser record"]
