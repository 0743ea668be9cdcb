"""A seeded fuzz of the gateway's HTTP front: malformed bytes get a well-formed answer or a close, never a 5xx.

Thousands of malformed or mutated requests go over raw sockets to the real gateway process in front of
the vLLM simulator: broken request heads, bodies cut short or too long, crafted multipart bodies, JSON of
the wrong types for the relayed and the admin endpoints, with good keys, bad keys and none. Every case is
built from its own seed (drawn from FUZZ_SEED), so a failing case can be rebuilt: FUZZ_ONLY=17,42 runs
just those cases of the seed.

Each case says what its bytes are, which fixes what the gateway owes it:
  complete    a whole request: an answer (or a close) within LIVENESS seconds;
  incomplete  a request cut short: the gateway closes within its head/body timeout + a margin
              (answers before the close are allowed);
  either      not known without parsing as the gateway does (a mutated head): an answer or a close
              within the same bound as an incomplete one;
  pipelined   a whole request, then bytes that are not HTTP: its answer, a 400 for the junk, then EOF.
Whatever arrives must be well-formed HTTP/1.1, never a 5xx (a 5xx relayed from the simulator counts),
and a 4xx made by the gateway has OpenAI's error shape. At the end the gateway must be healthy, its
memory near where it was after a warm-up, and its key file intact.

Failures are collected and reported together, grouped by cause, with the first cases' bytes.
"""

from __future__ import annotations

import collections
import json
import os
import queue
import random
import resource
import selectors
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.support.fuzz_judge import Conversation, Failure, judge, report
from tests.support.fuzz_requests import (
    CHAT,
    COMPLETE,
    EITHER,
    INCOMPLETE,
    RELAY_TEMPLATES,
    Case,
    Target,
    build_case,
    control,
    dump,
    multipart,
    request,
)
from tests.support.gateway import Backend, Gateway
from tests.support.http_wire import WireResponse
from tests.support.processes import Simulator

SEED = int(os.environ.get("FUZZ_SEED", "20250611"))
ONLY = [int(i) for i in os.environ.get("FUZZ_ONLY", "").replace(" ", "").split(",") if i]
FUZZ_CASES = 5000  # malformed or mutated requests
CONTROL_EVERY = 25  # and one well-formed control request after every 24 of them
WORKERS = 6  # connections driven at once (plus the parked ones)
HEAD_TIMEOUT = BODY_TIMEOUT = 2  # what the gateway is started with
CLOSE_BOUND = max(HEAD_TIMEOUT, BODY_TIMEOUT) + 4.0  # an incomplete request's connection ends by then
LIVENESS = 10.0  # a complete request's answer (or close) arrives by then
FUZZ_BUDGET = 60.0  # seconds for sending all cases; beyond it no new case starts
CHECK_TIMEOUT = 5.0  # for each check after the fuzz
PARKED_MAX = 600  # connections waiting for the gateway to close them
LOOP_BOUND = 1.0  # a concurrent GET /health answers within this: the fuzz never stalls the event loop
RSS_GROWTH_MB = 64
REPORTED = 20  # cases shown in full in the failure message


# ---- the processes ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_gateway(tmp_path_factory):
    """A simulator at full speed (no token pacing: long generations asked for by the fuzz end at once)
    and a gateway in front of it with short head and body timeouts."""
    # Parked connections need descriptors here and in the gateway (which inherits this limit today).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2 * PARKED_MAX + 512
    if soft != resource.RLIM_INFINITY and soft < wanted:
        soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    with Simulator.start(
        tmp_path_factory.mktemp("fuzz-sim"),
        "--served-model-name",
        "sim",
        "sim-alias",
        "--model",
        "/models/sim",
        "--token-rate",
        "0",
    ) as simulator:
        backend = Backend("sim", simulator.base_url, path="/models/sim", aliases="sim-alias")
        env = {"GATEWAY_HEAD_TIMEOUT": str(HEAD_TIMEOUT), "GATEWAY_BODY_TIMEOUT": str(BODY_TIMEOUT)}
        with Gateway.start(tmp_path_factory.mktemp("fuzz-gw"), [backend], env=env) as gateway:
            yield gateway


# ---- running a case -----------------------------------------------------------------------------


def send(sock: socket.socket, conversation: Conversation, deadline: float) -> None:
    for i, piece in enumerate(conversation.case.data):
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            sock.sendall(piece)
        except TimeoutError:
            conversation.send_error = "send stalled (the gateway stopped reading)"
            return
        except OSError as error:  # closed by the gateway while sending: what it sent before is still read
            conversation.send_error = f"send failed: {error.strerror or error}"
            return
        if i + 1 < len(conversation.case.data):
            time.sleep(0.005)


