"""What the run directory (VLLM_RUN_DIR) holds for each model server, and the /proc facts behind it.

    <id>.pid          "PID STARTTIME MODE": the server's process group leader; STARTTIME (from
                      /proc) tells our process from a later one that got the same PID. Written by
                      whoever launches the server; the format is scripts/lib_processes.sh's.
    <id>.launch.json  how to start it: argv, log, mode, health URL, the command as logged. Written by
                      `vllm_fleet plan` at every start, so a restart repeats the same placement.
    <id>.want         "run TOKEN" or "stop": what the operator last asked. A new TOKEN is a new start
                      (a failed model runs again); "stop" means never restart it.
    <id>.status.json  the supervisor's view: state, restarts, the last exit, a failure's reason.
    <id>.used         touched by the gateway when it sends the server a request (at most once a
                      second) and when a request waits for it: its time is the last use, which
                      keeps an idle model awake or wakes one that sleeps or stopped.
    <id>.sleep        written by the gateway's admin action: put the model to sleep (or stop it,
                      as its idle= says) now; the supervisor removes it when it sees it.
    <id>.api_key      the key the server requires (mode 0600): the config's api_key, else one made at
                      the model's first start and kept, so that restarts and the gateway agree. The
                      supervisor gives it to the server as VLLM_API_KEY, the gateway sends it upstream.

Every file is written whole to a temporary name and renamed, so a reader never sees half of one.
"""

from __future__ import annotations

import bisect
import json
import os
import secrets
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SUPERVISOR_ID = "supervisor"
WAKE_BOUNDS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)  # seconds


def write_atomically(path: Path, text: str, mode: int = 0o644) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(descriptor, "w") as file:
        file.write(text)
    os.replace(temporary, path)


@dataclass
class LaunchRecord:
    """How one model server starts: what `vllm_fleet plan` built for it."""

    id: str
    argv: list[str]
    log: str
    mode: str  # "vllm" or "simulated"
    health_url: str
    logged_command: str  # the command as the log's header shows it, keys hidden
    env: dict[str, str]  # the environment of the start that asked for it: a restart gets the same
    idle: str = "none"  # none, sleep or stop: what the supervisor does once it saw no use for idle_after
    idle_after: float = 0.0  # seconds
    base_url: str = ""  # where its /sleep and /wake_up are
    keyed: bool = False  # the server requires the key in <id>.api_key (False: api_key=none, or older records)

    @classmethod
    def from_json(cls, text: str) -> LaunchRecord:
        data = json.loads(text)
        optional = {"idle", "idle_after", "base_url", "keyed"}  # records written before idle models came
        return cls(**{name: data[name] for name in cls.__dataclass_fields__ if name in data or name not in optional})


@dataclass
class ModelStatus:
    """What the supervisor last saw of a model; status_all_services.sh shows it."""

    state: str = "loading"
    token: str = ""  # the start (want file's TOKEN) this status belongs to
    pid: int = 0
    restarts: int = 0
    last_exit: str = ""
    reason: str = ""  # why a model is failed or restarting, in words
    next_start: float = 0.0  # when a restarting model starts again (epoch seconds)
    since: float = 0.0  # when it entered this state
    log_tail: list[str] = field(default_factory=list)  # a failed model's last log lines
    # Its wakes since this start, from the request that asked to the server ready again: the count,
    # the seconds, and how many took up to each bound (the last: above them all), for the gateway's
    # histogram.
    wakes: int = 0
    wake_seconds: float = 0.0
    wake_bounds: list[float] = field(default_factory=lambda: list(WAKE_BOUNDS))
    wake_counts: list[int] = field(default_factory=lambda: [0] * (len(WAKE_BOUNDS) + 1))

    def count_wake(self, seconds: float) -> None:
        self.wakes += 1
        self.wake_seconds += seconds
        self.wake_counts[bisect.bisect_left(self.wake_bounds, seconds)] += 1


