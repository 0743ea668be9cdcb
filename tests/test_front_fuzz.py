"""A seeded fuzz of the gateway's HTTP front (the spec: /tmp/spec/front-spec.md, "hardened HTTP front").

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
import string
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.chat import chat_body
from tests.support.gateway import Backend, Gateway
from tests.support.http_wire import Malformed, WireResponse, take_response
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
LOOP_BOUND = 1.0  # a concurrent GET /health answers within this (the spec's bound)
# The spec types the error shape: {"message": str, "type": str, "param": null|str, "code": str}. A null
# code (FastAPI's own 405 and body-parsing 400 today) fails the test; False would only ask for the keys.
ERROR_CODE_IS_A_STRING = True
RSS_GROWTH_MB = 64
REPORTED = 20  # cases shown in full in the failure message

COMPLETE, INCOMPLETE, EITHER, PIPELINED = "complete", "incomplete", "either", "pipelined"
TOKEN_CHARS = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"


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


@dataclass
class Target:
    port: int
    user_key: bytes
    admin_key: bytes
    victim_id: bytes  # a key the admin cases may change at will
    created: list[bytes] = field(default_factory=list)  # keys made by the cases, for DELETE cases
    lock: threading.Lock = field(default_factory=threading.Lock)

    def created_id(self, rng: random.Random) -> bytes | None:
        with self.lock:
            return self.created.pop(rng.randrange(len(self.created))) if self.created else None


# ---- requests and cases -------------------------------------------------------------------------


@dataclass
class Req:
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    version: bytes | None = b"HTTP/1.1"

    def request_line(self) -> bytes:
        return self.method + b" " + self.target + (b" " + self.version if self.version is not None else b"")

    def lines(self) -> list[bytes]:
        return [self.request_line(), *[name + b": " + value for name, value in self.headers]]

    def head(self, eol: bytes = b"\r\n") -> bytes:
        return b"".join(line + eol for line in self.lines()) + eol

    def encode(self) -> bytes:
        return self.head() + self.body

    def set(self, name: bytes, value: bytes) -> Req:
        self.headers = [(n, v) for n, v in self.headers if n.lower() != name.lower()] + [(name, value)]
        return self

    def drop(self, name: bytes) -> Req:
        self.headers = [(n, v) for n, v in self.headers if n.lower() != name.lower()]
        return self


def request(
    method: bytes,
    path: bytes,
    headers: list[tuple[bytes, bytes]],
    body: bytes = b"",
    query: bytes = b"",
    content_type: bytes | None = b"application/json",
) -> Req:
    target = path + (b"?" + query if query else b"")
    all_headers = [(b"Host", b"gw"), *headers]
    if body or method in (b"POST", b"PATCH", b"PUT"):
        if content_type is not None:
            all_headers.append((b"Content-Type", content_type))
        all_headers.append((b"Content-Length", b"%d" % len(body)))
    return Req(method, target, all_headers, body)


@dataclass
class Case:
    category: str
    data: list[bytes]  # sent in this order, as separate sends
    kind: str
    note: str = ""
    head_only: bool = False  # answers a HEAD: no body whatever its headers say
    answers: int = 1  # complete cases: answers owed before the connection may be left
    expect: tuple[int, ...] = ()  # controls: the statuses those answers must have
    index: int = -1

    @property
    def raw(self) -> bytes:
        return b"".join(self.data)


class Raw(bytes):
    """JSON text put into a body as it is (numbers and strings no serialiser writes, deep nesting)."""


class Pairs(list):
    """A JSON object given as (key, value) pairs, so that a key can occur twice."""


def dump(value: object) -> bytes:
    if isinstance(value, Raw):
        return bytes(value)
    if isinstance(value, Pairs):
        return b"{" + b",".join(json.dumps(k).encode() + b":" + dump(v) for k, v in value) + b"}"
    if isinstance(value, dict):
        return b"{" + b",".join(json.dumps(k).encode() + b": " + dump(v) for k, v in value.items()) + b"}"
    if isinstance(value, list):
        return b"[" + b", ".join(dump(v) for v in value) + b"]"
    return json.dumps(value).encode()


def token(rng: random.Random, low: int = 4, high: int = 24) -> bytes:
    return "".join(rng.choice(TOKEN_CHARS) for _ in range(rng.randint(low, high))).encode()


def noise(rng: random.Random, low: int, high: int) -> bytes:
    return rng.randbytes(rng.randint(low, high))


def junk_start(rng: random.Random) -> bytes:
    """Bytes no request can begin with (so the parser rejects them at once), then anything."""
    return rng.choice([b"}", b",", b"\x00", b"{", b"]", b'"', b":", b"\x01", b"\x7f", b"\xff"]) + noise(rng, 0, 200)


def chunked(rng: random.Random, body: bytes) -> bytes:
    cuts = sorted(rng.sample(range(1, len(body)), min(len(body) - 1, rng.randint(0, 4)))) if len(body) > 1 else []
    pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)] if body else []
    return b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


def credentials(rng: random.Random, t: Target, role: str = "user") -> tuple[list, bytes, str]:
    """Authorization headers, a query string and a word for the note: mostly the right key, else not."""
    key = t.admin_key if role == "admin" else t.user_key
    other = t.user_key if role == "admin" else t.admin_key
    r = rng.random()
    if r < 0.62:
        return [(b"Authorization", b"Bearer " + key)], b"", "key"
    if r < 0.70:
        return [], b"", "no key"
    if r < 0.78:
        return [(b"Authorization", b"Bearer sk-" + token(rng, 8, 43))], b"", "bad key"
    if r < 0.83:
        value = rng.choice(
            [
                b"Bearer",
                b"Bearer ",
                b"Basic dXNlcjpwYXNz",
                b"bearer " + key,
                b"Bearer  " + key,
                b"Bearer " + key + b"x",
                b"Bearer " + key[:-1],
                b"Token " + key,
                b"Bearer\t" + key,
            ]
        )
        return [(b"Authorization", value)], b"", "mangled key"
    if r < 0.87:
        pair = [(b"Authorization", b"Bearer " + key), (b"Authorization", b"Bearer sk-nope")]
        return pair if rng.random() < 0.5 else pair[::-1], b"", "two keys"
    if r < 0.92:
        return [], b"api_key=" + key, "query key"
    if r < 0.96:
        return [(b"Authorization", b"Bearer " + other)], b"", "other role's key"
    return [], b"api_key=" + rng.choice([b"", b"sk-x", b"%00", key + b"&api_key=x", b"%20" + key]), "bad query key"


# -- JSON of the wrong types --

RELAY_TEMPLATES = {
    b"/v1/chat/completions": lambda rng: chat_body("sim", max_tokens=rng.randint(1, 8)),
    b"/v1/completions": lambda rng: {"model": "sim", "prompt": "hi there", "max_tokens": rng.randint(1, 8)},
    b"/v1/embeddings": lambda rng: {"model": "sim", "input": "hi"},
    b"/tokenize": lambda rng: {"model": "sim", "prompt": "hi there"},
    b"/detokenize": lambda rng: {"model": "sim", "tokens": [1, 2, 3]},
}
MAIN_FIELD = {
    b"/v1/chat/completions": "messages",
    b"/v1/completions": "prompt",
    b"/v1/embeddings": "input",
    b"/tokenize": "prompt",
    b"/detokenize": "tokens",
}
RELAY_FIELDS = {
    b"/v1/chat/completions": [
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "stream",
        "stream_options",
        "temperature",
        "n",
        "stop",
        "tools",
        "response_format",
        "logprobs",
        "seed",
    ],
    b"/v1/completions": ["prompt", "max_tokens", "stream", "stream_options", "echo", "suffix", "best_of"],
    b"/v1/embeddings": ["input", "encoding_format", "dimensions", "user"],
    b"/tokenize": ["prompt", "messages", "add_special_tokens", "return_token_strs"],
    b"/detokenize": ["tokens"],
}


def nested(rng: random.Random, high: int = 1200) -> Raw:
    """Arrays or objects nested up to `high` deep: orjson refuses to parse beyond 1024 levels or to write
    beyond 254, Python recurses about 1000 deep; the ranges straddle those limits."""
    depth = rng.choice(
        [
            rng.randint(2, 64),
            rng.randint(64, high),
            rng.randint(240, 270),
            rng.randint(960, 1022),
            rng.randint(1023, 1100),
        ]
    )
    depth = min(depth, high)
    if rng.random() < 0.5:
        return Raw(b"[" * depth + rng.choice([b"", b"1", b'"x"']) + b"]" * depth)
    return Raw(b'{"a":' * depth + b"1" + b"}" * depth)


def weird(rng: random.Random) -> object:
    """A value of a type or size no endpoint expects there."""
    pick = rng.randrange(10)
    if pick == 0:
        return rng.choice([0, -1, 1, 7, -0.5, 3.25, 1e308, -1e308, 2**63, 2**64 + 1, 10**30, -(10**30), 5e-324])
    if pick == 1:
        return Raw(
            rng.choice(
                [
                    b"1e999",
                    b"-1e999",
                    b"NaN",
                    b"Infinity",
                    b"-",
                    b"01",
                    b"1.",
                    b".5",
                    b"+1",
                    b"0x10",
                    b"1e",
                    b"9" * rng.randint(20, 5000),
                    b"1" + b"0" * 400 + b".5e-400",
                    b"-0",
                    b"1E400",
                    b"123456789012345678901234567890",
                ]
            )
        )
    if pick == 2:
        return rng.choice([True, False, None])
    if pick == 3:
        return rng.choice(
            [
                "",
                "yes",
                "no",
                "true",
                "null",
                "0",
                "sim",
                "sim-alias",
                " sim",
                "SIM",
                "\x00",
                "\u202e\u0000",
                "é" * 100,
                "\r\n",
                "{}",
                "[DONE]",
            ]
        )
    if pick == 4:
        return "x" * rng.choice([1000, 10000, 100000])
    if pick == 5:
        return Raw(
            rng.choice(
                [
                    b'"\\ud800"',
                    b'"\\udfff\\ud800"',
                    b'"\xff\xfe"',
                    b'"\\u0000"',
                    b'"unterminated',
                    b'"\\x41"',
                    b'"\\"',
                    b"'single'",
                ]
            )
        )
    if pick == 6:
        return rng.choice(
            [
                [],
                [None],
                [1, "a", {}],
                list(range(rng.randint(1, 2000))),
                ["sim"] * 3,
                [[]],
                [True, False],
                [1.5, -2],
                [{"type": "text", "text": 5}],
            ]
        )
    if pick == 7:
        return rng.choice(
            [
                {},
                {"a": 1},
                {"model": "sim"},
                {"role": "user", "content": "hi"},
                {"": None},
                {"include_usage": "yes"},
                {"type": "json_object"},
            ]
        )
    if pick == 8:
        return nested(rng)
    return rng.randint(-(2**70), 2**70)


def mutate_relay_body(rng: random.Random, path: bytes) -> tuple[bytes, str]:
    """A relayed endpoint's body with one to three fields of the wrong type (or a broken whole)."""
    body = RELAY_TEMPLATES[path](rng)
    notes = []
    for _ in range(rng.randint(1, 3)):
        r = rng.random()
        if r < 0.15:
            body["model"] = rng.choice(
                [
                    5,
                    0,
                    -1.5,
                    ["sim"],
                    [],
                    None,
                    {"name": "sim"},
                    True,
                    "",
                    "nope",
                    "sim\x00",
                    Raw(b"1e999"),
                    "sim-alias",
                    " sim",
                ]
            )
            notes.append(f"model={body['model']!r:.40}")
        elif r < 0.25:  # deep nesting where the endpoint's content goes, up to the parsers' limits and past
            name = MAIN_FIELD[path]
            deep = nested(rng) if rng.random() < 0.6 else nested(rng, 300)
            body[name] = deep if rng.random() < 0.6 else [deep]
            notes.append(f"{name} nested {deep.count(b'[') or deep.count(b'{')} deep")
        elif r < 0.45:
            name = rng.choice(RELAY_FIELDS[path])
            body[name] = targeted(rng, name)
            notes.append(f"{name}={_short(body[name])}")
        elif r < 0.75:
            name = rng.choice([*RELAY_FIELDS[path], "model", "prompt", "messages", "input", "tokens"])
            body[name] = weird(rng)
            notes.append(f"{name}={_short(body[name])}")
        elif r < 0.85 and body:
            name = rng.choice(list(body))
            del body[name]
            notes.append(f"no {name}")
        else:
            name = rng.choice(["unknown", "x" * 300, "", "\x00", "model ", "MODEL", "__proto__"])
            body[name] = weird(rng)
            notes.append(f"extra {name[:10]!r}")
    data = dump(body)
    if rng.random() < 0.15:
        data, how = broken_json(rng, data)
        notes.append(how)
    return data, ", ".join(notes)


