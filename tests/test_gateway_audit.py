"""The audit trail: every key created, changed, rotated, revoked or restored, over the API (which
admin key, from which address) or with the CLI (which user), as JSON lines and over
`GET /admin/audit`; never a secret."""

from __future__ import annotations

import getpass
import json

from tests.support.gateway import Backend, Gateway


def test_key_changes_over_the_api_are_in_the_trail_with_the_admin_and_address_and_no_secret(tmp_path, simulator):
    with Gateway.start(tmp_path, [Backend("sim", simulator.base_url)]) as gateway:
        with gateway.http(gateway.admin_key) as admin:
            made = admin.post("/admin/keys", json={"name": "audited", "rate_limit": "9/minute"}).json()
            admin.patch("/admin/keys/audited", json={"disabled": True, "models": ["sim"]})
            rotated = admin.post("/admin/keys/audited/rotate", json={"grace_seconds": 60}).json()
            admin.delete("/admin/keys/audited")
            trail = admin.get("/admin/audit", params={"key": "audited"}).json()
            only_rotations = admin.get("/admin/audit", params={"action": "rotate"}).json()
            limited = admin.get("/admin/audit", params={"limit": 2}).json()
            bad = admin.get("/admin/audit", params={"since": "yesterday"})
            me = next(key for key in admin.get("/admin/keys").json()["data"] if key["name"] == "test-admin")
        with gateway.http(gateway.key) as user:
            forbidden = user.get("/admin/audit")

        events = trail["data"]
        assert [event["action"] for event in events] == ["create", "update", "rotate", "revoke"]
        assert {event["key_id"] for event in events} == {made["id"]}
        assert {(event["via"], event["admin_key_id"], event["admin_key_name"]) for event in events} == {
            ("api", me["id"], "test-admin")
        }
        assert {event["address"] for event in events} == {"127.0.0.1"}
        assert events[0]["changes"] == {"name": "audited", "rate_limit": "9/minute"}
        assert events[1]["changes"] == {"disabled": True, "models": ["sim"]}
        assert events[2]["grace_seconds"] == 60
        assert [event["action"] for event in only_rotations["data"]] == ["rotate"]
        assert len(limited["data"]) == 2 and limited["has_more"] is True
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "since"
        assert forbidden.status_code == 403
        text = (tmp_path / "logs" / "audit.jsonl").read_text()
        for secret in (made["key"], rotated["key"], gateway.admin_key):
            assert secret not in text
        assert "sha256:" not in text


def test_key_changes_with_the_cli_are_in_the_trail_with_the_user(gateway):
    gateway.cli("keys", "create", "--name", "cli-audited", "--weight", "2")
    gateway.cli("keys", "update", "cli-audited", "--rate-limit", "5/minute")
    gateway.cli("keys", "rotate", "cli-audited")
    gateway.cli("keys", "revoke", "cli-audited")
    with gateway.http(gateway.admin_key) as admin:
        events = admin.get("/admin/audit", params={"key": "cli-audited"}).json()["data"]
    assert [event["action"] for event in events] == ["create", "update", "rotate", "revoke"]
    assert {(event["via"], event["user"]) for event in events} == {("cli", getpass.getuser())}
    assert events[0]["changes"]["weight"] == 2.0 and events[1]["changes"] == {"rate_limit": "5/minute"}
    lines = (gateway.workdir / "logs" / "audit.jsonl").read_text().splitlines()
    assert all(json.loads(line)["time"].endswith("Z") for line in lines)
