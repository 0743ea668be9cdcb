"""The processes under test: nginx as the canned backend, nginx as a reverse proxy, the gateway (this
revision's or another's), vllm-router, and the Python floor (python_pipe.py).

Each runs as a child of the driver, pinned with taskset, on free loopback ports, and is stopped with it.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from canned import VARIANTS, CannedFiles, Variant, token_event_size

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
# The tests' picker, below the ports that port 0 hands out: the suite runs the benchmark's own tests
# beside others, and a port drawn from port 0 can be taken before its server binds it.
from tests.support.processes import free_port  # noqa: E402


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_for_port(port: int, proc: subprocess.Popen, what: str, log_path: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{what} exited with status {proc.returncode} before listening on port {port}; "
                f"{log_path}:\n{tail(log_path)}"
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout:.0f} s")


@dataclass
class Child:
    """A process started by the driver in its own session, so stopping it also takes its children."""

    name: str
    proc: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, grace: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                log(f"{self.name} did not stop within {grace:.0f} s; killing it")
        # Whatever it started and left behind is still in its process group.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


def spawn(
    name: str,
    argv: list[str],
    log_path: Path,
    cpus: list[int] | None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> Child:
    if cpus:
        argv = ["taskset", "-c", ",".join(map(str, cpus)), *argv]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
    return Child(name, proc, log_path)


# ---- nginx -----------------------------------------------------------------------------------------


def _open_files_limit() -> int:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return 65536 if hard == resource.RLIM_INFINITY else min(65536, hard)


def _nginx_main(directory: Path, http_body: str, workers: int = 1) -> str:
    # Workers keep the master's user when it is not root; as root, nginx would otherwise switch them to
    # "nobody", which may not be able to read the work directory.
    user = f"user {getpass.getuser()};\n" if os.geteuid() == 0 else ""
    temp = "\n".join(
        f"    {kind}_temp_path {directory / 'tmp' / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""# Written by benchmarks/bench.py; regenerated on every run.
{user}worker_processes {workers};
worker_rlimit_nofile {_open_files_limit()};
pid {directory / "nginx.pid"};
error_log {directory / "error.log"} warn;

events {{
    worker_connections 16384;
}}

http {{
    types {{ }}
    server_tokens off;
    etag off;
    open_file_cache max=64 inactive=1h;
    open_file_cache_valid 1h;
    tcp_nodelay on;
    keepalive_timeout 300s;
    keepalive_requests 100000000;
    client_body_buffer_size 64k;
{temp}
{http_body}
}}
"""


# One write of one event's size every size/rate seconds: ~100 writes over about a second, like a real token
# stream. Without sendfile (which rounds file chunks up to whole pages), output_buffers sets the write size;
# postpone_output 0 stops nginx from gathering small writes into one.
PACING = """
            sendfile off;
            output_buffers 1 {size};
            postpone_output 0;
            limit_rate {rate};"""


def backend_conf(directory: Path, files: CannedFiles, ports: dict[str, int], workers: int) -> str:
    servers = []
    for variant in VARIANTS:
        response = files.response(variant)
        if variant.paced:
            size = token_event_size(variant.model)
            rate = response.stat().st_size
            pacing = PACING.format(size=size, rate=rate)
        else:
            pacing = ""
        content_type = "text/event-stream" if variant.stream else "application/json"
        servers.append(f"""
    server {{
        listen 127.0.0.1:{ports[variant.name]} backlog=4096;
        access_log off;
        location = /health {{ return 200; }}
        location = /v1/models {{
            default_type application/json;
            alias {files.models(variant)};
        }}
        # nginx refuses POST on static files; the 405 error page re-enters as GET on the canned response.
        location = /v1/chat/completions {{
            error_page 405 =200 /canned;
            return 405;
        }}
        location = /canned {{
            internal;
            default_type {content_type};
            alias {response};{pacing}
        }}
    }}""")
    return _nginx_main(directory, "".join(servers), workers)