class RunDir:
    def __init__(self, path: Path) -> None:
        self.path = path

    def file(self, model_id: str, suffix: str) -> Path:
        return self.path / f"{model_id}{suffix}"

    def launched_ids(self) -> list[str]:
        return sorted(path.name[: -len(".launch.json")] for path in self.path.glob("*.launch.json"))

    def launch_record(self, model_id: str) -> LaunchRecord | None:
        try:
            return LaunchRecord.from_json(self.file(model_id, ".launch.json").read_text())
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def write_launch_record(self, record: LaunchRecord) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        # The environment may hold tokens (HF_TOKEN) and argv a vLLM --api-key: for the owner only.
        write_atomically(self.file(record.id, ".launch.json"), json.dumps(asdict(record), indent=1) + "\n", 0o600)

    def backend_key(self, model_id: str, configured: str) -> str:
        """The key the model's server requires, made now when it has none: `configured` is the
        config's api_key ("" for one of the fleet's own, "none" for no key, which returns "")."""
        if configured == "none":
            return ""
        path = self.file(model_id, ".api_key")
        existing = self.read_backend_key(model_id)
        key = configured or existing or secrets.token_urlsafe(32)
        if key != existing:
            self.path.mkdir(parents=True, exist_ok=True)
            write_atomically(path, key + "\n", 0o600)
        return key

    def read_backend_key(self, model_id: str) -> str:
        try:
            return self.file(model_id, ".api_key").read_text().strip()
        except OSError:
            return ""

    def want(self, model_id: str) -> tuple[str, str]:
        """("run", TOKEN), ("stop", "") or ("", "") when nobody asked."""
        try:
            words = self.file(model_id, ".want").read_text().split()
        except OSError:
            return "", ""
        if words[:1] == ["run"]:
            return "run", " ".join(words[1:])
        return ("stop", "") if words[:1] == ["stop"] else ("", "")

    def status(self, model_id: str) -> ModelStatus | None:
        try:
            data: dict[str, Any] = json.loads(self.file(model_id, ".status.json").read_text())
            return ModelStatus(**{name: data[name] for name in ModelStatus.__dataclass_fields__ if name in data})
        except (OSError, ValueError, TypeError):
            return None

    def write_status(self, model_id: str, status: ModelStatus) -> None:
        write_atomically(self.file(model_id, ".status.json"), json.dumps(asdict(status)) + "\n")

    def supervised_status(self, model_id: str) -> ModelStatus | None:
        """The supervisor's status of the start the want file asks for now; None when the model is not
        wanted or the supervisor has not looked at this start yet (then the process tells)."""
        want, token = self.want(model_id)
        status = self.status(model_id)
        if want != "run" or status is None or status.token != token:
            return None
        return status

    def used_at(self, model_id: str) -> float:
        """When the gateway last used or asked for the server (epoch seconds; 0 for never)."""
        try:
            return self.file(model_id, ".used").stat().st_mtime
        except OSError:
            return 0.0

    def take_sleep_request(self, model_id: str) -> bool:
        """Whether an admin asked the model to sleep now; the request is consumed."""
        try:
            self.file(model_id, ".sleep").unlink()
        except OSError:
            return False
        return True

    def pid(self, model_id: str) -> tuple[int, str]:
        """(PID, STARTTIME) of the PID file, (0, "") without one."""
        try:
            words = self.file(model_id, ".pid").read_text().split()
            return int(words[0]), words[1] if len(words) > 1 else ""
        except (OSError, ValueError, IndexError):
            return 0, ""

    def write_pid(self, model_id: str, pid: int, mode: str) -> None:
        write_atomically(self.file(model_id, ".pid"), f"{pid} {starttime(pid)} {mode}\n")

    def remove_pid(self, model_id: str, pid: int) -> None:
        """Remove the PID file if it still names pid (a start may have written a newer one)."""
        if self.pid(model_id)[0] == pid:
            self.file(model_id, ".pid").unlink(missing_ok=True)

    def running_pid(self, model_id: str) -> int:
        """The PID file's process when it (or what is left of its group) still runs, else 0."""
        pid, started = self.pid(model_id)
        if pid <= 0:
            return 0
        if leader_alive(pid):
            return pid if not started or starttime(pid) == started else 0
        return pid if group_members(pid) else 0


# ---- /proc -------------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()  # the command name may hold spaces and parentheses


def starttime(pid: int) -> str:
    fields = _stat_fields(pid)
    return fields[19] if fields else ""


def leader_alive(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def group_members(group: int) -> list[int]:
    """Live processes of the process group or session that group leads (workers that left the group
    for a session of their own count too, as in lib_processes.sh)."""
    members = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = _stat_fields(int(name))
        if fields and fields[0] != "Z" and group in (int(fields[2]), int(fields[3])):
            members.append(int(name))
    return members


def signal_group(group: int, signum: signal.Signals) -> None:
    try:
        os.killpg(group, signum)
    except (ProcessLookupError, PermissionError):
        pass
    for member in group_members(group):
        try:
            os.kill(member, signum)
        except (ProcessLookupError, PermissionError):
            pass
