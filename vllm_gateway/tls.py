"""HTTPS: the TLS context the gateway's port and the metrics port serve with, made from the settings'
certificate and key, and checked once before `serve` listens, so that a file that is missing,
unreadable or not the certificate's key stops it with one line naming the file."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from ipaddress import ip_address
from pathlib import Path
from typing import Any

from .settings import Settings


class TLSError(Exception):
    """Why the certificate and key cannot serve, in one sentence that names the file."""


def server_context(certfile: Path, keyfile: Path, password: str | None = None) -> ssl.SSLContext:
    """The context of every HTTPS port, or TLSError: each file is read and its content checked in turn,
    so that the one sentence names the file at fault (OpenSSL's own error names neither)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # TLS 1.0 and 1.1 are deprecated (RFC 8996). Python's own floor is 1.2 too; set here so that it stays.
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # The front speaks HTTP/1.1 only: a client that offers h2 must not be told it may use it.
    context.set_alpn_protocols(["http/1.1"])
    certificate = read("GATEWAY_TLS_CERTFILE", certfile)
    key = read("GATEWAY_TLS_KEYFILE", keyfile)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=certificate.decode("latin-1"))
    except (ssl.SSLError, ValueError):
        raise TLSError(f"GATEWAY_TLS_CERTFILE={certfile} holds no PEM certificate") from None
    try:
        # An empty password, not None: None lets OpenSSL ask for one on the terminal, and wait.
        context.load_cert_chain(certfile, keyfile, password or "")
    except ssl.SSLError as error:
        if error.reason == "KEY_VALUES_MISMATCH":
            raise TLSError(
                f"GATEWAY_TLS_KEYFILE={keyfile} is not the key of the certificate in GATEWAY_TLS_CERTFILE={certfile}"
            ) from None
        if b"ENCRYPTED" in key:
            raise TLSError(
                f"GATEWAY_TLS_KEYFILE={keyfile} is encrypted, and GATEWAY_TLS_KEYFILE_PASSWORD is "
                f"{'wrong' if password else 'not set'}"
            ) from None
        raise TLSError(f"GATEWAY_TLS_KEYFILE={keyfile} holds no PEM private key") from None  # OpenSSL: "PEM lib"
    except OSError as error:  # replaced between the read above and this load
        raise TLSError(f"cannot read {error.filename or certfile}: {error.strerror}") from None
    return context


def read(setting: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise TLSError(f"cannot read {setting}={path}: {error.strerror}") from None


def context_of(settings: Settings) -> ssl.SSLContext | None:
    """The settings' TLS context, or None for plain HTTP. ServeSettings made sure both files are set."""
    if settings.tls_certfile is None or settings.tls_keyfile is None:
        return None
    password = settings.tls_keyfile_password
    return server_context(
        settings.tls_certfile, settings.tls_keyfile, password.get_secret_value() if password else None
    )


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """What uvicorn.run takes to serve HTTPS with the gateway's context (none for plain HTTP). uvicorn
    makes the context in each worker, with the factory, from the files' names."""
    if settings.tls_certfile is None or settings.tls_keyfile is None:
        return {}
    password = settings.tls_keyfile_password
    return dict(
        ssl_certfile=str(settings.tls_certfile),
        ssl_keyfile=str(settings.tls_keyfile),
        ssl_keyfile_password=password.get_secret_value() if password else None,
        ssl_context_factory=uvicorn_context,
    )


def uvicorn_context(config: Any, default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
    """uvicorn's `ssl_context_factory`: this module's context instead of uvicorn's own (`default`)."""
    return server_context(Path(config.ssl_certfile), Path(config.ssl_keyfile), config.ssl_keyfile_password)


def loopback(host: str) -> bool:
    """Whether clients can reach `host` from this machine only (a name other than localhost: no)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def clear_text_warning(settings: Settings) -> str | None:
    """The warning for a gateway that other hosts reach without TLS, or None."""
    if settings.tls_certfile is not None or loopback(settings.host):
        return None
    return (
        f"listening on {settings.host}:{settings.port} without TLS: API keys and prompts cross the network in "
        "clear text. Set GATEWAY_TLS_CERTFILE and GATEWAY_TLS_KEYFILE, or set GATEWAY_HOST=127.0.0.1 behind a "
        "TLS proxy (docs/security.md, TLS)."
    )
