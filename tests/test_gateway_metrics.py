"""GET /metrics: figures that match what the answers said, who may scrape, a real Prometheus and
promtool reading them, several workers adding up, and a dashboard that queries only what exists."""

from __future__ import annotations

import json
import re
import select
import shutil
import socket
import subprocess
import time
import uuid

import httpx
import pytest

from tests.support.chat import chat_body
from tests.support.front import read_to_eof, send_all
from tests.support.gateway import Backend, Gateway, Reader
from tests.support.processes import REPO_ROOT, Simulator, free_port, start_process, wait_for_http, wait_until

SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    found = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        found.append((match[1], dict(LABEL.findall(match[2] or "")), float(match[3])))
    return found


def total(text: str, name: str, **labels: str) -> float:
    return sum(
        value
        for sample, have, value in samples(text)
        if sample == name and all(have.get(k) == v for k, v in labels.items())
    )


def scrape(gateway: Gateway, key: str | None = None) -> str:
    with gateway.http(key) as client:
        response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


def chat(gateway: Gateway, key: str, model: str, max_tokens: int, stream: bool) -> int:
    """One chat request; returns the completion tokens its `usage` reported."""
    client = gateway.openai(key)
    if not stream:
        reply = client.chat.completions.create(**chat_body(model, max_tokens=max_tokens))
        return reply.usage.completion_tokens
    usage = None
    for chunk in client.chat.completions.create(
        **chat_body(model, max_tokens=max_tokens, stream=True, stream_options={"include_usage": True})
    ):
        usage = chunk.usage or usage
    assert usage is not None
    return usage.completion_tokens


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, simulator):
    backend = Backend("sim", simulator.base_url, path="/models/sim", aliases="sim-alias")
    with Gateway.start(tmp_path_factory.mktemp("metrics"), [backend]) as gateway:
        yield gateway


