"""Command line: `serve` (the default), `models`, and `keys init|create|list|revoke|update`."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import NoneType
from typing import Any, get_args, get_origin

from pydantic import ValidationError
from pydantic.fields import FieldInfo

from . import audit, time_text, tls
from .errors import GatewayError
from .fleet_control import ACTIONS, act
from .keystore import (
    Editable,
    KeyFileError,
    KeyRecord,
    KeyStore,
    LastAdminKeyError,
    Shown,
    check_models,
    marked,
    refusal,
)
from .model_config import ModelConfigError, load_backend_specs
from .server.file_limits import raise_open_files_limit
from .settings import ServeSettings, Settings, cannot_serve_reasons, load_settings
from .time_text import span_seconds


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        status: int = args.run(args)
        return status
    except (KeyFileError, ModelConfigError, LastAdminKeyError, ValueError, LookupError) as error:
        print(f"vllm_api_server: {error}", file=sys.stderr)
        return 1


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="vllm_api_server.py",
        description="OpenAI-compatible gateway for the vLLM servers in vllm_model_configs.sh. "
        "Settings come from GATEWAY_* environment variables (see README).",
    )
    commands = root.add_subparsers(dest="command")
    root.set_defaults(run=serve, host=None, port=None, workers=None)

    serve_cmd = commands.add_parser("serve", help="run the gateway (the default)")
    serve_cmd.add_argument("--host", help="listen address (GATEWAY_HOST, default 0.0.0.0)")
    serve_cmd.add_argument("--port", type=int, help="listen port (GATEWAY_PORT, default 1024)")
    serve_cmd.add_argument("--workers", type=int, help="worker processes (GATEWAY_WORKERS, default 1)")
    serve_cmd.set_defaults(run=serve)

    models_cmd = commands.add_parser(
        "models",
        help="print the models and backends as the gateway sees them, or start, stop, restart, sleep or wake one",
        description="Without ACTION, the models and their servers. `models ACTION ID` starts, stops or restarts "
        "the server with that id through the fleet scripts, or puts an idle= model to sleep or wakes it through "
        "its supervisor, as POST /admin/models/ID/ACTION does.",
    )
    models_cmd.add_argument("--json", action="store_true", help="print JSON")
    models_cmd.add_argument("action", nargs="?", choices=ACTIONS, help="what to do with one server")
    models_cmd.add_argument("id", nargs="?", help="the server's id (vllm_model_configs.sh)")
    models_cmd.set_defaults(run=show_models)

    keys = commands.add_parser("keys", help="manage API keys in the key file").add_subparsers(dest="action")
    keys_init = keys.add_parser("init", help="create the key file with an admin key, if there is none")
    keys_init.set_defaults(run=init_keys)

    create = keys.add_parser("create", help="create a key; it is printed once and never stored")
    add_key_options(create, at_creation=True)
    create.add_argument("--json", action="store_true", help="print the new key as JSON")
    create.set_defaults(run=create_key)

    listing = keys.add_parser("list", help="list keys (never the keys themselves)")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(run=list_keys)

    restore = keys.add_parser(
        "restore",
        help="put the key file's last good copy back in place of a missing or broken one",
        description="The gateway keeps a copy of the last key file that read well beside it "
        "(api_keys.json.last-good); this puts it back, unless the file in place reads well.",
    )
    restore.set_defaults(run=restore_keys)

    rotate = keys.add_parser(
        "rotate",
        help="give a key a new secret: same id, limits and usage; printed once",
        description="The old secret stops working at once, or after --grace.",
    )
    rotate.add_argument("key", help="the key's id (key_...) or its name")
    rotate.add_argument("--grace", default="0", help="how long the old secret keeps working: 1h, 30m, 90s (default 0)")
    rotate.add_argument("--json", action="store_true", help="print the key as JSON")
    rotate.set_defaults(run=rotate_key)

    revoke = keys.add_parser("revoke", help="delete a key for good")
    revoke.add_argument("key", help="the key's id (key_...) or its name, when no other key has that name")
    revoke.set_defaults(run=revoke_key)

    update = keys.add_parser("update", help="change a key's name, models, limits, admin flag or disabled flag")
    update.add_argument("key", help="the key's id (key_...) or its name, when no other key has that name")
    add_key_options(update, at_creation=False)
    update.set_defaults(run=update_key)

    usage_cmd = commands.add_parser("usage", help="print requests and tokens from the usage ledger")
    usage_cmd.add_argument("--since", default="7d", help="how far back: 12h, 7d, 2w (default 7d)")
    usage_cmd.add_argument(
        "--by", default="key,model", help="group by any of key, model, hour, joined with commas (default key,model)"
    )
    usage_cmd.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    usage_cmd.set_defaults(run=show_usage)
    return root


# -- serve --

# "uvloop" means uvloop with the gateway's batch accept (see server/event_loop.py).
UVICORN_LOOPS = {"uvloop": "vllm_gateway.server.event_loop:BatchAcceptLoop"}


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    overrides = {name: getattr(args, name) for name in ("host", "port", "workers") if getattr(args, name)}
    for name, value in overrides.items():
        os.environ[f"GATEWAY_{name.upper()}"] = str(value)  # worker processes read settings afresh
    try:
        settings = load_settings(ServeSettings)
    except ValidationError as error:
        reasons = cannot_serve_reasons(error)
        if not reasons:
            raise  # a setting wrong alone: main says which, as for every command
        for reason in reasons:
            print(f"vllm_api_server: {reason}", file=sys.stderr)
        return 2
    try:
        tls.context_of(settings)  # uvicorn's workers make their own: this one says early what is wrong
    except tls.TLSError as error:
        print(f"vllm_api_server: {error}", file=sys.stderr)
        return 2
    if (warning := tls.clear_text_warning(settings)) is not None:
        print(f"vllm_api_server: warning: {warning}", file=sys.stderr, flush=True)
    raise_open_files_limit()
    store = KeyStore(settings.key_file)
    if not store.exists:
        if not sys.stdout.isatty():
            print(
                f"vllm_api_server: no key file at {settings.key_file}. Run `python3 vllm_api_server.py keys init` "
                "once on a terminal to create the first admin key (start_api_server.sh does it for you).",
                file=sys.stderr,
            )
            return 1
        init_keys(args)
    if settings.workers > 1:
        # Each worker reads the key file and the model config: read here first, a broken one fails once,
        # before any worker starts. A single worker's create_app reads them before it listens.
        store.load()
        load_backend_specs(settings.model_config_file)

    common: dict[str, Any] = dict(
        host=settings.host,
        port=settings.port,
        http="vllm_gateway.server.protocol:GatewayProtocol",
        loop=UVICORN_LOOPS.get(settings.loop, settings.loop),
        timeout_keep_alive=settings.keepalive_timeout,
        server_header=False,
        proxy_headers=False,
        access_log=False,
        log_level="info",
        **tls.uvicorn_options(settings),
    )
    # uvicorn shuts down gracefully on SIGTERM and then raises the signal again, which ends the
    # process without running its exit handlers (the tests' coverage data is saved by one). This
    # handler, the one uvicorn restores before raising, exits through Python instead, with status 0.
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    if settings.workers > 1:
        uvicorn.run("vllm_gateway.app:create_app", factory=True, workers=settings.workers, **common)
    else:
        from .app import create_app

        uvicorn.run(create_app(settings), **common)
    return 0


def exit_on_sigterm(signum: int, frame: object) -> None:
    sys.exit(0)


# -- models --


def show_models(args: argparse.Namespace) -> int:
    settings = load_settings()
    if args.action is not None:
        return model_action(settings, args.action, args.id)
    rows = asyncio.run(probe_all(settings))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print_table(
        [("MODEL", "ALIASES", "STATUS", "BACKEND", "URL", "PATH")]
        + [
            (r["model"], ",".join(r["aliases"]) or "-", r["status"], r["backend"], r["url"], r["path"] or "-")
            for r in rows
        ]
    )
    return 0


def model_action(settings: Settings, action: str, model_id: str | None) -> int:
    if not model_id:
        print(f"models {action}: give the server's id", file=sys.stderr)
        return 2
    try:
        specs = load_backend_specs(settings.model_config_file)
    except ModelConfigError as error:
        print(f"models {action}: {error}", file=sys.stderr)
        return 2
    spec = next((spec for spec in specs if spec.id == model_id), None)
    try:
        outcome = asyncio.run(act(action, spec, model_id, settings.run_dir))
    except GatewayError as error:
        print(f"models {action}: {error}", file=sys.stderr)
        return 1 if error.status >= 500 else 2
    print("\n".join(outcome.output))
    return 0


def print_table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


async def probe_all(settings: Settings) -> list[dict[str, Any]]:
    from .health import check_backend, probe_pool
    from .registry import Registry

    registry = Registry(load_backend_specs(settings.model_config_file))
    pool = probe_pool(settings.health_timeout, settings.max_upstream_head_bytes)
    await asyncio.gather(*(check_backend(pool, b, settings.run_dir) for b in registry.backends()))
    pool.close()
    return [
        {
            "model": model.name,
            "aliases": list(model.aliases),
            "status": backend.state.value,
            "detail": backend.detail,
            "backend": backend.spec.id,
            "url": backend.base_url,
            "path": model.path,
        }
        for model in registry.models.values()
        for backend in model.backends
    ]


# -- keys --


def key_store() -> KeyStore:
    store = KeyStore(load_settings().key_file)
    store.load()
    return store


def init_keys(_: argparse.Namespace) -> int:
    store = KeyStore(load_settings().key_file)
    secret = store.create_first_admin_key()
    if secret is None:
        store.load()
        print(f"vllm_api_server: key file {store.path} already holds {len(store.records())} key(s)", file=sys.stderr)
        return 0
    rule = "=" * 72
    print(
        f"{rule}\n First start: created an admin API key. It is shown only this once:\n\n    {secret}\n\n"
        f" Only its hash is stored, in {shown_path(store.path)}. Keep it safe; make keys for users with\n"
        f"    python3 vllm_api_server.py keys create --name NAME\n{rule}",
        flush=True,
    )
    return 0


def shown_path(path: Path) -> str:
    """`path` as the person at the terminal would type it: relative where it is below here."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def create_key(args: argparse.Namespace) -> int:
    fields = {
        name: given_at_creation(name, field, editable, getattr(args, name))
        for name, field, editable in marked(Editable)
        if editable.at_creation
    }
    if fields.get("models"):
        check_models(fields["models"], model_names())
    record, secret = key_store().create(**fields)
    audited("create", record, changes={name: value for name, value in fields.items() if value not in (None, False)})
    if args.json:
        print(json.dumps({**record.public(), "key": secret}))
    else:
        print(f"created {record.id} ({record.name}). The key, shown only this once:\n{secret}")
    return 0


