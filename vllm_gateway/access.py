"""Who may send a request: the key is checked as soon as a request head is complete, so that nobody
without a valid key makes the gateway read, keep or parse a byte of a body."""

from __future__ import annotations

import time
from urllib.parse import parse_qsl

from . import errors
from .errors import GatewayError
from .keystore import KeyRecord, KeyStore
from .server.exchange import Exchange

# Answered without a key (a key, when sent, is still checked: /health then shows details).
PUBLIC_PATHS = frozenset({"/health"})


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


def sends_key(exchange: Exchange) -> bool:
    return bool(exchange.header(b"authorization")) or b"api_key=" in exchange.query_string


def check_head(keys: KeyStore, exchange: Exchange) -> GatewayError | None:
    """Run when the head is complete: the error that refuses the request unread, or None (with
    exchange.key set to the caller's key where one was sent)."""
    if exchange.path not in PUBLIC_PATHS or sends_key(exchange):
        try:
            exchange.key = authenticate(keys, exchange.header(b"authorization"), exchange.query_string)
        except GatewayError as error:
            return error
        if exchange.path.startswith("/admin/") and not exchange.key.admin:
            return errors.admin_required()
    return exchange.declared_size_error()
