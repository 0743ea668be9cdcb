"""Console sessions: a key pasted once at sign-in, exchanged for a signed cookie that stands for it.

The cookie holds the key's id, when the session ends and a random nonce, signed (HMAC-SHA256) with a
secret the gateway makes on first use and keeps beside the key file (console_secret, mode 0600), so
every worker and a restarted gateway accept it. The signature also covers the key's current hash:
rotating or revoking the key ends its sessions. Nothing is stored per session; signing out forgets
the nonce in this worker until the session would have ended (other workers accept a copied cookie
until then).

A request that changes something (any method but GET and HEAD) with a session cookie must carry the
session's CSRF token in X-CSRF-Token, which a page of another site cannot read, and an Origin, when
it sends one, of the gateway itself; the cookie is SameSite=Strict besides.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from ..keystore import KeyRecord, KeyStore
from ..ratelimit import LocalWindows, window_sizes

COOKIE = "vllm_console"
SAFE_METHODS = frozenset({"GET", "HEAD"})


@dataclass(frozen=True)
class Session:
    key: KeyRecord
    csrf: str
    expires_at: float


class Sessions:
    def __init__(self, secret_path: Path, keys: KeyStore, lifetime: float, sign_in_limit: str) -> None:
        self.secret_path = secret_path
        self.keys = keys
        self.lifetime = lifetime
        self.sign_in_limit = sign_in_limit
        self.sign_ins = LocalWindows()  # attempts per client address
        self.signed_out: dict[str, float] = {}  # nonce -> when its session would have ended
        self._secret: bytes | None = None

    # -- the secret --

    @property
    def secret(self) -> bytes:
        if self._secret is None:
            self._secret = self._load_or_make_secret()
        return self._secret

    def _load_or_make_secret(self) -> bytes:
        try:
            text = self.secret_path.read_text().strip()
        except FileNotFoundError:
            text = ""
        if len(text) >= 64:
            return bytes.fromhex(text)
        made = secrets.token_hex(32)
        try:  # the first worker to make it wins, so that all of them sign alike
            descriptor = os.open(self.secret_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return bytes.fromhex(self.secret_path.read_text().strip())
        with os.fdopen(descriptor, "w") as file:
            file.write(made + "\n")
        return bytes.fromhex(made)

    # -- sessions --

    def sign_in_allowed(self, address: str) -> bool:
        """Whether this client address may try another key now (GATEWAY_CONSOLE_SIGN_IN_LIMIT)."""
        now = time.time()
        allowed = True
        for amount, seconds in window_sizes(self.sign_in_limit):
            count, _ = self.sign_ins.hit("sign-in", address, amount, seconds, now=now)
            allowed = allowed and count <= amount
        return allowed

    def open(self, record: KeyRecord) -> tuple[str, Session]:
        """A new session of the key: its cookie value and what the page is told."""
        expires = int(time.time() + self.lifetime)
        nonce = secrets.token_urlsafe(18)
        body = f"{record.id}.{expires}.{nonce}"
        return f"{body}.{self._sign(body, record)}", Session(record, self._csrf(nonce), expires)

    def find(self, cookie_header: bytes) -> Session | None:
        """The session a request's Cookie header carries, when it is valid now."""
        value = cookie_value(cookie_header, COOKIE)
        parts = value.split(".")
        if len(parts) != 4:
            return None
        key_id, expires_text, nonce, signature = parts
        record = self.keys.by_id(key_id)
        if record is None or not expires_text.isdigit():
            return None
        body = f"{key_id}.{expires_text}.{nonce}"
        if not hmac.compare_digest(signature, self._sign(body, record)):
            return None
        expires, now = int(expires_text), time.time()
        if expires <= now or nonce in self.signed_out or record.disabled or record.expired(now):
            return None
        return Session(record, self._csrf(nonce), expires)

    def close(self, cookie_header: bytes) -> None:
        session_nonce = cookie_value(cookie_header, COOKIE).split(".")
        if len(session_nonce) == 4 and session_nonce[1].isdigit():
            now = time.time()
            self.signed_out = {nonce: end for nonce, end in self.signed_out.items() if end > now}
            self.signed_out[session_nonce[2]] = float(session_nonce[1])

    def _sign(self, body: str, record: KeyRecord) -> str:
        mac = hmac.new(self.secret, f"{body}.{record.hash}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()

    def _csrf(self, nonce: str) -> str:
        mac = hmac.new(self.secret, f"csrf.{nonce}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac[:18]).decode()


def cookie_value(header: bytes, name: str) -> str:
    """One cookie's value from a Cookie header ("" when it has none)."""
    wanted = name.encode() + b"="
    for part in header.split(b";"):
        part = part.strip()
        if part.startswith(wanted):
            return part[len(wanted) :].decode("latin-1")
    return ""


def same_origin(origin: bytes, host: bytes) -> bool:
    """An Origin header names the gateway itself (the Host the browser sent), or there is none."""
    if not origin:
        return True
    return urlsplit(origin.decode("latin-1")).netloc.lower() == host.decode("latin-1").lower()
