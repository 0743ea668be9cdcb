"""Every gateway setting, declared once, with its default and the checks it must pass.

Values come from the environment (prefix GATEWAY_) or from an env file named by GATEWAY_ENV_FILE
(default gateway.env in the working directory, when present). Nothing else reads os.environ.

Settings checks each value alone, and finds the one Redis the workers share; ServeSettings adds what
`serve` needs of them together (several workers count and queue in one place, HTTPS has a certificate
and its key), so that the other commands (keys, models, usage) still run under a configuration that
cannot serve.
"""

from __future__ import annotations

import os
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, SettingsConfigDict


def checkout_of(package: Path) -> Path:
    """The checkout the gateway runs from: the folder above the package that holds vllm_api_server.py
    (the package's parent, or for the compiled build in .build/compiled/, three levels up)."""
    for folder in package.parents:
        if (folder / "vllm_api_server.py").exists():
            return folder
    return package.parent


REPO_DIR = checkout_of(Path(__file__).resolve().parent)
# The schemes of a Redis URL, as redis-py reads them (a `limits` storage may add `async+`).
REDIS_SCHEMES = ("redis", "rediss", "unix")
# The type of the errors ServeSettings raises: settings valid one by one that cannot serve together.
CANNOT_SERVE = "cannot_serve"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GATEWAY_", extra="ignore")

    # -- server: where clients connect, how many requests a worker holds, how long idle connections stay --
    host: str = "0.0.0.0"
    port: int = 1024
    # One worker process serves hundreds of streams on its event loop; more workers need Redis
    # (redis_url) so that the counts stay exact and admission sees every worker's requests.
    workers: int = Field(1, ge=1)
    concurrency_limit: int = Field(100, ge=1)
    keepalive_timeout: int = Field(300, ge=1)
    loop: Literal["uvloop", "asyncio", "auto"] = "uvloop"

    # -- what one client may send and leave unread (nginx's default beside each) --
    # nginx client_header_timeout 60 s; 30 s is ample for a head, which is one packet in practice.
    head_timeout: float = Field(30.0, gt=0)
    # nginx client_body_timeout 60 s: the longest pause between two reads of a body.
    body_timeout: float = Field(60.0, gt=0)
    # nginx send_timeout 60 s: the longest a client may leave its answer unread. A stream whose
    # client stopped reading holds one of the model's few sequences until then.
    send_timeout: float = Field(60.0, gt=0)
    # nginx large_client_header_buffers 4 8k: a request line over 8 KiB is a 414.
    max_request_line_bytes: int = Field(8 * 1024, ge=256)
    # nginx's whole head fits in 4 x 8 KiB buffers; vLLM clients send a few hundred bytes.
    max_head_bytes: int = Field(64 * 1024, ge=1024)
    max_headers: int = Field(100, ge=8)
    # nginx client_max_body_size 1m; vLLM takes long prompts and base64 images, so 32 MiB.
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    # Endpoints that are not relayed (admin, health, models) take small bodies only.
    max_admin_body_bytes: int = Field(64 * 1024, ge=1024)
    # nginx lingering_time 30 s: after an answer that closes the connection while the client is still
    # sending (a 431, a 413, a 401 before the body...), what it sends is read and dropped for at most
    # this long and this many bytes, so that it reads its answer rather than a reset (server/protocol.py).
    # nginx bounds no bytes; twice the body limit lets a whole refused body in.
    linger_timeout: float = Field(30.0, gt=0)
    linger_bytes: int = Field(64 * 1024 * 1024, ge=0)
    # None: derived at start from the file-descriptor limit (see server/file_limits.py).
    max_connections: int | None = Field(None, ge=1)

    # -- HTTPS (docs/security.md#tls): without it, keys and prompts cross the network in clear text --
    # A PEM certificate (any intermediate certificates after it) and its private key: both, or neither
    # for plain HTTP. The metrics port serves HTTPS with them too. The password is an encrypted key's.
    tls_certfile: Path | None = None
    tls_keyfile: Path | None = None
    tls_keyfile_password: SecretStr | None = None

    # -- upstream vLLM servers --
    model_config_file: Path = Field(
        REPO_DIR / "vllm_model_configs.sh",
        validation_alias=AliasChoices("VLLM_MODEL_CONFIG", "GATEWAY_MODEL_CONFIG"),
    )
    connect_timeout: float = Field(5.0, gt=0)
    # Seconds without a byte from vLLM before the client gets 504; long prompts prefill for a while.
    read_timeout: float = Field(600.0, gt=0)
    # A backend's response head, bounded as a request's is (max_head_bytes); beyond it the client gets 502.
    max_upstream_head_bytes: int = Field(64 * 1024, ge=1024)
    health_interval: float = Field(5.0, gt=0)
    # Seconds a health check waits to connect and for the answer. vLLM answers /health from the event
    # loop that streams its answers: under a heavy load, or on a busy host, that can take seconds.
    health_timeout: float = Field(3.0, gt=0)
    run_dir: Path = Field(REPO_DIR / "run", validation_alias=AliasChoices("VLLM_RUN_DIR", "GATEWAY_RUN_DIR"))

    # -- keys and limits --
    key_file: Path = REPO_DIR / "api_keys.json"
    # How often the gateway looks whether keys' last-used times are due in the key file (a first
    # use, or one a minute newer: keystore.usage_due), so that `keys list` shows them within seconds.
    key_usage_flush_seconds: float = Field(2.0, gt=0)
    rate_limit: str = "20/minute"
    # Tokens (prompt + completion) per key, for keys without a token_limit of their own; none: no limit.
    token_limit: str | None = None
    # Seconds the backend's /tokenize gets to count the prompt of a request whose usage never came (its
    # client left, or the backend cut the answer); past them, or failing, the prompt is estimated
    # (prompt_count.py). The request's log line and ledger entry wait that long, never a client.
    prompt_count_timeout: float = Field(2.0, gt=0, le=60)
    # Where the rate limits count (a `limits` storage URL). Unset: redis_url when that is set, else
    # this worker's memory.
    rate_limit_storage: str = "memory://"
    # Counted in memory (one worker, no Redis), the rate and token windows are written to a file so that
    # a restart keeps them (window_file.py). None: limit_windows.json beside the key file; off: a
    # restart starts every window over.
    limit_state: bool = True
    limit_state_file: Path | None = None
    # How often the windows are written when they changed: a crash (kill -9) forgets at most this long.
    limit_state_flush_seconds: float = Field(1.0, gt=0, le=60)
    # The Redis the workers share: admission's counts and queues, and the rate limits' counts unless
    # rate_limit_storage names a store of its own. Unset: rate_limit_storage, when that is Redis.
    redis_url: str | None = None
    # Seconds Redis (the shared store above) may take to accept a connection or answer before the
    # gateway takes it for down: requests then get 503 store_unavailable instead of hanging.
    redis_timeout: float = Field(3.0, gt=0)

    # -- admission (admission/local.py): each backend gets at most its capacity, the rest wait fairly --
    admission: bool = True
    # A key's requests in flight and waiting together, for keys without max_parallel_requests.
    max_parallel_requests: int = Field(64, ge=1)
    # Seconds a request may wait for a free backend, and requests that may wait per model (over all
    # workers). A worker holds at most concurrency_limit requests, relayed or waiting, so a longer
    # queue than that could never fill with one worker.
    queue_timeout: float = Field(60.0, gt=0)
    queue_limit: int = Field(100, ge=0)

    # -- the web console at /console/ (docs/console.md) --
    # Off: /console/ answers 404 and a session cookie is no key.
    console: bool = True
    # A console session lasts this long after sign-in (a rotated or revoked key ends it sooner).
    console_session_seconds: float = Field(12 * 3600.0, gt=0, le=30 * 86400)
    # Sign-in attempts per client address, in the rate limits' syntax: a key cannot be guessed by trying.
    console_sign_in_limit: str = "10/minute"
    # The secret that signs session cookies. None: console_secret beside the key file.
    console_secret_file: Path | None = None
    # The cookie's Secure flag. None: set when the request came over HTTPS; true behind a TLS proxy.
    console_secure_cookie: bool | None = None

    # -- the console's data: /admin/overview, /admin/models/{id}, /admin/requests (console_api.py) --
    # How often the overview's history reads the metrics' counters (console_figures.py): the finest
    # step of its per-minute rows and of its tokens per second.
    console_sample_seconds: float = Field(2.0, gt=0, le=60)
    # The most of the request log's end (and of its rotated copy) one call of /admin/requests, or a model
    # server's recent errors, reads: a filter that matches no recent line costs this, not the whole log.
    console_request_scan_bytes: int = Field(16 * 1024 * 1024, ge=64 * 1024)
    # The most of a model server's log end GET /admin/models/{id} reads for its last 100 lines.
    console_log_tail_bytes: int = Field(1024 * 1024, ge=4096)

    # -- metrics: GET /metrics (docs/metrics.md) --
    # Off: nothing is recorded and /metrics answers 404 (the benchmark's gateway-bare).
    metrics: bool = True
    # Client networks (CIDRs, comma-separated) answered without a key; any other client needs an admin
    # key. It replaces the default, so keep 127.0.0.0/8 in it to keep loopback; empty: admin keys only.
    metrics_allow: str = "127.0.0.0/8,::1/128"
    # A port of its own for /metrics, on the same host; None: the gateway's port.
    metrics_port: int | None = Field(None, ge=1, le=65535)
    # Connections that port holds at once (per worker): a scraper needs one. They come out of the
    # descriptors the gateway port's derived cap leaves (max_connections).
    metrics_max_connections: int = Field(16, ge=1)
    # How often each worker writes its figures for the others to add up (several workers only).
    metrics_snapshot_seconds: float = Field(1.0, gt=0)

    # -- the usage ledger (usage_ledger.py): requests and tokens per key, model and hour --
    usage_ledger: bool = True
    # None: usage.db beside the key file.
    usage_db: Path | None = None
    # How often a worker writes what it counted: a crash loses at most this long of counts.
    usage_flush_seconds: float = Field(1.0, gt=0, le=60)

    # -- logs --
    log_dir: Path = Field(REPO_DIR / "logs", validation_alias=AliasChoices("GATEWAY_LOG_DIR", "VLLM_LOG_DIR"))
    # The fleet scripts' logs, where the supervisor writes fleet_events.jsonl (GET /admin/events).
    fleet_log_dir: Path = Field(REPO_DIR / "logs", validation_alias=AliasChoices("VLLM_LOG_DIR"))
    log_file_name: str = "vllm_api_server.log"
    log_max_bytes: int = 50 * 1024 * 1024
    log_backups: int = 5

    @field_validator("rate_limit", "console_sign_in_limit")
    @classmethod
    def _rate_limit_parses(cls, value: str) -> str:
        from limits import parse_many

        parse_many(value)  # windows joined with `;`, as ratelimit.parse_limits reads them
        return value

    @field_validator("metrics_allow")
    @classmethod
    def _networks_parse(cls, value: str) -> str:
        networks_of(value)
        return value

    @property
    def metrics_networks(self) -> list[IPv4Network | IPv6Network]:
        return networks_of(self.metrics_allow)

    @field_validator("token_limit")
    @classmethod
    def _token_limit_parses(cls, value: str | None) -> str | None:
        from limits import parse_many

        if value is None or not value.strip() or value.strip().lower() == "none":
            return None
        parse_many(value)
        return value

    @field_validator("tls_certfile", "tls_keyfile", "tls_keyfile_password", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        # `GATEWAY_TLS_CERTFILE=` in gateway.env means no file, not the working directory (Path("")).
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("redis_url")
    @classmethod
    def _redis_url_is_redis(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip().removeprefix("async+")
        if urlsplit(value).scheme.lower() not in REDIS_SCHEMES:
            raise ValueError("GATEWAY_REDIS_URL takes a redis://, rediss:// or unix:// URL")
        return value

    @model_validator(mode="after")
    def _one_redis_for_the_workers(self) -> Settings:
        """The precedence of the two settings that name a shared store (docs/settings.md)."""
        if self.redis_url is None and self.rate_limit_scheme in REDIS_SCHEMES:
            self.redis_url = self.rate_limit_storage.removeprefix("async+")
        elif self.redis_url is not None and "rate_limit_storage" not in self.model_fields_set:
            self.rate_limit_storage = self.redis_url
        return self

    @property
    def usage_db_path(self) -> Path:
        return self.usage_db or self.key_file.parent / "usage.db"

    @property
    def console_secret_path(self) -> Path:
        return self.console_secret_file or self.key_file.parent / "console_secret"

    @property
    def limit_state_path(self) -> Path:
        return self.limit_state_file or self.key_file.parent / "limit_windows.json"

    @property
    def log_path(self) -> Path:
        return self.log_dir / self.log_file_name

    @property
    def rate_limit_scheme(self) -> str:
        """The storage's scheme as `limits` reads it: `async+memory://` and `MEMORY://` are memory too."""
        scheme = urlsplit(self.rate_limit_storage).scheme.lower()
        return scheme.removeprefix("async+")

    @property
    def shares_rate_limit_store(self) -> bool:
        return self.rate_limit_scheme != "memory"


class ServeSettings(Settings):
    """The settings `serve` starts the gateway with: what Settings checks, that several workers count
    and queue in one place, and that HTTPS has both its files. Each worker counting alone would let a
    key make workers x its limit and send a model workers x its capacity."""

    @model_validator(mode="after")
    def _workers_share_the_rate_limits(self) -> ServeSettings:
        if self.workers > 1 and not self.shares_rate_limit_store:
            raise cannot_serve(
                f"refusing to start {self.workers} workers with GATEWAY_RATE_LIMIT_STORAGE="
                f"{self.rate_limit_storage}: each worker would count requests on its own, so every key could "
                "make workers x its limit. Set GATEWAY_RATE_LIMIT_STORAGE=redis://HOST:6379 or use one worker."
            )
        return self

    @model_validator(mode="after")
    def _workers_share_admission(self) -> ServeSettings:
        if self.workers > 1 and self.admission and self.redis_url is None:
            raise cannot_serve(
                f"refusing to start {self.workers} workers with GATEWAY_RATE_LIMIT_STORAGE="
                f"{self.rate_limit_storage}: the workers share admission's counts and queues through Redis. "
                "Set GATEWAY_REDIS_URL=redis://HOST:6379, or GATEWAY_ADMISSION=false."
            )
        return self

    @model_validator(mode="after")
    def _tls_has_both_files(self) -> ServeSettings:
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            given, missing = ("CERTFILE", "KEYFILE") if self.tls_keyfile is None else ("KEYFILE", "CERTFILE")
            raise cannot_serve(
                f"refusing to start with GATEWAY_TLS_{given} but no GATEWAY_TLS_{missing}: HTTPS needs both "
                "the certificate and its key. Set GATEWAY_TLS_CERTFILE and GATEWAY_TLS_KEYFILE, or neither "
                "for plain HTTP."
            )
        return self


def cannot_serve(reason: str) -> PydanticCustomError:
    # The reason goes in as a value, not as the template, where braces would be read as fields.
    return PydanticCustomError(CANNOT_SERVE, "{reason}", {"reason": reason})


def cannot_serve_reasons(error: ValidationError) -> list[str]:
    """Why ServeSettings refused settings that Settings takes; empty when a setting was wrong alone."""
    return [detail["msg"] for detail in error.errors() if detail["type"] == CANNOT_SERVE]


def networks_of(text: str) -> list[IPv4Network | IPv6Network]:
    return [ip_network(part.strip(), strict=False) for part in text.split(",") if part.strip()]


def load_settings(kind: type[Settings] = Settings, **overrides: Any) -> Settings:
    """`kind`: Settings, or ServeSettings for the settings a gateway serves with."""
    env_file = os.environ.get("GATEWAY_ENV_FILE", "gateway.env")
    return kind(_env_file=env_file if Path(env_file).is_file() else None, **overrides)
