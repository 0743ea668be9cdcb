"""The gateway as a real process for tests: a model config, a key file, keys, a free port.

gateway = Gateway.start(tmp_path, [Backend("sim", simulator.base_url, path="/models/sim")])
client = gateway.openai()            # the official SDK, with an ordinary user key
gateway.log_text()                   # vllm_api_server.log
gateway.stop()

The gateway and its command line (`gateway.cli(...)`) start as forks of a process that has imported them
(tests/support/forked.py) when the suite names its build (GATEWAY_COMPILED=0 or 1, as scripts/test.sh
does), and as `python vllm_api_server.py ...` otherwise.

With GATEWAY_TLS_CERTFILE in `env`, the gateway serves HTTPS: gateway.url is https://, and its clients
trust that certificate (a self-signed one is its own CA: tests/support/tls.py makes one).
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.support import forked
from tests.support.clients import client_tls, sdk
from tests.support.processes import (
    REPO_ROOT,
    ProcessHandle,
    free_port,
    start_forked,
    start_process,
    wait_for_http,
    wait_until,
)
from vllm_gateway.metrics.recording import REQUESTS

# What uvicorn logs in each worker once the app's lifespan has started.
WORKER_STARTED = "Application startup complete."


@dataclass
class Backend:
    """One `vllm_model` block of the test's model config."""

    name: str
    url: str
    path: str = ""
    id: str = ""
    aliases: str = ""
    api_key: str = ""
    max_num_seqs: str = ""
    max_concurrency: str = ""

    def config_line(self) -> str:
        words = [f"name={self.name}", f"url={self.url}"]
        for key in ("path", "id", "aliases", "api_key", "max_num_seqs", "max_concurrency"):
            if getattr(self, key):
                words.append(f"{key}={getattr(self, key)}")
        return "vllm_model " + " ".join(f"'{word}'" for word in words) + "\n"


def write_model_config(path: Path, backends: Sequence[Backend]) -> Path:
    path.write_text("".join(backend.config_line() for backend in backends))
    return path


