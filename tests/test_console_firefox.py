"""The console in Firefox too (Debian's firefox-esr, headless), driven over Marionette, Firefox's own
remote protocol (PyPI marionette-driver), since no geckodriver for Selenium installs from a package
registry: sign in, every page shows its data without an error, the playground streams an answer,
and the key is nowhere in the page or the browser's storage. The Chromium tests
(test_console_browser.py) cover the journeys; this one that the same pages work in the other engine."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.gateway import Backend, Gateway

WAIT_S = 30.0  # a liveness bound for what a page shows


class Firefox:
    def __init__(self, base_url: str, log: Path) -> None:
        from marionette_driver.marionette import Marionette

        binary = shutil.which("firefox-esr") or shutil.which("firefox")
        assert binary, "firefox-esr is missing: scripts/install_test_deps.sh installs it"
        self.base_url = base_url
        self.client = Marionette(bin=binary, headless=True, gecko_log=str(log))  # else gecko.log in the cwd
        self.client.start_session()

    def quit(self) -> None:
        self.client.delete_session()
        self.client.cleanup()

    def open(self, path: str) -> None:
        self.client.navigate(self.base_url + path)

    def script(self, source: str, *args: object) -> Any:
        return self.client.execute_script(source, script_args=list(args))

    def wait(self, condition: Callable[[], Any], message: str) -> Any:
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                result = condition()
            except Exception:  # the page is changing under the look: look again
                result = None
            if result:
                return result
            assert time.monotonic() < deadline, message
            time.sleep(0.2)

    def text(self, css: str) -> str:
        return str(self.script("const e = document.querySelector(arguments[0]); return e ? e.innerText : '';", css))

    def errors(self) -> list[str]:
        return list(
            self.script(
                "return [...document.querySelectorAll('.page-error')].map(e => e.innerText).filter(t => t.trim());"
            )
        )


@pytest.fixture(scope="module")
def firefox(gateway: Gateway, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Firefox]:
    browser = Firefox(gateway.url, tmp_path_factory.mktemp("firefox-log") / "gecko.log")
    try:
        yield browser
    finally:
        browser.quit()


def test_every_console_page_works_in_firefox(gateway: Gateway, firefox: Firefox) -> None:
    firefox.open("/console/")
    firefox.wait(lambda: "/console/sign-in" in firefox.script("return location.href"), "no redirect to sign-in")
    firefox.wait(lambda: firefox.client.find_element("css selector", "#key"), "no key field")
    firefox.client.find_element("css selector", "#key").send_keys(gateway.admin_key)
    firefox.client.find_element("css selector", "#sign-in-form button[type=submit]").click()
    firefox.wait(lambda: firefox.script("return location.hash") == "#/overview", "sign-in did not lead to the overview")
    firefox.wait(lambda: "ready" in firefox.text('[data-model="sim"] .card-head .badge'), "sim is not shown ready")

    shown = {}
    for route, heading in (("#/keys", "Keys"), ("#/usage", "Usage"), ("#/requests", "Requests")):
        firefox.script("window.location.hash = arguments[0]", route)
        firefox.wait(lambda h=heading: firefox.text("main h1").startswith(h), f"{route}: no {heading} heading")
        firefox.wait(
            lambda: firefox.script("return document.querySelectorAll('main table').length"), f"{route}: no data"
        )
        shown[route] = firefox.errors()

    firefox.script("window.location.hash = '#/playground'")
    options = "return [...document.querySelectorAll('main select[name=model] option')].map(o => o.text)"
    firefox.wait(lambda: "sim (ready)" in firefox.script(options), f"sim is not offered: {firefox.script(options)}")
    firefox.client.find_element("css selector", "main textarea[name=message]").send_keys("Hello from Firefox")
    firefox.script("[...document.querySelectorAll('main button')].find(b => b.innerText.trim() == 'Send').click()")
    done = firefox.wait(lambda: "tokens" in (meta := firefox.text(".turn.assistant .turn-meta")) and meta, "no answer")
    answer = firefox.text(".turn.assistant .turn-text")
    source = firefox.script("return document.documentElement.outerHTML")
    storage = firefox.script("return JSON.stringify([localStorage, sessionStorage, document.cookie])")

    assert shown == {"#/keys": [], "#/usage": [], "#/requests": []}
    assert "tokens" in done and answer.strip()
    assert gateway.admin_key not in source and gateway.admin_key not in storage
    assert "vllm_console" not in storage  # the cookie is HttpOnly: no script of the page reads it


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, simulator) -> Iterator[Gateway]:
    backend = Backend("sim", simulator.base_url, path="/models/sim")
    with Gateway.start(tmp_path_factory.mktemp("firefox"), [backend]) as gateway:
        yield gateway
