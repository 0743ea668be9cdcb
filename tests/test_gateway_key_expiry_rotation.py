"""Keys that expire and rotate: an expired key gets 401 key_expired; a rotated key keeps its id,
limits and usage under a new secret, and its old secret works only for the grace period given."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

from tests.support.processes import wait_until


def status_with(gateway, key: str) -> int:
    with gateway.http(key) as client:
        return client.get("/v1/models").status_code


def test_a_key_stops_working_when_it_expires_with_a_401_saying_so(gateway):
    soon = time.time() + 2
    with gateway.http(gateway.admin_key) as admin:
        made = admin.post("/admin/keys", json={"name": "expiring", "expires_at": soon}).json()
        iso = admin.post("/admin/keys", json={"name": "expiring-iso", "expires_at": "2031-01-31T00:00:00Z"})
        past = admin.post("/admin/keys", json={"name": "expired-already", "expires_at": "2020-01-01"})
    assert made["expires_at"] == soon
    assert iso.status_code == 201 and iso.json()["expires_at"] == datetime(2031, 1, 31, tzinfo=UTC).timestamp()
    assert past.status_code == 400 and past.json()["error"]["param"] == "expires_at"
    assert "in the past" in past.json()["error"]["message"]
    assert status_with(gateway, made["key"]) == 200

    wait_until(lambda: status_with(gateway, made["key"]) == 401, timeout=10)
    with gateway.http(made["key"]) as client:
        error = client.get("/v1/models").json()["error"]
    expected_at = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(soon))
    assert error == {
        "message": f"This API key expired at {expected_at}.",
        "type": "invalid_request_error",
        "param": None,
        "code": "key_expired",
    }


def test_an_expiry_that_is_no_time_is_refused_and_digits_are_unix_seconds(gateway):
    refused = {}
    with gateway.http(gateway.admin_key) as admin:
        for given in ("nan", "inf", "1e12", -5, float("inf"), 1e300, "99999999999999", "2031-13-01", True):
            body = json.dumps({"name": f"no-time-{len(refused)}", "expires_at": given}, allow_nan=True)
            answer = admin.post("/admin/keys", content=body, headers={"content-type": "application/json"})
            refused[repr(given)] = (answer.status_code, answer.json().get("error", {}).get("param"))
        digits = admin.post("/admin/keys", json={"name": "digits-are-seconds", "expires_at": " 1956528000 "})
    cli = gateway.cli("keys", "create", "--name", "endless", "--expires", "inf", check=False)

    assert set(refused.values()) == {(400, "expires_at")}, refused
    assert digits.status_code == 201 and digits.json()["expires_at"] == 1956528000.0
    assert cli.returncode == 1 and '`expires_at` does not take "inf"' in cli.stderr


def test_an_audit_query_bound_that_is_no_time_is_refused(gateway):
    with gateway.http(gateway.admin_key) as admin:
        answers = [admin.get("/admin/audit", params={"since": bound}) for bound in ("nan", "1e9", "-1")]
        digits = admin.get("/admin/audit", params={"since": "0", "until": "4102444800"})
    assert [answer.status_code for answer in answers] == [400, 400, 400]
    assert {answer.json()["error"]["param"] for answer in answers} == {"since"}
    assert digits.status_code == 200


def test_the_cli_sets_an_expiry_as_a_span_or_a_date_lists_it_and_lifts_it(gateway):
    made = gateway.create_key("--name", "month", "--expires", "30d")
    assert abs(float(made["expires_at"]) - (time.time() + 30 * 86400)) < 60
    gateway.cli("keys", "update", "month", "--expires", "2031-05-01")
    row = next(line for line in gateway.cli("keys", "list").stdout.splitlines() if " month " in line)
    assert "2031-05-01 00:00 UTC" in row
    gateway.cli("keys", "update", "month", "--expires", "never")
    row = next(line for line in gateway.cli("keys", "list").stdout.splitlines() if " month " in line)
    assert "UTC" not in row
    refused = gateway.cli("keys", "update", "month", "--expires", "soon", check=False)
    assert refused.returncode == 1 and '`expires_at` does not take "soon"' in refused.stderr
    assert status_with(gateway, str(made["key"])) == 200


def test_a_rotated_key_keeps_its_id_and_limits_and_its_old_secret_works_for_the_grace_only(gateway):
    made = gateway.create_key("--name", "rotating", "--rate-limit", "500/minute")
    old = str(made["key"])
    assert status_with(gateway, old) == 200
    rotated = gateway.cli("keys", "rotate", "rotating", "--grace", "3s", "--json")
    new = json.loads(rotated.stdout)
    assert new["id"] == made["id"] and new["rate_limit"] == "500/minute" and new["key"] != old
    assert "previous_hash" not in new and "hash" not in new
    assert status_with(gateway, new["key"]) == 200
    assert status_with(gateway, old) == 200  # within its grace
    wait_until(lambda: status_with(gateway, old) == 401, timeout=10)
    assert status_with(gateway, new["key"]) == 200
    key_file = (gateway.workdir / "api_keys.json").read_text()
    assert old not in key_file and new["key"] not in key_file  # hashes only


def test_a_key_rotated_over_the_api_without_grace_loses_its_old_secret_at_once(gateway):
    with gateway.http(gateway.admin_key) as admin:
        made = admin.post("/admin/keys", json={"name": "rotate-api"}).json()
        rotated = admin.post("/admin/keys/rotate-api/rotate")
        bad = admin.post("/admin/keys/rotate-api/rotate", json={"grace_seconds": -1})
        missing = admin.post("/admin/keys/nobody/rotate")
    assert rotated.status_code == 200 and rotated.json()["id"] == made["id"]
    assert status_with(gateway, made["key"]) == 401
    assert status_with(gateway, rotated.json()["key"]) == 200
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "grace_seconds"
    assert missing.status_code == 404
