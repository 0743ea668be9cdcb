"""The requests of the HTTP front's fuzz (tests/test_front_fuzz.py): each case generator turns a seeded
random.Random and the gateway under test (`Target`) into a `Case`, the bytes to send and what kind of request
they make, which fixes what the gateway owes them (see the test's docstring). Well-formed controls are mixed
in, and `build_case` rebuilds any case from its index and seed.

    case = build_case(index, case_seed, Target(port, user_key, admin_key, victim_id), control_every=25)
    case.data                  # the pieces to send, in order, as separate sends
    case.kind                  # COMPLETE, INCOMPLETE, EITHER or PIPELINED
"""

from __future__ import annotations

import json
import random
import string
import threading
from dataclasses import dataclass, field

from tests.support.chat import chat_body

# What a case's bytes are, which fixes what the gateway owes it (the test's docstring says what).
COMPLETE, INCOMPLETE, EITHER, PIPELINED = "complete", "incomplete", "either", "pipelined"
TOKEN_CHARS = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"


@dataclass
class Target:
    """The gateway under fuzz: its port and keys."""

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
    """Wrong types a client may send: messages true, prompt a dict, max_tokens a string, stream "yes"."""
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
    """Very long tokens, mostly within the gateway's default limits (request line 8192, head 64 KiB, 100 headers)."""
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
    a second or more (1-4 MB would hold such a scan for many minutes: a separate test's job)."""
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
    if pick == 5:  # what curl --http2 sends to an http:// URL, then a second request (both must be answered)
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


def build_case(index: int, case_seed: int, t: Target, control_every: int) -> Case:
    """Case `index` of a run, from its own seed: a control every `control_every`-th case, else a fuzz case."""
    rng = random.Random(case_seed)
    if index % control_every == control_every - 1:
        case = control(rng, t)
    else:
        weights, generators = zip(*GENERATORS, strict=True)
        case = rng.choices(generators, weights)[0](rng, t)
    case.index = index
    return case
