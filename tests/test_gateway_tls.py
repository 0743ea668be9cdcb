"""HTTPS (GATEWAY_TLS_CERTFILE, GATEWAY_TLS_KEYFILE): what clients get over it, and without trusting it or
speaking it; the front's refusals, timeouts and closes over TLS; the metrics port; several workers; what
`serve` refuses at start; and the warning of a gateway that other hosts reach in clear text."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import time
import warnings

import httpx
import openai
import pytest

from tests.support.chat import chat_body
from tests.support.front import LIVENESS, assert_rejected, read_to_eof
from tests.support.gateway import Backend, Gateway, Reader, cli_run, gateway_env, raw_post
from tests.support.processes import Simulator, free_port, wait_until
from tests.support.tls import encrypted, self_signed
from vllm_gateway.server.timers import LINGER_QUIET_SECONDS
from vllm_gateway.tls import loopback

MIB = 1024 * 1024
WRONG_KEY = "sk-" + "x" * 43
HEALTH = b"GET /health HTTP/1.1\r\nHost: gw\r\n\r\n"
WARNING = "without TLS: API keys and prompts cross the network in clear text"


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    return self_signed(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def simulator(tmp_path_factory):
    """Tokens as fast as it can make them, and room for a million of them in one answer."""
    with Simulator.start(
        tmp_path_factory.mktemp("sim"), "--token-rate", "0", "--max-model-len", "10000000", model="sim"
    ) as simulator:
        yield simulator


@pytest.fixture(scope="module")
def metrics_port():
    return free_port()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, simulator, certificate, metrics_port):
    """HTTPS on every address (as by default), with the metrics on a port of their own and one-second
    head and send timeouts."""
    cert, key = certificate
    env = {
        "GATEWAY_TLS_CERTFILE": str(cert),
        "GATEWAY_TLS_KEYFILE": str(key),
        "GATEWAY_HOST": "0.0.0.0",
        "GATEWAY_METRICS_PORT": str(metrics_port),
        "GATEWAY_HEAD_TIMEOUT": "1",
        "GATEWAY_SEND_TIMEOUT": "1",
    }
    with Gateway.start(tmp_path_factory.mktemp("gw-tls"), [Backend("sim", simulator.base_url)], env=env) as gateway:
        yield gateway


def tls_connect(gateway: Gateway, suppress_ragged_eofs: bool = True, **options: int) -> ssl.SSLSocket:
    """A TLS connection to the gateway that trusts its certificate; `options`: socket options set before
    connecting (SO_SNDBUF, SO_RCVBUF), so that the TCP window is small from the start."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    for name, value in options.items():
        sock.setsockopt(socket.SOL_SOCKET, getattr(socket, name), value)
    sock.settimeout(LIVENESS)
    sock.connect(("127.0.0.1", gateway.port))
    assert gateway.trust is not None
    return gateway.trust.wrap_socket(sock, server_hostname="127.0.0.1", suppress_ragged_eofs=suppress_ragged_eofs)