def targeted(rng: random.Random, name: str) -> object:
    """The wrong types the spec names: messages true, prompt a dict, max_tokens a string, stream "yes"."""
    if name in ("messages", "prompt", "input", "tokens") and rng.random() < 0.25:
        return nested(rng) if rng.random() < 0.7 else [nested(rng, 300)]
    if name == "messages":
        return rng.choice(
            [
                True,
                False,
                5,
                "hi",
                {"role": "user"},
                [],
                [True],
                ["hi"],
                [None],
                [{"role": "user", "content": weird(rng)}],
                [{"role": weird(rng), "content": "hi"}],
                [{"content": [{"type": "text", "text": weird(rng)}]}],
                [{"role": "user"}],
                [{"role": "user", "content": [weird(rng)]}],
                nested(rng),
            ]
        )
    if name == "prompt":
        return rng.choice(
            [
                {"text": "hi"},
                {},
                [weird(rng)],
                5,
                True,
                None,
                [[1, 2], [3]],
                ["a", 1, None],
                [1, 2, 3],
                nested(rng),
                "",
                list(range(rng.randint(1, 5000))),
            ]
        )
    if name in ("max_tokens", "max_completion_tokens"):
        return rng.choice(
            [
                "10",
                "yes",
                -1,
                0,
                1.5,
                10**30,
                True,
                None,
                [],
                {},
                2**63,
                4096,
                4000,
                rng.randint(1, 4200),
                Raw(b"1e999"),
                "1e3",
            ]
        )
    if name == "stream":
        return rng.choice(["yes", 1, 0, "false", "", [], {}, None, True, "true"])
    if name == "stream_options":
        return rng.choice(["yes", 1, [], {"include_usage": "yes"}, {"include_usage": True}, {"x": 1}, True])
    if name == "input":
        return rng.choice(
            [
                5,
                True,
                None,
                {},
                [],
                [None],
                [[]],
                [1, "a"],
                [[1, 2], [3]],
                nested(rng),
                [nested(rng, 300)],
                list(range(rng.randint(1, 3000))),
                "x" * 50000,
            ]
        )
    if name == "tokens":
        return rng.choice(
            [
                "1 2 3",
                5,
                None,
                {},
                [1.5],
                [-1],
                [10**30],
                [True],
                ["a"],
                nested(rng),
                list(range(rng.randint(1, 3000))),
                [2**63],
            ]
        )
    return weird(rng)