def model_names() -> frozenset[str]:
    """The names and aliases of the config's models, which a key's model list may name."""
    specs = load_backend_specs(load_settings().model_config_file)
    return frozenset(name for spec in specs for name in (spec.name, *spec.aliases))


def list_keys(args: argparse.Namespace) -> int:
    store = key_store()
    records = store.records()
    for name in store.duplicate_names():  # key files from before names were unique
        print(f"vllm_api_server: warning: several keys are named {name}: rename all but one", file=sys.stderr)
    usage = recent_usage_by_key(load_settings())
    if args.json:
        listing = []
        for record in records:
            requests, prompt, completion = usage.get(record.id, (0, 0, 0))
            listing.append(
                {
                    **record.public(),
                    "usage_30d": {"requests": requests, "prompt_tokens": prompt, "completion_tokens": completion},
                }
            )
        print(json.dumps(listing, indent=2))
        return 0
    rows = []
    for record in records:
        requests, prompt, completion = usage.get(record.id, (0, 0, 0))
        rows.append((*describe(record), str(requests), str(prompt + completion)))
    print_table([(*headings(), "REQUESTS 30D", "TOKENS 30D"), *rows])
    return 0


def recent_usage_by_key(settings: Settings, days: int = 30) -> dict[str, tuple[int, int, int]]:
    """Requests, prompt and completion tokens per key id over the last `days`, from the usage ledger
    (the source of truth for what a key used; empty when there is no ledger yet)."""
    from .usage_ledger import HOUR, SQLiteUsageStore
    from .usage_report import key_totals

    if not settings.usage_db_path.exists():
        return {}
    return key_totals(SQLiteUsageStore(settings.usage_db_path), int(time.time()) - days * 24 * HOUR)