def proxy_conf(directory: Path, backend_ports: dict[str, int], ports: dict[str, int]) -> str:
    blocks = []
    for variant in VARIANTS:
        blocks.append(f"""
    upstream backend_{variant.name} {{
        server 127.0.0.1:{backend_ports[variant.name]};
        keepalive 1024;
        keepalive_requests 100000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen 127.0.0.1:{ports[variant.name]} backlog=4096;
        # Logged like the gateway logs, buffered as any production nginx would be.
        access_log {directory / "access.log"} combined buffer=64k flush=1s;
        location / {{
            proxy_pass http://backend_{variant.name};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            # A token stream must reach the client as it is produced.
            proxy_buffering off;
            proxy_read_timeout 300s;
        }}
    }}""")
    return _nginx_main(directory, "".join(blocks))


@dataclass
class PortPerVariant:
    """A process under test (nginx, the Python pipe) serving each variant on a port of its own."""

    child: Child
    ports: dict[str, int]

    def url(self, variant: Variant) -> str:
        return f"http://127.0.0.1:{self.ports[variant.name]}"


def start_nginx(
    name: str, directory: Path, conf_text: str, ports: dict[str, int], cpus: list[int] | None
) -> PortPerVariant:
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (directory / "tmp" / kind).mkdir(parents=True, exist_ok=True)
    conf = directory / "nginx.conf"
    conf.write_text(conf_text)
    argv = ["nginx", "-p", str(directory), "-c", str(conf), "-e", str(directory / "error.log"), "-g", "daemon off;"]
    child = spawn(name, argv, directory / "stdout.log", cpus)
    for port in ports.values():
        wait_for_port(port, child.proc, name, child.log_path)
    return PortPerVariant(child, ports)


def start_backend(work: Path, files: CannedFiles, cpus: list[int] | None) -> PortPerVariant:
    """nginx with one worker per core in `cpus` (one when unpinned) serving the canned answers."""
    ports = {variant.name: free_port() for variant in VARIANTS}
    directory = work.resolve() / "nginx-backend"
    conf = backend_conf(directory, files, ports, workers=len(cpus or [0]))
    return start_nginx("nginx backend", directory, conf, ports, cpus)


def start_proxy(work: Path, backend: PortPerVariant, cpu: int | None) -> PortPerVariant:
    """nginx with one worker, on `cpu`, proxying each variant's port to the backend's."""
    ports = {variant.name: free_port() for variant in VARIANTS}
    directory = work.resolve() / "nginx-proxy"
    conf = proxy_conf(directory, backend.ports, ports)
    return start_nginx("nginx proxy", directory, conf, ports, None if cpu is None else [cpu])


def start_pipe(work: Path, python: str, backend: PortPerVariant, cpu: int | None) -> PortPerVariant:
    """python_pipe.py on `cpu`: a port per variant, piped to the backend's."""
    ports = {variant.name: free_port() for variant in VARIANTS}
    pairs = [f"{ports[name]}:{backend.ports[name]}" for name in ports]
    argv = [python, str(Path(__file__).resolve().parent / "python_pipe.py"), *pairs]
    child = spawn(
        "python pipe", argv, work.resolve() / "python-pipe" / "stdout.log", None if cpu is None else [cpu], cwd=REPO
    )
    for port in ports.values():
        wait_for_port(port, child.proc, "python pipe", child.log_path)
    return PortPerVariant(child, ports)


# ---- the gateway -----------------------------------------------------------------------------------


@dataclass
class Gateway:
    child: Child
    port: int
    key: str
    env: dict[str, str] = field(repr=False)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, variant: Variant) -> str:
        return self.base_url  # the gateway routes on the model named in the body


