"""A real browser for the stack test's UI checks (and the page's own test): Debian's chromium, driven through
selenium by Debian's chromium-driver, headless, with no network but loopback.

Both come from apt (`.ci/run` installs them): docker.io and browser downloads are unreachable here, so
selenium is given the driver and the browser binary and never runs its own download manager. Chromium's
background connections are off, and every request but loopback (which Chromium never proxies) goes to a proxy
that does not exist, so a page that tried to load something from the internet would show it as broken.
``headers`` are sent with every request the browser makes (Chromium's DevTools protocol), as a reverse proxy
that logs people in would add them: the inference service's bearer token for its page.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")


class BrowserMissing(RuntimeError):
    """chromium or chromium-driver is not installed."""


@contextlib.contextmanager
def chromium(headers: dict[str, str] | None = None, size: tuple[int, int] = (1400, 1000)) -> Iterator:
    """A selenium WebDriver for headless chromium, closed (with its profile) at the end."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not shutil.which(path):
            raise BrowserMissing(f"{path} is missing: apt-get install {package}")
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for argument in (
            "--headless=new",
            "--no-sandbox",  # as root in CI; the pages are our own
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--proxy-server=127.0.0.1:9",
            f"--window-size={size[0]},{size[1]}",
            f"--user-data-dir={profile}",
        ):
            options.add_argument(argument)
        driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
        try:
            driver.set_page_load_timeout(60)
            if headers:
                driver.execute_cdp_cmd("Network.enable", {})
                driver.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": headers})
            yield driver
        finally:
            driver.quit()


def screenshot(driver, folder: Path, name: str) -> Path:
    """The page as the browser shows it, as ``folder/name.png``: kept with the test's output."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    driver.save_screenshot(str(path))
    return path
