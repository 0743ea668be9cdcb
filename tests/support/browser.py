"""Headless Chromium, driven by Selenium, for the console's browser tests.

    with Browser.start(gateway_url, shots_dir) as browser:
        browser.open("/console/sign-in")
        browser.sign_in(admin_key)
        browser.wait_text("main h1", "Overview")
        browser.screenshot("overview")
        browser.problems()      # CSP violations and uncaught script errors the page logged

Debian's `chromium` and `chromium-driver` (scripts/install_test_deps.sh installs them) and PyPI's
`selenium`. The browser reads what a person sees: text, buttons by their names, screenshots.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
WAIT_S = 20.0  # a liveness bound for what a page shows; a loaded two-core machine is slow to render


def chromium_paths() -> tuple[str, str]:
    """The browser and its driver; the test fails (does not skip) without them, as with redis-server."""
    browser = next((path for name in CHROMIUM if (path := shutil.which(name))), None)
    driver = shutil.which("chromedriver")
    assert browser and driver, "chromium and chromedriver are missing: scripts/install_test_deps.sh installs them"
    return browser, driver


def screenshots_dir(tmp_path: Path) -> Path:
    """CONSOLE_SCREENSHOTS when set (docs/console/ for the docs' pictures), else the test's tmp dir."""
    chosen = os.environ.get("CONSOLE_SCREENSHOTS")
    directory = Path(chosen) if chosen else tmp_path / "screenshots"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


class Browser:
    def __init__(self, driver: Any, base_url: str, shots: Path, profile: str) -> None:
        self.driver = driver
        self.base_url = base_url
        self.shots = shots
        self.profile = profile
        self.downloads = Path(profile) / "downloads"  # where a page's downloads land

    @classmethod
    def start(cls, base_url: str, shots: Path, width: int = 1280, height: int = 900) -> Browser:
        from selenium import webdriver  # requirements-test.txt: missing, the test fails rather than skips
        from selenium.webdriver.chrome.service import Service

        binary, driver_path = chromium_paths()
        profile = tempfile.mkdtemp(prefix="console-chromium-")
        options = webdriver.ChromeOptions()
        options.binary_location = binary
        for argument in (
            "--headless=new",
            "--no-sandbox",
            "--disable-dev-shm-usage",
            "--disable-gpu",
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
            "--lang=en-US",
        ):
            options.add_argument(argument)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        downloads = Path(profile) / "downloads"
        options.add_experimental_option(
            "prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False}
        )
        driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
        driver.set_page_load_timeout(30)
        driver.set_script_timeout(30)
        browser = cls(driver, base_url, shots, profile)
        browser.resize(width, height)
        return browser

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.quit()

    def quit(self) -> None:
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self.profile, ignore_errors=True)

    def resize(self, width: int, height: int) -> None:
        """Make the page's viewport (not the window around it) `width` x `height`."""
        self.driver.set_window_size(width, height)
        inner = self.driver.execute_script("return [window.innerWidth, window.innerHeight]")
        self.driver.set_window_size(2 * width - inner[0], 2 * height - inner[1])

    # -- going places --

    def open(self, path: str) -> None:
        self.driver.get(self.base_url + path)

    def go(self, route: str) -> None:
        """A console route (#/keys) from within the app, as a click on a link would."""
        self.driver.execute_script("window.location.hash = arguments[0]", route)

    @property
    def url(self) -> str:
        return str(self.driver.current_url)

    def sign_in(self, key: str) -> None:
        field = self.find("#key")
        field.clear()
        field.send_keys(key)
        self.button("Sign in").click()

    # -- reading the page --

    def wait(self, condition: Callable[[], Any], timeout: float = WAIT_S, message: str = "") -> Any:
        from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
        from selenium.webdriver.support.ui import WebDriverWait

        def check(_: object) -> Any:
            try:
                return condition()
            except StaleElementReferenceException:
                return False  # the page re-rendered the element meanwhile: look again

        try:
            return WebDriverWait(self.driver, timeout, poll_frequency=0.05).until(check)
        except WebDriverException as error:
            raise AssertionError(
                f"{message or 'the page never got there'} (url {self.url}): {self.main_text()}"
            ) from error

    def find(self, css: str) -> Any:
        from selenium.webdriver.common.by import By

        return self.wait(lambda: self.driver.find_element(By.CSS_SELECTOR, css), message=f"no {css}")

    def all(self, css: str) -> list[Any]:
        from selenium.webdriver.common.by import By

        return list(self.driver.find_elements(By.CSS_SELECTOR, css))

    def text(self, css: str) -> str:
        found = self.all(css)
        return str(found[0].text) if found else ""

    def main_text(self) -> str:
        try:
            return str(self.driver.execute_script("return document.body ? document.body.innerText : ''"))[:2000]
        except Exception:  # only for a failure's message
            return "(no page)"

    def wait_text(self, css: str, wanted: str, timeout: float = WAIT_S) -> str:
        """Wait until the first `css` element's visible text contains `wanted`; that text."""
        return str(
            self.wait(lambda: wanted in self.text(css) and self.text(css), timeout, f"{css} never showed {wanted!r}")
        )

    def button(self, name: str, within: str = "body") -> Any:
        """A visible, enabled button by its accessible name (its aria-label, else its text)."""
        from selenium.webdriver.common.by import By

        def found() -> Any:
            for candidate in self.driver.find_elements(By.CSS_SELECTOR, f"{within} button"):
                label = candidate.get_attribute("aria-label") or candidate.text
                if label.strip() == name and candidate.is_displayed() and candidate.is_enabled():
                    return candidate
            return None

        return self.wait(found, message=f"no button {name!r} in {within}")

    def field(self, label: str, within: str = "body") -> Any:
        """An input, select or textarea by its <label>'s text, as a person finds it."""
        from selenium.webdriver.common.by import By

        def found() -> Any:
            for candidate in self.driver.find_elements(By.CSS_SELECTOR, f"{within} label"):
                if candidate.text.strip() == label and candidate.is_displayed():
                    return self.driver.find_element(By.ID, candidate.get_attribute("for"))
            return None

        return self.wait(found, message=f"no field labelled {label!r} in {within}")

    def select(self, label: str, visible_text: str) -> None:
        from selenium.webdriver.support.ui import Select

        element = self.field(label)
        self.wait(
            lambda: any(o.text == visible_text for o in Select(element).options), message=f"no option {visible_text!r}"
        )
        Select(element).select_by_visible_text(visible_text)

    def table_rows(self, within: str) -> list[list[str]]:
        """The cells' text of each body row of the first table in `within`."""
        script = """
            const table = document.querySelector(arguments[0] + ' table');
            if (!table) return [];
            return [...table.tBodies[0].rows].map((row) => [...row.cells].map((cell) => cell.innerText.trim()));
        """
        return list(self.driver.execute_script(script, within))

    def fetch_status(self, path: str) -> int:
        """The status a fetch from the page gets for `path`, with the page's cookie, as its scripts would."""
        script = """
            const done = arguments[arguments.length - 1];
            fetch(arguments[0], {credentials: 'same-origin'}).then((answer) => done(answer.status), () => done(0));
        """
        return int(self.driver.execute_async_script(script, path))

    def storage(self) -> str:
        """Everything in localStorage and sessionStorage, and the cookies scripts can read, as text."""
        script = """
            const dump = (store) => Object.fromEntries(Object.keys(store).map((name) => [name, store.getItem(name)]));
            return JSON.stringify({local: dump(localStorage), session: dump(sessionStorage), cookie: document.cookie});
        """
        return str(self.driver.execute_script(script))

    def page_source(self) -> str:
        """The DOM as it stands (outerHTML, with the inputs' current values), not only the file as served."""
        script = """
            const values = [...document.querySelectorAll('input, textarea')].map((input) => input.value);
            return document.documentElement.outerHTML + '\\n' + JSON.stringify(values);
        """
        return str(self.driver.page_source) + str(self.driver.execute_script(script))

    def downloaded(self, name: str) -> str:
        """The text of a file the page downloaded, once it is there whole."""
        path = self.downloads / name
        self.wait(lambda: path.exists() and not (self.downloads / f"{name}.crdownload").exists(), message=f"no {name}")
        return path.read_text()

    # -- evidence --

    def screenshot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        # What the page looks like at rest: no focus ring, no status message fading out.
        self.driver.execute_script("""
            document.activeElement?.blur?.();
            const status = document.getElementById('status');
            if (status) status.textContent = '';
        """)
        self.driver.save_screenshot(str(path))
        return path

    def problems(self) -> list[str]:
        """What the browser logged that a correct page never causes: a CSP violation (an inline script
        or style would be one), an uncaught exception, a failed module import. Failed requests (a 401
        or 403 a test provoked) are not problems."""
        lines = [entry["message"] for entry in self.driver.get_log("browser")]
        markers = ("Content Security Policy", "Uncaught", "SyntaxError", "TypeError", "ReferenceError")
        return [line for line in lines if any(marker in line for marker in markers)]


def key_visible_anywhere(browser: Browser, key: str) -> list[str]:
    """Where a key shows in the browser: the DOM, the URL, the storages, the cookies scripts see."""
    places = {"page": browser.page_source(), "url": browser.url, "storage": browser.storage()}
    return [place for place, text in places.items() if key in text or json.dumps(key)[1:-1] in text]