class Gateway:
    def __init__(self, workdir: Path, port: int, handle: ProcessHandle, env: dict[str, str]) -> None:
        self.workdir = workdir
        self.port = port
        self.handle = handle
        self.env = env
        certfile = env.get("GATEWAY_TLS_CERTFILE")
        self.url = f"{'https' if certfile else 'http'}://127.0.0.1:{port}"
        # What the tests' clients trust over https: the gateway's own certificate.
        self.trust = ssl.create_default_context(cafile=certfile) if certfile else None
        self.admin_key = ""
        self.key = ""

    @classmethod
    def start(
        cls,
        workdir: Path,
        backends: Sequence[Backend],
        env: Mapping[str, str] | None = None,
        wait_ready: bool = True,
        open_files: int | None = None,
    ) -> Gateway:
        """`open_files`: the gateway's descriptor limit, soft and hard (`ulimit -n`), else the tests'."""
        port = free_port()
        full_env, admin, user = prepare_workdir(workdir, port, backends, env)
        log_path = workdir / "gateway.stdout.log"
        if forked.can_fork({**os.environ, **full_env}):
            handle = start_forked("gateway", ["serve"], full_env, log_path, open_files=open_files)
        else:
            command = [sys.executable, str(REPO_ROOT / "vllm_api_server.py"), "serve"]
            handle = start_process(command, env=full_env, log_path=log_path, open_files=open_files)
        gateway = cls(workdir, port, handle, full_env)
        gateway.admin_key, gateway.key = admin, user
        try:
            wait_for_http(gateway.url + "/health", timeout=30, process=handle, context=gateway.trust)
            gateway.wait_for_workers(int(full_env.get("GATEWAY_WORKERS", "1")))
            if wait_ready and backends:
                gateway.wait_until(lambda health: health["models_ready"] == health["models_total"])
        except BaseException:
            handle.stop()
            raise
        return gateway

    def wait_for_workers(self, workers: int) -> None:
        """/health answers once one worker does; on a busy machine the others may still be starting, and
        every connection would go to the first. Each worker logs this line when its lifespan has started."""
        if workers > 1:
            wait_until(lambda: self.handle.log().count(WORKER_STARTED) >= workers, timeout=60)

    def requests_by_worker(self, model: str, keys: set[str] | None = None) -> list[float]:
        """The requests for `model` that each worker has counted (of these keys, by name, if given), from
        their metrics snapshots (with several workers, each writes one a second)."""
        counts = []
        for path in sorted((self.workdir / "run" / "metrics").glob("*.json")):
            series = json.loads(path.read_text())["series"]  # labels (model, backend, key, status): figures
            counts.append(
                sum(
                    figures[REQUESTS]
                    for labels, figures in series
                    if labels[0] == model and (keys is None or labels[2] in keys)
                )
            )
        return counts

    # -- helpers for tests --

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = cli_run(self.env, args)
        if check:
            result.check_returncode()
        return result

    def create_key(self, *args: str) -> dict[str, object]:
        return json.loads(self.cli("keys", "create", "--json", *args).stdout)

    def http(self, key: str | None = None, timeout: float = 30) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout, verify=self.trust or client_tls())

    def openai(self, key: str | None = None, **kwargs: object):
        return sdk(self.url + "/v1", key or self.key, self.trust, **kwargs)

    def health(self, key: str | None = None) -> dict[str, object]:
        with self.http(key) as client:
            return client.get("/health").json()

    def waiting(self) -> int:
        """Requests waiting for a server with room, over every model (and, with several workers,
        every worker: Redis's count as of the last heartbeat)."""
        models = self.health(self.admin_key)["models"]
        return sum(int(model.get("waiting", 0)) for model in models)  # type: ignore[attr-defined]

    def wait_until(self, condition, timeout: float = 30.0) -> dict[str, object]:
        """Poll /health (with the admin key) until `condition(health)` holds."""
        deadline = time.monotonic() + timeout
        while True:
            health = self.health(self.admin_key)
            if condition(health):
                return health
            if time.monotonic() > deadline:
                raise TimeoutError(f"gateway health never matched: {health}")
            time.sleep(0.1)

    def wait_for_key(self, key: str, timeout: float = 5.0) -> None:
        """Wait until the gateway accepts `key` (at once since keys work on their first request; kept
        for the tests that make one before the gateway has started)."""
        deadline = time.monotonic() + timeout
        with self.http(key) as client:
            while client.get("/v1/models").status_code == 401:
                if time.monotonic() > deadline:
                    raise TimeoutError("the gateway never accepted the new key")
                time.sleep(0.05)

    @property
    def log_path(self) -> Path:
        return Path(self.env["GATEWAY_LOG_DIR"]) / "vllm_api_server.log"

    def log_text(self, settle: float = 0.3) -> str:
        time.sleep(settle)  # lines are written by a background thread
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self) -> int | None:
        return self.handle.stop()

    def __enter__(self) -> Gateway:
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        self.stop()
        if kind is not None:  # a failed test shows what the gateway said meanwhile
            lines = self.log_text(settle=0).splitlines()
            print("\n".join(["-- the gateway's log, its last lines:", *lines[-60:]]), file=sys.stderr)


def gateway_env(workdir: Path, port: int) -> dict[str, str]:
    return {
        "GATEWAY_HOST": "127.0.0.1",
        "GATEWAY_PORT": str(port),
        "GATEWAY_KEY_FILE": str(workdir / "api_keys.json"),
        "GATEWAY_LOG_DIR": str(workdir / "logs"),
        "VLLM_MODEL_CONFIG": str(workdir / "models.sh"),
        "VLLM_RUN_DIR": str(workdir / "run"),
        "GATEWAY_HEALTH_INTERVAL": "0.5",
        "GATEWAY_RATE_LIMIT": "100000/minute",
        "GATEWAY_ENV_FILE": str(workdir / "no-env-file"),
    }


