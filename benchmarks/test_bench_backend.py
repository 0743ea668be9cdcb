"""The benchmark's own parts, against real nginx and wrk: the canned backend answers like vLLM, the paced
stream really arrives as many small writes, the nginx proxy passes it on unbuffered, and the wrk script
reports what the driver parses.

    .venv/bin/pytest benchmarks/test_bench_backend.py
"""

from __future__ import annotations

import http.server
import itertools
import json
import socket
import sys
import threading
from pathlib import Path
from typing import ClassVar

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from canned import VARIANTS, write_canned
from loadgen import Load, Measured, run_wrk
from servers import answer_bytes, check_response, post, start_backend, start_proxy

VARIANT = {v.name: v for v in VARIANTS}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("bench")


@pytest.fixture(scope="module")
def files(work):
    return write_canned(work / "canned")


@pytest.fixture(scope="module")
def backend(work, files):
    server = start_backend(work, files, cpus=None)
    yield server
    server.child.stop()


@pytest.fixture(scope="module")
def proxy(work, backend):
    server = start_proxy(work, backend, cpu=None)
    yield server
    server.child.stop()


def raw_exchange(port: int, request: bytes) -> list[bytes]:
    """Send one HTTP/1.1 request with Connection: close and return what each recv() got."""
    reads = []
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        while chunk := sock.recv(65536):
            reads.append(chunk)
    return reads


def chat_request(body: bytes) -> bytes:
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer sk-test\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


def test_backend_answers_health_models_and_a_chat_completion(backend, files):
    variant = VARIANT["json"]
    url = backend.url(variant)
    status, payload = post(url, files.body(variant).read_bytes(), key="sk-test")
    assert check_response(variant, status, payload, files.events_per_stream) is None
    completion = json.loads(payload)
    assert completion["usage"]["completion_tokens"] == 100
    assert completion["choices"][0]["message"]["role"] == "assistant"

    health = raw_exchange(backend.ports["json"], b"GET /health HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
    assert b"".join(health).startswith(b"HTTP/1.1 200")
    models = b"".join(
        raw_exchange(backend.ports["json"], b"GET /v1/models HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
    )
    assert [m["id"] for m in json.loads(models.split(b"\r\n\r\n", 1)[1])["data"]] == [variant.model]


def test_whole_stream_is_vllm_shaped_with_usage_before_done(backend, files):
    variant = VARIANT["stream"]
    status, payload = post(backend.url(variant), files.body(variant).read_bytes(), key=None)
    assert check_response(variant, status, payload, files.events_per_stream) is None
    events = [e for e in payload.split(b"\n\n") if e]
    assert len(events) == files.events_per_stream == 103
    chunks = [json.loads(e.removeprefix(b"data: ")) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1]).count(" ") == 100
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 100
    assert events[-1] == b"data: [DONE]"


def test_paced_stream_arrives_as_many_small_writes(backend, files):
    reads = raw_exchange(backend.ports["paced"], chat_request(files.body(VARIANT["paced"]).read_bytes()))
    payload = b"".join(reads).split(b"\r\n\r\n", 1)[1]
    assert payload == files.response(VARIANT["paced"]).read_bytes()
    # ~105 writes of one event each; a loaded machine may merge a few, never most of them.
    assert len(reads) > 50
    assert max(len(r) for r in reads[1:]) < 4 * len(payload) // 100


def test_nginx_proxy_relays_the_paced_stream_without_buffering_it(proxy, files):
    reads = raw_exchange(proxy.ports["paced"], chat_request(files.body(VARIANT["paced"]).read_bytes()))
    assert b"[DONE]" in reads[-1] or b"[DONE]" in b"".join(reads[-3:])
    assert len(reads) > 50


def wrk_for_a_second(proxy, files, variant, connections: int, pid: int | None = None) -> Measured:
    load = Load(
        url=proxy.url(variant),
        bodies=[files.body(variant)],
        key="sk-test",
        connections=connections,
        duration=1,
        timeout=5,
        cpus=None,
    )
    return run_wrk(load, pid)


def test_wrk_script_reports_requests_latency_and_no_errors(proxy, files):
    measured = wrk_for_a_second(proxy, files, VARIANT["json"], connections=4, pid=proxy.child.pid)
    assert measured.requests > 0
    assert measured.error_count == 0
    assert 0 < measured.latency_us["p50"] <= measured.latency_us["p99"]
    assert measured.cpu_seconds is not None and measured.rss_peak_kb > 0
    assert measured.cpu_user_seconds is not None and 0 <= measured.cpu_user_seconds <= measured.cpu_seconds


@pytest.mark.parametrize(("work", "mostly"), [("pass", "user"), ("os.read(fd, 1 << 16)", "system")])
def test_cpu_is_split_into_the_process_own_time_and_the_kernels(work, mostly):
    """A loop that only counts spends its time in the process; one that reads 64 KiB of /dev/zero a turn
    (the kernel fills them), in the kernel: about 1:8 here."""
    import subprocess
    import time

    import procstat

    loop = f"import os\nfd = os.open('/dev/zero', os.O_RDONLY)\nwhile True: {work}\n"
    child = subprocess.Popen([sys.executable, "-c", loop])
    try:
        time.sleep(0.3)  # started
        before = procstat.cpu_split(child.pid)
        time.sleep(1.0)
        after = procstat.cpu_split(child.pid)
    finally:
        child.kill()
        child.wait()
    user, system = after[0] - before[0], after[1] - before[1]
    assert user + system > 0.3
    assert (user > system) == (mostly == "user")


@pytest.mark.parametrize("kind", ["json", "stream"])
def test_answer_bytes_is_what_wrk_reads_of_one_whole_answer(proxy, files, kind):
    # The paced figures divide CPU by the bytes wrk read over this (bench.streams_served): the
    # nginx proxy re-frames a stream in chunks, as the gateway does.
    variant = VARIANT[kind]
    size = answer_bytes(proxy.url(variant), files.body(variant).read_bytes(), "sk-test")
    assert size > files.response(variant).stat().st_size
    measured = wrk_for_a_second(proxy, files, variant, connections=2)
    assert measured.requests > 100
    # What wrk read includes the answers its end cut off, two at most here.
    assert measured.bytes / measured.requests == pytest.approx(size, rel=0.01)


class Recorder(http.server.BaseHTTPRequestHandler):
    """Answers every POST with a tiny JSON body and records what arrived."""

    protocol_version = "HTTP/1.1"
    seen: ClassVar[list[tuple[str, bytes]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.seen.append((self.headers.get("Authorization", ""), body))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


def test_wrk_script_sends_the_key_and_a_mix_of_bodies_in_turn(files):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        bodies = [files.body(VARIANT["json"]), files.body(VARIANT["stream"])]
        measured = run_wrk(
            Load(
                url=f"http://127.0.0.1:{server.server_address[1]}",
                bodies=bodies,
                key="sk-mix",
                connections=1,
                duration=1,
                timeout=5,
                cpus=None,
            ),
            pid=None,
        )
    finally:
        server.shutdown()
        server.server_close()
    assert measured.requests > 2 and measured.error_count == 0
    assert {auth for auth, _ in Recorder.seen} == {"Bearer sk-mix"}
    sent = [json.loads(body)["stream"] for _, body in Recorder.seen]
    assert set(sent) == {False, True}
    assert all(a != b for a, b in itertools.pairwise(sent))  # one connection: strictly in turn
