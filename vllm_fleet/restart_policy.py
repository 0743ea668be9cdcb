"""When a model server that exited is started again, when it counts as hung, and when it has failed.

Settings come from the environment of the script that started the supervisor; each is in seconds
(decimals allowed) or a count, with the defaults below (docs/fleet.md lists them).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields

# name of the field: (variable, default, whole number?)
SETTINGS = {
    "restart_delay": ("VLLM_RESTART_DELAY", "1", False),
    "restart_delay_max": ("VLLM_RESTART_DELAY_MAX", "300", False),
    "reset_after": ("VLLM_RESTART_RESET_AFTER", "600", False),
    "crash_loop_exits": ("VLLM_CRASH_LOOP_EXITS", "5", True),
    "crash_loop_window": ("VLLM_CRASH_LOOP_WINDOW", "600", False),
    "hang_checks": ("VLLM_HANG_CHECKS", "3", True),
    "health_interval": ("VLLM_HEALTH_CHECK_INTERVAL", "5", False),
    "start_timeout": ("VLLM_START_TIMEOUT", "1800", False),
    "stop_timeout": ("VLLM_STOP_TIMEOUT", "60", False),
    "sleep_timeout": ("VLLM_SLEEP_TIMEOUT", "300", False),
    "wake_timeout": ("VLLM_WAKE_TIMEOUT", "300", False),
}


# A first start whose server is gone this soon after its launch ran a command that cannot work (a wrong
# path or flag), which no retry mends: it is failed, not restarted. start_all_models.sh waits as long
# before it looks, and then reports it.
EXITED_AT_ONCE_SECONDS = 1.0


class SettingError(ValueError):
    pass


@dataclass(frozen=True)
class RestartPolicy:
    restart_delay: float = 1.0  # the first restart's wait; each exit since the last reset doubles it
    restart_delay_max: float = 300.0
    reset_after: float = 600.0  # healthy this long: the next exit waits restart_delay again
    crash_loop_exits: int = 5  # this many exits within crash_loop_window: failed, no more restarts
    crash_loop_window: float = 600.0
    hang_checks: int = 3  # /health failing this many checks in a row after ready: hung
    health_interval: float = 5.0
    start_timeout: float = 1800.0  # not ready this long after its start: hung (weights load slowly)
    stop_timeout: float = 60.0  # SIGTERM, then SIGKILL after this long
    # An idle server's POST /sleep (weights copied to CPU memory) and POST /wake_up (and back): one
    # that has not answered within this long counts as hung.
    sleep_timeout: float = 300.0
    wake_timeout: float = 300.0

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> RestartPolicy:
        values: dict[str, float | int] = {}
        for name, (variable, default, whole) in SETTINGS.items():
            text = environ.get(variable) or default
            try:
                number = float(text)
            except ValueError:
                number = math.nan
            if whole and (not number.is_integer() or number < 1):
                raise SettingError(f"{variable}={text}: a whole number from 1 is needed")
            if not whole and not (0 < number < math.inf):
                raise SettingError(f"{variable}={text}: a number of seconds above 0 is needed")
            values[name] = int(number) if whole else number
        return cls(**values)  # type: ignore[arg-type]

    def delay(self, exits_since_reset: int) -> float:
        """The wait before the restart that follows the n-th exit since the last reset (n from 1)."""
        doublings = min(max(exits_since_reset - 1, 0), 64)  # past the cap long before; no float overflow
        doubled: float = self.restart_delay * 2.0**doublings
        return min(doubled, self.restart_delay_max)

    def in_crash_loop(self, exit_times: list[float], now: float) -> bool:
        return sum(1 for moment in exit_times if now - moment <= self.crash_loop_window) >= self.crash_loop_exits


assert [f.name for f in fields(RestartPolicy)] == list(SETTINGS)
