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

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from tests.support.gateway import Backend, gateway_env, test_key, write_model_config
from tests.support.http_wire import WireResponse, take_response
from tests.support.memory_server import LIVENESS, MemoryConnection, MemoryServer
from vllm_gateway.app import Gateway, create_app
from vllm_gateway.registry import BackendState
from vllm_gateway.settings import ServeSettings, load_settings

# The port the settings name: nothing listens on it, the connections are in memory.
UNUSED_PORT = 1024


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
        workdir.mkdir(parents=True, exist_ok=True)
        full_env = {**gateway_env(workdir, UNUSED_PORT), **(env or {})}
        write_model_config(Path(full_env["VLLM_MODEL_CONFIG"]), backends)
        admin, user = test_key(full_env, "test-admin", admin=True), test_key(full_env, "test-user")
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

    def until(self, condition: Any, timeout: float = LIVENESS, what: str = "", interval: float = 0.001) -> float:
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
        buffer = connection.pending
        found: list[WireResponse] = []

        def whole() -> bool:
            nonlocal buffer
            buffer += connection.take()
            response, used = take_response(buffer, eof=connection.ended, head_only=head_only)
            if response is None:
                if connection.ended:
                    raise AssertionError(f"the connection ended before a whole response: {buffer[:300]!r}")
                return False
            found.append(response)
            buffer = buffer[used:]
            return True

        self.until(whole, timeout, what=f"a whole response on the connection (so far {buffer[:200]!r})")
        connection.pending = buffer
        return found[0]

    def exchange(self, request: bytes, timeout: float = LIVENESS) -> WireResponse:
        """Send `request` on a new connection and read its response."""
        connection = self.connect()
        connection.send(request)
        return self.read_response(connection, timeout)

    def http(self, key: str | None = None) -> httpx.Client:
        """An httpx client whose requests reach this gateway over one in-memory connection, kept alive as
        the server allows; each response is read whole (for a stream's pieces as they come, read_until)."""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url="http://gw", headers=headers, transport=MemoryHTTP(self))

    def health(self, key: str | None = None) -> dict[str, Any]:
        with self.http(key) as client:
            health: dict[str, Any] = client.get("/health").json()
            return health

    def wait_until(self, condition: Any, timeout: float = 30.0) -> dict[str, Any]:
        """Ask /health (with the admin key) until `condition(health)` holds, the loop running between."""
        deadline = self.now() + timeout
        while not condition(health := self.health(self.admin_key)):
            if self.now() > deadline:
                raise TimeoutError(f"gateway health never matched: {health}")
            self.run(0.1)
        return health

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

    def read_to_end(self, connection: MemoryConnection, timeout: float = LIVENESS) -> bytes:
        """Everything the server sends on `connection` until it ends the connection."""
        self.until(lambda: connection.ended, timeout, what="the server ending the connection")
        data = connection.pending + connection.take()
        connection.pending = b""
        return data


class MemoryHTTP(httpx.BaseTransport):
    """httpx's transport for MemoryGateway.http: the request as HTTP/1.1 bytes on a MemoryConnection, the
    response read strictly (take_response) and handed to httpx as the bytes that came, still encoded."""

    def __init__(self, gateway: MemoryGateway) -> None:
        self.gateway = gateway
        self.connection: MemoryConnection | None = None

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self.connection is None or not self.connection.kept_alive:
            self.connection = self.gateway.connect()
        body = request.read()
        if request.headers.get("transfer-encoding", "").lower() == "chunked":  # content from an iterator
            body = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
        lines = [f"{request.method} {request.url.raw_path.decode()} HTTP/1.1".encode()]
        lines += [name + b": " + value for name, value in request.headers.raw]
        self.connection.send(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        response = self.gateway.read_response(self.connection, head_only=request.method == "HEAD")
        if response.closes:  # as a client does: the next request goes on a new connection
            self.connection = None
        # A stream not yet read, as httpx's own transports give: read whole, or raw with iter_raw().
        stream = httpx.ByteStream(response.body)
        return httpx.Response(response.status, headers=response.headers, stream=stream, request=request)