def gateway_env(work: Path, port: int, model_config: Path, overrides: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "GATEWAY_PORT": str(port),
            "GATEWAY_HOST": "127.0.0.1",
            "GATEWAY_KEY_FILE": str(work / "keys.json"),
            "VLLM_MODEL_CONFIG": str(model_config),
            # Everything stays on, with limits far above what the load can reach.
            "GATEWAY_RATE_LIMIT": "1000000000/minute",
            "GATEWAY_CONCURRENCY_LIMIT": "100000",
            # One key makes every connection's requests: its cap of requests at once must not bind.
            "GATEWAY_MAX_PARALLEL_REQUESTS": "100000",
            "GATEWAY_LOG_DIR": str(work / "logs"),
            "VLLM_LOG_DIR": str(work / "logs"),
            "VLLM_RUN_DIR": str(work / "run"),
            # One process on one core: figures are per gateway core.
            "GATEWAY_WORKERS": "1",
        }
    )
    env.update(overrides)
    return env


def create_key(python: str, env: dict[str, str], repo: Path = REPO) -> str:
    argv = [python, str(repo / "vllm_api_server.py"), "keys", "create", "--name", "bench", "--json"]
    done = subprocess.run(argv, env=env, cwd=repo, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"creating a gateway key failed ({' '.join(argv[1:])}):\n{done.stderr.strip()}")
    return json.loads(done.stdout)["key"]


def write_model_config(
    path: Path, routes: dict[str, str], model_path: str = "/bench", max_num_seqs: int | None = None
) -> None:
    """A model config in the format of vllm_model_configs.sh: url= backends the gateway only routes to.
    With `max_num_seqs`, each backend's capacity for admission (else admission does not limit them)."""
    lines = ["# shellcheck shell=bash", "# Written by benchmarks/bench.py."]
    capacity = f" max_num_seqs={max_num_seqs}" if max_num_seqs else ""
    for name, url in routes.items():
        lines.append(f"vllm_model name={name} path={model_path} url={url}{capacity}")
    path.write_text("\n".join(lines) + "\n")


def start_gateway(
    work: Path,
    python: str,
    routes: dict[str, str],
    cpu: int | None,
    model_path: str = "/bench",
    overrides: dict[str, str] | None = None,
    max_num_seqs: int | None = None,
    repo: Path = REPO,
    launcher: list[str] | None = None,
    start_timeout: float = 60,
) -> Gateway:
    """Start `python vllm_api_server.py serve` with one key and `routes` (model name -> backend URL).

    `repo` is the checkout whose gateway runs (another revision's worktree for the baseline): its
    vllm_api_server.py, run there, imports that checkout's vllm_gateway before the installed one. Settings
    an older revision does not know are ignored by it. `launcher` goes in front of the gateway's command
    (valgrind, for benchmarks/instructions.py)."""
    work.mkdir(parents=True, exist_ok=True)
    model_config = work / "models.sh"
    write_model_config(model_config, routes, model_path, max_num_seqs)
    keys = work / "keys.json"
    if keys.exists():
        keys.unlink()
    port = free_port()
    env = gateway_env(work, port, model_config, overrides or {})
    key = create_key(python, env, repo)
    argv = [*(launcher or []), python, str(repo / "vllm_api_server.py"), "serve"]
    child = spawn("gateway", argv, work / "gateway.out", None if cpu is None else [cpu], env=env, cwd=repo)
    wait_for_port(port, child.proc, "gateway", child.log_path, timeout=start_timeout)
    return Gateway(child, port, key, env)


# ---- vllm-router -----------------------------------------------------------------------------------


@dataclass
class RouterPerVariant:
    """vllm-router in front of the canned backend: one router per variant, as it serves one set of workers
    (routing on the model name is its multi-model mode, a feature the comparison leaves out)."""

    children: dict[str, Child]
    ports: dict[str, int]

    def url(self, variant: Variant) -> str:
        return f"http://127.0.0.1:{self.ports[variant.name]}"

    def pid(self, variant: Variant) -> int:
        return self.children[variant.name].pid


def vllm_router_argv(executable: str, port: int, worker: str, metrics_port: int) -> list[str]:
    return [
        executable,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--worker-urls",
        worker,
        # With one worker every policy picks it; round_robin does so without the prefix tree of the default
        # cache_aware policy, which the gateway has no counterpart of.
        "--policy",
        "round_robin",
        # It always serves Prometheus metrics (as the gateway does); each router needs a port of its own.
        "--prometheus-port",
        str(metrics_port),
        # One health check at start, then none during the run: the backend is nginx and stays up.
        "--health-check-interval-secs",
        "86400",
    ]