def serve(workdir, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`vllm_api_server.py serve` with these settings, to its end (a refusal is expected)."""
    workdir.mkdir(parents=True, exist_ok=True)
    return cli_run(gateway_env(workdir, free_port()) | env, ["serve"])


# -- clients --


def test_the_openai_sdk_gets_a_chat_completion_and_a_stream_over_https(gateway, certificate):
    cert, _ = certificate
    assert gateway.url.startswith("https://")
    client = openai.OpenAI(
        base_url=gateway.url + "/v1",
        api_key=gateway.key,
        max_retries=0,
        http_client=httpx.Client(verify=ssl.create_default_context(cafile=cert)),
    )
    reply = client.chat.completions.create(**chat_body("sim", max_tokens=5))
    assert reply.choices[0].message.content
    assert reply.usage.completion_tokens == 5
    stream = client.chat.completions.create(
        **chat_body("sim", max_tokens=8, stream=True, stream_options={"include_usage": True})
    )
    chunks = list(stream)
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) == 8
    assert chunks[-1].usage.completion_tokens == 8


def test_the_openai_sdk_finds_the_gateway_through_openai_base_url_and_ssl_cert_file(gateway, certificate):
    """As docs/security.md tells clients: the variables alone, no code."""
    cert, _ = certificate
    env = {**os.environ, "OPENAI_BASE_URL": gateway.url + "/v1", "OPENAI_API_KEY": gateway.key}
    env["SSL_CERT_FILE"] = str(cert)
    listing = "import openai; print([model.id for model in openai.OpenAI(max_retries=0).models.list()])"
    result = subprocess.run([sys.executable, "-c", listing], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['sim']"


def test_a_client_that_does_not_trust_the_certificate_fails_verification(gateway):
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=gateway.key, max_retries=0)  # the system's CAs
    with pytest.raises(openai.APIConnectionError) as caught:
        client.models.list()
    causes = []
    error: BaseException | None = caught.value
    while error is not None:
        causes.append(error)
        error = error.__cause__ or error.__context__
    assert any(isinstance(cause, ssl.SSLCertVerificationError) for cause in causes), causes


def handshake(gateway: Gateway, version: ssl.TLSVersion, alpn: list[str]) -> ssl.SSLSocket:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(gateway.env["GATEWAY_TLS_CERTFILE"])
    context.set_ciphers("DEFAULT:@SECLEVEL=0")  # the client would allow old protocols: the gateway must not
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # naming TLS 1.1 is deprecated
        context.minimum_version = context.maximum_version = version
    context.set_alpn_protocols(alpn)
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=LIVENESS)
    return context.wrap_socket(sock, server_hostname="127.0.0.1")


def test_tls_below_1_2_is_refused_and_a_client_offering_http2_is_given_http_1_1(gateway):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old = ssl.TLSVersion.TLSv1_1
    with pytest.raises(ssl.SSLError):
        handshake(gateway, old, ["http/1.1"]).close()
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        with handshake(gateway, version, ["h2", "http/1.1"]) as sock:
            assert sock.selected_alpn_protocol() == "http/1.1"
            sock.sendall(HEALTH)
            assert Reader(sock).response()[0] == 200


def test_plain_http_to_the_https_port_gets_no_http_answer_and_the_key_reaches_no_log(gateway):
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=LIVENESS) as sock:
        sock.sendall(raw_post(gateway.key, chat_body("sim", max_tokens=1)))
        received = read_to_eof(sock)  # fails unless the gateway closes
    assert b"HTTP/" not in received
    assert gateway.key not in gateway.log_text()
    assert gateway.key not in gateway.handle.log()


# -- the front over TLS --


@pytest.fixture(scope="module", params=["uvloop", "asyncio"])
def gateway_on_each_loop(request, tmp_path_factory, certificate):
    """The module's gateway (uvloop), and one on asyncio's loop, whose TLS transport closes differently."""
    if request.param == "uvloop":
        yield request.getfixturevalue("gateway")
        return
    cert, key = certificate
    env = {"GATEWAY_TLS_CERTFILE": str(cert), "GATEWAY_TLS_KEYFILE": str(key), "GATEWAY_LOOP": "asyncio"}
    with Gateway.start(tmp_path_factory.mktemp("gw-asyncio"), [], env=env) as gateway:
        yield gateway


def test_a_wrong_key_sent_with_a_whole_body_gets_its_401_intact_and_then_the_close(gateway_on_each_loop):
    body = b'{"model": "sim", "pad": "' + b"p" * 4 * MIB + b'"}'
    with tls_connect(gateway_on_each_loop, SO_SNDBUF=65536) as sock:
        try:
            sock.sendall(raw_post(WRONG_KEY, body))
        except OSError as error:
            pytest.fail(f"the gateway reset the connection while the request was being sent: {error!r}")
        reader = Reader(sock)
        assert_rejected(reader.response(), 401, "invalid_api_key", "invalid_request_error")
        # TLS has no half-close: close_notify follows once the client is quiet, before the 30 s linger timeout.
        started = time.monotonic()
        assert reader.closed(timeout=LINGER_QUIET_SECONDS + 5), "no close_notify after the client went quiet"
        assert time.monotonic() - started < LINGER_QUIET_SECONDS + 5


def test_a_tls_client_that_sends_half_a_head_gets_its_408(gateway):
    with tls_connect(gateway) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: gw\r\n")
        reader = Reader(sock)
        assert_rejected(reader.response(), 408, "request_timeout")
        assert reader.closed(timeout=LINGER_QUIET_SECONDS + 5)


def test_a_tls_client_that_stops_reading_a_stream_is_dropped_and_the_generation_aborted(gateway, simulator):
    aborted_before = simulator.stats()["aborted"]
    with tls_connect(gateway, SO_RCVBUF=4096) as sock:
        sock.sendall(raw_post(gateway.key, chat_body("sim", max_tokens=1_000_000, stream=True)))
        wait_until(lambda: simulator.running() == 1, timeout=LIVENESS)
        # The client reads nothing from here on; past the send timeout (1 s) the gateway gives up on it.
        wait_until(lambda: simulator.stats()["aborted"] > aborted_before, timeout=LIVENESS)
        assert simulator.running() == 0


def test_a_client_that_ends_with_close_notify_leaves_no_warning_in_the_output(gateway_on_each_loop):
    gateway = gateway_on_each_loop
    with tls_connect(gateway) as sock:
        sock.sendall(HEALTH)
        assert Reader(sock).response()[0] == 200
        sock.unwrap()  # close_notify, as curl ends; returns once the gateway's close_notify arrives
    time.sleep(0.3)
    assert "eof_received" not in gateway.handle.log()  # asyncio's "returning true from eof_received()..."


def test_a_tls_gateway_with_an_idle_client_stops_at_once_and_the_client_reads_a_clean_close(tmp_path, certificate):
    cert, key = certificate
    env = {"GATEWAY_TLS_CERTFILE": str(cert), "GATEWAY_TLS_KEYFILE": str(key)}
    with Gateway.start(tmp_path / "gw", [], env=env) as gateway:
        # suppress_ragged_eofs=False: a close without close_notify raises instead of reading b"".
        with tls_connect(gateway, suppress_ragged_eofs=False) as sock:
            sock.sendall(HEALTH)
            assert Reader(sock).response()[0] == 200
            # Idle in a pool, the client reads nothing: the gateway must not wait 30 s for its close_notify.
            started = time.monotonic()
            assert gateway.stop() == 0, "the gateway did not stop by itself (SIGKILL after 10 s)"
            assert time.monotonic() - started < 5
            assert sock.recv(1) == b""


# -- the metrics port --


def test_the_metrics_port_serves_https_and_nothing_in_clear(gateway, metrics_port):
    with httpx.Client(verify=gateway.trust) as client:
        response = client.get(f"https://127.0.0.1:{metrics_port}/metrics")
    assert response.status_code == 200
    assert "vllm_gateway_" in response.text
    with socket.create_connection(("127.0.0.1", metrics_port), timeout=LIVENESS) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: gw\r\n\r\n")
        assert b"HTTP/" not in read_to_eof(sock)


# -- several workers --


def test_two_workers_serve_https_with_an_encrypted_key_and_its_password(tmp_path, simulator, certificate, redis_url):
    cert, key = certificate
    password = "correct-horse-battery"
    env = {
        "GATEWAY_TLS_CERTFILE": str(cert),
        "GATEWAY_TLS_KEYFILE": str(encrypted(key, password)),
        "GATEWAY_TLS_KEYFILE_PASSWORD": password,
        "GATEWAY_WORKERS": "2",
        "GATEWAY_REDIS_URL": redis_url,
    }
    with Gateway.start(tmp_path / "gw", [Backend("sim", simulator.base_url)], env=env) as gateway:
        for _ in range(4):  # a new connection each time: either worker may take it
            reply = gateway.openai().chat.completions.create(**chat_body("sim", max_tokens=2))
            assert reply.usage.completion_tokens == 2
        log = wait_until(lambda: (text := gateway.log_text()).count("gateway listening on https://") == 2 and text)
        assert password not in log + gateway.handle.log()


# -- refusals at start --


@pytest.mark.parametrize("given", ["GATEWAY_TLS_CERTFILE", "GATEWAY_TLS_KEYFILE"])
def test_one_tls_file_without_the_other_is_refused_naming_both(tmp_path, certificate, given):
    cert, key = certificate
    result = serve(tmp_path, {given: str(cert if given.endswith("CERTFILE") else key)})
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert "GATEWAY_TLS_CERTFILE" in line and "GATEWAY_TLS_KEYFILE" in line


def test_files_that_cannot_serve_are_refused_with_a_line_naming_the_file(tmp_path, certificate):
    cert, key = certificate
    _, other_key = self_signed(tmp_path, "other")
    cases = {
        "missing certificate": (tmp_path / "nowhere.crt", key, tmp_path / "nowhere.crt"),
        "key of another certificate": (cert, other_key, other_key),
        "certificate file holding a key": (key, key, key),
        "encrypted key without its password": (cert, encrypted(key, "pw"), "GATEWAY_TLS_KEYFILE_PASSWORD"),
    }
    for case, (certfile, keyfile, named) in cases.items():
        result = serve(
            tmp_path / case.replace(" ", "-"),
            {"GATEWAY_TLS_CERTFILE": str(certfile), "GATEWAY_TLS_KEYFILE": str(keyfile)},
        )
        assert result.returncode == 2, (case, result.stderr)
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and str(named) in lines[0], (case, result.stderr)


# -- the warning of a gateway reached in clear text --


def test_a_gateway_on_every_address_without_tls_warns_once_that_keys_cross_in_clear(tmp_path):
    with Gateway.start(tmp_path / "gw", [], env={"GATEWAY_HOST": "0.0.0.0"}) as gateway:
        output = gateway.handle.log()
    assert output.count(WARNING) == 1
    (line,) = [line for line in output.splitlines() if WARNING in line]
    assert "GATEWAY_TLS_CERTFILE" in line and "GATEWAY_HOST=127.0.0.1" in line


def test_no_warning_with_tls_or_on_loopback(tmp_path, gateway):
    assert WARNING not in gateway.handle.log()  # HTTPS on 0.0.0.0
    with Gateway.start(tmp_path / "gw", [], env={"GATEWAY_HOST": "127.0.0.1"}) as plain:
        assert WARNING not in plain.handle.log()


@pytest.mark.parametrize(
    "host, expected",
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.20", False),
        ("gateway.example", False),
    ],
)
def test_loopback_hosts_are_told_from_the_others(host, expected):
    assert loopback(host) is expected


def test_a_console_session_over_https_gets_a_secure_cookie(gateway):
    with gateway.http() as client:
        answer = client.post("/console/api/session", json={"key": gateway.admin_key})
        with_cookie = client.get("/console/api/session")

    assert answer.status_code == 200
    assert "secure" in [part.strip().lower() for part in answer.headers["set-cookie"].split(";")]
    assert with_cookie.status_code == 200  # the client sends a Secure cookie back over HTTPS
