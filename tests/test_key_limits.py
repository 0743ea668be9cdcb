"""A key's limits in force (key_limits.py): its own where its record sets them, else the settings', worked
out once per record and again when the key file brings a new one. Plain data: no process needed."""

from __future__ import annotations

from pathlib import Path

from vllm_gateway.key_limits import KeyLimits, KeyLimitsCache, limits_of
from vllm_gateway.keystore import KeyRecord, KeyStore
from vllm_gateway.settings import Settings

SETTINGS = Settings(rate_limit="30/minute", token_limit="5000/hour", max_parallel_requests=7)


def record(key_id: str = "key_a", **limits: object) -> KeyRecord:
    return KeyRecord.model_validate(
        {"id": key_id, "name": "a", "prefix": "sk-", "hash": "-", "created_at": 0.0, **limits}
    )


def test_a_key_without_limits_of_its_own_gets_the_settings_and_a_weight_of_one() -> None:
    assert limits_of(record(), SETTINGS) == KeyLimits("key_a", "30/minute", "5000/hour", 7, 1.0)


def test_a_keys_own_limits_win_over_the_settings() -> None:
    own = record(rate_limit="2/second", token_limit="10/minute", max_parallel_requests=3, weight=2.5)
    assert limits_of(own, SETTINGS) == KeyLimits("key_a", "2/second", "10/minute", 3, 2.5)


def test_without_a_token_limit_anywhere_a_key_has_none() -> None:
    assert limits_of(record(), Settings(token_limit=None)).tokens is None


def test_a_keys_limits_are_worked_out_once_per_record() -> None:
    cache = KeyLimitsCache(SETTINGS)
    key = record()
    assert cache.of(key) is cache.of(key)


def test_a_changed_key_gets_its_new_limits_and_revoked_keys_are_forgotten(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "api_keys.json")
    changed, secret = store.create("changed")
    revoked, revoked_secret = store.create("revoked")
    first, other = store.authenticate(secret), store.authenticate(revoked_secret)
    assert first is not None and other is not None
    cache = KeyLimitsCache(SETTINGS)
    before = cache.of(first)
    cache.of(other)

    # Every change writes the key file and installs what it holds: every record is new.
    store.update(changed.id, {"rate_limit": "1/second", "max_parallel_requests": 2})
    store.revoke(revoked.id)
    now = store.authenticate(secret)
    assert now is not None and store.authenticate(revoked_secret) is None
    after = cache.of(now)

    assert (before.rate, before.parallel) == ("30/minute", 7)
    assert (after.rate, after.parallel) == ("1/second", 2)
    assert set(cache.by_id) == {changed.id}