def test_requests_and_completion_tokens_per_model_and_key_equal_what_the_answers_said(gateway):
    before = scrape(gateway)
    user_tokens = [chat(gateway, gateway.key, "sim", n, stream=n % 2 == 0) for n in (3, 4, 5, 6)]
    admin_tokens = [chat(gateway, gateway.admin_key, "sim-alias", n, stream=True) for n in (2, 7)]
    after = scrape(gateway)

    def grew(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert grew("vllm_gateway_requests_total", model="sim", key="test-user", status="2xx") == 4
    assert grew("vllm_gateway_completion_tokens_total", model="sim", key="test-user") == sum(user_tokens)
    # An alias counts under its model's name.
    assert grew("vllm_gateway_requests_total", model="sim", key="test-admin", status="2xx") == 2
    assert grew("vllm_gateway_completion_tokens_total", model="sim", key="test-admin") == sum(admin_tokens)
    assert grew("vllm_gateway_request_duration_seconds_count", model="sim", key="test-user", status="2xx") == 4
    assert grew("vllm_gateway_time_to_first_token_seconds_count", model="sim", key="test-user") == 2
    assert grew("vllm_gateway_overhead_seconds_count", model="sim", backend="sim") == 6
    assert total(after, "vllm_gateway_backend_up", model="sim", backend="sim") == 1
    assert total(after, "vllm_gateway_requests_in_flight", model="sim", backend="sim") == 0
    assert total(after, "process_resident_memory_bytes") > 0
    assert total(after, "process_open_fds") > 0


def test_model_names_the_gateway_does_not_know_never_become_label_values(gateway):
    made_up = f"made-up-{uuid.uuid4().hex}"
    before = scrape(gateway)
    with gateway.http(gateway.key) as client:
        answer = client.post("/v1/chat/completions", json={"model": made_up, "messages": []})
    assert answer.status_code == 404
    after = scrape(gateway)
    assert made_up not in after
    labels = {"model": "unknown", "key": "test-user", "status": "4xx"}
    name = "vllm_gateway_requests_total"
    assert total(after, name, **labels) - total(before, name, **labels) == 1


def test_no_key_secret_appears_in_the_exposition(gateway):
    chat(gateway, gateway.key, "sim", 2, stream=False)
    chat(gateway, gateway.admin_key, "sim", 2, stream=True)
    text = scrape(gateway, gateway.admin_key)
    for secret in (gateway.key, gateway.admin_key):
        assert secret not in text
        assert secret[:12] not in text
    assert "sk-" not in text
    for record in json.loads((gateway.workdir / "api_keys.json").read_text())["keys"]:
        assert record["hash"].split(":")[-1] not in text


def test_exposition_passes_promtool_check_metrics(gateway):
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: scripts/install_test_deps.sh installs the prometheus package"
    chat(gateway, gateway.key, "sim", 3, stream=True)
    text = scrape(gateway)
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rate_limited_requests_are_counted_by_key_name(tmp_path, simulator):
    env = {"GATEWAY_RATE_LIMIT": "2/minute"}
    with Gateway.start(tmp_path, [Backend("sim", simulator.base_url)], env=env) as gateway:
        with gateway.http(gateway.key) as client:
            statuses = [
                client.post("/v1/chat/completions", json=chat_body("sim", max_tokens=1)).status_code for _ in range(3)
            ]
        text = scrape(gateway)
    assert statuses == [200, 200, 429]
    assert total(text, "vllm_gateway_rate_limited_total", key="test-user", kind="requests") == 1
    assert total(text, "vllm_gateway_requests_total", model="-", key="test-user", status="4xx") == 1


def test_requests_refused_by_a_token_limit_are_counted_as_kind_tokens(tmp_path, simulator):
    env = {"GATEWAY_TOKEN_LIMIT": "10/minute"}
    with Gateway.start(tmp_path, [Backend("sim", simulator.base_url)], env=env) as gateway:
        with gateway.http(gateway.key) as client:
            answers = [client.post("/v1/chat/completions", json=chat_body("sim", max_tokens=5)) for _ in range(4)]
        text = scrape(gateway)
    refused = [answer for answer in answers if answer.status_code == 429]
    assert refused and all(answer.json()["error"]["type"] == "tokens" for answer in refused)
    assert total(text, "vllm_gateway_rate_limited_total", key="test-user", kind="tokens") == len(refused)
    assert total(text, "vllm_gateway_rate_limited_total", kind="requests") == 0


def test_a_stream_the_backend_drops_counts_as_a_mid_stream_upstream_error(tmp_path):
    with Simulator.start(tmp_path, "--crash-after-tokens", "2") as simulator:
        with Gateway.start(tmp_path / "gw", [Backend("sim", simulator.base_url)]) as gateway:
            with gateway.http(gateway.key) as client:
                answer = client.post(
                    "/v1/chat/completions",
                    json=chat_body("sim", max_tokens=20, stream=True),
                )

            def counted() -> str | None:
                text = scrape(gateway)
                return text if total(text, "vllm_gateway_requests_total", model="sim") else None

            # The request is counted after the gateway has counted its prompt, which the stream's usage
            # never gave: it asks the backend, which crashed. The client has its answer by then, and a
            # scrape on another connection came between, once.
            text = wait_until(counted, timeout=10, interval=0.1)
    assert answer.status_code == 200 and "upstream_error" in answer.text
    assert total(text, "vllm_gateway_upstream_errors_total", model="sim", backend="sim", kind="mid_stream") == 1
    assert total(text, "vllm_gateway_requests_total", model="sim", status="5xx") == 1


def test_scrapes_from_outside_the_allowed_networks_need_an_admin_key(tmp_path, simulator):
    env = {"GATEWAY_METRICS_ALLOW": "10.0.0.0/8"}  # excludes 127.0.0.1, where the test connects from
    with Gateway.start(tmp_path, [Backend("sim", simulator.base_url)], env=env) as gateway:
        with gateway.http() as client:
            keyless = client.get("/metrics")
        with gateway.http(gateway.key) as client:
            user = client.get("/metrics")
        with gateway.http("sk-not-a-key") as client:
            wrong = client.get("/metrics")
        with gateway.http() as client:
            in_query = client.get("/metrics", params={"api_key": gateway.admin_key})
        admin = scrape(gateway, gateway.admin_key)
    assert keyless.status_code == 403 and user.status_code == 403 and wrong.status_code == 401
    for refused in (keyless, user, wrong):
        assert set(refused.json()["error"]) == {"message", "type", "param", "code"}
    assert keyless.json()["error"] == {
        "message": "Metrics are answered to the networks in GATEWAY_METRICS_ALLOW and to admin keys.",
        "type": "permission_error",
        "param": None,
        "code": "metrics_forbidden",
    }
    assert in_query.status_code == 200
    assert "vllm_gateway_requests_total" in admin


def test_metrics_turned_off_answer_404_and_requests_still_flow(tmp_path, simulator):
    env = {"GATEWAY_METRICS": "false"}
    with Gateway.start(tmp_path, [Backend("sim", simulator.base_url)], env=env) as gateway:
        assert chat(gateway, gateway.key, "sim", 3, stream=False) == 3
        with gateway.http(gateway.admin_key) as client:
            response = client.get("/metrics")
        assert response.status_code == 404
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_metrics_on_a_port_of_their_own_leave_the_gateway_port(tmp_path, simulator):
    port = free_port()
    env = {"GATEWAY_METRICS_PORT": str(port)}
    with Gateway.start(tmp_path, [Backend("sim", simulator.base_url)], env=env) as gateway:
        chat(gateway, gateway.key, "sim", 4, stream=False)
        with gateway.http(gateway.admin_key) as client:
            on_gateway_port = client.get("/metrics")
        own = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
        elsewhere = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10)
    assert on_gateway_port.status_code == 404
    assert own.status_code == 200
    assert total(own.text, "vllm_gateway_completion_tokens_total", model="sim", key="test-user") == 4
    assert elsewhere.status_code == 404 and elsewhere.json()["error"]["code"]


