"""Who may send a request: the key is checked as soon as a request head is complete, so that nobody
without a valid key makes the gateway read, keep or parse a byte of a body.

A request without a key may carry a console session's cookie instead (console/session.py), which
stands for the key that signed in; it is looked at only when no key came, so requests with keys
(the relay's) pay nothing for it."""

from __future__ import annotations

import hmac
import time
from typing import Final
from urllib.parse import parse_qsl

from . import errors
from .console.session import COOKIE, SAFE_METHODS, Sessions, same_origin
from .errors import GatewayError
from .keystore import KeyRecord, KeyStore
from .server.exchange import Exchange

# Answered without a key (a key, when sent, is still checked: /health then shows details).
PUBLIC_PATHS: Final = frozenset({"/health"})
# The console's pages and sign-in, which look at the session themselves (console/routes.py).
CONSOLE_PATH: Final = "/console"
SESSION_COOKIE: Final = COOKIE.encode() + b"="


def authenticate(keys: KeyStore, authorization: bytes, query_string: bytes) -> KeyRecord:
    """The key of a request, from `Authorization: Bearer` or `?api_key=`; a 401 error otherwise."""
    secret = ""
    if authorization[:7].lower() == b"bearer ":
        secret = authorization[7:].strip().decode("latin-1")
    elif b"api_key=" in query_string:
        secret = dict(parse_qsl(query_string.decode("latin-1"))).get("api_key", "")
    record = keys.authenticate(secret) if secret else None
    if record is None:
        raise errors.invalid_api_key()
    if record.disabled:
        raise errors.key_disabled()
    if record.expires_at is not None and record.expired(time.time()):
        raise errors.key_expired(record.expires_at)
    return record


def sends_key(authorization: bytes, query_string: bytes) -> bool:
    return bool(authorization) or b"api_key=" in query_string


def check_head(keys: KeyStore, exchange: Exchange, sessions: Sessions | None = None) -> GatewayError | None:
    """Run when the head is complete: the error that refuses the request unread, or None (with
    exchange.key set to the caller's key where one was sent)."""
    if sessions is not None and (exchange.path == CONSOLE_PATH or exchange.path.startswith("/console/")):
        return exchange.declared_size_error()
    # The Authorization header is looked up once: a keyed request (the relay's) pays nothing more than
    # before sessions existed.
    authorization = exchange.header(b"authorization")
    keyed = sends_key(authorization, exchange.query_string)
    cookie = b""
    if sessions is not None and not keyed:
        cookie = exchange.header(b"cookie")
        cookie = cookie if SESSION_COOKIE in cookie else b""
    if keyed or cookie or exchange.path not in PUBLIC_PATHS:
        try:
            if cookie and sessions is not None:
                exchange.key = session_key(sessions, exchange, cookie)
            else:
                exchange.key = authenticate(keys, authorization, exchange.query_string)
        except GatewayError as error:
            return error
        if exchange.path.startswith("/admin/") and not exchange.key.admin:
            return errors.admin_required()
    return exchange.declared_size_error()


def session_key(sessions: Sessions, exchange: Exchange, cookie: bytes) -> KeyRecord:
    """The key a console session stands for; a request that changes something must also show the
    session's CSRF token and come from the gateway's own pages (console/session.py)."""
    session = sessions.find(cookie)
    if session is None:
        raise errors.console_session_invalid()
    if exchange.method not in SAFE_METHODS:
        token = exchange.header(b"x-csrf-token").decode("latin-1")
        if not hmac.compare_digest(token, session.csrf):
            raise errors.csrf_failed("without the console session's X-CSRF-Token")
        if not same_origin(exchange.header(b"origin"), exchange.header(b"host")):
            raise errors.csrf_failed("from another origin")
    return session.key
