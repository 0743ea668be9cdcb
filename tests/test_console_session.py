"""Console sessions over a real gateway: a key pasted once becomes an HttpOnly, SameSite=Strict cookie
that stands for it; changes need the session's CSRF token and the gateway's own origin; a wrong key
gets no session; sign-in attempts are limited; a user key's session reaches no admin endpoint;
signing out, rotating or revoking the key ends the session; and the key is never logged."""

from __future__ import annotations

from contextlib import closing
from pathlib import Path

import httpx
import pytest

from tests.support.chat import chat_body
from tests.support.gateway import Backend, Gateway

SESSION = "/console/api/session"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, simulator):
    env = {"GATEWAY_CONSOLE_SIGN_IN_LIMIT": "1000/minute"}
    with Gateway.start(tmp_path_factory.mktemp("console"), [Backend("sim", simulator.base_url)], env=env) as gateway:
        yield gateway


def signed_in(gateway: Gateway, key: str) -> tuple[httpx.Client, dict]:
    """A client holding the session cookie of `key`, and what sign-in answered."""
    client = httpx.Client(base_url=gateway.url, timeout=30)
    answer = client.post(SESSION, json={"key": key})
    assert answer.status_code == 200, answer.text
    return client, answer.json()


def test_sign_in_sets_an_httponly_strict_cookie_and_tells_the_page_no_key(gateway):
    with httpx.Client(base_url=gateway.url) as client:
        answer = client.post(SESSION, json={"key": gateway.admin_key})
    cookie = answer.headers["set-cookie"]
    attributes = [part.strip().lower() for part in cookie.split(";")]

    assert answer.status_code == 200
    assert cookie.startswith("vllm_console=")
    assert "httponly" in attributes and "samesite=strict" in attributes and "path=/" in attributes
    assert "secure" not in attributes  # plain HTTP here: a Secure cookie would never come back
    assert gateway.admin_key not in cookie and gateway.admin_key not in answer.text
    assert set(answer.json()) == {"key_id", "name", "admin", "csrf", "expires_at"}
    assert answer.json()["admin"] is True and answer.json()["name"] == "test-admin"


def test_a_session_reads_like_its_key_and_changes_only_with_its_csrf_token_from_its_own_origin(gateway):
    client, session = signed_in(gateway, gateway.admin_key)
    with closing(client):
        listed = client.get("/admin/keys")
        no_token = client.post("/admin/keys", json={"name": "console-no-token"})
        wrong_token = client.post("/admin/keys", json={"name": "console-bad"}, headers={"X-CSRF-Token": "x" * 24})
        other_site = client.post(
            "/admin/keys",
            json={"name": "console-other-site"},
            headers={"X-CSRF-Token": session["csrf"], "Origin": "https://evil.example"},
        )
        made = client.post(
            "/admin/keys",
            json={"name": "console-made"},
            headers={"X-CSRF-Token": session["csrf"], "Origin": gateway.url},
        )
        names = [key["name"] for key in client.get("/admin/keys").json()["data"]]

    assert listed.status_code == 200
    for refused in (no_token, wrong_token, other_site):
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "csrf_failed"
    assert made.status_code == 201
    assert "console-made" in names and not {"console-no-token", "console-bad", "console-other-site"} & set(names)


def test_a_wrong_key_gets_no_session_and_a_forged_cookie_is_no_key(gateway):
    with httpx.Client(base_url=gateway.url) as client:
        wrong = client.post(SESSION, json={"key": "sk-not-a-key-at-all"})
        forged = client.get("/admin/keys", headers={"Cookie": "vllm_console=key_x.9999999999.abc.def"})
        who = client.get(SESSION, headers={"Cookie": "vllm_console=key_x.9999999999.abc.def"})

    assert wrong.status_code == 401 and "set-cookie" not in wrong.headers
    assert wrong.json()["error"]["code"] == "invalid_api_key"
    assert forged.status_code == 401 and forged.json()["error"]["code"] == "invalid_session"
    assert who.status_code == 401


def test_a_user_keys_session_reaches_its_own_usage_and_the_models_but_no_admin_endpoint(gateway):
    client, session = signed_in(gateway, gateway.key)
    headers = {"X-CSRF-Token": session["csrf"]}
    with closing(client):
        admin = client.get("/admin/keys")
        usage = client.get("/v1/usage", params={"start_time": 0})
        chat = client.post("/v1/chat/completions", json=chat_body("sim", max_tokens=3), headers=headers)
        unsent = client.post("/v1/chat/completions", json=chat_body("sim", max_tokens=3))

    assert session["admin"] is False
    assert admin.status_code == 403 and admin.json()["error"]["code"] == "admin_required"
    assert usage.status_code == 200
    assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] == 3
    assert unsent.status_code == 403  # the playground's request carries the token; another site's cannot


def test_signing_out_ends_the_session_for_the_cookie_it_had(gateway):
    client, session = signed_in(gateway, gateway.admin_key)
    cookie = client.cookies["vllm_console"]
    with closing(client):
        before = client.get(SESSION)
        out = client.delete(SESSION, headers={"X-CSRF-Token": session["csrf"]})
    with httpx.Client(base_url=gateway.url, headers={"Cookie": f"vllm_console={cookie}"}) as replay:
        after = replay.get("/admin/keys")

    assert before.status_code == 200
    assert out.status_code == 204 and 'vllm_console=""' in out.headers["set-cookie"]
    assert after.status_code == 401