def test_the_metrics_port_refuses_other_methods_and_bodies_declared_too_large_on_their_head(tmp_path, simulator):
    port = free_port()
    env = {"GATEWAY_METRICS_PORT": str(port)}
    with Gateway.start(tmp_path, [Backend("sim", simulator.base_url)], env=env):
        answers = []
        for head in (
            b"POST /metrics HTTP/1.1\r\nHost: metrics\r\nContent-Length: 2\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\nHost: metrics\r\nContent-Length: 1000000000\r\n\r\n",
        ):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                send_all(sock, head)  # the body never comes: the answer must not wait for it
                answers.append(read_to_eof(sock, timeout=5))
    not_allowed, too_large = answers
    assert not_allowed.startswith(b"HTTP/1.1 405 ")
    assert json.loads(not_allowed.partition(b"\r\n\r\n")[2]) == {
        "error": {
            "message": "Method Not Allowed",
            "type": "invalid_request_error",
            "param": None,
            "code": "method_not_allowed",
        }
    }
    assert too_large.startswith(b"HTTP/1.1 413 ")
    assert json.loads(too_large.partition(b"\r\n\r\n")[2])["error"]["code"] == "body_too_large"


def open_count(sockets: list[socket.socket]) -> int:
    """How many of these connections the gateway has not closed."""
    readable, _, _ = select.select(sockets, [], [], 0)
    still = len(sockets) - len(readable)
    for sock in readable:
        try:
            still += sock.recv(1) != b""
        except OSError:
            pass  # reset: closed
    return still


def test_idle_connections_to_the_metrics_port_neither_starve_the_gateway_port_nor_stay(tmp_path, simulator):
    # As reported: `ulimit -n 256` and 400 idle connections to the metrics port (no key needed).
    port = free_port()
    env = {"GATEWAY_METRICS_PORT": str(port), "GATEWAY_HEAD_TIMEOUT": "2", "GATEWAY_USAGE_FLUSH_SECONDS": "0.2"}
    with Gateway.start(tmp_path, [Backend("sim", simulator.base_url)], env=env, open_files=256) as gateway:
        idle: list[socket.socket] = []
        try:
            for _ in range(400):
                try:
                    idle.append(socket.create_connection(("127.0.0.1", port), timeout=2))
                except OSError:
                    break  # not even accepted into the kernel's queue: the gateway stopped accepting
            # The gateway's port still serves a relayed request, which the ledger can still write down.
            with gateway.http(gateway.admin_key, timeout=5) as client:
                assert client.get("/health").status_code == 200
                assert chat(gateway, gateway.key, "sim", 3, stream=False) == 3

                def counted() -> bool:
                    query = {"start_time": int(time.time()) - 3600, "bucket_width": "1d"}
                    data = client.get("/admin/usage", params=query).json()["data"]
                    return any(result["num_model_requests"] for bucket in data for result in bucket["results"])

                wait_until(counted, timeout=10, interval=0.2)
            assert len(idle) == 400
            # Those over the metrics port's cap closed at once, the others after GATEWAY_HEAD_TIMEOUT.
            wait_until(lambda: open_count(idle) == 0, timeout=10, interval=0.2)
        finally:
            for sock in idle:
                sock.close()
        assert httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).status_code == 200
        logs = gateway.log_text() + (tmp_path / "gateway.stdout.log").read_text()
    assert "Too many open files" not in logs


SCRAPE = b"GET /metrics HTTP/1.1\r\nHost: metrics\r\n\r\n"