def read_until_settled(sock: socket.socket, conversation: Conversation, deadline: float) -> None:
    while not conversation.settled():
        left = deadline - time.monotonic()
        if left <= 0:
            conversation.timed_out = True
            return
        sock.settimeout(left)
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            conversation.close(reset=True)
            return
        if data:
            conversation.feed(data)
        else:
            conversation.close()


class ParkingLot:
    """Connections left for the gateway to answer or close (incomplete and uncertain cases): one thread
    watches them all, so that the wait for a timeout does not hold a worker."""

    def __init__(self, on_done) -> None:
        self.on_done = on_done
        self.slots = threading.BoundedSemaphore(PARKED_MAX)
        self.incoming: queue.Queue = queue.Queue()
        self.selector = selectors.DefaultSelector()
        self.wake_read, self.wake_write = socket.socketpair()
        self.wake_read.setblocking(False)
        self.selector.register(self.wake_read, selectors.EVENT_READ, None)
        self.stopping = False
        self.waited = 0.0  # seconds workers spent waiting for a free slot
        self.active: dict[socket.socket, tuple[Conversation, float]] = {}
        self.thread = threading.Thread(target=self._run, name="parking-lot", daemon=True)
        self.thread.start()

    def park(self, sock: socket.socket, conversation: Conversation, deadline: float) -> bool:
        """Hand the connection over; False (and the socket closed) if no slot came free in time."""
        if not self.slots.acquire(blocking=False):
            began = time.monotonic()
            got = self.slots.acquire(timeout=CLOSE_BOUND + 10)  # a slot frees by its deadline at the latest
            self.waited += time.monotonic() - began
            if not got:
                sock.close()
                return False
        self.incoming.put((sock, conversation, deadline))
        self.wake_write.send(b"x")
        return True

    def close(self) -> None:
        """Wait until every parked connection ended (each has its deadline), then stop the thread."""
        self.stopping = True
        self.wake_write.send(b"x")
        self.thread.join(timeout=CLOSE_BOUND + 30)
        self.selector.close()
        self.wake_read.close()
        self.wake_write.close()

    def _run(self) -> None:
        while True:
            while not self.incoming.empty():
                sock, conversation, deadline = self.incoming.get()
                sock.setblocking(False)
                self.active[sock] = (conversation, deadline)
                self.selector.register(sock, selectors.EVENT_READ, None)
            if self.stopping and not self.active and self.incoming.empty():
                return
            now = time.monotonic()
            nearest = min((deadline for _, deadline in self.active.values()), default=now + 0.5)
            for key, _ in self.selector.select(timeout=max(0.0, min(0.5, nearest - now))):
                if key.fileobj is self.wake_read:
                    try:
                        self.wake_read.recv(4096)
                    except BlockingIOError:
                        pass
                    continue
                self._read(key.fileobj)
            now = time.monotonic()
            for sock, (conversation, deadline) in list(self.active.items()):
                if now >= deadline and not conversation.settled():
                    conversation.timed_out = True
                    self._finish(sock)

    def _read(self, sock: socket.socket) -> None:
        conversation, _ = self.active[sock]
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            conversation.close(reset=True)
        else:
            if data:
                conversation.feed(data)
            else:
                conversation.close()
        if conversation.settled():
            self._finish(sock)

    def _finish(self, sock: socket.socket) -> None:
        conversation, _ = self.active.pop(sock)
        self.selector.unregister(sock)
        sock.close()
        self.slots.release()
        conversation.ended = time.monotonic()
        self.on_done(conversation)


# ---- the test -----------------------------------------------------------------------------------


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def exchange(port: int, data: bytes, timeout: float = 10.0) -> list[WireResponse]:
    """Send `data` on a new connection and read the answers until the gateway closes it (or `timeout`)."""
    case = Case("check", [data], INCOMPLETE)
    conversation = Conversation(case)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        send(sock, conversation, time.monotonic() + timeout)
        read_until_settled(sock, conversation, time.monotonic() + timeout)
    if conversation.malformed:
        raise AssertionError(conversation.malformed)
    return conversation.final


