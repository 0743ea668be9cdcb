"""Settings: which store each part counts in (GATEWAY_REDIS_URL and GATEWAY_RATE_LIMIT_STORAGE), and
what ServeSettings refuses that the other commands' Settings take."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from vllm_gateway.settings import ServeSettings, Settings, cannot_serve_reasons

REDIS = "redis://127.0.0.1:6379/2"
OTHER_REDIS = "redis://127.0.0.1:6379/1"


@pytest.fixture(autouse=True)
def _no_gateway_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only what a test passes: none of the GATEWAY_ variables of the shell running the tests."""
    import os

    for name in os.environ:
        if name.startswith("GATEWAY_"):
            monkeypatch.delenv(name)


def test_redis_url_alone_holds_admission_and_the_rate_limits() -> None:
    settings = Settings(redis_url=REDIS)
    assert settings.redis_url == REDIS
    assert settings.rate_limit_storage == REDIS
    assert settings.shares_rate_limit_store


def test_a_rate_limit_storage_that_is_set_keeps_the_rate_limits_and_admission_uses_redis_url() -> None:
    settings = Settings(redis_url=REDIS, rate_limit_storage=OTHER_REDIS)
    assert (settings.redis_url, settings.rate_limit_storage) == (REDIS, OTHER_REDIS)
    in_memory = Settings(redis_url=REDIS, rate_limit_storage="memory://")
    assert (in_memory.redis_url, in_memory.rate_limit_storage) == (REDIS, "memory://")


@pytest.mark.parametrize("storage", [REDIS, "async+" + REDIS])
def test_a_redis_rate_limit_storage_alone_holds_admission_too(storage: str) -> None:
    settings = Settings(rate_limit_storage=storage)
    assert settings.redis_url == REDIS
    assert settings.rate_limit_storage == storage


def test_without_redis_admission_has_none_and_the_rate_limits_count_in_memory() -> None:
    settings = Settings(redis_url="")
    assert settings.redis_url is None
    assert settings.rate_limit_storage == "memory://"
    assert Settings(rate_limit_storage="memcached://127.0.0.1:11211").redis_url is None


@pytest.mark.parametrize("url", ["http://127.0.0.1:6379", "memory://", "127.0.0.1:6379"])
def test_a_redis_url_that_is_not_redis_is_refused(url: str) -> None:
    with pytest.raises(ValidationError, match="GATEWAY_REDIS_URL takes a redis://, rediss:// or unix:// URL"):
        Settings(redis_url=url)


def refusals(**values: object) -> list[str]:
    with pytest.raises(ValidationError) as caught:
        ServeSettings(**values)
    return cannot_serve_reasons(caught.value)


def test_serving_several_workers_that_count_alone_is_refused_with_the_setting_to_change() -> None:
    (reason,) = refusals(workers=4)
    assert reason.startswith("refusing to start 4 workers with GATEWAY_RATE_LIMIT_STORAGE=memory://")
    assert "Set GATEWAY_RATE_LIMIT_STORAGE=redis://HOST:6379 or use one worker." in reason
    (reason,) = refusals(workers=2, rate_limit_storage="memory://", redis_url=REDIS)
    assert "each worker would count requests on its own" in reason


def test_serving_several_workers_with_admission_and_no_redis_is_refused() -> None:
    (reason,) = refusals(workers=2, rate_limit_storage="memcached://127.0.0.1:11211")
    assert reason.startswith("refusing to start 2 workers with GATEWAY_RATE_LIMIT_STORAGE=memcached://")
    assert "Set GATEWAY_REDIS_URL=redis://HOST:6379, or GATEWAY_ADMISSION=false." in reason
    ServeSettings(workers=2, rate_limit_storage="memcached://127.0.0.1:11211", admission=False)


def test_serving_several_workers_with_redis_url_alone_is_accepted() -> None:
    assert ServeSettings(workers=2, redis_url=REDIS).redis_url == REDIS


def test_a_setting_wrong_alone_is_no_refusal_to_serve() -> None:
    assert refusals(workers=2, redis_url="http://x") == []


def test_the_other_commands_settings_take_what_cannot_serve() -> None:
    """`keys`, `models` and `usage` read Settings: a configuration that cannot serve still manages keys."""
    assert Settings(workers=4).workers == 4


def test_serving_https_with_one_of_its_two_files_is_refused_naming_both() -> None:
    (reason,) = refusals(tls_certfile="gateway.crt")
    assert reason.startswith("refusing to start with GATEWAY_TLS_CERTFILE but no GATEWAY_TLS_KEYFILE:")
    (reason,) = refusals(tls_keyfile="gateway.key")
    assert reason.startswith("refusing to start with GATEWAY_TLS_KEYFILE but no GATEWAY_TLS_CERTFILE:")
    assert ServeSettings(tls_certfile="gateway.crt", tls_keyfile="gateway.key").tls_keyfile == Path("gateway.key")


def test_an_empty_tls_setting_is_unset_not_the_working_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_TLS_CERTFILE", "")
    monkeypatch.setenv("GATEWAY_TLS_KEYFILE", " ")
    settings = ServeSettings()
    assert (settings.tls_certfile, settings.tls_keyfile) == (None, None)