def prepare_workdir(
    workdir: Path, port: int, backends: Sequence[Backend], env: Mapping[str, str] | None
) -> tuple[dict[str, str], str, str]:
    """A gateway's directory as its start needs it: the model config of `backends` and the keys test-admin
    and test-user. Returns the gateway's environment (gateway_env, `env` over it), the admin key and the
    user key."""
    workdir.mkdir(parents=True, exist_ok=True)
    full_env = {**gateway_env(workdir, port), **(env or {})}
    write_model_config(Path(full_env["VLLM_MODEL_CONFIG"]), backends)
    return full_env, test_key(full_env, "test-admin", admin=True), test_key(full_env, "test-user")


def test_key(env: Mapping[str, str], name: str, admin: bool = False) -> str:
    """A key named `name` in the gateway's key file, as `keys create` makes it but for its line in the
    audit trail: written by the key store in this process, since a CLI run for each of a gateway's two
    keys cost every start of one about half a second of CPU. A gateway started again in the same
    directory finds it there already (names are unique), and gets a new secret for it instead."""
    from vllm_gateway.keystore import KeyStore

    store = KeyStore(Path(env["GATEWAY_KEY_FILE"]))
    store.load()
    existing = next((record for record in store.records() if record.name == name), None)
    if existing is not None:
        rotated = store.rotate(existing.id)
        assert rotated is not None
        return rotated[1]
    return store.create(name, admin=admin)[1]


def cli_run(env: Mapping[str, str], args: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """`vllm_api_server.py ARGS` with `env` added to the tests' environment, its output captured."""
    full_env = {**os.environ, **env}
    if forked.can_fork(full_env):
        return forked.run("gateway", args, full_env, timeout=60)
    return command_run(full_env, args)


def command_run(env: Mapping[str, str], args: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """`python vllm_api_server.py ARGS` as a command, with the whole environment `env`."""
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "vllm_api_server.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=60,
    )


def run_cli(env: Mapping[str, str], *args: str) -> str:
    result = cli_run(env, args)
    if result.returncode != 0:
        raise RuntimeError(f"vllm_api_server.py {' '.join(args)} failed: {result.stderr}")
    return result.stdout


def raw_post(
    key: str, body: dict | bytes, path: str = "/v1/chat/completions", version: str = "1.1", extra: str = ""
) -> bytes:
    """The bytes of a POST with a JSON body and a key, for tests that speak HTTP over a raw socket."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return (
        f"POST {path} HTTP/{version}\r\nHost: gw\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n{extra}\r\n"
    ).encode() + data


class Reader:
    """Reads whole HTTP/1.1 responses off a socket: content-length, chunked, or to the close."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buffer += data
        return bool(data)

    def _take_until(self, marker: bytes) -> bytes:
        while marker not in self.buffer:
            if not self._fill():
                raise EOFError(f"connection closed before {marker!r}")
        head, self.buffer = self.buffer.split(marker, 1)
        return head

    def _take(self, size: int) -> bytes:
        while len(self.buffer) < size:
            if not self._fill():
                raise EOFError("connection closed mid-body")
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def response(self) -> tuple[int, dict[str, str], bytes]:
        head = self._take_until(b"\r\n\r\n").decode()
        status_line, *lines = head.split("\r\n")
        status = int(status_line.split()[1])
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if status == 100:
            return status, headers, b""
        if "content-length" in headers:
            body = self._take(int(headers["content-length"]))
        elif headers.get("transfer-encoding") == "chunked":
            parts = []
            while size := int(self._take_until(b"\r\n"), 16):
                parts.append(self._take(size))
                self._take(2)
            self._take(2)
            body = b"".join(parts)
        else:
            while self._fill():
                pass
            body, self.buffer = self.buffer, b""
        return status, headers, body

    def closed(self, timeout: float) -> bool:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