def test_rotating_or_revoking_the_key_ends_its_sessions(gateway):
    made = gateway.create_key("--name", "console-rotated", "--admin")
    gateway.wait_for_key(str(made["key"]))
    client, _ = signed_in(gateway, str(made["key"]))
    with closing(client):
        before = client.get("/admin/keys").status_code
        gateway.cli("keys", "rotate", "console-rotated", "--json")
        gateway.wait_until(lambda _: client.get("/admin/keys").status_code == 401, timeout=10)

    assert before == 200


def test_the_key_never_reaches_the_log_and_the_secret_is_the_owners_only(gateway):
    client, _ = signed_in(gateway, gateway.admin_key)
    with closing(client):
        client.get("/admin/keys")
    log = gateway.log_text(settle=1.0)
    secret = Path(gateway.env["GATEWAY_KEY_FILE"]).parent / "console_secret"

    assert "console sign-in by key" in log
    assert gateway.admin_key not in log and gateway.key not in log
    assert secret.stat().st_mode & 0o777 == 0o600


def test_sign_in_attempts_are_limited_per_address(tmp_path, simulator):
    env = {"GATEWAY_CONSOLE_SIGN_IN_LIMIT": "3/minute"}
    with Gateway.start(tmp_path, [Backend("sim", simulator.base_url)], env=env) as gateway:
        with httpx.Client(base_url=gateway.url) as client:
            wrong = [client.post(SESSION, json={"key": f"sk-guess-{n}"}).status_code for n in range(3)]
            right_but_late = client.post(SESSION, json={"key": gateway.admin_key})

    assert wrong == [401, 401, 401]
    assert right_but_late.status_code == 429 and "retry-after" in right_but_late.headers
    assert "set-cookie" not in right_but_late.headers


def test_a_session_outlives_a_restart_of_the_gateway(tmp_path, simulator):
    backend = Backend("sim", simulator.base_url)
    with Gateway.start(tmp_path, [backend]) as first:
        kept = str(first.create_key("--name", "console-kept", "--admin")["key"])
        first.wait_for_key(kept)
        client, _ = signed_in(first, kept)
        client.close()
    with Gateway.start(tmp_path, [backend]) as second:
        with httpx.Client(base_url=second.url, cookies=client.cookies) as replay:
            answer = replay.get("/admin/keys")

    assert answer.status_code == 200  # signed by the secret kept beside the key file


def test_with_the_console_off_its_pages_are_gone_and_a_cookie_is_no_key(tmp_path, simulator):
    with Gateway.start(tmp_path, [Backend("sim", simulator.base_url)], env={"GATEWAY_CONSOLE": "false"}) as gateway:
        with httpx.Client(base_url=gateway.url) as client:
            sign_in = client.post(SESSION, json={"key": gateway.admin_key})
            page = client.get("/console/", headers={"Authorization": f"Bearer {gateway.admin_key}"})
            cookie = client.get("/admin/keys", headers={"Cookie": "vllm_console=a.1.b.c"})

    assert sign_in.status_code == 401 and "set-cookie" not in sign_in.headers  # an endpoint like any other
    assert page.status_code == 404
    assert cookie.status_code == 401 and cookie.json()["error"]["code"] == "invalid_api_key"


def test_the_console_page_without_a_session_sends_the_browser_to_sign_in(gateway):
    with httpx.Client(base_url=gateway.url) as client:
        bare = client.get("/console")
        page = client.get("/console/")
        sign_in = client.get("/console/sign-in")
        traversal = client.get("/console/static/..%2F..%2Fkeystore.py")
        unknown = client.get("/console/static/nothing.js")

    assert bare.status_code == 308 and bare.headers["location"] == "/console/"
    assert page.status_code == 303 and page.headers["location"] == "/console/sign-in"
    assert sign_in.status_code == 200 and "<form" in sign_in.text
    policy = sign_in.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy and "unsafe-inline" not in policy
    assert sign_in.headers["x-frame-options"] == "DENY"
    assert traversal.status_code == 404 and unknown.status_code == 404


def test_the_console_page_with_a_session_is_served_and_holds_no_key(gateway):
    client, _ = signed_in(gateway, gateway.admin_key)
    with closing(client):
        page = client.get("/console/")
        scripts = [client.get(f"/console/static/{name}") for name in ("console.js", "api.js", "console.css")]

    assert page.status_code == 200 and "<html" in page.text.lower()
    assert "content-security-policy" in page.headers
    assert all(script.status_code == 200 for script in scripts)
    assert gateway.admin_key not in page.text and not any(gateway.admin_key in s.text for s in scripts)


def test_behind_a_tls_proxy_the_setting_makes_the_cookie_secure(tmp_path, simulator):
    env = {"GATEWAY_CONSOLE_SECURE_COOKIE": "true"}
    with Gateway.start(tmp_path, [Backend("sim", simulator.base_url)], env=env) as gateway:
        with httpx.Client(base_url=gateway.url) as client:
            answer = client.post(SESSION, json={"key": gateway.admin_key})

    assert answer.status_code == 200
    assert "secure" in [part.strip().lower() for part in answer.headers["set-cookie"].split(";")]
