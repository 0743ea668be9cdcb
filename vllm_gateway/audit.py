"""The audit trail of key administration: who created, changed, rotated, revoked or restored which
key, and what changed, one JSON object a line in GATEWAY_LOG_DIR/audit.jsonl.

Written by the admin API (the admin key that asked, and from which address) and by the CLI (the
user that ran it on this host), after the change is saved. Never a secret: changes name the fields
an admin sets (keystore.Editable), and a rotation says only that the key has a new secret. The API
serves the file to admin keys as `GET /admin/audit` (event_log.py).
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from .keystore import KeyRecord

log = logging.getLogger("vllm_gateway.audit")

AUDIT_FILE = "audit.jsonl"
ACTIONS = ("create", "update", "rotate", "revoke", "restore")


def api_actor(admin: KeyRecord, address: str | None) -> dict[str, Any]:
    return {"via": "api", "admin_key_id": admin.id, "admin_key_name": admin.name, "address": address}


def cli_actor() -> dict[str, Any]:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return {"via": "cli", "user": user}


def record(log_dir: Path, actor: dict[str, Any], action: str, key: KeyRecord | None, **details: Any) -> None:
    """Append one line; a trail that cannot be written is logged, and the change it records stands."""
    now = time.time()
    line = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z",
        "action": action,
        "key_id": key.id if key is not None else None,
        "key_name": key.name if key is not None else None,
        **actor,
        **details,
    }
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(log_dir / AUDIT_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(descriptor, (json.dumps(line) + "\n").encode())  # one write: lines never interleave
        finally:
            os.close(descriptor)
    except OSError as error:
        log.error("audit trail not written (%s): %s", error, line)