def start_vllm_router(work: Path, executable: str, backend: PortPerVariant, cpu: int | None) -> RouterPerVariant:
    """A vllm-router per variant, all on `cpu`, each with the backend's port of that variant as its worker."""
    directory = work.resolve() / "vllm-router"
    children, ports = {}, {}
    try:
        for variant in VARIANTS:
            ports[variant.name] = free_port()
            argv = vllm_router_argv(executable, ports[variant.name], backend.url(variant), free_port())
            log_path = directory / f"{variant.name}.log"
            children[variant.name] = spawn(
                f"vllm-router ({variant.name})", argv, log_path, None if cpu is None else [cpu]
            )
        for name, child in children.items():
            wait_for_port(ports[name], child.proc, child.name, child.log_path)
    except BaseException:
        for child in children.values():
            child.stop()
        raise
    return RouterPerVariant(children, ports)


# ---- checks ----------------------------------------------------------------------------------------


def post(url: str, body: bytes, key: str | None, timeout: float = 30.0) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url + "/v1/chat/completions", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def chat_request(host: str, body: bytes, key: str | None) -> bytes:
    """A POST of `body` to /v1/chat/completions as chat.lua sends it (Host is `host`, a key when given)."""
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        + (f"Authorization: Bearer {key}\r\n" if key else "")
        + f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, int]:
    """Read one HTTP/1.1 answer whole, of a fixed length or chunked: its status, and the bytes it took on
    the wire, head and framing included (what wrk counts)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    fields = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    size = len(head)
    if "chunked" in fields.get("transfer-encoding", "").lower():
        while True:
            line = await reader.readuntil(b"\r\n")
            chunk = int(line.split(b";")[0], 16)
            size += len(line) + len(await reader.readexactly(chunk + 2))
            if chunk == 0:
                return status, size
    return status, size + len(await reader.readexactly(int(fields.get("content-length", "0"))))


def answer_bytes(url: str, body: bytes, key: str | None, timeout: float = 60.0) -> int:
    """The bytes one whole answer takes on the wire through `url`, as wrk counts what it reads of a
    kept-alive connection."""

    async def one() -> int:
        host_port = url.removeprefix("http://")
        host, _, port = host_port.partition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(chat_request(host_port, body, key))
            return (await read_answer(reader))[1]
        finally:
            writer.close()

    return asyncio.run(asyncio.wait_for(one(), timeout))


def check_response(variant: Variant, status: int, payload: bytes, events_per_stream: int) -> str | None:
    """None when the response is the whole canned answer, else what is wrong with it."""
    if status != 200:
        return f"status {status}: {payload[:300]!r}"
    if not variant.stream:
        try:
            choices = json.loads(payload)["choices"]
        except (ValueError, KeyError) as error:
            return f"not a chat completion ({error}): {payload[:300]!r}"
        return None if choices else "no choices in the completion"
    events = [e for e in payload.replace(b"\r\n", b"\n").split(b"\n\n") if e.strip()]
    if not events or events[-1].strip() != b"data: [DONE]":
        return f"stream does not end with [DONE]: ...{payload[-200:]!r}"
    if len(events) < events_per_stream:
        return f"stream has {len(events)} events, expected {events_per_stream}"
    return None


def wait_until_serving(
    name: str, url_of, files: CannedFiles, key: str | None, proc: subprocess.Popen, timeout: float
) -> None:
    """Send each variant once and check the answer, retrying while the target warms up (health checks)."""
    for variant in VARIANTS:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with status {proc.returncode}")
            try:
                status, payload = post(url_of(variant), files.body(variant).read_bytes(), key)
                problem = check_response(variant, status, payload, files.events_per_stream)
            except OSError as error:
                problem = str(error)
            if problem is None:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} does not serve {variant.model}: {problem}")
            time.sleep(0.5)
