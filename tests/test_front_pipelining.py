"""A client that pipelines a great many requests and reads nothing (spec: "Pipelining"): the gateway
stops reading rather than buffer the answers, and when the client reads, every answer comes, in order."""

from __future__ import annotations

import bisect
import socket
import threading
import time

import pytest

from tests.support.front import LIVENESS, connect, max_rss_while, rss_kib, wait_until_idle
from tests.support.gateway import Backend, Gateway, Reader
from tests.support.processes import Simulator, wait_until

# A hundred models make each /health answer about 7 KB, so that answers buffered for a client who
# does not read would show in the gateway's memory: 6,000 of them are about 42 MB. (Thirty thousand
# answers of 1.5 KB showed it as well, at five times the suite's time.)
MODELS = [f"m{i:02d}" for i in range(100)]
HEALTH = b"GET /health HTTP/1.1\r\nHost: gw\r\n\r\n"
# Every path but /health needs a key, checked with the head: a 401 now and then shows the order.
MISSING = b"GET /no-such-page HTTP/1.1\r\nHost: gw\r\n\r\n"


@pytest.fixture(scope="module")
def many_models_simulator(tmp_path_factory):
    with Simulator.start(
        tmp_path_factory.mktemp("sim-many"), "--served-model-name", *MODELS, model=MODELS[0]
    ) as simulator:
        yield simulator


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, many_models_simulator):
    backends = [Backend(name, many_models_simulator.base_url) for name in MODELS]
    # Health checks every minute, not twice a second, so that the gateway is idle when nobody asks.
    with Gateway.start(tmp_path_factory.mktemp("gw-pipe"), backends, env={"GATEWAY_HEALTH_INTERVAL": "60"}) as gateway:
        yield gateway


class Sender(threading.Thread):
    """Sends `requests` back to back on `sock` without reading; `sent_bytes` says how far it got."""

    def __init__(self, sock: socket.socket, requests: list[bytes]) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.data = memoryview(b"".join(requests))
        self.ends: list[int] = []  # where each request ends in `data`
        offset = 0
        for data in requests:
            offset += len(data)
            self.ends.append(offset)
        self.sent_bytes = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while self.sent_bytes < len(self.data):
                try:
                    self.sent_bytes += self.sock.send(self.data[self.sent_bytes : self.sent_bytes + 65536])
                except TimeoutError:
                    continue  # still blocked: the gateway reads again once the answers are read
        except OSError as error:
            self.error = error

    @property
    def sent_requests(self) -> int:
        return bisect.bisect_right(self.ends, self.sent_bytes)

    def wait_until_stalled_or_done(self, quiet: float = 1.0, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        last = -1
        while self.is_alive() and self.sent_bytes != last:
            assert time.monotonic() < deadline, "the requests were still being sent after a minute"
            last = self.sent_bytes
            time.sleep(quiet)


def pipelined(count: int, every: int) -> tuple[list[bytes], list[int]]:
    requests = [MISSING if i % every == every - 1 else HEALTH for i in range(count)]
    return requests, [401 if data is MISSING else 200 for data in requests]


def read_answers(reader: Reader, sender: Sender) -> list[int]:
    """Read, in order, the status of the answer to every request the sender got out whole."""
    statuses: list[int] = []
    try:
        while sender.is_alive() or len(statuses) < sender.sent_requests:
            statuses.append(reader.response()[0])
    except (EOFError, ConnectionResetError, TimeoutError) as error:
        pytest.fail(f"after {len(statuses)} of {sender.sent_requests} answers: {error!r}")
    sender.join(LIVENESS)
    assert sender.error is None, f"sending stopped: {sender.error!r}"
    return statuses


def test_6000_pipelined_requests_unread_do_not_grow_the_gateway_and_are_all_answered_in_order(gateway):
    requests, expected = pipelined(6_006, every=1001)  # 6,000 GET /health and 6 refused GETs
    pid = gateway.handle.pid
    wait_until_idle(pid)
    before = rss_kib(pid)
    sock, reader = connect(gateway)
    with sock:
        sender = Sender(sock, requests)
        sender.start()
        sender.wait_until_stalled_or_done()
        # A gateway that answers all 6,000 into its buffers takes a while: measure at the end of
        # that, or after 20 s of it, when the buffered answers already show.
        wait_until_idle(pid, timeout=20, fail=False)
        grown = max_rss_while(pid, 0.5) - before
        assert grown < 10 * 1024, f"the gateway grew by {grown / 1024:.1f} MB holding answers nobody read"
        statuses = read_answers(reader, sender)
    assert len(statuses) == len(requests)
    assert statuses == expected


def test_every_pipelined_request_has_its_access_log_line(gateway):
    requests, expected = pipelined(2_000, every=100)
    before = gateway.log_text()
    sock, reader = connect(gateway)
    with sock:
        sender = Sender(sock, requests)
        sender.start()
        sender.wait_until_stalled_or_done()
        statuses = read_answers(reader, sender)
    assert statuses == expected

    def counts() -> tuple[int, int]:
        new = gateway.log_text(settle=0)[len(before) :]
        return new.count("GET /health status=200"), new.count("GET /no-such-page status=401")

    try:
        wait_until(lambda: counts() == (expected.count(200), expected.count(401)), timeout=5)
    except TimeoutError:
        pytest.fail(
            f"access-log lines (health, 401): {counts()}, expected {(expected.count(200), expected.count(401))}"
        )
