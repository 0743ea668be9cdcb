"""The whole gateway (vllm_gateway.app.create_app: keys, limits, admission, the relay, the FastAPI app) in
the test's own process, served by MemoryServer over in-memory connections. Its backends are real servers
on real sockets (the simulator, a raw test backend), reached on the same loop.

    with MemoryGateway.start(tmp_path, [Backend("sim", simulator.base_url)]) as gateway:
        response = gateway.exchange(raw_post(gateway.key, body))   # a WireResponse, strictly read
        connection = gateway.connect()                              # or one connection, kept alive
        connection.send(raw_post(gateway.key, body))
        response = gateway.read_response(connection)

The loop runs only while the test waits on it (exchange, read_response, until), as MemoryServer's does;
the gateway's background tasks (health checks, the key file's watch) run then too. What needs the gateway
as a process (the SDKs, its workers, its command line, signals) stays with tests.support.gateway.Gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import h11
import httpx

from tests.support.front import rss_kib
from tests.support.gateway import Backend, prepare_workdir
from tests.support.http_wire import WireResponse, take_response
from tests.support.memory_server import MemoryConnection, MemoryServer
from vllm_gateway.app import Gateway, create_app
from vllm_gateway.registry import BackendState
from vllm_gateway.settings import ServeSettings, load_settings

# The port the settings name: nothing listens on it, the connections are in memory.
UNUSED_PORT = 1024
# How long a wait on the gateway may take before the test fails rather than hang (a liveness bound): a
# backend process's answer on a loaded machine included, as long as a gateway process's clients wait.
LIVENESS = 30.0
# How long the loop runs between two looks of a wait whose every look asks another process (an HTTP
# round trip, which holds up the loop while it lasts).
ASKING_A_PROCESS = 0.05

T = TypeVar("T")


@contextlib.contextmanager
def environment(env: Mapping[str, str]) -> Iterator[None]:
    """os.environ with `env` in it for the time of the block, as the gateway's process would have it."""
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class MemoryGateway:
    """A gateway built from a model config and settings as a started one would be, with an admin key
    (`admin_key`) and a user key (`key`) in its key file."""

    def __init__(self, workdir: Path, app: Gateway, server: MemoryServer, admin_key: str, key: str) -> None:
        self.workdir = workdir
        self.app = app
        self.state = app.state
        self.server = server
        self.admin_key = admin_key
        self.key = key
        self._lifespan: contextlib.AbstractAsyncContextManager[None] | None = None

    @classmethod
    def start(
        cls,
        workdir: Path,
        backends: Sequence[Backend],
        env: Mapping[str, str] | None = None,
        wait_ready: bool = True,
    ) -> MemoryGateway:
        full_env, admin, user = prepare_workdir(workdir, UNUSED_PORT, backends, env)
        with environment(full_env):
            app = create_app(load_settings(ServeSettings))
        gateway = cls(workdir, app, MemoryServer(served=app), admin, user)
        try:
            gateway._start_lifespan()
            if wait_ready and backends:
                models = gateway.state.registry.models.values()
                gateway.until(lambda: all(model.state is BackendState.READY for model in models), 30, "models ready")
        except BaseException:
            gateway.stop()
            raise
        return gateway

    def _start_lifespan(self) -> None:
        self._lifespan = self.app.api.router.lifespan_context(self.app.api)
        self.server.loop.run_until_complete(self._lifespan.__aenter__())

    def stop(self) -> None:
        if self._lifespan is not None:
            lifespan, self._lifespan = self._lifespan, None
            self.server.loop.run_until_complete(lifespan.__aexit__(None, None, None))
        self.server.close()

    def __enter__(self) -> MemoryGateway:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def create_key(self, name: str, **fields: Any) -> tuple[str, str]:
        """A new key with these fields (`token_limit="1000/hour"`), made as the admin API makes one: its
        id and the key."""
        record, secret = self.state.keys.create(name, **fields)
        return record.id, secret

    # -- talking to it --

    def connect(self) -> MemoryConnection:
        return self.server.connect()

    def until(
        self, condition: Callable[[], object], timeout: float = LIVENESS, what: str = "", interval: float = 0.001
    ) -> float:
        """Run the loop until `condition()` holds and return the loop's time then (a liveness bound: fails
        after `timeout`); `interval` between looks, longer for one that asks another process."""
        return self.server.until(condition, timeout, what, interval)

    def now(self) -> float:
        """The loop's clock."""
        return self.server.now()

    def read_response(
        self, connection: MemoryConnection, timeout: float = LIVENESS, head_only: bool = False
    ) -> WireResponse:
        """The next whole response on `connection`, read strictly (tests.support.http_wire); what follows
        it stays for the next call."""
        found: list[WireResponse] = []

        def whole() -> bool:
            response = take_whole_response(connection, head_only)
            if response is not None:
                found.append(response)
            return response is not None

        self.until(whole, timeout, what=f"a whole response on the connection (so far {connection.pending[:200]!r})")
        return found[0]

    def exchange(self, request: bytes, timeout: float = LIVENESS) -> WireResponse:
        """Send `request` on a new connection and read its response."""
        connection = self.connect()
        connection.send(request)
        return self.read_response(connection, timeout)

    def run_async(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine of the test's on the gateway's loop (its clients: async_http) to its end."""
        return self.server.loop.run_until_complete(coroutine)

    def async_http(self, key: str | None = None, timeout: float = 60.0) -> httpx.AsyncClient:
        """An httpx client for coroutines on the gateway's loop (run_async): each request on a connection
        of its own, its body read as it comes; a client that leaves (a cancelled task, a closed stream)
        goes away from its connection as a socket's peer would. `timeout`: a liveness bound on each."""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.AsyncClient(base_url="http://gw", headers=headers, transport=MemoryAsyncHTTP(self, timeout))

    def http(self, key: str | None = None) -> httpx.Client:
        """An httpx client whose requests reach this gateway over one in-memory connection, kept alive as
        the server allows; each response is read whole (for a stream's pieces as they come, read_until)."""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url="http://gw", headers=headers, transport=MemoryHTTP(self))

    def waiting(self) -> int:
        """Requests waiting for a server with room, over every model, as /health counts them: read from
        the gateway's state, so that a coroutine on its loop may ask too."""
        return sum(self.state.admission.waiting_everywhere(name) for name in self.state.registry.models)

    def in_flight(self) -> int:
        """Requests the gateway is relaying or holding, as /health counts them (from the state)."""
        return self.state.in_flight

    def health(self, key: str | None = None) -> dict[str, Any]:
        with self.http(key) as client:
            health: dict[str, Any] = client.get("/health").json()
            return health

    def poll(self, check: Callable[[], T], timeout: float = LIVENESS, interval: float = 0.05) -> T:
        """Call `check` until it returns something truthy and return that, the loop running `interval`
        between calls: unlike until's condition, `check` may itself talk to the gateway (http, health)."""
        deadline = self.now() + timeout
        while not (result := check()):
            if self.now() > deadline:
                raise TimeoutError(f"not within {timeout} s: {check} (last: {result!r})")
            self.run(interval)
        return result

    def wait_until(self, condition: Callable[[dict[str, Any]], bool], timeout: float = 30.0) -> dict[str, Any]:
        """Ask /health (with the admin key) until `condition(health)` holds, the loop running between."""
        found: list[dict[str, Any]] = []

        def matched() -> bool:
            found[:] = [self.health(self.admin_key)]
            return condition(found[0])

        self.poll(matched, timeout, interval=0.1)
        return found[0]

    def log_text(self, settle: float = 0.3) -> str:
        """The gateway's log file, once the loop has run `settle` seconds more: a request's line is
        written after its answer, by a background thread."""
        self.run(settle)
        path = self.state.settings.log_path
        return path.read_text() if path.exists() else ""

    def read_until(self, connection: MemoryConnection, marker: bytes, timeout: float = LIVENESS) -> bytes:
        """What the server has sent on `connection`, raw (the head and any chunk framing), once `marker`
        is in it: the part of a stream a client has when it sees `marker`. It stays unread: the next
        read_response starts from it."""

        def arrived() -> bool:
            connection.pending += connection.take()
            return marker in connection.pending

        self.until(arrived, timeout, what=f"{marker!r} on the connection")
        return connection.pending

    def run(self, seconds: float) -> None:
        """Let the loop run for `seconds`."""
        self.server.run(seconds)

    def max_rss(self, seconds: float) -> int:
        """The highest resident memory (KiB) of the test's process, which holds the gateway, seen while the
        loop runs `seconds`."""
        pid = os.getpid()
        peak = rss_kib(pid)
        end = self.now() + seconds

        def sampled() -> bool:
            nonlocal peak
            peak = max(peak, rss_kib(pid))
            return self.now() >= end

        self.until(sampled, seconds + LIVENESS, what="the end of the measurement", interval=0.05)
        return peak

    def read_to_end(self, connection: MemoryConnection, timeout: float = LIVENESS) -> bytes:
        """Everything the server sends on `connection` until it ends the connection."""
        self.until(lambda: connection.ended, timeout, what="the server ending the connection")
        data = connection.pending + connection.take()
        connection.pending = b""
        return data


