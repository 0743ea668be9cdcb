"""The supervisor's rules as functions: the backoff, the crash loop and the settings behind them."""

from __future__ import annotations

import pytest

from vllm_fleet.restart_policy import SETTINGS, RestartPolicy, SettingError


def test_the_delay_starts_at_the_setting_doubles_with_each_exit_and_stops_at_its_cap() -> None:
    policy = RestartPolicy()
    assert [policy.delay(n) for n in range(1, 11)] == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300]
    assert RestartPolicy(restart_delay=0.5, restart_delay_max=3).delay(4) == 3
    assert policy.delay(100_000) == 300  # a model that exited all year long


def test_a_crash_loop_counts_only_the_exits_inside_its_window() -> None:
    policy = RestartPolicy(crash_loop_exits=3, crash_loop_window=60)
    assert not policy.in_crash_loop([0, 10], now=20)
    assert policy.in_crash_loop([0, 10, 20], now=20)
    assert not policy.in_crash_loop([0, 10, 70], now=70)  # the first left the window


def test_defaults_are_the_documented_ones() -> None:
    policy = RestartPolicy.from_environment({})
    assert policy == RestartPolicy()
    assert (policy.restart_delay, policy.restart_delay_max, policy.reset_after) == (1, 300, 600)
    assert (policy.crash_loop_exits, policy.crash_loop_window, policy.hang_checks) == (5, 600, 3)


def test_each_setting_is_read_from_its_variable() -> None:
    policy = RestartPolicy.from_environment({variable: "7" for variable, _, _ in SETTINGS.values()})
    assert all(getattr(policy, name) == 7 for name in SETTINGS)


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("VLLM_RESTART_DELAY", "soon", "VLLM_RESTART_DELAY=soon: a number of seconds above 0 is needed"),
        ("VLLM_RESTART_DELAY_MAX", "0", "VLLM_RESTART_DELAY_MAX=0: a number of seconds above 0 is needed"),
        ("VLLM_HEALTH_CHECK_INTERVAL", "inf", "a number of seconds above 0"),
        ("VLLM_CRASH_LOOP_EXITS", "2.5", "VLLM_CRASH_LOOP_EXITS=2.5: a whole number from 1 is needed"),
        ("VLLM_HANG_CHECKS", "0", "VLLM_HANG_CHECKS=0: a whole number from 1 is needed"),
    ],
)
def test_a_bad_setting_is_refused_by_name(variable: str, value: str, message: str) -> None:
    with pytest.raises(SettingError, match=message):
        RestartPolicy.from_environment({variable: value})
