"""The one owner of the model server processes: starts what the scripts ask for, restarts what dies.

`python3 vllm_fleet supervise` runs in the background (start_all_models.sh starts it when none runs;
one at a time, through a lock). Every half second it reads the run directory (run_dir.py): a model
whose want file says "run" and which has no live process is started from its launch record; one that
exits without being asked is started again after a backoff, or marked failed after a crash loop; one
whose /health fails after it was ready is stopped and restarted, as a crash. "stop" in the want file
means hands off: stop_all_models.sh does the stopping. The supervisor holds no state that matters
across its own death: a new one adopts the running servers by their PID files instead of starting
duplicates, and a failed model stays failed (its status file says so) until a new start asks again.
It runs until stop_all_models.sh stops it, once no model is wanted (a supervisor that left by itself
when idle could miss a start asked for in that instant).

A model with idle=sleep or idle=stop that the gateway has not used (run/<id>.used) for its
idle_after is put to sleep (vLLM's sleep mode, idle.py) or stopped; a use after that wakes it, or
starts it again with the same placement. Neither counts as an exit: no backoff, no crash loop.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from . import idle
from .events import EVENT_FILE, EventLog, exit_words
from .restart_policy import EXITED_AT_ONCE_SECONDS, RestartPolicy
from .run_dir import SUPERVISOR_ID, LaunchRecord, ModelStatus, RunDir, group_members, leader_alive, signal_group

TICK = 0.5  # seconds between two looks at the run directory
CHECK_THREADS = 16  # /health checks under way at once: one a server, for a host's few servers
LOG_TAIL_LINES = 20


def health_ok(url: str, timeout: float) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as answer:
            return bool(answer.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def log_tail(path: str, lines: int = LOG_TAIL_LINES) -> list[str]:
    try:
        with open(path, "rb") as file:
            file.seek(0, os.SEEK_END)
            file.seek(max(file.tell() - 16384, 0))
            text = file.read().decode(errors="replace")
    except OSError:
        return []
    return text.splitlines()[-lines:]


class Watch:
    """One model as the supervisor follows it, from the start a want file asked for."""

    def __init__(self, supervisor: Supervisor, model_id: str) -> None:
        self.supervisor = supervisor
        self.id = model_id
        self.token: str | None = None
        self.status = ModelStatus()
        self.pid = 0
        self.exit_times: list[float] = []
        self.exits_since_reset = 0
        self.started_at = 0.0
        self.ready_since = 0.0
        self.failed_checks = 0
        self.next_check = 0.0
        self.kill_at = 0.0  # a hung server gets SIGKILL then
        self.hang_reason = ""
        # The /health check under way, on the supervisor's threads: a hung server's check waits out
        # its timeout there, not in the loop that watches every other server.
        self.probe: Future[bool] | None = None
        self.probed_pid = 0
        self.record: LaunchRecord | None = None  # of the current start: its idle settings
        self.awaiting_ready = False  # launched or adopted, and not seen ready since
        self.first_start = False  # launched for a start the start script asked for (not a restart)
        self.idle_at = 0.0  # when it went to sleep or stopped as idle: a use after that wakes it
        self.asked_at = 0.0  # when the use that wakes it came: a wake's seconds count from there
        self.idle_stop = False  # stopping as idle: its exit is no crash
        # A /sleep or /wake_up under way, on the supervisor's threads, and what follows its answer.
        self.call: Future[tuple[bool, str]] | None = None
        self.call_done: Callable[[bool, str, float], None] | None = None

    # ---- the state ----

    def set_state(self, state: str, **changes: object) -> None:
        self.status.state = state
        self.status.since = self.supervisor.clock()
        for name, value in changes.items():
            setattr(self.status, name, value)
        self.supervisor.run_dir.write_status(self.id, self.status)

    def event(self, name: str, **fields: object) -> None:
        self.supervisor.events.record(name, self.id, **fields)

    # ---- one look ----

    def step(self, now: float) -> None:
        run_dir = self.supervisor.run_dir
        want, token = run_dir.want(self.id)
        if want != "run":
            if self.token is not None and not self.pid_alive():  # hands off once stop_all_models.sh is done
                self.event("stopped", pid=self.pid or None)
                self.set_state("stopped", pid=0, reason="stopped by request")
                self.token = None
                self.pid = 0
            return
        if token != self.token:
            self.begin(token, now)
        if self.status.state == "failed":
            return
        if self.pid:
            self.follow(now)
        elif self.status.state == "stopped":  # stopped as idle: until a request comes
            if run_dir.used_at(self.id) > self.idle_at:
                self.asked_at = run_dir.used_at(self.id)
                self.launch(now)
        elif now >= self.status.next_start:
            self.launch(now)

    def begin(self, token: str, now: float) -> None:
        """A start asked for (or one seen for the first time by this supervisor): adopt or launch."""
        run_dir = self.supervisor.run_dir
        previous = run_dir.status(self.id)
        self.token = token
        self.exit_times = []
        self.exits_since_reset = 0
        self.status = ModelStatus(token=token)
        self.record = run_dir.launch_record(self.id)
        self.call = self.call_done = None
        running = run_dir.running_pid(self.id)
        if previous is not None and previous.token == token:
            self.status = previous  # the same start, seen by a new supervisor: keep its count
            if previous.state == "failed" and not running:
                return
            if previous.state == "stopped" and not running:
                self.idle_at = previous.since  # stopped as idle: it stays so until a request comes
                return
            if previous.state in ("sleeping", "waking") and running:
                # Asleep, or maybe not yet awake: a use after it fell asleep (any, for a wake that
                # was under way) wakes it, and waking an awake server is harmless.
                self.pid = running
                self.idle_at = previous.since if previous.state == "sleeping" else 0.0
                self.awaiting_ready = False
                self.event("adopted", pid=running)
                self.set_state("sleeping", pid=running)
                return
        if running:
            self.pid = running
            self.started_at = now
            self.ready_since = 0.0
            self.awaiting_ready = True
            self.first_start = False  # started long ago, for all this supervisor knows
            self.event("adopted", pid=running)
            self.set_state("loading", pid=running, reason="")
        else:
            self.pid = 0
            self.status.next_start = 0.0

    def pid_alive(self) -> bool:
        return bool(self.pid) and (leader_alive(self.pid) or bool(group_members(self.pid)))

    def follow(self, now: float) -> None:
        """A server we know of: dead, being killed, or up (then maybe its health is due)."""
        if not leader_alive(self.pid):
            if group_members(self.pid):
                signal_group(self.pid, signal.SIGKILL)  # the leader died: its engine and workers too
                return
            self.exited(now)
            return
        if self.kill_at:
            if now >= self.kill_at:
                signal_group(self.pid, signal.SIGKILL)
            return
        if self.call is not None:
            if not self.call.done():
                return  # its own timeout bounds it; /health need not answer while the weights move
            (answered, text), then = self.call.result(), self.call_done
            self.call = self.call_done = None
            assert then is not None
            then(answered, text, now)
        elif not self.awaiting_ready and self.record is not None and self.record.idle != "none":
            self.mind_idleness(now)
        if self.pid == 0 or self.kill_at:
            return  # it went (an idle stop, a failed wake)
        if self.probe is not None:
            if self.probe.done():
                answered, self.probe = self.probe.result(), None
                if self.probed_pid == self.pid:  # not a check of a server that has been replaced since
                    self.health_answered(answered, now)
        elif now >= self.next_check:
            self.check_health(now)

    def check_health(self, now: float) -> None:
        policy = self.supervisor.policy
        record = self.record
        loading = self.awaiting_ready
        # While it loads, look each second so that ready is seen soon; then every health_interval.
        self.next_check = now + (min(policy.health_interval, 1.0) if loading else policy.health_interval)
        if record is None:
            return
        self.probed_pid = self.pid
        self.probe = self.supervisor.checks.submit(health_ok, record.health_url, min(policy.health_interval, 5.0))

    def health_answered(self, answered: bool, now: float) -> None:
        policy = self.supervisor.policy
        loading = self.awaiting_ready
        if answered:
            self.failed_checks = 0
            if loading:
                self.awaiting_ready = False
                self.ready_since = now
                self.event("ready", pid=self.pid, seconds=round(now - self.started_at, 3))
                if self.status.state == "waking":  # started again for a request, after an idle stop
                    self.woke(now)
                self.set_state("ready", reason="")
            elif self.exits_since_reset and now - self.ready_since >= policy.reset_after:
                self.exits_since_reset = 0  # healthy long enough: the next exit waits the first delay again
            return
        if not loading:
            self.failed_checks += 1
            if self.failed_checks >= policy.hang_checks:
                self.hang(now, f"/health failed {self.failed_checks} checks in a row")
        elif now - self.started_at >= policy.start_timeout:
            self.hang(now, f"not ready {policy.start_timeout:g}s after its start")

    # ---- idle ----

    def mind_idleness(self, now: float) -> None:
        """A ready server unused for its idle_after (or asked to sleep now) sleeps or stops; a
        sleeping one that got a request since wakes."""
        run_dir, record = self.supervisor.run_dir, self.record
        assert record is not None
        asked_to_sleep = run_dir.take_sleep_request(self.id)
        used = run_dir.used_at(self.id)
        if self.status.state == "ready":
            idle_for = now - max(used, self.ready_since)
            if asked_to_sleep or idle_for >= record.idle_after:
                self.go_idle(now, "asked to" if asked_to_sleep else f"idle {idle_for:.0f}s")
        elif self.status.state == "sleeping" and used > self.idle_at:
            self.asked_at = used
            self.wake(now)

    def go_idle(self, now: float, why: str) -> None:
        record, policy = self.record, self.supervisor.policy
        assert record is not None
        self.idle_at = now
        if record.idle == "stop":
            self.idle_stop = True
            self.kill_at = now + policy.stop_timeout
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            self.set_state("stopped", reason=f"{why}: stopped; starts again on the next request")
            return
        # Sleeping from now: the gateway sends it nothing more, and what it sends meanwhile waits.
        self.set_state("sleeping", reason=f"{why}: sleeping; wakes on the next request")
        started = now

        def slept(answered: bool, text: str, when: float) -> None:
            if answered:
                self.event("sleep", pid=self.pid, seconds=round(when - started, 3), detail=why)
            else:
                self.event("sleep_failed", pid=self.pid, detail=text)
                self.hang(when, f"POST /sleep failed: {text}")

        self.start_call(idle.put_to_sleep, record.base_url, policy.sleep_timeout, slept)

    def wake(self, now: float) -> None:
        record, policy = self.record, self.supervisor.policy
        assert record is not None
        self.set_state("waking", reason="woken by a request")

        def woken(answered: bool, text: str, when: float) -> None:
            if not answered:
                self.event("wake_failed", pid=self.pid, detail=text)
                self.hang(when, f"POST /wake_up failed: {text}")
                return
            self.ready_since = when
            self.woke(when)
            self.set_state("ready", reason="")

        self.start_call(idle.wake, record.base_url, policy.wake_timeout, woken)

    def woke(self, now: float) -> None:
        seconds = max(now - self.asked_at, 0.0)
        self.status.count_wake(seconds)
        self.event("wake", pid=self.pid, seconds=round(seconds, 3), mode=self.record.idle if self.record else "")

    def start_call(
        self,
        call: Callable[[str, float], tuple[bool, str]],
        base_url: str,
        timeout: float,
        then: Callable[[bool, str, float], None],
    ) -> None:
        self.call = self.supervisor.checks.submit(call, base_url, timeout)
        self.call_done = then

    # ---- exits ----

    def hang(self, now: float, why: str) -> None:
        self.event("hang", pid=self.pid, detail=why)
        self.hang_reason = why
        self.kill_at = now + self.supervisor.policy.stop_timeout
        try:
            os.kill(self.pid, signal.SIGTERM)  # the API server first: it stops its engine in order
        except ProcessLookupError:
            pass
        self.set_state("restarting", reason=f"hung: {why}")

    def exited(self, now: float) -> None:
        policy = self.supervisor.policy
        status_word = self.supervisor.exit_status(self.pid)
        fields, words = exit_words(status_word)
        if self.hang_reason:
            words = f"{words}, stopped as hung ({self.hang_reason})"
        self.supervisor.run_dir.remove_pid(self.id, self.pid)
        self.call = self.call_done = None  # a /sleep or /wake_up of the server that is gone
        if self.idle_stop:
            self.event("stopped", pid=self.pid, **fields, detail=f"idle: {words}")
            self.pid, self.kill_at, self.idle_stop, self.probe = 0, 0.0, False, None
            self.set_state("stopped", pid=0)
            return
        if self.ready_since and now - self.ready_since >= policy.reset_after:
            self.exits_since_reset = 0
        self.exits_since_reset += 1
        self.exit_times = [moment for moment in self.exit_times if now - moment <= policy.crash_loop_window]
        self.exit_times.append(now)
        pid, self.pid, self.kill_at, self.hang_reason, self.ready_since = self.pid, 0, 0.0, "", 0.0
        self.probe = None  # a check still under way was of the server that is gone
        record = self.supervisor.run_dir.launch_record(self.id)
        if self.first_start and self.awaiting_ready and now - self.started_at <= EXITED_AT_ONCE_SECONDS:
            # Decided here, not by the start script's look a second later: the restart's delay can be
            # shorter than that second on a busy host, and a command that cannot run would run again.
            self.failed_on_exit(pid, fields, words, f"{words} at once after its start", record)
            return
        if policy.in_crash_loop(self.exit_times, now):
            reason = f"{len(self.exit_times)} exits within {policy.crash_loop_window:g}s, the last: {words}"
            self.failed_on_exit(pid, fields, words, reason, record)
            return
        delay = policy.delay(self.exits_since_reset)
        self.event("exit", pid=pid, **fields, delay=delay, detail=words)
        self.set_state(
            "restarting", pid=0, last_exit=words, next_start=now + delay, reason=f"{words}; restarts in {delay:g}s"
        )

    def failed_on_exit(
        self, pid: int, fields: dict[str, object], words: str, why: str, record: LaunchRecord | None
    ) -> None:
        """The exit of `pid` ends its restarts: failed, with `why` and the end of its log."""
        reason = f"{why}; not restarted until started again"
        self.event("exit", pid=pid, **fields, detail=words)
        self.event("failed", detail=reason)
        tail = log_tail(record.log) if record else []
        self.set_state("failed", pid=0, last_exit=words, reason=reason, log_tail=tail)

    def launch(self, now: float) -> None:
        record = self.supervisor.run_dir.launch_record(self.id)
        if record is None:
            self.set_state("failed", reason="no launch record: start it with start_all_models.sh")
            return
        self.record = record
        again = self.status.state == "restarting"
        on_demand = self.status.state == "stopped"
        try:
            pid = self.supervisor.spawn(record, "restarts" if again else "starts on demand" if on_demand else "starts")
        except OSError as error:
            self.exit_times.append(now)
            self.set_state("failed", reason=f"could not run {record.argv[0]}: {error.strerror}")
            self.event("failed", detail=self.status.reason)
            return
        self.pid = pid
        self.started_at = now
        self.ready_since = 0.0
        self.awaiting_ready = True
        self.first_start = not again and not on_demand
        self.failed_checks = 0
        self.next_check = now + min(self.supervisor.policy.health_interval, 1.0)
        if again:
            self.status.restarts += 1
        detail = {"detail": "on demand, after an idle stop"} if on_demand else {}
        self.event("restart" if again else "start", pid=pid, restarts=self.status.restarts, mode=record.mode, **detail)
        self.set_state("waking" if on_demand else "loading", pid=pid, reason="", next_start=0.0)


class Supervisor:
    def __init__(
        self, run_dir: RunDir, events: EventLog, policy: RestartPolicy, clock: Callable[[], float] = time.time
    ) -> None:
        self.run_dir = run_dir
        self.events = events
        self.policy = policy
        self.clock = clock
        self.watches: dict[str, Watch] = {}
        self.checks = ThreadPoolExecutor(max_workers=CHECK_THREADS, thread_name_prefix="health")
        self.children: set[int] = set()  # the servers this supervisor started, until their exit is read
        self.exit_statuses: dict[int, int] = {}  # wait statuses of our children, until their watch reads them

    def spawn(self, record: LaunchRecord, verb: str) -> int:
        """Start the server as the launch record says, its output appended to its log."""
        if verb != "starts":  # a first start's header is the start script's
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            with open(record.log, "a") as log:
                log.write(f"==== {stamp}: supervisor restarts {record.id} ({record.mode}) ====\n")
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, record.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644),
            (os.POSIX_SPAWN_DUP2, 1, 2),
        ]
        pid = os.posix_spawnp(record.argv[0], record.argv, self.server_env(record), file_actions=actions)
        self.children.add(pid)
        self.run_dir.write_pid(record.id, pid, record.mode)
        return pid

    def server_env(self, record: LaunchRecord) -> dict[str, str]:
        """The launch's environment with the server's key as vLLM reads it (VLLM_API_KEY), and no
        other: a key exported to the scripts is not every server's."""
        env = {name: value for name, value in record.env.items() if name != "VLLM_API_KEY"}
        if record.keyed:
            env["VLLM_API_KEY"] = self.run_dir.backend_key(record.id, "")
        return env

    def exit_status(self, pid: int) -> int | None:
        """How our child pid ended; None for a server we adopted (only its parent could know)."""
        if pid in self.children and pid not in self.exit_statuses:
            # It died after this tick's reap: a zombie now, so this wait does not block.
            try:
                _, self.exit_statuses[pid] = os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        self.children.discard(pid)
        return self.exit_statuses.pop(pid, None)

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.exit_statuses[pid] = status

    def tick(self) -> None:
        """One look at every model."""
        self.reap()
        now = self.clock()
        for model_id in self.run_dir.launched_ids():
            self.watches.setdefault(model_id, Watch(self, model_id)).step(now)

    def run(self) -> int:
        lock = self.run_dir.path / f".{SUPERVISOR_ID}.lock"
        self.run_dir.path.mkdir(parents=True, exist_ok=True)
        handle = os.open(lock, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return 0  # another supervisor runs: it does the work
            raise
        self.run_dir.write_pid(SUPERVISOR_ID, os.getpid(), SUPERVISOR_ID)
        stopping = False

        def leave(signum: int, frame: object) -> None:
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGTERM, leave)
        signal.signal(signal.SIGINT, leave)
        try:
            while not stopping:
                self.tick()
                time.sleep(TICK)
            self.tick()  # the models stopped just before us: their stop events
        finally:
            self.checks.shutdown(wait=False, cancel_futures=True)
            self.run_dir.remove_pid(SUPERVISOR_ID, os.getpid())
        return 0


def supervise(run_dir: Path, log_dir: Path, policy: RestartPolicy) -> int:
    return Supervisor(RunDir(run_dir), EventLog(log_dir / EVENT_FILE), policy).run()