def take_whole_response(connection: MemoryConnection, head_only: bool = False) -> WireResponse | None:
    """The next whole response on `connection` if it has come (what follows stays pending), else None."""
    connection.pending += connection.take()
    response, used = take_response(connection.pending, eof=connection.ended, head_only=head_only)
    if response is None:
        if connection.ended:
            raise AssertionError(f"the connection ended before a whole response: {connection.pending[:300]!r}")
        return None
    connection.pending = connection.pending[used:]
    return response


def request_bytes(request: httpx.Request, body: bytes) -> bytes:
    """`request` as an HTTP/1.1 client sends it; a body from an iterator (chunked) as one chunk."""
    if request.headers.get("transfer-encoding", "").lower() == "chunked":
        body = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
    lines = [f"{request.method} {request.url.raw_path.decode()} HTTP/1.1".encode()]
    lines += [name + b": " + value for name, value in request.headers.raw]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


class MemoryHTTP(httpx.BaseTransport):
    """httpx's transport for MemoryGateway.http: the request as HTTP/1.1 bytes on a MemoryConnection, the
    response read strictly (take_response) and handed to httpx as the bytes that came, still encoded."""

    def __init__(self, gateway: MemoryGateway) -> None:
        self.gateway = gateway
        self.connection: MemoryConnection | None = None

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self.connection is None or not self.connection.kept_alive:
            self.connection = self.gateway.connect()
        self.connection.send(request_bytes(request, request.read()))
        response = self.gateway.read_response(self.connection, head_only=request.method == "HEAD")
        if response.closes:  # as a client does: the next request goes on a new connection
            self.connection = None
        # A stream not yet read, as httpx's own transports give: read whole, or raw with iter_raw().
        stream = httpx.ByteStream(response.body)
        return httpx.Response(response.status, headers=response.headers, stream=stream, request=request)