def describe(record: KeyRecord) -> tuple[str, ...]:
    """A key as a row of `keys list`: its shown fields, in their order (keystore.Shown)."""
    return tuple(shown.show(getattr(record, name)) for name, _, shown in marked(Shown))


def headings() -> tuple[str, ...]:
    return tuple(shown.heading or name.upper().replace("_", " ") for name, _, shown in marked(Shown))


def add_key_options(command: argparse.ArgumentParser, at_creation: bool) -> None:
    """An option for each editable key field (keystore.Editable). `keys create` takes its value (a
    flag: on); `keys update` its value or the word that unsets it (a flag: --x and --no-x)."""
    for name, field, editable in marked(Editable):
        kind = value_type(field)
        flag = editable.flag or option_of(name)
        if not at_creation and kind is bool:
            command.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=editable.update_help
            )
        elif not at_creation:
            command.add_argument(flag, dest=name, help=editable.update_help)
        elif editable.at_creation and kind is bool:
            command.add_argument(flag, dest=name, action="store_true", help=editable.create_help)
        elif editable.at_creation:
            parse = kind if kind in (int, float) and editable.parse is None else str
            command.add_argument(flag, dest=name, type=parse, required=field.is_required(), help=editable.create_help)


def option_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def value_type(field: FieldInfo) -> Any:
    """The type of a key field's values, None aside: bool, str, int, float or list."""
    kinds = [kind for kind in get_args(field.annotation) if kind is not NoneType] or [field.annotation]
    return get_origin(kinds[0]) or kinds[0]


