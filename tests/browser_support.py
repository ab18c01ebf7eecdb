"""Headless Chromium for the page tests (Debian's chromium + chromium-driver, selenium from the [dev] extra):
`bash tools/setup_chromium.sh` installs them; the tests skip without them."""

from __future__ import annotations

import shutil

import pytest

SKIP_REASON = "Debian's chromium and chromium-driver are not installed (bash tools/setup_chromium.sh)"


def chromium() -> tuple[str, str] | None:
    """(browser, driver) paths, or None."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def headless_driver(width: int = 1200, height: int = 900, *extra: str):
    """A selenium Chrome driver on headless Chromium (the caller quits it); skips without selenium."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    browser, driver_path = chromium()  # type: ignore[misc]
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}", *extra):
        opts.add_argument(arg)
    return webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=driver_path))