def broken_json(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    how = rng.randrange(9)
    if how == 0:
        return rng.choice([b"[]", b'"x"', b"1", b"null", b"true", b"[{}]", b'["model", "sim"]']), "not an object"
    if how == 1:
        return data[: rng.randrange(len(data))], "cut JSON"
    if how == 2:
        at = rng.randrange(len(data))
        return data[:at] + rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00"]) + data[at:], "bad UTF-8"
    if how == 3:
        return b"\xef\xbb\xbf" + data, "BOM"
    if how == 4:
        return data + rng.choice([b"xyz", b"}", b"{}", b"\x00", b" // c"]), "trailing garbage"
    if how == 5:
        return rng.choice([b"", b" ", b"\r\n", b"\t\n "]), "empty"
    if how == 6:
        pairs = [("model", "sim"), ("model", weird(rng)), ("prompt", "a"), ("prompt", weird(rng))]
        return dump(Pairs(pairs)), "dup keys"
    if how == 7:
        return data.replace(b'"', b"'"), "single quotes"
    return b"/* c */" + data, "comment"


def _short(value: object) -> str:
    text = value.decode(errors="replace") if isinstance(value, bytes) else repr(value)
    return text[:40] + ("..." if len(text) > 40 else "")


# -- the usual requests the head mutations start from --


def relay_post(rng: random.Random, t: Target, path: bytes | None = None, body: bytes | None = None) -> tuple[Req, str]:
    path = path or rng.choice(list(RELAY_TEMPLATES))
    headers, query, who = credentials(rng, t)
    data = body if body is not None else dump(RELAY_TEMPLATES[path](rng))
    return request(b"POST", path, headers, data, query), f"{path.decode()} {who}"


def admin_patch_victim(rng: random.Random, t: Target) -> tuple[Req, str]:
    headers, query, who = credentials(rng, t, "admin")
    req = request(b"PATCH", b"/admin/keys/" + t.victim_id, headers, b'{"name": "victim"}', query)
    return req, f"PATCH victim {who}"


def base_post(rng: random.Random, t: Target) -> tuple[Req, str]:
    r = rng.random()
    if r < 0.65:
        return relay_post(rng, t)
    if r < 0.8:
        return admin_patch_victim(rng, t)
    if r < 0.9:
        headers, query, who = credentials(rng, t, "admin")
        return request(b"POST", b"/admin/keys", headers, b'{"name": "fuzz-head"}', query), f"POST /admin/keys {who}"
    body, content_type = multipart(
        rng.choice([b"b0undary", b"----x" + token(rng)]),
        [(b"model", None, b"sim"), (b"file", b"a.wav", noise(rng, 1, 2000))],
    )
    headers, query, who = credentials(rng, t)
    return (request(b"POST", b"/v1/audio/transcriptions", headers, body, query, content_type), f"transcription {who}")


def base_request(rng: random.Random, t: Target) -> tuple[Req, str]:
    pick = rng.randrange(8)
    if pick == 0:
        return request(b"GET", b"/health", []), "GET /health"
    if pick == 1:
        headers, query, who = credentials(rng, t)
        return request(b"GET", b"/v1/models", headers, query=query), f"GET /v1/models {who}"
    if pick == 2:
        return request(b"GET", b"/metrics", []), "GET /metrics"
    if pick == 3:
        headers, query, who = credentials(rng, t, "admin")
        return request(b"GET", b"/admin/keys", headers, query=query), f"GET /admin/keys {who}"
    return base_post(rng, t)


# -- case generators: (rng, target) -> Case --

METHODS = [
    b"GE T",
    b"get",
    b"Get",
    b"G\x00T",
    b"",
    b"GETT",
    b"PRI",
    b"CONNECT",
    b"OPTIONS",
    b"TRACE",
    b"PUT",
    b"DELETE",
    b"PATCH",
    b"FOO",
    b"M-SEARCH",
    b"PROPFIND",
    b"QUERY",
    b"LINK",
    b"SOURCE",
    b"\xc3\xa9",
    b"POST\x7f",
    b"POS",
    b"HEAD",
    b"PATCH ",
    b"P\tOST",
]


def g_method(rng, t):
    req, what = base_request(rng, t)
    req.method = rng.choice([*METHODS, b"X" * rng.randint(16, 4000), token(rng, 1, 40), noise(rng, 1, 12)])
    data = req.encode()
    if req.method == b"PRI" and rng.random() < 0.5:
        data = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + noise(rng, 0, 64)
    return Case("head/method", [data], EITHER, f"{what}, method {req.method[:20]!r}", head_only=req.method == b"HEAD")


VERSIONS = [
    b"HTTP/1.2",
    b"HTTP/2.0",
    b"HTTP/2",
    b"HTTP/3",
    b"HTTP/0.9",
    b"HTTP/1",
    b"HTTP/11",
    b"http/1.1",
    b"HTTP/1.1x",
    b"HTTP/ 1.1",
    b"HTTP /1.1",
    b"HTP/1.1",
    b"",
    None,
    b"HTTP/1.10",
    b"HTTP/9.9",
    b"HTTP/1.1 extra",
    b"HTTP/1.0",
    b"HTTP/1.1\x00",
    b"HTTP/1.",
    b"HTTP/-1.1",
    b"ICE/1.0",
    b"RTSP/1.0",
    b"HTTP/1.1     ",
    b"HTTP/1.1\t",
    b"HTTP/\xff.1",
]


def g_version(rng, t):
    req, what = base_request(rng, t)
    req.version = rng.choice(VERSIONS)
    return Case("head/version", [req.encode()], EITHER, f"{what}, version {req.version!r}")


def g_line_endings(rng, t):
    req, what = base_request(rng, t)
    lines = req.lines()
    style = rng.randrange(6)
    if style == 0:
        head = b"".join(line + b"\n" for line in lines) + b"\n"
    elif style == 1:
        endings = [b"\r\n", b"\n", b"\r", b"\r\r\n", b"\n\r"]
        head = b"".join(line + rng.choice(endings) for line in lines) + b"\r\n"
    elif style == 2:
        head = b"".join(line + b"\r" for line in lines) + b"\r"
    elif style == 3:  # no blank line: the head never ends
        return Case("head/line-endings", [req.head()[:-2]], INCOMPLETE, f"{what}, no blank line")
    elif style == 4:
        head = b"".join(line + b"\r\n" for line in lines) + b"\n"
    else:
        at = rng.randrange(1, len(lines))
        line = lines[at]
        cut = rng.randrange(len(line) + 1)
        lines[at] = line[:cut] + rng.choice([b"\n", b"\r", b"\r\n "]) + line[cut:]
        head = b"".join(line + b"\r\n" for line in lines) + b"\r\n"
    return Case("head/line-endings", [head + req.body], EITHER, f"{what}, line endings style {style}")


CONTROL_BYTES = [0, 1, 7, 8, 9, 10, 11, 12, 13, 27, 31, 127, 0x80, 0xC0, 0xFF]


def g_control_bytes(rng, t):
    req, what = base_request(rng, t)
    head = bytearray(req.head())
    inserted = []
    for _ in range(rng.randint(1, 3)):
        at = rng.randrange(len(head) - 4)
        byte = rng.choice(CONTROL_BYTES if rng.random() < 0.7 else [0])
        if rng.random() < 0.5:
            head[at:at] = bytes([byte])
        else:
            head[at] = byte
        inserted.append(f"{byte:#04x}@{at}")
    return Case("head/control-bytes", [bytes(head) + req.body], EITHER, f"{what}, {' '.join(inserted)}")


def g_content_length(rng, t):
    req, what = base_post(rng, t)
    body, n = req.body, len(req.body)
    variant = rng.randrange(12)
    kind = EITHER
    if variant == 0:
        value = b"9" * rng.randint(20, 40)
    elif variant == 1:
        value = b"%d" % rng.choice([10**12, 2**63 - 1, 2**64 - 1, 33554433, 10**9])
    elif variant == 2:
        value, kind = b"33554431", INCOMPLETE
    elif variant == 3:
        value, kind = b"%d" % (n + rng.randint(1, 5000)), INCOMPLETE
    elif variant == 4:
        value = rng.choice(
            [
                b"-1",
                b"+%d" % n,
                b"0x10",
                b"1e3",
                b"%d.0" % n,
                b"",
                b"%d %d" % (n, n),
                b"%d,%d" % (n, n),
                b"%d, %d" % (n, n + 1),
                b"\x0b%d" % n,
                b"%d\x00" % n,
                b"0%d" % n,
                b"00000000000000000000000%d" % n,
                b"%d;x" % n,
                b"\xd9\xa3",
            ]
        )
    elif variant in (5, 6):
        other = n if variant == 5 else n + rng.randint(1, 9)
        req.headers.append((b"Content-Length", b"%d" % other))
        return Case("head/content-length", [req.encode()], EITHER, f"{what}, two Content-Length ({n}, {other})")
    elif variant == 7:
        value, kind = b"0", PIPELINED
        if not body or body[:1] not in b'{[":,':
            kind = EITHER
    elif variant == 8 and n > 2:
        cut = rng.randrange(1, n - 1)
        value = b"%d" % cut
        kind = PIPELINED if body[cut : cut + 1] in (b" ", b'"', b":", b",", b"{", b"}", b"[", b"]") else EITHER
    elif variant == 9:
        req = request(b"GET", b"/health", [], noise(rng, 1, 300), content_type=None)
        return Case("head/content-length", [req.encode()], COMPLETE, "GET /health with a body")
    elif variant == 10:
        name = rng.choice(
            [
                b"content-length",
                b"CONTENT-LENGTH",
                b"Content-Length ",
                b"Content_Length",
                b"Content-Length\t",
                b" Content-Length",
                b"Content-Lengths",
            ]
        )
        req.drop(b"Content-Length").headers.append((name, b"%d" % n))
        return Case("head/content-length", [req.encode()], EITHER, f"{what}, header name {name!r}")
    else:
        value = b" %d " % n
    req.set(b"Content-Length", value)
    return Case("head/content-length", [req.encode()], kind, f"{what}, Content-Length {value[:30]!r} for {n}")


def g_cl_and_te(rng, t):
    req, what = base_post(rng, t)
    body = req.body
    encoded = chunked(rng, body)
    variant = rng.randrange(8)
    req.drop(b"Content-Length")
    te, cl, payload = b"chunked", b"%d" % len(body), encoded
    if variant == 1:
        cl = b"%d" % len(encoded)
    elif variant == 3:
        te, payload = b"identity", body
    elif variant == 4:
        cl = b"0"
    pairs = [(b"Content-Length", cl), (b"Transfer-Encoding", te)]
    if variant == 2:
        pairs.reverse()
    elif variant == 5:
        pairs[1] = (b"Transfer-Encoding ", te)
    elif variant == 6:
        pairs[1] = (b"Transfer-Encoding", b"\r\n " + te)
    elif variant == 7:
        pairs[1] = (b"Transfer-Encoding", b"\x0b" + te)
    req.headers += pairs
    req.body = payload
    return Case("head/cl-and-te", [req.encode()], EITHER, f"{what}, CL {cl!r} with TE {te!r} (variant {variant})")


TRANSFER_CODINGS = [
    [b"chunked"],
    [b"Chunked"],
    [b"CHUNKED"],
    [b"gzip, chunked"],
    [b"chunked, gzip"],
    [b"identity"],
    [b"gzip"],
    [b"xchunked"],
    [b"chunked\x00"],
    [b"chunked;q=1"],
    [b" chunked"],
    [b"chunked, chunked"],
    [b""],
    [b"chunked", b"chunked"],
    [b"gzip", b"chunked"],
    [b"chunked", b"gzip"],
]


def g_transfer_encoding(rng, t):
    req, what = base_post(rng, t)
    codings = rng.choice(TRANSFER_CODINGS)
    req.drop(b"Content-Length")
    req.headers += [(b"Transfer-Encoding", value) for value in codings]
    if codings[-1].strip().lower().endswith(b"chunked"):
        req.body = chunked(rng, req.body)
    return Case("head/transfer-encoding", [req.encode()], EITHER, f"{what}, TE {codings!r}")


def g_chunks(rng, t):
    req, what = base_post(rng, t)
    body = req.body or b"{}"
    req.drop(b"Content-Length").headers.append((b"Transfer-Encoding", b"chunked"))
    n = len(body)
    variant = rng.randrange(11)
    kind = EITHER
    if variant == 0:
        size = rng.choice(
            [
                b"zz",
                b"-1",
                b"0x5",
                b" %x" % n,
                b"%x " % n,
                b"",
                b"+%x" % n,
                b"%x\x00" % n,
                b"f" * rng.randint(17, 40),
                b"%x\t" % n,
                b"0%x" % n,
            ]
        )
        payload = size + b"\r\n" + body + b"\r\n0\r\n\r\n"
    elif variant == 1:
        payload = b"%x\r\n" % (n + rng.randint(1, 12)) + body + b"\r\n0\r\n\r\n"
    elif variant == 2 and n > 1:
        payload = b"%x\r\n" % rng.randrange(1, n) + body + b"\r\n0\r\n\r\n"
    elif variant == 3:
        extension = rng.choice(
            [
                b";name=value",
                b";" + b"x" * rng.randint(100, 5000),
                b";\x00",
                b'; q="1"',
                b";" * 50,
                b";a=" + noise(rng, 1, 30),
            ]
        )
        payload = b"%x" % n + extension + b"\r\n" + body + b"\r\n0\r\n\r\n"
    elif variant == 4:
        payload = b"%x\r\n" % n + body + b"0\r\n\r\n"
    elif variant == 5:
        payload, kind = b"%x\r\n" % n + body + b"\r\n", INCOMPLETE
    elif variant == 6:
        payload, kind = b"%x\r\n" % n + body + b"\r\n0\r\n", INCOMPLETE
    elif variant == 7:
        trailer = rng.choice([b"X-Trailer: 1", b"bad trailer", b"Content-Length: 5", b"X: \x00"])
        payload = b"%x\r\n" % n + body + b"\r\n0\r\n" + trailer + b"\r\n\r\n"
        kind = COMPLETE if trailer == b"X-Trailer: 1" else EITHER
    elif variant == 8:
        payload = b"%x\n" % n + body + b"\n0\n\n"
    elif variant == 9:
        payload, kind = b"".join(b"1\r\n%c\r\n" % byte for byte in body) + b"0\r\n\r\n", COMPLETE
    else:
        payload, kind = chunked(rng, body) + junk_start(rng), PIPELINED
    req.body = payload
    return Case("head/chunks", [req.encode()], kind, f"{what}, chunk variant {variant}")


NO_COLON = [
    b"JustAName",
    b"X-Foo bar",
    b": value",
    b"Name : value",
    b"Name\t: value",
    b"(bad): value",
    b'Na"me: v',
    b"X-A:: b",
    b"=",
    b"Host",
    b"Authorization Bearer x",
    b"\x00: x",
    b"Name:value",
]


def g_no_colon(rng, t):
    req, what = base_request(rng, t)
    lines = req.lines()
    line = rng.choice(NO_COLON) if rng.random() < 0.8 else b" leading: space"
    at = 1 if line.startswith(b" ") else rng.randint(1, len(lines))
    lines.insert(at, line)
    head = b"".join(x + b"\r\n" for x in lines) + b"\r\n"
    return Case("head/no-colon", [head + req.body], EITHER, f"{what}, line {line!r}")


def g_obs_fold(rng, t):
    req, what = base_request(rng, t)
    if rng.random() < 0.3 or not req.headers:
        req.headers.append((b"X-Folded", b"a b c"))
    at = rng.randrange(len(req.headers))
    name, value = req.headers[at]
    cut = rng.randrange(len(value) + 1)
    fold = rng.choice([b"\r\n ", b"\r\n\t", b"\r\n  \r\n ", b"\r\n \t "])
    req.headers[at] = (name, value[:cut] + fold + value[cut:])
    return Case("head/obs-fold", [req.encode()], EITHER, f"{what}, {name.decode()} folded")


def g_long(rng, t):
    """Very long tokens, mostly within the spec's limits (request line 8192, head 64 KiB, 100 headers)."""
    beyond = rng.random() < 0.15
    variant = rng.randrange(7)
    if variant in (0, 1):
        headers, query, who = credentials(rng, t)
        prefix = b"/v1/models/" if variant == 0 else b"/health?q="
        suffix = (b"&" if variant == 1 else b"?") + query if query else b""
        room = 8192 - len(b"GET  HTTP/1.1") - len(prefix) - len(suffix)
        size = rng.randint(room + 1, room + 6000) if beyond else rng.randint(1000, room)
        filler = (rng.choice([b"a", b"%41", b"/", b"-"]) * size)[:size]
        req = Req(b"GET", prefix + filler + suffix, [(b"Host", b"gw"), *headers])
        return Case("head/long", [req.encode()], COMPLETE, f"request target {size} bytes {who}")
    req, what = base_request(rng, t)
    used = len(req.head())
    if variant == 2:
        size = rng.randint(65536 - used, 65536 - used + 40000) if beyond else rng.randint(4000, 65536 - used - 64)
        req.headers.append((b"X-Long", b"v" * size))
        note = f"a {size}-byte header value"
    elif variant == 3:
        count = rng.randint(101, 160) if beyond else rng.randint(80, 100 - len(req.headers))
        req.headers += [(b"X-H%d" % i, b"v%d" % i) for i in range(count - len(req.headers))]
        note = f"{count} header lines"
    elif variant == 4:
        size = rng.randint(1000, 8000)
        req.headers.append((b"X-" + b"N" * size, b"1"))
        note = f"a {size}-byte header name"
    elif variant == 5:
        req.set(b"Authorization", b"Bearer " + b"k" * rng.randint(1000, 30000))
        note = "a long bearer key"
    else:
        req.set(b"X-Request-ID", rng.choice([b"r" * rng.randint(129, 30000), b"a" * 128, b"\xff" * 100]))
        note = "a long X-Request-ID"
    return Case("head/long", [req.encode()], COMPLETE, f"{what}, {note}{' (beyond the limit)' if beyond else ''}")


def g_expect(rng, t):
    req, what = base_post(rng, t)
    variant = rng.randrange(7)
    if variant == 0:
        req.headers.append((b"Expect", b"100-continue"))
        return Case("head/expect", [req.encode()], COMPLETE, f"{what}, Expect 100-continue and the body at once")
    if variant == 1:
        req.headers.append((b"Expect", b"100-continue"))
        return Case("head/expect", [req.head()], INCOMPLETE, f"{what}, Expect 100-continue, no body ever")
    if variant == 2 and len(req.body) > 1:
        req.headers.append((b"Expect", b"100-continue"))
        cut = rng.randrange(1, len(req.body))
        return Case(
            "head/expect", [req.head(), req.body[:cut]], INCOMPLETE, f"{what}, Expect 100-continue, half a body"
        )
    if variant == 3:
        value = rng.choice(
            [b"100-Continue", b"100-continue, foo", b"200-ok", b"", b"100", b"continue", b"100-continue;x=1", b"\xff"]
        )
        req.headers.append((b"Expect", value))
        return Case("head/expect", [req.encode()], COMPLETE, f"{what}, Expect {value!r}")
    if variant == 4:
        req.headers += [(b"Expect", b"100-continue"), (b"Expect", b"100-continue")]
        return Case("head/expect", [req.encode()], COMPLETE, f"{what}, Expect twice")
    if variant == 5:
        get = request(b"GET", b"/health", [(b"Expect", b"100-continue")])
        return Case("head/expect", [get.encode()], COMPLETE, "GET /health with Expect 100-continue")
    relay, what = relay_post(rng, t)
    relay.set(b"Content-Length", b"%d" % (2**40)).headers.append((b"Expect", b"100-continue"))
    return Case("head/expect", [relay.head()], EITHER, f"{what}, Expect 100-continue with a terabyte declared")


def g_upgrade(rng, t):
    variant = rng.randrange(7)
    if variant == 0:
        req = request(
            b"GET",
            b"/health",
            [
                (b"Connection", b"Upgrade"),
                (b"Upgrade", b"websocket"),
                (b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ=="),
                (b"Sec-WebSocket-Version", b"13"),
            ],
        )
        return Case("head/upgrade", [req.encode()], COMPLETE, "websocket upgrade on /health")
    req, what = base_post(rng, t)
    if variant == 1:
        req.headers += [
            (b"Connection", b"Upgrade, HTTP2-Settings"),
            (b"Upgrade", b"h2c"),
            (b"HTTP2-Settings", b"AAMAAABkAARAAAAAAAIAAAAA"),
        ]
        return Case("head/upgrade", [req.encode()], COMPLETE, f"{what}, h2c upgrade")
    if variant == 2:
        req.headers.append((b"Upgrade", rng.choice([b"h2c", b"websocket", b"TLS/1.2"])))
        return Case("head/upgrade", [req.encode()], COMPLETE, f"{what}, Upgrade without Connection")
    if variant == 3:
        req.headers.append((b"Connection", b"Upgrade"))
        return Case("head/upgrade", [req.encode()], COMPLETE, f"{what}, Connection: Upgrade without Upgrade")
    if variant == 4:
        req.headers += [(b"Connection", b"Upgrade"), (b"Upgrade", b"h2c")]
        data = req.encode() + b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + noise(rng, 0, 100)
        return Case("head/upgrade", [data], COMPLETE, f"{what}, h2c upgrade then an HTTP/2 preface")
    if variant == 5:
        value = rng.choice([b"\x01", b"x" * 5000, b"websocket, h2c, foo/1", b"", b"h2c" * 100])
        req.headers += [(b"Connection", b"upgrade"), (b"Upgrade", value)]
        return Case("head/upgrade", [req.encode()], COMPLETE, f"{what}, Upgrade {value[:20]!r}")
    connect = b"CONNECT gw:443 HTTP/1.1\r\nHost: gw:443\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n"
    return Case("head/upgrade", [connect + noise(rng, 0, 100)], EITHER, "CONNECT with an upgrade")


def g_target(rng, t):
    targets = [
        b"*",
        b"",
        b"//health",
        b"/health#frag",
        b"/%zz",
        b"/%",
        b"/v1/chat/completions?x=%00",
        b"/\xff",
        b"/health?\xff",
        b"http://evil.example/health",
        b"https://x/admin/keys",
        b"health",
        b"/..%2f..%2fetc/passwd",
        b"/v1/models/%73k-x",
        b"/admin/keys/%00",
        b"/admin/keys/",
        b"/%2e%2e/admin/keys",
        b"/health/../admin/keys",
        b"/v1//chat/completions",
        b"/V1/CHAT/COMPLETIONS",
        b"/tokenize/",
        b"/v1/chat/completions;x",
        b"/health?" + b"&" * 1000,
        b"/health?api_key=",
        b"/v1/models?api_key=" + t.user_key,
        b"/\t/",
        b"/ a",
        b"/admin/keys?" + b"%" * 50,
        b"/v1/chat/completions%00",
        b"/v1/chat/completions%2F",
        b"/v1/chat%2Fcompletions",
    ]
    req, what = base_request(rng, t)
    new = rng.choice(targets)
    query = req.target.partition(b"?")[2]
    req.target = new + (b"&" + query if query and b"?" in new else b"?" + query if query else b"")
    return Case("head/target", [req.encode()], EITHER, f"{what}, target {new[:40]!r}")


def g_whitespace(rng, t):
    req, what = base_request(rng, t)
    variant = rng.randrange(8)
    head = req.head()
    if variant == 0:
        head = head.replace(b" ", b"  ", 1)
    elif variant == 1:
        line, rest = head.split(b"\r\n", 1)
        head = line.replace(b" ", b"\t") + b"\r\n" + rest
    elif variant == 2:
        head = rng.choice([b"\r\n", b"\r\n\r\n", b"\n", b"\r\n" * 20]) + head
    elif variant == 3:
        head = rng.choice([b" ", b"\t", b"  "]) + head
    elif variant == 4:
        req.headers = [(n, v + rng.choice([b"   ", b"\t", b" \t "])) for n, v in req.headers]
        head = req.head()
    elif variant == 5:
        req.headers.append((b"X-Empty", rng.choice([b"", b"   ", b"\t"])))
        head = req.head()
    elif variant == 6:
        line, rest = head.split(b"\r\n", 1)
        head = line + rng.choice([b" ", b"\t", b"  "]) + b"\r\n" + rest
    else:
        req.headers.append((b"X-Tab", b"a\tb"))
        head = req.head()
    return Case("head/whitespace", [head + req.body], EITHER, f"{what}, whitespace variant {variant}")


def g_truncated_head(rng, t):
    req, what = base_request(rng, t)
    head = req.head()
    cut = 0 if rng.random() < 0.05 else rng.randrange(1, len(head))
    return Case("head/truncated", [head[:cut]] if cut else [], INCOMPLETE, f"{what}, head cut at {cut} of {len(head)}")


def g_byte_mutation(rng, t):
    req, what = base_request(rng, t)
    data = bytearray(req.encode())
    ops = []
    for _ in range(rng.randint(1, 6)):
        op = rng.randrange(6)
        at = rng.randrange(len(data))
        if op == 0:
            data[at] ^= 1 << rng.randrange(8)
        elif op == 1:
            data[at:at] = rng.randbytes(rng.randint(1, 4))
        elif op == 2 and len(data) > 8:
            del data[at : at + rng.randint(1, 4)]
        elif op == 3:
            data[at:at] = data[at : at + rng.randint(1, 40)]
        elif op == 4:
            other = rng.randrange(len(data))
            data[at], data[other] = data[other], data[at]
        else:
            data[at] = rng.randrange(256)
        ops.append(op)
    return Case("head/mutated", [bytes(data)], EITHER, f"{what}, byte ops {ops}")


def g_junk(rng, t):
    variant = rng.randrange(7)
    data = [
        noise(rng, 1, 4096),
        "".join(rng.choice(string.printable) for _ in range(rng.randint(1, 2000))).encode(),
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + noise(rng, 32, 200),
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04\x00\x00\x00\x00\x00",
        b"\r\n" * rng.randint(1, 500),
        b" " * rng.randint(1, 500),
        rng.choice([b"GET", b"POST /", b"G"]),
    ][variant]
    return Case("junk", [data], EITHER, f"junk variant {variant}, {len(data)} bytes")


def g_truncated_body(rng, t):
    req, what = base_post(rng, t)
    if len(req.body) < 2:
        req.body = b'{"model": "sim", "prompt": "x"}'
        req.set(b"Content-Length", b"%d" % len(req.body))
    cut = rng.randrange(0, len(req.body))
    data = [req.head(), req.body[:cut]] if rng.random() < 0.5 else [req.head() + req.body[:cut]]
    return Case("body/truncated", data, INCOMPLETE, f"{what}, body cut at {cut} of {len(req.body)}")


def g_overlong_body(rng, t):
    if rng.random() < 0.2:
        req, what = request(b"GET", b"/health", []), "GET /health"
    else:
        req, what = base_post(rng, t)
    junk = rng.choice([b"\x00\x01garbage\r\n\r\n", junk_start(rng)])
    return Case("body/overlong", [req.encode() + junk], PIPELINED, f"{what}, then {len(junk)} bytes of junk")


def g_random_body(rng, t):
    req, what = base_post(rng, t)
    req.body = rng.choice([noise(rng, 0, 4096), noise(rng, 0, 64), b"\x00" * rng.randint(1, 1000)])
    req.set(b"Content-Length", b"%d" % len(req.body))
    if rng.random() < 0.3:
        req.set(
            b"Content-Type",
            rng.choice(
                [
                    b"text/plain",
                    b"application/octet-stream",
                    b"",
                    b"\xff",
                    b"application/json; charset=utf-16",
                    b"multipart/form-data",
                ]
            ),
        )
    return Case("body/random", [req.encode()], COMPLETE, f"{what}, {len(req.body)} random bytes")


# -- multipart --


def multipart(boundary: bytes, parts: list[tuple[bytes, bytes | None, bytes]], end: bool = True) -> tuple[bytes, bytes]:
    out = []
    for name, filename, data in parts:
        disposition = b'Content-Disposition: form-data; name="' + name + b'"'
        if filename is not None:
            disposition += b'; filename="' + filename + b'"\r\nContent-Type: audio/wav'
        out.append(b"--" + boundary + b"\r\n" + disposition + b"\r\n\r\n" + data + b"\r\n")
    if end:
        out.append(b"--" + boundary + b"--\r\n")
    return b"".join(out), b"multipart/form-data; boundary=" + boundary


def crafted_size(rng: random.Random, rare: float = 0.04, large: tuple[int, int] = (48_000, 80_000)) -> int:
    """Mostly a few KB; rarely tens of KB, where a scan quadratic in the body holds the event loop for
    a second or more (the spec's 1-4 MB would hold such a scan for many minutes: a separate test's job)."""
    return rng.randint(*large) if rng.random() < rare else rng.randint(1_000, 16_000)


def g_multipart(rng, t):
    boundary = b"----fuzz" + token(rng, 8, 16).replace(b"%", b"x")
    audio = noise(rng, 0, 3000)
    parts = [(b"model", None, b"sim"), (b"file", b"a.wav", audio)]
    if rng.random() < 0.3:
        parts.append((b"response_format", None, rng.choice([b"json", b"text", b"srt", b"\xff"])))
    variant = rng.randrange(16)
    body, content_type = multipart(boundary, parts)
    note = f"multipart variant {variant}"
    if variant == 1:
        content_type = rng.choice([b"multipart/form-data", b"multipart/form-data;", b"multipart/form-data; charset=x"])
    elif variant == 2:
        content_type = b"multipart/form-data; boundary=" + boundary[:-1] + b"Z"
    elif variant == 3:
        content_type = rng.choice([b"multipart/form-data; boundary=", b'multipart/form-data; boundary=""'])
    elif variant == 4:
        odd = rng.choice([b"a b", b"x" * rng.randint(71, 2000), b"\"'()+_,-./:=?", b"--", b"\xff\xfe"])
        body, _ = multipart(odd, parts)
        content_type = b'multipart/form-data; boundary="' + odd + b'"'
    elif variant == 5:
        content_type += b"; boundary=other"
    elif variant == 6:
        body = rng.choice([body[:-4], body[: -(len(boundary) + 6)], body[: rng.randrange(len(body))]])
    elif variant == 7:
        body, content_type = multipart(boundary, parts[1:])
    elif variant == 8:
        model = rng.choice(
            [
                (b"model", None, b""),
                (b"model", b"m.txt", b"sim"),
                (b"MODEL", None, b"sim"),
                (b"model", None, b"sim\r\n"),
                (b"model", None, b"\xff\xfe"),
                (b"model", None, b"nope"),
                (b"model", None, b"sim  "),
                (b"model", None, b"sim\x00"),
                (b"model", None, b"s" * 5000),
            ]
        )
        body, content_type = multipart(boundary, [model, *parts[1:]])
        note += f" model part {model[0]!r} {model[2][:12]!r}"
    elif variant == 9:
        body = b"Content-Disposition: " * (crafted_size(rng, rare=0.3, large=(64_000, 96_000)) // 21)
        if rng.random() < 0.5:
            body += multipart(boundary, parts)[0]
        note += f" Content-Disposition repeated, {len(body)} bytes"
    elif variant == 10:
        line = b'Content-Disposition: form-data; name="model"\r\n'
        body = (b"--" + boundary + b"\r\n") + line * (crafted_size(rng) // len(line))
        note += f" model headers repeated, {len(body)} bytes"
    elif variant == 11:
        body = (b"--" + boundary + b"\r\n") * (crafted_size(rng) // (len(boundary) + 4)) + body
        note += f" boundaries repeated, {len(body)} bytes"
    elif variant == 12:
        head = b"--" + boundary + b'\r\nContent-Disposition: form-data; name="model"\r\n'
        body = head + b"X-A: b\r\n" * (crafted_size(rng) // 8) + b"\r\nsim\r\n" + multipart(boundary, parts[1:])[0]
        note += f" part headers repeated, {len(body)} bytes"
    elif variant == 13:
        mutable = bytearray(body)
        for _ in range(rng.randint(1, 8)):
            mutable[rng.randrange(len(mutable))] = rng.randrange(256)
        body = bytes(mutable)
    elif variant == 14:
        inner, inner_type = multipart(b"inner", [(b"model", None, b"sim")])
        body = (
            b"--"
            + boundary
            + b'\r\nContent-Disposition: form-data; name="model"\r\nContent-Type: '
            + inner_type
            + b"\r\n\r\n"
            + inner
            + b"\r\n"
            + multipart(boundary, parts[1:])[0]
        )
    elif variant == 15:
        path = rng.choice([b"/v1/chat/completions", b"/v1/completions", b"/tokenize"])
        headers, query, who = credentials(rng, t)
        req = request(
            b"POST",
            path,
            headers,
            dump(RELAY_TEMPLATES[path](rng)),
            query,
            rng.choice([b"multipart/form-data", b"multipart/form-data; boundary=x"]),
        )
        return Case("multipart", [req.encode()], COMPLETE, f"{path.decode()} {who}, JSON sent as multipart")
    headers, query, who = credentials(rng, t)
    req = request(b"POST", b"/v1/audio/transcriptions", headers, body, query, content_type)
    return Case("multipart", [req.encode()], COMPLETE, f"transcription {who}, {note}")


def g_relay_json(rng, t):
    path = rng.choice(list(RELAY_TEMPLATES))
    body, note = mutate_relay_body(rng, path)
    req, what = relay_post(rng, t, path, body)
    if rng.random() < 0.1:
        req.drop(b"Content-Length").headers.append((b"Transfer-Encoding", b"chunked"))
        req.body = chunked(rng, body)
        what += " chunked"
    return Case("json/relay", [req.encode()], COMPLETE, f"{what}: {note}")


RATE_LIMITS = [
    "lots",
    "",
    "-1/minute",
    "1/fortnight",
    "0/second",
    "1/0 minute",
    "99999999999999999999999/second",
    "1 per minute",
    "1/minute;",
    ";;",
    "10/minute; 5/second",
    "\x00",
    "1/minute" * 50,
    "5/minute",
    "1/1000000000000000000000 seconds",
    "nan/minute",
    "1e3/minute",
    "١/minute",
    "2 per 3 hours",
]


def admin_value(rng: random.Random, name: str) -> object:
    if name == "name":
        return rng.choice([5, None, ["a"], {"a": 1}, True, "", "n" * 201, "n" * 200, "\x00", "fuzz", weird(rng)])
    if name == "models":
        return rng.choice(
            [
                "sim",
                "",
                5,
                [5],
                [None],
                ["sim", 5],
                {"sim": 1},
                ["sim"],
                [],
                None,
                True,
                [["sim"]],
                ["x" * 5000],
                weird(rng),
            ]
        )
    if name == "rate_limit":
        return rng.choice([*RATE_LIMITS, 5, 5.5, [], {}, True, None, weird(rng)])
    if name in ("admin", "disabled"):
        return rng.choice(["yes", "no", 1, 0, "true", None, [], {}, 2, "false", True, False])
    return weird(rng)


def g_admin(rng, t):
    headers, query, who = credentials(rng, t, "admin")
    r = rng.random()
    fields = ["name", "admin", "models", "rate_limit", "disabled"]
    if r < 0.45:
        method, path = b"POST", b"/admin/keys"
        body: dict = {"name": f"fuzz-{rng.randrange(10**6)}"}
    elif r < 0.8:
        method = b"PATCH"
        target = rng.choice(
            [
                t.victim_id,
                t.victim_id,
                b"key_000000000000",
                token(rng),
                b"%00",
                b"x" * 3000,
                b"..%2f..",
                b"%73k-",
                b"\xc3\xa9",
            ]
        )
        path = b"/admin/keys/" + target
        body = {}
    else:
        method = b"DELETE"
        created = t.created_id(rng) if rng.random() < 0.5 else None
        target = created or rng.choice(
            [b"key_000000000000", token(rng), b"%00", b"x" * 3000, b"", b"%2e%2e", b"key_" + b"0" * 12 + b"/x"]
        )
        path = b"/admin/keys/" + target
        body = {}
    notes = [f"{method.decode()} {path[:40].decode(errors='replace')} {who}"]
    for _ in range(rng.randint(0 if method == b"DELETE" else 1, 3)):
        name = rng.choice([*fields, "unknown", "hash", "id", "key", "created_at", ""])
        body[name] = admin_value(rng, name)
        notes.append(f"{name}={_short(body[name])}")
    data = dump(body) if body or method != b"DELETE" else b""
    if rng.random() < 0.12:
        data, how = broken_json(rng, data or b"{}")
        notes.append(how)
    if rng.random() < 0.05:
        data = dump({"name": "big", "models": ["m" * 100] * rng.randint(100, 1200)})
        notes.append(f"{len(data)}-byte body")
    content_type = rng.choice([b"application/json"] * 8 + [b"text/plain", None, b"application/x-www-form-urlencoded"])
    req = request(method, path, headers, data, query, content_type)
    return Case("admin", [req.encode()], COMPLETE, ", ".join(notes))


GENERATORS = [
    (5, g_method),
    (4, g_version),
    (5, g_line_endings),
    (6, g_control_bytes),
    (7, g_content_length),
    (3, g_cl_and_te),
    (3, g_transfer_encoding),
    (5, g_chunks),
    (3, g_no_colon),
    (3, g_obs_fold),
    (4, g_long),
    (4, g_expect),
    (3, g_upgrade),
    (3, g_target),
    (2, g_whitespace),
    (3, g_truncated_head),
    (5, g_byte_mutation),
    (2, g_junk),
    (4, g_truncated_body),
    (3, g_overlong_body),
    (3, g_random_body),
    (8, g_multipart),
    (14, g_relay_json),
    (8, g_admin),
]


# -- controls: well-formed requests mixed in, which must keep working whatever came before --

CHAT = chat_body("sim", max_tokens=3)


def control(rng: random.Random, t: Target) -> Case:
    key = [(b"Authorization", b"Bearer " + t.user_key)]
    chat = request(b"POST", b"/v1/chat/completions", key, dump(CHAT))
    health = request(b"GET", b"/health", [])
    pick = rng.randrange(9)
    if pick == 0:
        return Case("control/chat", [chat.encode()], COMPLETE, "chat", expect=(200,))
    if pick == 1:
        stream = request(b"POST", b"/v1/chat/completions", key, dump({**CHAT, "stream": True}))
        return Case("control/stream", [stream.encode()], COMPLETE, "stream", expect=(200,))
    if pick == 2:
        return Case("control/health", [health.encode()], COMPLETE, "health", expect=(200,))
    if pick == 3:
        chat.drop(b"Content-Length").headers.append((b"Transfer-Encoding", b"chunked"))
        chat.body = chunked(rng, chat.body)
        return Case("control/chunked", [chat.encode()], COMPLETE, "chunked chat", expect=(200,))
    if pick == 4:
        chat.headers.append((b"Expect", b"100-continue"))
        return Case("control/expect", [chat.head(), chat.body], COMPLETE, "chat with Expect", expect=(200,))
    if pick == 5:  # what curl --http2 sends to an http:// URL, then a second request (the spec: both answered)
        chat.headers += [
            (b"Connection", b"Upgrade, HTTP2-Settings"),
            (b"Upgrade", b"h2c"),
            (b"HTTP2-Settings", b"AAMAAABkAARAAAAAAAIAAAAA"),
        ]
        return Case(
            "control/h2c",
            [chat.encode() + health.encode()],
            COMPLETE,
            "h2c chat + health",
            answers=2,
            expect=(200, 200),
        )
    if pick == 6:
        return Case(
            "control/pipelined",
            [chat.encode() + health.encode() + chat.encode()],
            COMPLETE,
            "chat + health + chat",
            answers=3,
            expect=(200, 200, 200),
        )
    if pick == 7:
        chat.version = b"HTTP/1.0"
        return Case("control/http1.0", [chat.encode()], COMPLETE, "HTTP/1.0 chat", expect=(200,))
    admin = request(b"GET", b"/admin/keys", [(b"Authorization", b"Bearer " + t.admin_key)])
    return Case("control/admin", [admin.encode()], COMPLETE, "admin list", expect=(200,))


def build_case(index: int, case_seed: int, t: Target) -> Case:
    rng = random.Random(case_seed)
    if index % CONTROL_EVERY == CONTROL_EVERY - 1:
        case = control(rng, t)
    else:
        weights, generators = zip(*GENERATORS, strict=True)
        case = rng.choices(generators, weights)[0](rng, t)
    case.index = index
    return case


# ---- running a case -----------------------------------------------------------------------------


class Conversation:
    """What came back on one case's connection, parsed as it arrives."""

    def __init__(self, case: Case) -> None:
        self.case = case
        self.buffer = b""
        self.responses: list[WireResponse] = []
        self.eof = False
        self.reset = False
        self.malformed: str | None = None
        self.answered = 0.0  # when the first final answer was complete
        self.timed_out = False
        self.send_error = ""
        self.started = time.monotonic()
        self.ended = 0.0

    @property
    def final(self) -> list[WireResponse]:
        return [r for r in self.responses if not r.interim]

    def feed(self, data: bytes) -> None:
        self.buffer += data
        self._parse()

    def close(self, reset: bool = False) -> None:
        self.eof, self.reset = True, reset
        self._parse()

    def _parse(self) -> None:
        while self.malformed is None:
            final = self.final
            if final and final[-1].closes and self.buffer:
                self.malformed = f"bytes after a response that said connection: close: {self.buffer[:80]!r}"
                return
            try:
                response, used = take_response(self.buffer, self.eof, self.case.head_only and not final)
            except Malformed as error:
                self.malformed = str(error)
                return
            if response is None:
                return
            self.responses.append(response)
            self.buffer = self.buffer[used:]
            if not response.interim and not self.answered:
                self.answered = time.monotonic()

    def settled(self) -> bool:
        if self.malformed or self.eof:
            return True
        final = self.final
        if self.case.kind in (COMPLETE, EITHER):
            return len(final) >= self.case.answers and not final[-1].closes
        return False  # incomplete and pipelined ones wait for the gateway to close


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


# ---- judging a case -----------------------------------------------------------------------------


@dataclass
class Failure:
    cause: str
    case: Case
    detail: str


def error_shape_problem(response: WireResponse) -> str | None:
    if not (response.header("content-type") or "").startswith("application/json"):
        return f"content-type {response.header('content-type')!r}"
    try:
        body = json.loads(response.body)
    except ValueError:
        return "the body is not JSON"
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict) or not {"message", "type", "param", "code"} <= set(error):
        return "not {error: {message, type, param, code}}"
    if not isinstance(error["message"], str) or not isinstance(error["type"], str):
        return "message or type not a string"
    if error["param"] is not None and not isinstance(error["param"], str):
        return "param neither null nor a string"
    if ERROR_CODE_IS_A_STRING and not isinstance(error["code"], str):
        return f"error.code is {error['code']!r}, not a string"
    return None


def judge(conversation: Conversation) -> list[Failure]:
    case = conversation.case
    failures = []

    def fail(cause: str, detail: str = "") -> None:
        failures.append(Failure(cause, case, detail))

    final = conversation.final
    got = "; ".join(r.summary() for r in conversation.responses) or "nothing"
    if conversation.send_error:
        got += f" ({conversation.send_error})"
    if conversation.malformed:
        fail("malformed response", conversation.malformed)
    for response in conversation.responses:
        if response.status >= 500:
            source = "relayed from the simulator" if response.from_simulator else "from the gateway"
            fail(f"{response.status} {source}", response.summary())
        elif response.status >= 400 and not response.from_simulator and not case.head_only:
            problem = error_shape_problem(response)
            if problem:
                fail(f"gateway {response.status} not in OpenAI's error shape: {problem}", response.summary())
    if case.expect:
        statuses = tuple(r.status for r in final[: len(case.expect)])
        if statuses != case.expect:
            fail(
                f"control {case.category}: answers {statuses}, expected {case.expect}",
                f"got {got}{', then EOF' if conversation.eof else ''}",
            )
    waited = f"{(conversation.ended or time.monotonic()) - conversation.started:.1f} s"
    if conversation.timed_out:
        if case.kind == COMPLETE:
            if len(final) < case.answers:
                fail(f"complete request: no answer nor close within {LIVENESS:g} s", f"got {got}")
            else:
                fail("said connection: close but kept the connection open", f"got {got}")
        elif case.kind == EITHER:
            fail(f"left hanging: no answer nor close within {CLOSE_BOUND:g} s", f"got {got}")
        elif case.kind == INCOMPLETE:
            fail(
                f"incomplete request: connection not closed within {CLOSE_BOUND:g} s"
                + (" (after an answer)" if final else ""),
                f"got {got}",
            )
        else:
            fail(f"junk after a complete request: connection not closed within {LIVENESS:g} s", f"got {got}")
    if case.kind == PIPELINED and conversation.eof and not conversation.malformed:
        if not final:
            fail(
                "lost answer: a complete request followed by junk got no answer before EOF",
                f"{'reset' if conversation.reset else 'EOF'} after {waited}",
            )
        elif not final[0].closes and (len(final) < 2 or final[1].status != 400):
            fail("junk after an answered request got no 400 before EOF", f"got {got}")
    return failures


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


def report(failures: list[Failure], lines: list[str], shown: int = REPORTED) -> str:
    by_cause: dict[str, list[Failure]] = collections.defaultdict(list)
    for failure in failures:
        by_cause[failure.cause].append(failure)
    out = [*lines, f"failures by cause ({len(failures)} in all, {len({f.case.index for f in failures})} cases):"]
    for cause, group in sorted(by_cause.items(), key=lambda item: -len(item[1])):
        categories = collections.Counter(f.case.category for f in group)
        example = group[0]
        indexes = sorted({f.case.index for f in group if f.case.index >= 0})
        out.append(f"  {len(group):5d}  {cause}")
        out.append(f"         in {dict(categories.most_common(6))}")
        if indexes:
            out.append(f"         cases {', '.join(map(str, indexes[:12]))}{', ...' if len(indexes) > 12 else ''}")
        out.append(f"         e.g. case {example.case.index} ({example.case.note[:120]}): {example.detail[:200]}")
    out.append(f"first {min(shown, len(failures))} failures (FUZZ_SEED={SEED} FUZZ_ONLY=<index>,... rebuilds cases):")
    for failure in sorted(failures, key=lambda f: f.case.index)[:shown]:
        case = failure.case
        out.append(f"  case {case.index} [{case.category}, {case.kind}] {failure.cause}")
        out.append(f"      {case.note[:160]}")
        out.append(f"      sent {len(case.raw)} bytes: {case.raw[:240]!r}{'...' if len(case.raw) > 240 else ''}")
        out.append(f"      {failure.detail[:240]}")
    return "\n".join(out)


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
            found = judge(conversation)
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
            case = build_case(index, seeds[index], t)
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
    full.write_text(report(failures, lines, shown=len(failures)))
    text = report(failures, [*lines, f"every failure: {full}"])
    print(text)
    assert not failures, text