def parsed(name: str, editable: Editable, text: str) -> Any:
    """An option's text read by its field's own reader (Editable.parse), or its refusal."""
    assert editable.parse is not None
    try:
        return editable.parse(text)
    except ValueError:
        raise refusal(name, text) from None


def given_at_creation(name: str, field: FieldInfo, editable: Editable, value: Any) -> Any:
    """The value `keys create` sets from its option (a list: comma-separated; none or empty: None)."""
    if editable.parse is not None and isinstance(value, str):
        return parsed(name, editable, value)
    if value_type(field) is not list:
        return value
    return [item for item in value.split(",") if item] if value else None


def changed_to(name: str, field: FieldInfo, editable: Editable, value: Any) -> Any:
    """The value `keys update` sets from its option's text (a flag's: True or False)."""
    kind = value_type(field)
    if kind is bool:
        return value
    if field.default is None and value == editable.unset:
        return None
    if editable.parse is not None:
        return parsed(name, editable, value)
    if kind is list:
        return [item for item in value.split(",") if item]
    if kind is float:  # a number for the store's range check and its message
        return number(option_of(name), value, editable.unset)
    return value  # the store checks the rest (a whole number of requests, a limit's syntax)


def number(option: str, text: str, unset: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{option} takes a number or '{unset}', not {text!r}") from None


def audited(action: str, key: KeyRecord | None, **details: Any) -> None:
    """A key change done with the CLI, in the audit trail (audit.py)."""
    audit.record(load_settings().log_dir, audit.cli_actor(), action, key, **details)


def restore_keys(_: argparse.Namespace) -> int:
    store = KeyStore(load_settings().key_file)  # not loaded: the file in place may be broken
    count = store.restore()
    audited("restore", None, keys=count)
    print(
        f"restored {store.path} from {store.last_good_path} ({count} keys); a running gateway takes it within a second"
    )
    return 0


def rotate_key(args: argparse.Namespace) -> int:
    grace = span_seconds(args.grace)
    if grace is None:
        raise ValueError(f"--grace takes a span such as 1h, 30m or 90s, not {args.grace!r}")
    store = key_store()
    rotated = store.rotate(store.key_id_of(args.key), grace)
    if rotated is None:
        raise LookupError(f"no key with the id or name {args.key}")
    record, secret = rotated
    audited("rotate", record, grace_seconds=grace)
    if args.json:
        print(json.dumps({**record.public(), "key": secret}))
        return 0
    old = (
        f"the old one works until {time_text.shown(record.previous_until)}" if grace else "the old one no longer works"
    )
    print(f"rotated {record.id} ({record.name}); {old}. The new key, shown only this once:\n{secret}")
    return 0


def revoke_key(args: argparse.Namespace) -> int:
    store = key_store()
    key_id = store.key_id_of(args.key)
    revoked = next((record for record in store.records() if record.id == key_id), None)
    if revoked is None or not store.revoke(key_id):
        print(f"vllm_api_server: no key with id {key_id}", file=sys.stderr)
        return 1
    audited("revoke", revoked)
    print(f"revoked {key_id}")
    return 0


def update_key(args: argparse.Namespace) -> int:
    changes = {
        name: changed_to(name, field, editable, getattr(args, name))
        for name, field, editable in marked(Editable)
        if getattr(args, name) is not None
    }
    store = key_store()
    key_id = store.key_id_of(args.key)
    if changes.get("models"):
        check_models(changes["models"], model_names())
    record = store.update(key_id, changes)
    if record is None:
        print(f"vllm_api_server: no key with id {key_id}", file=sys.stderr)
        return 1
    audited("update", record, changes=changes)
    print("  ".join(describe(record)))
    return 0


# -- usage --


def show_usage(args: argparse.Namespace) -> int:
    from .usage_ledger import SQLiteUsageStore
    from .usage_report import parse_span, usage_table

    settings = load_settings()
    by = [part.strip() for part in args.by.split(",") if part.strip()]
    unknown = set(by) - {"key", "model", "hour"}
    if unknown or not by:
        raise ValueError(f"--by takes key, model and hour, not {args.by!r}")
    if not settings.usage_db_path.exists():
        print(f"no usage recorded yet: the gateway writes {shown_path(settings.usage_db_path)} as it serves")
        return 0
    since = int(time.time()) - parse_span(args.since)
    names = {record.id: record.name for record in key_store().records()} if "key" in by else {}
    entries = usage_table(SQLiteUsageStore(settings.usage_db_path), since, by, names)
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    if not entries:
        print(f"no usage in the last {args.since}")
        return 0
    header = list(entries[0])
    print_table([header] + [[str(entry[column]) for column in header] for entry in entries])
    return 0