class LoopProbe:
    """GET /health (no key) on a new connection every tenth of a second while the fuzz runs."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.latencies: list[tuple[float, float]] = []  # (when, seconds)
        self.problems: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="loop-probe", daemon=True)
        self.start = time.monotonic()
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.1):
            began = time.monotonic()
            try:
                answers = exchange(self.port, b"GET /health HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n")
                if [r.status for r in answers] != [200]:
                    self.problems.append(f"/health answered {[r.summary() for r in answers]}")
            except (OSError, AssertionError) as error:
                self.problems.append(f"/health failed: {error}")
            self.latencies.append((began - self.start, time.monotonic() - began))

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(timeout=15)

    def summary(self) -> str:
        times = sorted(took for _, took in self.latencies) or [0.0]
        slow = [when for when, took in self.latencies if took > LOOP_BOUND]
        return (
            f"loop probe: {len(self.latencies)} GET /health, median {times[len(times) // 2]:.3f} s, "
            f"90% {times[len(times) * 9 // 10]:.3f} s, slowest {times[-1]:.2f} s, {len(slow)} over {LOOP_BOUND:g} s"
            + (f" (at {', '.join(f'{when:.1f}' for when in slow[:8])} s)" if slow else "")
        )

    def failures(self) -> list[tuple[str, str]]:
        held = [
            (
                f"event loop held: concurrent GET /health took over {LOOP_BOUND:g} s",
                f"{took:.2f} s at {when:.1f} s into the fuzz",
            )
            for when, took in self.latencies
            if took > LOOP_BOUND
        ]
        return held + [("concurrent GET /health failed", problem) for problem in self.problems]


def checks_after(gateway: Gateway) -> list[tuple[str, str]]:
    """(what, why) for each way the gateway is not fine after the fuzz: it still lives, answers /health,
    relays a chat completion, honours the admin key, and its key file is whole."""

    def health():
        answers = exchange(
            gateway.port, b"GET /health HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n", timeout=CHECK_TIMEOUT
        )
        return None if [r.status for r in answers] == [200] else f"answers: {[r.summary() for r in answers]}"

    def chat():
        with gateway.http(gateway.key, timeout=CHECK_TIMEOUT) as client:
            reply = client.post("/v1/chat/completions", json=CHAT)
        ok = reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 3
        return None if ok else f"{reply.status_code} {reply.text[:200]}"

    def admin():
        with gateway.http(gateway.admin_key, timeout=CHECK_TIMEOUT) as client:
            reply = client.get("/admin/keys")
        names = {entry["name"] for entry in reply.json().get("data", [])} if reply.status_code == 200 else set()
        return None if {"test-admin", "test-user"} <= names else f"{reply.status_code} {reply.text[:200]}"

    def key_file():
        content = json.loads(Path(gateway.env["GATEWAY_KEY_FILE"]).read_text())
        names = {entry["name"] for entry in content["keys"]}
        return None if {"test-admin", "test-user"} <= names else f"keys left: {sorted(names)[:10]}"

    problems = []

    def alive():
        return None if gateway.handle.alive() else f"exited with {gateway.handle.returncode}"

    for what, check in [
        ("the gateway process is alive", alive),
        ("GET /health answers 200", health),
        ("a chat completion works", chat),
        ("the admin key works", admin),
        ("the key file is valid JSON with its keys", key_file),
    ]:
        try:
            problem = check()
        except Exception as error:
            problem = f"{type(error).__name__}: {error}"
        if problem:
            problems.append((what, str(problem)))
    return problems


def warm_up(port: int, t: Target) -> None:
    """Every kind of well-formed request a few times, so that the RSS afterwards is a fair baseline."""
    rng = random.Random(SEED ^ 0x5EED)
    for _ in range(60):
        case = control(rng, t)
        conversation = Conversation(case)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            send(sock, conversation, time.monotonic() + 10)
            read_until_settled(sock, conversation, time.monotonic() + 10)
    for path, template in RELAY_TEMPLATES.items():
        body = dump(template(rng))
        exchange(
            port,
            request(
                b"POST", path, [(b"Authorization", b"Bearer " + t.user_key), (b"Connection", b"close")], body
            ).encode(),
        )
    body, content_type = multipart(b"warm", [(b"model", None, b"sim"), (b"file", b"a.wav", b"x" * 2000)])
    exchange(
        port,
        request(
            b"POST",
            b"/v1/audio/transcriptions",
            [(b"Authorization", b"Bearer " + t.user_key), (b"Connection", b"close")],
            body,
            content_type=content_type,
        ).encode(),
    )


def test_front_survives_seeded_fuzz(fuzz_gateway, tmp_path):
    gateway = fuzz_gateway
    port = gateway.port
    with gateway.http(gateway.admin_key, timeout=LIVENESS) as admin:
        victim = admin.post("/admin/keys", json={"name": "victim"}).json()
    t = Target(port, gateway.key.encode(), gateway.admin_key.encode(), victim["id"].encode())

    warm_up(port, t)
    time.sleep(0.5)
    rss_before = rss_kb(gateway.handle.pid)

    failures: list[Failure] = []
    lock = threading.Lock()
    counts = collections.Counter()
    durations: list[tuple[float, int, str]] = []

    def done(conversation: Conversation) -> None:
        try:
            found = judge(conversation, LIVENESS, CLOSE_BOUND)
        except Exception as error:
            found = [
                Failure(
                    "the test itself failed judging the case", conversation.case, f"{type(error).__name__}: {error}"
                )
            ]
        with lock:
            counts[conversation.case.kind] += 1
            if conversation.answered:
                durations.append(
                    (conversation.answered - conversation.started, conversation.case.index, conversation.case.note[:60])
                )
            failures.extend(found)
            for response in conversation.final:  # keys made by the admin cases, for the DELETE cases
                if conversation.case.category == "admin" and response.status == 201:
                    try:
                        created = json.loads(response.body)["id"].encode()
                    except (ValueError, KeyError, TypeError, AttributeError):
                        continue
                    with t.lock:
                        t.created.append(created)

    master = random.Random(SEED)
    total = FUZZ_CASES + FUZZ_CASES // (CONTROL_EVERY - 1)
    seeds = [master.getrandbits(64) for _ in range(total)]
    indexes = ONLY or list(range(total))
    next_index = iter(indexes)
    index_lock = threading.Lock()
    started = time.monotonic()
    budget_end = started + FUZZ_BUDGET
    lot = ParkingLot(done)
    probe = LoopProbe(port)
    ran = collections.Counter()

    def worker() -> None:
        while time.monotonic() < budget_end:
            with index_lock:
                index = next(next_index, None)
            if index is None:
                return
            case = build_case(index, seeds[index], t, CONTROL_EVERY)
            try:
                run_case(case)
            except Exception as error:
                with lock:
                    failures.append(
                        Failure("the test itself failed on the case", case, f"{type(error).__name__}: {error}")
                    )

    def run_case(case: Case) -> None:
        conversation = Conversation(case)
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        except OSError as error:
            with lock:
                failures.append(Failure("could not connect to the gateway", case, str(error)))
            return
        with lock:
            ran["control" if case.expect else "fuzz"] += 1
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        send(sock, conversation, time.monotonic() + LIVENESS)
        if case.kind in (INCOMPLETE, EITHER):
            if not lot.park(sock, conversation, conversation.started + CLOSE_BOUND):
                with lock:
                    failures.append(Failure("the test's parking lot never freed a slot", case, ""))
            return
        with sock:
            read_until_settled(sock, conversation, conversation.started + LIVENESS)
        conversation.ended = time.monotonic()
        done(conversation)

    threads = [threading.Thread(target=worker, name=f"fuzz-{i}", daemon=True) for i in range(WORKERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=FUZZ_BUDGET + LIVENESS + 30)
    sent_in = time.monotonic() - started
    lot.close()
    probe.finish()
    elapsed = time.monotonic() - started

    # -- afterwards: still healthy, still serving, memory bounded, keys intact --
    lines = [
        (
            f"FUZZ_SEED={SEED}: {ran['fuzz']} fuzz cases and {ran['control']} controls "
            f"({dict(counts)}) sent in {sent_in:.1f} s, all ended after {elapsed:.1f} s"
        )
    ]
    if not ONLY and ran["fuzz"] < FUZZ_CASES:
        lines.append(f"only {ran['fuzz']} of {FUZZ_CASES} fuzz cases ran within the {FUZZ_BUDGET:g} s budget")
        failures.append(Failure("fuzz budget exhausted", Case("budget", [], COMPLETE, "", index=-1), lines[-1]))
    lines.append(f"workers waited {lot.waited:.1f} s in all for a free parking slot ({PARKED_MAX} slots)")
    lines.append(probe.summary())
    probe_case = Case("loop-probe", [b"GET /health HTTP/1.1\r\n\r\n"], COMPLETE, "concurrent health probe", index=-1)
    failures += [Failure(cause, probe_case, detail) for cause, detail in probe.failures()]

    end_case = Case("after", [], COMPLETE, "checks after the fuzz", index=-1)
    failures += [Failure(f"after the fuzz: {cause}", end_case, detail) for cause, detail in checks_after(gateway)]
    time.sleep(0.5)
    rss_after = rss_kb(gateway.handle.pid) if gateway.handle.alive() else 0
    growth_mb = (rss_after - rss_before) / 1024
    lines.append(
        f"gateway RSS {rss_before / 1024:.0f} MB after warm-up, {rss_after / 1024:.0f} MB at the end "
        f"({growth_mb:+.0f} MB)"
    )
    if growth_mb > RSS_GROWTH_MB:
        failures.append(
            Failure(f"after the fuzz: RSS grew by more than {RSS_GROWTH_MB} MB", end_case, f"{growth_mb:+.0f} MB")
        )

    slowest = sorted(durations, reverse=True)[:5]
    lines.append("slowest answers: " + ", ".join(f"{took:.2f} s (case {i}, {what})" for took, i, what in slowest))
    full = tmp_path / "fuzz-report.txt"
    full.write_text(report(failures, lines, SEED, shown=len(failures)))
    text = report(failures, [*lines, f"every failure: {full}"], SEED, shown=REPORTED)
    print(text)
    assert not failures, text