class MemoryAsyncHTTP(httpx.AsyncBaseTransport):
    """httpx's async transport for MemoryGateway.async_http: the response is handed over at its head, and
    its body as it comes (read by h11, the parser under httpx's own transport)."""

    def __init__(self, gateway: MemoryGateway, timeout: float) -> None:
        self.gateway = gateway
        self.timeout = timeout

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        connection = self.gateway.connect()
        parser = h11.Connection(h11.CLIENT)
        # h11 is told of the request only so that it reads the answer to it (a HEAD's has no body).
        parser.send(h11.Request(method=request.method, target=request.url.raw_path, headers=request.headers.raw))
        connection.send(request_bytes(request, await request.aread()))
        body = IncomingBody(self.gateway, connection, parser, self.timeout)
        try:
            head = await body.next_event()
            while isinstance(head, h11.InformationalResponse):
                head = await body.next_event()
        except BaseException:
            connection.disconnect()
            raise
        assert isinstance(head, h11.Response), head
        return httpx.Response(head.status_code, headers=head.headers, stream=body, request=request)


class IncomingBody(httpx.AsyncByteStream):
    """A response's body on a MemoryConnection, piece by piece as the server writes it."""

    def __init__(self, gateway: MemoryGateway, connection: MemoryConnection, parser: h11.Connection, timeout: float):
        self.gateway = gateway
        self.connection = connection
        self.parser = parser
        self.deadline = gateway.now() + timeout
        self.done = False

    async def next_event(self) -> Any:
        while (event := self.parser.next_event()) is h11.NEED_DATA:
            data = self.connection.take()
            if data or self.connection.ended:
                self.parser.receive_data(data)  # b"": the server ended the connection
                continue
            if self.gateway.now() > self.deadline:
                raise AssertionError("no answer on the connection within the test's bound")
            await asyncio.sleep(0.001)
        return event

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            while not isinstance(event := await self.next_event(), h11.EndOfMessage):
                if isinstance(event, h11.Data):
                    yield bytes(event.data)
            self.done = True
        finally:
            self.leave()

    async def aclose(self) -> None:
        self.leave()

    def leave(self) -> None:
        """The client is done with the response: one that leaves before its end goes away."""
        if not self.done:
            self.done = True
            self.connection.disconnect()
