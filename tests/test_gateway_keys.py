"""Key administration over the API and the CLI, and the safety of the key file itself."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time

import pytest

from tests.support.chat import chat_body
from tests.support.gateway import Backend, Gateway, gateway_env, run_cli
from tests.support.processes import REPO_ROOT, free_port, start_process, wait_until


def test_admin_lists_keys_without_any_secret_or_hash(gateway):
    with gateway.http(gateway.admin_key) as client:
        listing = client.get("/admin/keys").json()["data"]
    names = {entry["name"] for entry in listing}
    assert {"test-admin", "test-user"} <= names
    for entry in listing:
        assert {
            "id",
            "name",
            "prefix",
            "admin",
            "models",
            "rate_limit",
            "created_at",
            "last_used_at",
            "disabled",
        } <= set(entry)
        assert "hash" not in entry and "key" not in entry
    assert gateway.key not in json.dumps(listing) and gateway.admin_key not in json.dumps(listing)


def test_non_admin_key_gets_403_on_every_admin_endpoint(gateway):
    with gateway.http(gateway.key) as client:
        for method, path in [
            ("GET", "/admin/keys"),
            ("POST", "/admin/keys"),
            ("DELETE", "/admin/keys/x"),
            ("PATCH", "/admin/keys/x"),
        ]:
            response = client.request(method, path, json={"name": "x"})
            assert response.status_code == 403, (method, path)
            assert response.json()["error"]["type"] == "permission_error"


def test_key_created_over_the_api_is_shown_once_and_works(gateway):
    with gateway.http(gateway.admin_key) as admin:
        created = admin.post("/admin/keys", json={"name": "api-made", "models": ["sim"], "rate_limit": "5/minute"})
        assert created.status_code == 201
        key = created.json()["key"]
        shown_again = admin.get(f"/admin/keys/{created.json()['id']}").json()
    assert "key" not in shown_again and shown_again["rate_limit"] == "5/minute"
    with gateway.http(key) as client:
        reply = client.post("/v1/chat/completions", json=chat_body("sim", max_tokens=1))
    assert reply.status_code == 200
    assert reply.headers["x-ratelimit-limit-requests"] == "5"


def test_key_updated_and_revoked_over_the_api(gateway):
    with gateway.http(gateway.admin_key) as admin:
        created = admin.post("/admin/keys", json={"name": "short-lived"}).json()
        patched = admin.patch(f"/admin/keys/{created['id']}", json={"models": ["sim-alias"], "disabled": True})
        assert patched.status_code == 200
        assert patched.json()["models"] == ["sim-alias"] and patched.json()["disabled"] is True
        with gateway.http(created["key"]) as client:
            assert client.get("/v1/models").status_code == 401
        assert admin.delete(f"/admin/keys/{created['id']}").json()["deleted"] is True
        assert admin.delete(f"/admin/keys/{created['id']}").status_code == 404
        assert created["id"] not in {k["id"] for k in admin.get("/admin/keys").json()["data"]}


def test_invalid_admin_requests_get_400_in_openai_shape(gateway):
    with gateway.http(gateway.admin_key) as admin:
        for body in ({"name": ""}, {"name": "x", "rate_limit": "lots"}, {"name": "x", "surprise": 1}, {}):
            response = admin.post("/admin/keys", json=body)
            assert response.status_code == 400, body
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        (
            {"name": "x", "rate_limit": "10/minut"},
            "rate_limit",
            '`rate_limit` does not take "10/minut": it takes requests per window, such as "100/minute" or '
            '"10/second;1000/hour" (windows: second, minute, hour, day).',
        ),
        ({"name": "x", "weight": 0}, "weight", "`weight` does not take 0: it takes a number from 0.01 to 1000."),
        (
            {"name": "x", "max_parallel_requests": 0},
            "max_parallel_requests",
            "`max_parallel_requests` does not take 0: it takes a whole number from 1.",
        ),
        ({"name": ""}, "name", '`name` does not take "": it takes a name of 1 to 200 characters.'),
        ({"name": "x", "admin": "maybe"}, "admin", '`admin` does not take "maybe": it takes true or false.'),
    ],
)
def test_a_bad_key_field_is_refused_in_one_sentence_naming_it_what_was_given_and_what_it_takes(
    gateway, body, param, message
):
    with gateway.http(gateway.admin_key) as admin:
        user = next(key for key in admin.get("/admin/keys").json()["data"] if key["name"] == "test-user")
        created = admin.post("/admin/keys", json=body)
        changed = admin.patch(f"/admin/keys/{user['id']}", json=body)  # nothing of it is saved
        assert admin.get(f"/admin/keys/{user['id']}").json() == user
    for response in (created, changed):
        assert response.status_code == 400
        assert response.json() == {
            "error": {"message": message, "type": "invalid_request_error", "param": param, "code": "invalid_request"}
        }


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--rate-limit", "10/minut", '`rate_limit` does not take "10/minut"'),
        ("--token-limit", "lots", '`token_limit` does not take "lots"'),
        ("--max-parallel-requests", "0", "`max_parallel_requests` does not take"),
    ],
)
def test_the_cli_refuses_a_bad_key_field_in_one_sentence_too(gateway, option, value, message):
    for command in (["create", "--name", "x"], ["update", "test-user"]):
        refused = gateway.cli("keys", *command, option, value, check=False)
        assert refused.returncode == 1
        assert refused.stderr.startswith(f"vllm_api_server: {message}") and refused.stderr.count("\n") == 1
        assert ": it takes " in refused.stderr and "pydantic" not in refused.stderr


def test_the_last_admin_key_cannot_be_revoked(tmp_path, simulator):
    with (
        Gateway.start(tmp_path, [Backend("sim", simulator.base_url)]) as gateway,
        gateway.http(gateway.admin_key) as admin,
    ):
        admin_id = next(k["id"] for k in admin.get("/admin/keys").json()["data"] if k["admin"])
        refused = admin.delete(f"/admin/keys/{admin_id}")
        assert refused.status_code == 409
        assert admin.get("/admin/keys").status_code == 200


def test_key_file_holds_only_hashes_with_mode_0600(gateway):
    path = gateway.workdir / "api_keys.json"
    text = path.read_text()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert gateway.key not in text and gateway.admin_key not in text
    for record in json.loads(text)["keys"]:
        assert record["hash"].startswith("sha256:") and len(record["hash"]) == 7 + 64


def test_cli_creates_lists_and_revokes_keys(gateway):
    created = gateway.create_key("--name", "cli-made")
    gateway.wait_for_key(created["key"])
    listing = gateway.cli("keys", "list").stdout
    assert created["id"] in listing and created["key"] not in listing
    assert gateway.cli("keys", "revoke", created["id"]).returncode == 0
    assert gateway.cli("keys", "revoke", created["id"], check=False).returncode == 1
    with gateway.http(created["key"]) as client:
        import time

        deadline = time.monotonic() + 5
        while client.get("/v1/models").status_code != 401:
            assert time.monotonic() < deadline, "revoked key still accepted after 5 s"
            time.sleep(0.05)


def test_a_key_made_with_the_cli_works_on_its_first_request(gateway):
    for number in range(5):  # the file watcher looks once a second: each try is well inside that
        created = gateway.create_key("--name", f"at-once-{number}")
        with gateway.http(str(created["key"])) as client:
            assert client.get("/v1/models").status_code == 200


def test_a_key_made_over_the_api_works_at_once_on_every_worker(tmp_path, simulator, redis_url):
    backend = Backend("sim", simulator.base_url, path="/models/sim")
    env = {"GATEWAY_WORKERS": "2", "GATEWAY_RATE_LIMIT_STORAGE": redis_url}
    with Gateway.start(tmp_path / "gw", [backend], env=env) as two_workers:
        for number in range(5):
            with two_workers.http(two_workers.admin_key) as admin:
                made = admin.post("/admin/keys", json={"name": f"api-{number}"}).json()
            # A new connection each time, which either worker may take.
            statuses = []
            for _ in range(4):
                with two_workers.http(made["key"]) as client:
                    statuses.append(client.get("/v1/models").status_code)
            assert statuses == [200] * 4


def test_concurrent_key_creation_from_many_processes_loses_nothing(tmp_path):
    env = {**os.environ, **gateway_env(tmp_path, free_port())}
    run_cli(env, "keys", "init")
    script = "from vllm_gateway.cli import main; import sys; sys.exit(main(sys.argv[1:]))"

    def create(index: int) -> None:
        subprocess.run(
            [sys.executable, "-c", script, "keys", "create", "--name", f"k{index}"],
            env=env,
            cwd=REPO_ROOT,
            check=True,
            capture_output=True,
        )

    threads = [threading.Thread(target=create, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    names = {record["name"] for record in json.loads((tmp_path / "api_keys.json").read_text())["keys"]}
    assert names == {"admin"} | {f"k{i}" for i in range(12)}


def test_first_start_prints_an_admin_key_once_and_stores_its_hash(tmp_path):
    env = {**os.environ, **gateway_env(tmp_path, free_port())}
    first = run_cli(env, "keys", "init")
    key = next(word for word in first.split() if word.startswith("sk-"))
    second = subprocess.run(
        [sys.executable, "vllm_api_server.py", "keys", "init"], env=env, cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert "sk-" not in second.stdout + second.stderr
    stored = (tmp_path / "api_keys.json").read_text()
    assert key not in stored and json.loads(stored)["keys"][0]["admin"] is True


@pytest.mark.parametrize("content", [b"{not json", b'{"keys": [{"id": 1}]}', b""])
def test_corrupt_key_file_stops_the_gateway_and_is_left_untouched(tmp_path, content):
    env = gateway_env(tmp_path, free_port())
    (tmp_path / "models.sh").write_text("")
    key_file = tmp_path / "api_keys.json"
    key_file.write_bytes(content)
    handle = start_process(
        [sys.executable, str(REPO_ROOT / "vllm_api_server.py"), "serve"], env=env, log_path=tmp_path / "out.log"
    )
    assert handle.popen.wait(timeout=30) != 0
    assert "api_keys.json is not valid" in handle.log() and "will not overwrite" in handle.log()
    assert key_file.read_bytes() == content


def test_key_file_broken_while_running_keeps_the_last_good_keys(tmp_path, simulator):
    with Gateway.start(tmp_path, [Backend("sim", simulator.base_url)]) as gateway:
        key_file = tmp_path / "api_keys.json"
        key_file.write_text("{broken")
        import time

        time.sleep(1.2)
        with gateway.http(gateway.key) as client:
            assert client.get("/v1/models").status_code == 200
        with gateway.http(gateway.admin_key) as admin:
            assert admin.post("/admin/keys", json={"name": "x"}).status_code == 503
        assert key_file.read_text() == "{broken"
        assert "still using the last good copy" in gateway.log_text()


def test_a_broken_key_file_shows_in_health_and_metrics_is_logged_once_and_its_last_good_copy_restores(
    tmp_path, simulator
):
    with Gateway.start(tmp_path, [Backend("sim", simulator.base_url)]) as gateway:
        key_file = tmp_path / "api_keys.json"

        def ids(path):
            return sorted(key["id"] for key in json.loads(path.read_text())["keys"])

        good = ids(key_file)
        assert ids(tmp_path / "api_keys.json.last-good") == good  # kept since the start
        assert stat.S_IMODE(os.stat(tmp_path / "api_keys.json.last-good").st_mode) == 0o600
        assert gateway.health()["key_file"] == "ok"
        key_file.write_text("{broken")
        gateway.wait_until(lambda health: health["key_file"] == "invalid", timeout=5)
        public = gateway.health()
        assert public["status"] == "degraded" and "key_file_problem" not in public  # no path without a key
        detailed = gateway.health(gateway.key)
        assert "is not valid" in detailed["key_file_problem"] and "keys restore" in detailed["key_file_problem"]
        with gateway.http() as client:
            assert "vllm_gateway_key_file_ok 0" in client.get("/metrics").text
        time.sleep(3)  # six looks of the watcher at a file that stays broken
        assert gateway.log_text().count("is not valid") == 1
        assert "from a backup" not in gateway.log_text()

        restored = gateway.cli("keys", "restore")
        assert "restored" in restored.stdout and ids(key_file) == good
        gateway.wait_until(lambda health: health["key_file"] == "ok" and health["status"] == "ok", timeout=5)
        with gateway.http() as client:
            assert "vllm_gateway_key_file_ok 1" in client.get("/metrics").text
        again = gateway.cli("keys", "restore", check=False)
        assert again.returncode == 1 and "reads well: nothing to restore" in again.stderr
        key_file.unlink()  # every key is refused now: /health without one says so
        wait_until(lambda: gateway.health()["key_file"] == "invalid", timeout=5)
        assert gateway.cli("keys", "restore").returncode == 0 and ids(key_file) == good
        with gateway.http(gateway.key) as client:
            assert client.get("/v1/models").status_code == 200


def test_keys_list_shows_a_key_used_seconds_ago(gateway):
    new = gateway.create_key("--name", "just-used")
    gateway.wait_for_key(new["key"])  # a request with the key: it is used now
    used_before = time.time()

    def last_used() -> float | None:
        listing = json.loads(gateway.cli("keys", "list", "--json").stdout)
        return next(entry["last_used_at"] for entry in listing if entry["id"] == new["id"])

    deadline = time.monotonic() + 10
    while last_used() is None:
        assert time.monotonic() < deadline, "keys list still says the key was never used"
        time.sleep(0.5)
    assert last_used() <= used_before + 1
    table = gateway.cli("keys", "list").stdout
    header, *rows = table.splitlines()
    row = next(line for line in rows if line.startswith(new["id"]))
    column = header.index("LAST USED")
    assert not row[column:].startswith("never")


def test_the_key_file_is_rewritten_for_a_first_use_and_then_once_a_minute_at_most(tmp_path):
    from vllm_gateway.keystore import LAST_USED_RESOLUTION_SECONDS, KeyStore

    store = KeyStore(tmp_path / "api_keys.json")
    store.load()
    _, secret = store.create("busy")
    assert not store.usage_due()
    store.authenticate(secret)
    assert store.usage_due()  # a first use goes to the file at the next look
    store.flush_usage()
    stamp = (tmp_path / "api_keys.json").stat().st_mtime_ns
    store.authenticate(secret)
    assert not store.usage_due()  # used again within the minute: the file says enough
    record = store.records()[0]
    store._used[record.id] = record.last_used_at + LAST_USED_RESOLUTION_SECONDS  # a minute later
    assert store.usage_due()
    assert (tmp_path / "api_keys.json").stat().st_mtime_ns == stamp


def test_a_key_name_is_unique_and_the_api_takes_names_as_the_cli_does(gateway):
    with gateway.http(gateway.admin_key) as admin:
        made = admin.post("/admin/keys", json={"name": "unique-carol"}).json()
        again = admin.post("/admin/keys", json={"name": "unique-carol"})
        other = admin.post("/admin/keys", json={"name": "unique-dave"}).json()
        renamed = admin.patch("/admin/keys/unique-dave", json={"name": "unique-carol"})
        by_name = admin.get("/admin/keys/unique-carol")
        changed = admin.patch("/admin/keys/unique-carol", json={"rate_limit": "7/minute"})
        missing = admin.get("/admin/keys/nobody-here")
    assert again.status_code == 400
    assert again.json()["error"]["message"] == (
        f"a key named unique-carol exists already ({made['id']}): choose another name."
    )
    assert again.json()["error"]["param"] == "name"
    assert renamed.status_code == 400 and other["id"] in str(admin_keys(gateway))
    assert by_name.status_code == 200 and by_name.json()["id"] == made["id"]
    assert changed.status_code == 200 and changed.json()["rate_limit"] == "7/minute"
    assert missing.status_code == 404
    refused = gateway.cli("keys", "create", "--name", "unique-carol", check=False)
    assert refused.returncode == 1 and "a key named unique-carol exists already" in refused.stderr
    with gateway.http(gateway.admin_key) as admin:
        assert admin.delete("/admin/keys/unique-dave").status_code == 200


def admin_keys(gateway) -> list[dict]:
    with gateway.http(gateway.admin_key) as admin:
        return admin.get("/admin/keys").json()["data"]


def test_two_keys_of_one_name_in_an_old_key_file_are_reported_and_must_be_named_by_id(tmp_path, simulator):
    with Gateway.start(tmp_path, [Backend("sim", simulator.base_url)]) as gateway:
        path = gateway.workdir / "api_keys.json"
        content = json.loads(path.read_text())
        twin = next(key for key in content["keys"] if key["name"] == "test-user")
        content["keys"].append({**twin, "id": "key_000000000001", "hash": "sha256:" + "0" * 64})
        path.write_text(json.dumps(content))
        listing = gateway.cli("keys", "list")
        assert "several keys are named test-user" in listing.stderr
        with gateway.http(gateway.admin_key) as admin:
            wait_until(lambda: admin.get("/admin/keys/test-user").status_code == 409, timeout=5)
            answer = admin.get("/admin/keys/test-user").json()["error"]
        assert answer["code"] == "ambiguous_key_name" and "key_000000000001" in answer["message"]


def test_a_keys_models_must_be_models_or_aliases_of_the_config(gateway):
    with gateway.http(gateway.admin_key) as admin:
        typo = admin.post("/admin/keys", json={"name": "typo-models", "models": ["sim", "NoSuchModel"]})
        alias = admin.post("/admin/keys", json={"name": "alias-models", "models": ["sim-alias"]})
        changed = admin.patch("/admin/keys/alias-models", json={"models": ["sim", "Simm"]})
    assert typo.status_code == 400
    assert typo.json()["error"]["param"] == "models"
    assert typo.json()["error"]["message"] == (
        "`models` names NoSuchModel, neither a model nor an alias of the model config; it has sim, sim-alias."
    )
    assert alias.status_code == 201
    assert changed.status_code == 400 and "names Simm" in changed.json()["error"]["message"]
    cli = gateway.cli("keys", "update", "alias-models", "--models", "sim,Qwen3-14B-typo", check=False)
    assert cli.returncode == 1 and "`models` names Qwen3-14B-typo" in cli.stderr
    assert gateway.cli("keys", "update", "alias-models", "--models", "sim").returncode == 0
