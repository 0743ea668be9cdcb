"""A client that pipelines a great many requests and reads nothing (spec: "Pipelining"): the gateway
stops reading rather than buffer the answers, and when the client reads, every answer comes, in order.

The gateway runs in the test's process (tests/support/memory_gateway.py): a client's socket buffers
that fill up are a connection that stops reading (MemoryConnection.stop_reading), and the gateway's
memory is the test process's."""

from __future__ import annotations

import os

import pytest

from tests.support.front import rss_kib
from tests.support.gateway import Backend
from tests.support.http_wire import take_response
from tests.support.memory_gateway import MemoryGateway
from tests.support.memory_server import MemoryConnection
from tests.support.processes import Simulator

# A hundred models make each /health answer about 7 KB, so that answers buffered for a client who
# does not read would show in the gateway's memory: 6,000 of them are about 42 MB. (Thirty thousand
# answers of 1.5 KB showed it as well, at five times the suite's time.)
MODELS = [f"m{i:02d}" for i in range(100)]
HEALTH = b"GET /health HTTP/1.1\r\nHost: gw\r\n\r\n"
# Every path but /health needs a key, checked with the head: a 401 now and then shows the order.
MISSING = b"GET /no-such-page HTTP/1.1\r\nHost: gw\r\n\r\n"
# What a client's socket buffers and the gateway's take of answers before a client that reads nothing
# stops them: a few MB over loopback.
SOCKET_BUFFERS = 2 * 1024 * 1024


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
    with MemoryGateway.start(
        tmp_path_factory.mktemp("gw-pipe"), backends, env={"GATEWAY_HEALTH_INTERVAL": "60"}
    ) as gateway:
        yield gateway


def pipelined(count: int, every: int) -> tuple[list[bytes], list[int]]:
    requests = [MISSING if i % every == every - 1 else HEALTH for i in range(count)]
    return requests, [401 if data is MISSING else 200 for data in requests]


def until_idle(gateway: MemoryGateway, quiet: float = 0.5, timeout: float = 30.0) -> None:
    """Run the loop until the gateway has answered nothing for `quiet` seconds: it has done what it will
    do (at most `timeout`: a gateway still answering is measured all the same)."""
    deadline = gateway.now() + timeout
    while True:
        answered = gateway.server.state.total_requests
        gateway.run(quiet)
        if gateway.server.state.total_requests == answered or gateway.now() >= deadline:
            return


def read_answers(gateway: MemoryGateway, connection: MemoryConnection, count: int) -> list[int]:
    """Read, in order, the status of the answers to the `count` requests sent: strictly, as
    read_response does, each answer as soon as it is whole, and all of them in one run of the loop
    (for thousands of answers, a run for each costs more than the answer)."""
    statuses: list[int] = []
    buffer = bytearray(connection.pending)

    def read() -> bool:
        buffer.extend(connection.take())
        while len(statuses) < count:
            response, used = take_response(buffer, eof=connection.ended)
            if response is None:
                if connection.ended:
                    pytest.fail(f"after {len(statuses)} of {count} answers: the connection ended")
                break
            del buffer[:used]
            statuses.append(response.status)
        return len(statuses) == count

    try:
        gateway.until(read, timeout=60, what="every answer")
    except AssertionError as error:
        pytest.fail(f"after {len(statuses)} of {count} answers: {error}")
    connection.pending = bytes(buffer)
    return statuses


def test_6000_pipelined_requests_unread_do_not_grow_the_gateway_and_are_all_answered_in_order(gateway):
    requests, expected = pipelined(6_006, every=1001)  # 6,000 GET /health and 6 refused GETs
    data = b"".join(requests)
    until_idle(gateway)  # the measurement is of this client
    before = rss_kib(os.getpid())  # the test's process, which holds the gateway
    connection = gateway.connect()
    connection.send(data)  # 210 KB: all of it in the socket's buffers at once
    # The client reads nothing: the answers fill its socket's buffers, which then take no more.
    gateway.until(lambda: len(connection.transport.written) >= SOCKET_BUFFERS, what="the socket's buffers full")
    in_the_sockets = len(connection.transport.written)
    connection.stop_reading(unread=in_the_sockets)
    # A gateway that answers all 6,000 into its buffers takes a while: measure at the end of that, or
    # after 20 s of it, when the buffered answers already show. What the socket's buffers took is the
    # kernel's, which a gateway process's memory leaves out too; what is written after, the gateway's.
    until_idle(gateway, timeout=20)
    grown = gateway.max_rss(0.5) - before - in_the_sockets // 1024
    assert grown < 10 * 1024, f"the gateway grew by {grown / 1024:.1f} MB holding answers nobody read"
    connection.read_everything()
    statuses = read_answers(gateway, connection, len(requests))
    assert len(statuses) == len(requests)
    assert statuses == expected


def test_every_pipelined_request_has_its_access_log_line(gateway):
    requests, expected = pipelined(2_000, every=100)
    before = gateway.log_text()
    connection = gateway.connect()
    connection.send(b"".join(requests))
    statuses = read_answers(gateway, connection, len(requests))
    assert statuses == expected

    def counts() -> tuple[int, int]:
        new = gateway.log_text(settle=0)[len(before) :]
        return new.count("GET /health status=200"), new.count("GET /no-such-page status=401")

    try:
        gateway.poll(lambda: counts() == (expected.count(200), expected.count(401)), timeout=5)
    except TimeoutError:
        pytest.fail(
            f"access-log lines (health, 401): {counts()}, expected {(expected.count(200), expected.count(401))}"
        )
