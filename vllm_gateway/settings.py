"""Every gateway setting, declared once, with the spec's defaults.

Values come from the environment (prefix GATEWAY_) or from an env file named by GATEWAY_ENV_FILE
(default gateway.env in the working directory, when present). Nothing else reads os.environ.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_DIR = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GATEWAY_", extra="ignore")

    # -- server (the spec: port 1024, concurrency 100, keep-alive 300 s, httptools) --
    host: str = "0.0.0.0"
    port: int = 1024
    # One worker process serves hundreds of streams on its event loop; more workers need a shared
    # rate-limit store (rate_limit_storage) so that the counts stay exact.
    workers: int = Field(1, ge=1)
    concurrency_limit: int = Field(100, ge=1)
    keepalive_timeout: int = Field(300, ge=1)
    loop: Literal["uvloop", "asyncio", "auto"] = "uvloop"
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024)

    # -- upstream vLLM servers --
    model_config_file: Path = Field(
        REPO_DIR / "vllm_model_configs.sh",
        validation_alias=AliasChoices("VLLM_MODEL_CONFIG", "GATEWAY_MODEL_CONFIG"),
    )
    connect_timeout: float = Field(5.0, gt=0)
    # Seconds without a byte from vLLM before the client gets 504; long prompts prefill for a while.
    read_timeout: float = Field(600.0, gt=0)
    health_interval: float = Field(5.0, gt=0)
    run_dir: Path = Field(REPO_DIR / "run", validation_alias=AliasChoices("VLLM_RUN_DIR", "GATEWAY_RUN_DIR"))

    # -- keys and limits --
    key_file: Path = REPO_DIR / "api_keys.json"
    rate_limit: str = "20/minute"
    rate_limit_storage: str = "memory://"

    # -- logs --
    log_dir: Path = Field(REPO_DIR / "logs", validation_alias=AliasChoices("GATEWAY_LOG_DIR", "VLLM_LOG_DIR"))
    log_file_name: str = "vllm_api_server.log"
    log_max_bytes: int = 50 * 1024 * 1024
    log_backups: int = 5

    @field_validator("rate_limit")
    @classmethod
    def _rate_limit_parses(cls, value: str) -> str:
        from limits import parse

        parse(value)
        return value

    @property
    def log_path(self) -> Path:
        return self.log_dir / self.log_file_name

    @property
    def shares_rate_limit_store(self) -> bool:
        return not self.rate_limit_storage.startswith("memory://")


def load_settings(**overrides: object) -> Settings:
    env_file = os.environ.get("GATEWAY_ENV_FILE", "gateway.env")
    return Settings(_env_file=env_file if Path(env_file).is_file() else None, **overrides)
