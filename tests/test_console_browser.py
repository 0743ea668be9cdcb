"""The web console in a real browser (headless Chromium through Selenium) against the real scripts'
stack: two simulated models, their supervisor and the gateway. What a person does and sees: sign in,
create and revoke a key, read its usage, chat in the playground, watch a model restart, stop and start
one with its buttons; what a user key may see; where a key never shows up.

Screenshots of each page go to CONSOLE_SCREENSHOTS when set (docs/console/ for the docs), else to the
test's tmp dir."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import openai
import pytest

from tests.support.browser import Browser, key_visible_anywhere, screenshots_dir
from tests.support.clients import client_tls, sdk
from tests.support.fleet import Fleet, two_simulated_models
from tests.support.processes import wait_until

# beta streams slowly enough that a person (and the test) sees its answer grow.
BETA_ARGS = "simulate_args='--token-rate 40'"


@dataclass
class Stack:
    fleet: Fleet
    url: str
    admin_key: str

    def admin(self) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.admin_key}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30, verify=client_tls())

    def sdk(self, key: str) -> openai.OpenAI:
        return sdk(self.url + "/v1", key)

    def all_ready(self) -> None:
        """Every model ready (a test before may have stopped or killed one)."""

        def ready() -> bool:
            with self.admin() as client:
                health = client.get("/health").json()
            return bool(health["models_ready"] == health["models_total"] == 2)

        wait_until(ready, timeout=60, interval=0.2)

    def key_id(self, name: str) -> str:
        with self.admin() as client:
            return next(key["id"] for key in client.get("/admin/keys").json()["data"] if key["name"] == name)

    def usage_of(self, key_id: str) -> tuple[int, int, int]:
        """Requests, input and output tokens of a key since yesterday, as GET /admin/usage sums them."""
        params = {"start_time": int(time.time()) - 86400, "group_by": "api_key_id", "api_key_ids": key_id}
        with self.admin() as client:
            page = client.get("/admin/usage", params=params).json()
        results = [result for bucket in page["data"] for result in bucket["results"]]
        return (
            sum(result["num_model_requests"] for result in results),
            sum(result["input_tokens"] for result in results),
            sum(result["output_tokens"] for result in results),
        )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    fleet = two_simulated_models(tmp_path_factory.mktemp("console"), BETA_ARGS)
    # A killed server waits this long before its restart: longer than the overview's 5 s refresh,
    # so that the page is sure to show "restarting" once.
    fleet.env["VLLM_RESTART_DELAY"] = "6"
    try:
        port, admin_key = fleet.start_with_gateway(
            env={"GATEWAY_CONSOLE_SIGN_IN_LIMIT": "1000/minute", "GATEWAY_RATE_LIMIT": "1000/minute"}
        )
        yield Stack(fleet, f"http://127.0.0.1:{port}", admin_key)
    finally:
        fleet.stop_everything()


@pytest.fixture
def browser(stack: Stack, tmp_path: Path) -> Iterator[Browser]:
    stack.all_ready()
    with Browser.start(stack.url, screenshots_dir(tmp_path)) as browser:
        yield browser
        assert browser.problems() == []  # no CSP violation, no uncaught script error


def chat(client: openai.OpenAI, model: str, text: str, max_tokens: int = 4) -> str:
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": text}], max_tokens=max_tokens
    )
    return str(reply.choices[0].message.content)


def signed_in(browser: Browser, key: str, home: str) -> None:
    browser.open("/console/sign-in")
    browser.sign_in(key)
    browser.wait(lambda: browser.url.endswith(f"/console/#/{home}"), message=f"sign-in did not lead to #/{home}")


def model_badge(model: str) -> str:
    return f'[data-model="{model}"] .card-head .badge'


def keys_table_names(browser: Browser) -> list[str]:
    return [
        row[0].split("\n")[0].split(" ")[0] for row in browser.table_rows('[aria-label="API keys"]') if len(row) > 1
    ]


def test_an_admin_creates_a_key_reads_its_usage_chats_revokes_it_and_sees_a_model_restart(
    stack: Stack, browser: Browser
) -> None:
    browser.open("/console/sign-in")
    browser.screenshot("sign-in")
    browser.sign_in(stack.admin_key)
    browser.wait(lambda: browser.url.endswith("/console/#/overview"))
    for model in ("alpha", "beta"):
        browser.wait_text(model_badge(model), "ready")

    # Keys: create one; its secret is shown once, then dropped from the page.
    browser.go("#/keys")
    browser.field("Name", ".key-form").send_keys("journey")
    browser.field("Rate limit", ".key-form").send_keys("50/minute")
    browser.button("Create key").click()
    secret = browser.find("#secret-value").text
    assert re.fullmatch(r"sk-[A-Za-z0-9_-]{20,}", secret), secret
    browser.wait(lambda: "journey" in keys_table_names(browser))
    row = next(row for row in browser.table_rows('[aria-label="API keys"]') if row[0].startswith("journey"))
    assert row[1:4] == ["all", "50/minute", "default"]
    browser.button("Done").click()
    browser.wait(lambda: not browser.all("#secret-value"), message="the secret stayed on the page")
    assert secret not in browser.page_source()
    audit = '[aria-label="Audit trail, newest first"]'
    browser.wait(
        lambda: any(row[1:3] == ["create", f"journey ({stack.key_id('journey')})"] for row in browser.table_rows(audit))
    )
    browser.screenshot("keys")

    # The key works with the official SDK, and its requests and tokens reach the Usage page.
    client = stack.sdk(secret)
    for text in ("Hello!", "And again."):
        assert chat(client, "alpha", text, max_tokens=12)
    key_id = stack.key_id("journey")
    requests, input_tokens, output_tokens = wait_until(lambda: (u := stack.usage_of(key_id))[0] == 2 and u, timeout=15)
    browser.go("#/usage")
    shown = browser.wait(
        lambda: next((r for r in browser.table_rows('[aria-label="Per key"]') if r[0] == f"journey ({key_id})"), None)
    )
    assert shown[1:] == [
        f"{requests:,}",
        f"{input_tokens:,}",
        f"{output_tokens:,}",
        f"{input_tokens + output_tokens:,}",
    ]
    assert output_tokens == 24  # 12 a chat: the figures are the ledger's, not the page's guess
    browser.find('[aria-label="Usage figures"] svg.chart rect.bar')  # the chart drew its bars
    # The CSV export: the same figures, made in the page.
    browser.button("Export CSV").click()
    first, last = (browser.field(label).get_attribute("value") for label in ("From (UTC)", "To (UTC), inclusive"))
    lines = browser.downloaded(f"usage-{first}-{last}-1d.csv").splitlines()
    assert lines[0] == "bucket_start,bucket_end,api_key_id,key_name,model,requests,input_tokens,output_tokens"
    assert [line.split(",")[2:] for line in lines if f",{key_id}," in line] == [
        [key_id, "journey", "alpha", str(requests), str(input_tokens), str(output_tokens)]
    ]
    browser.screenshot("usage")

    # The playground's answer streams in: text shows while the answer is still coming.
    browser.go("#/playground")
    browser.select("Model", "beta (ready)")
    browser.field("Max tokens").clear()
    browser.field("Max tokens").send_keys("48")
    browser.field("Message").send_keys("Tell me a story.")
    browser.button("Send").click()
    answer, meta = ".turn.assistant .turn-text", ".turn.assistant .turn-meta"
    partial = browser.wait(lambda: browser.text(meta) == "…" and browser.text(answer))
    done = browser.wait_text(meta, "tokens")
    assert "48 tokens" in done
    final = browser.text(answer)
    assert final.startswith(partial) and len(final.split()) > len(partial.split())
    assert browser.text(".turn.user .turn-text") == "Tell me a story."
    browser.screenshot("playground")

    # Edit and rotate it in their dialogs; with a grace period the old secret works beside the new one.
    browser.go("#/keys")
    browser.button("Edit journey").click()
    limit = browser.field("Rate limit", within="dialog[open]")
    limit.clear()
    limit.send_keys("60/minute")
    browser.button("Save", within="dialog[open]").click()
    keys = '[aria-label="API keys"]'
    browser.wait(
        lambda: any(row[0].startswith("journey") and row[2] == "60/minute" for row in browser.table_rows(keys))
    )
    with stack.admin() as admin:
        assert admin.get("/admin/keys/journey").json()["rate_limit"] == "60/minute"
    browser.button("Rotate journey").click()
    browser.field("Grace, in seconds", within="dialog[open]").send_keys("3600")
    browser.button("Rotate", within="dialog[open]").click()
    rotated = browser.wait(lambda: (text := browser.text("#secret-value")).startswith("sk-") and text)
    assert rotated != secret
    rotated_client = stack.sdk(rotated)
    assert chat(rotated_client, "alpha", "the new secret") and chat(client, "alpha", "the old one, in its grace")
    browser.button("Done").click()

    # Revoke the key in the page, after a confirmation; the SDK is refused from then on.
    browser.button("Revoke journey").click()
    browser.wait_text("#confirm", "Revoke journey?")
    browser.button("Revoke", within="#confirm").click()
    browser.wait(lambda: "journey" not in keys_table_names(browser), message="the revoked key is still listed")
    for revoked in (client, rotated_client):
        with pytest.raises(openai.AuthenticationError):
            chat(revoked, "alpha", "still?")

    # A model server killed outright: the overview shows it restarting, then ready again.
    browser.go("#/overview")
    browser.wait_text(model_badge("beta"), "ready")
    os.killpg(stack.fleet.pid("beta"), signal.SIGKILL)
    browser.wait_text(model_badge("beta"), "restarting", timeout=30)
    browser.screenshot("overview-restarting")
    browser.wait_text(model_badge("beta"), "ready", timeout=60)
    browser.find(".charts svg.chart polyline.line")
    browser.screenshot("overview")

    # A phone's width: the navigation folds behind a button and the page never scrolls sideways;
    # a wide table scrolls inside its own box.
    browser.resize(390, 844)
    fits = "return document.documentElement.scrollWidth <= window.innerWidth"
    browser.wait(lambda: browser.driver.execute_script(fits), message="the overview is wider than a phone")
    link = browser.wait(lambda: next(iter(browser.all('#nav a[data-page="keys"]')), None))
    assert not link.is_displayed()
    browser.button("Menu").click()
    browser.wait(link.is_displayed, message="the menu did not open")
    link.click()
    browser.wait(lambda: browser.table_rows('[aria-label="API keys"]'))
    assert browser.driver.execute_script(fits)
    box = browser.find('[aria-label="API keys"]')
    assert browser.driver.execute_script("return arguments[0].scrollWidth > arguments[0].clientWidth", box)
    browser.screenshot("phone-keys")


def test_the_requests_page_shows_a_keys_requests_and_filters_them_by_status(stack: Stack, browser: Browser) -> None:
    with stack.admin() as admin:
        created = admin.post("/admin/keys", json={"name": "requests-probe"}).json()
    client = stack.sdk(created["key"])
    for text in ("one", "two"):
        chat(client, "alpha", text)
    with pytest.raises(openai.NotFoundError):
        chat(client, "no-such-model", "x")
    chat(stack.sdk(stack.admin_key), "beta", "another key's request")

    signed_in(browser, stack.admin_key, "overview")
    browser.go("#/requests")
    table = '[aria-label="Requests, newest first"]'
    # By default only requests to models: not the console's own polls, which the log has too.
    shown = browser.wait(lambda: [row for row in browser.table_rows(table) if len(row) > 1])
    assert {row[2] for row in shown} == {"POST /v1/chat/completions"}
    browser.field("Model requests only").click()
    browser.wait(lambda: any(row[2].startswith("GET /admin/requests") for row in browser.table_rows(table)))
    browser.field("Model requests only").click()

    browser.select("Key", f"requests-probe ({created['id']})")

    def rows_of_the_key() -> list[list[str]]:
        rows = browser.table_rows(table)
        return rows if len(rows) == 3 and all(row[3] == "requests-probe" for row in rows) else []

    rows = browser.wait(rows_of_the_key, message="the key's three requests never showed alone")
    assert sorted(row[1] for row in rows) == ["200", "200", "404"]
    assert {row[4] for row in rows} == {"alpha", "no-such-model"}
    browser.screenshot("requests")

    browser.field("Status").send_keys("4xx")
    browser.button("Filter").click()
    browser.wait(lambda: [row[1] for row in browser.table_rows(table)] == ["404"], message="4xx did not filter")
    assert f"key={created['id']}" in browser.url and "status=4xx" in browser.url  # a link to this view


def test_a_model_page_shows_its_config_events_and_log_and_stops_and_starts_it(stack: Stack, browser: Browser) -> None:
    signed_in(browser, stack.admin_key, "overview")
    browser.find('[data-model="alpha"] h3 a').click()
    browser.wait(lambda: browser.url.endswith("#/models/alpha"))
    port = stack.fleet.ports[0]
    browser.wait_text("pre.config", f"port={port}")
    assert "name=alpha" in browser.text("pre.config")
    browser.wait(lambda: any(row[1] == "start" for row in browser.table_rows('[aria-labelledby="events-heading"]')))
    browser.wait(lambda: "alpha" in browser.text("pre.log"), message="the log tail stayed empty")
    browser.wait_text("h1 .badge", "ready")
    browser.screenshot("model")

    # The keyboard alone: Enter opens the confirmation, Escape cancels it, and nothing is done.
    restart = browser.button("Restart")
    restart.send_keys("\n")
    dialog = browser.find("#confirm")
    browser.wait(dialog.is_displayed)
    assert browser.text("#confirm-title") == "Restart alpha?"
    browser.driver.switch_to.active_element.send_keys("\ue00c")  # Escape
    browser.wait(lambda: not dialog.is_displayed(), message="Escape did not close the dialog")
    assert browser.text(".action-result") == ""
    pid = stack.fleet.pid("alpha")

    browser.button("Stop").click()
    browser.wait_text("#confirm-title", "Stop alpha?")
    browser.button("Stop", within="#confirm").click()
    browser.wait_text(".action-result", "Stop alpha: done.", timeout=40)
    browser.wait(lambda: browser.text("h1 .badge") not in ("", "ready"), message="alpha still shows ready")
    with stack.admin() as admin:
        alpha = next(model for model in admin.get("/health").json()["models"] if model["id"] == "alpha")
    assert alpha["status"] != "ready"
    browser.screenshot("model-stopped")
    assert not (stack.fleet.run_dir / "alpha.pid").exists() or stack.fleet.pid("alpha") != pid

    browser.button("Start").click()
    browser.wait_text("#confirm-title", "Start alpha?")
    browser.button("Start", within="#confirm").click()
    browser.wait_text(".action-result", "Start alpha: done.", timeout=60)
    browser.wait_text("h1 .badge", "ready", timeout=40)
    assert stack.fleet.pid("alpha") != pid


def test_a_user_key_sees_its_own_usage_and_the_playground_and_no_admin_data(stack: Stack, browser: Browser) -> None:
    created = json.loads(stack.fleet.cli("keys", "create", "--name", "viewer", "--json").stdout)
    chat(stack.sdk(created["key"]), "alpha", "hi", max_tokens=5)
    wait_until(lambda: stack.usage_of(created["id"])[0] == 1, timeout=15)

    signed_in(browser, created["key"], "usage")
    browser.wait_text("main h1", "My usage")
    assert [link.text for link in browser.all("#nav a")] == ["My usage", "Playground"]
    assert browser.text("#who") == "viewer"
    per_model = browser.wait(lambda: browser.table_rows('[aria-label="Per model"]'))
    assert per_model[0][:2] == ["alpha", "1"]
    assert browser.table_rows('[aria-label="Per key"]') == []  # no one else's keys
    limits = browser.wait(lambda: browser.table_rows('[aria-label="Rate and token windows now"]'))
    assert limits[0][0] == "1000/minute requests"
    browser.screenshot("user-usage")

    for path in ("/admin/overview", "/admin/keys", "/admin/usage?start_time=0", "/admin/requests"):
        assert browser.fetch_status(path) == 403, path
    assert browser.fetch_status("/v1/usage?start_time=0") == 200
    browser.go("#/keys")
    browser.wait_text(".page-error", "This endpoint needs an admin API key.")
    browser.screenshot("user-admin-page-refused")
    browser.go("#/playground")
    assert browser.wait(lambda: browser.field("Model").text.strip()) == "alpha (ready)\nbeta (ready)"
    browser.screenshot("user-playground")


def test_without_a_session_pages_lead_to_sign_in_and_the_key_shows_up_nowhere(stack: Stack, browser: Browser) -> None:
    for path in ("/console/", "/console/#/keys"):
        browser.open(path)
        browser.wait(
            lambda: urlsplit(browser.url).path == "/console/sign-in", message=f"{path} did not lead to sign-in"
        )
    assert browser.fetch_status("/admin/keys") == 401

    browser.sign_in("sk-this-is-not-a-key-of-this-gateway")
    browser.wait(lambda: browser.text("#sign-in-error"), message="a wrong key showed no error")
    assert "did not accept this key" in browser.text("#sign-in-error")
    browser.screenshot("sign-in-refused")
    assert urlsplit(browser.url).path == "/console/sign-in"
    assert browser.driver.get_cookies() == []

    browser.sign_in(stack.admin_key)
    browser.wait(lambda: browser.url.endswith("/console/#/keys"), message="sign-in did not go on to the page linked")
    browser.wait_text("main h1", "Keys")
    for route, heading in (("#/overview", "Overview"), ("#/keys", "Keys"), ("#/usage", "Usage")):
        browser.go(route)
        browser.wait_text("main h1", heading)
        assert key_visible_anywhere(browser, stack.admin_key) == [], route
    cookies = browser.driver.get_cookies()
    assert [cookie["name"] for cookie in cookies] == ["vllm_console"] and cookies[0]["httpOnly"]
    assert stack.admin_key not in cookies[0]["value"]
    log = stack.fleet.log_dir / "vllm_api_server.log"
    assert "console sign-in" in log.read_text()
    assert stack.admin_key not in log.read_text()

    browser.button("Sign out").click()
    browser.wait(lambda: browser.url.endswith("/console/sign-in"))
    assert browser.driver.get_cookies() == []
    assert browser.fetch_status("/admin/keys") == 401