def test_connections_to_the_metrics_port_beyond_its_cap_are_closed_at_once(tmp_path, simulator):
    port = free_port()
    env = {"GATEWAY_METRICS_PORT": str(port), "GATEWAY_METRICS_MAX_CONNECTIONS": "3"}
    with Gateway.start(tmp_path, [Backend("sim", simulator.base_url)], env=env) as gateway:
        held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(3)]
        readers = [Reader(sock) for sock in held]
        try:
            for sock, reader in zip(held, readers, strict=True):
                sock.sendall(SCRAPE)
                status, _, body = reader.response()
                assert status == 200 and b"vllm_gateway_requests_total" in body
            with socket.create_connection(("127.0.0.1", port), timeout=10) as extra:
                send_all(extra, SCRAPE)
                assert read_to_eof(extra, timeout=3) == b"", "the fourth connection got an answer"
            for sock, reader in zip(held, readers, strict=True):  # kept alive, and served again
                sock.sendall(SCRAPE)
                assert reader.response()[0] == 200
        finally:
            for sock in held:
                sock.close()
        wait_until(
            lambda: "connection limit of 3 reached (GATEWAY_METRICS_MAX_CONNECTIONS)" in gateway.log_text(), timeout=5
        )


def test_prometheus_scrapes_the_completion_tokens_the_answers_reported(tmp_path, gateway):
    prometheus = shutil.which("prometheus")
    assert prometheus, "prometheus is missing: scripts/install_test_deps.sh installs it"
    for n in (3, 5, 8):
        chat(gateway, gateway.key, "sim", n, stream=n % 2 == 1)
    expected = total(scrape(gateway), "vllm_gateway_completion_tokens_total", model="sim")
    assert expected > 0
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        "scrape_configs:\n  - job_name: gateway\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{gateway.port}']\n"
    )
    port = free_port()
    handle = start_process(
        [
            prometheus,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        log_path=tmp_path / "prometheus.log",
        cwd=tmp_path,
    )
    api = f"http://127.0.0.1:{port}/api/v1"
    try:
        wait_for_http(f"http://127.0.0.1:{port}/-/ready", timeout=60, process=handle)

        def target_up() -> bool:
            targets = httpx.get(api + "/targets", timeout=5).json()["data"]["activeTargets"]
            return any(target["health"] == "up" for target in targets)

        wait_until(target_up, timeout=60, interval=0.5)

        def scraped() -> float | None:
            query = 'sum(vllm_gateway_completion_tokens_total{model="sim"})'
            result = httpx.get(api + "/query", params={"query": query}, timeout=5).json()["data"]["result"]
            value = float(result[0]["value"][1]) if result else None
            return value if value == expected else None

        assert wait_until(scraped, timeout=60, interval=0.5) == expected
    finally:
        handle.stop()


def test_a_scrape_adds_up_every_worker(tmp_path, simulator, redis_url):
    env = {"GATEWAY_WORKERS": "2", "GATEWAY_RATE_LIMIT_STORAGE": redis_url}
    with Gateway.start(tmp_path, [Backend("sim", simulator.base_url)], env=env) as gateway:
        tokens = 0
        # New connections each time, so the kernel spreads them over the workers.
        for n in range(12):
            tokens += chat(gateway, gateway.key, "sim", 2 + n % 3, stream=n % 2 == 0)

        def whole() -> str | None:
            text = scrape(gateway)
            requests = total(text, "vllm_gateway_requests_total", model="sim", key="test-user")
            return text if requests == 12 and total(text, "vllm_gateway_workers") == 2 else None

        text = wait_until(whole, timeout=30, interval=0.2)
        log = (tmp_path / "gateway.stdout.log").read_text()
    assert total(text, "vllm_gateway_completion_tokens_total", model="sim", key="test-user") == tokens
    assert log.count("Started server process") == 2


DASHBOARD = REPO_ROOT / "docs" / "grafana-dashboard.json"
QUERIED_NAME = re.compile(r"\b((?:vllm_gateway_|process_)[a-zA-Z0-9_]*)")


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def test_dashboard_queries_only_metrics_the_gateway_exposes(gateway):
    chat(gateway, gateway.key, "sim", 2, stream=True)
    text = scrape(gateway)
    families = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    sample_names = {name for name, _, _ in samples(text)}
    expressions = dashboard_expressions()
    queried = {name for expr in expressions for name in QUERIED_NAME.findall(expr)}
    assert len(expressions) >= 8 and queried
    for name in sorted(queried):
        family = re.sub(r"_(bucket|sum|count)$", "", name)
        exposed = name in sample_names or name in families or families.get(family) == "histogram"
        assert exposed, f"the dashboard queries {name}, which /metrics does not expose"
