"""The API key store: a JSON file of key hashes, changed atomically under a lock, watched for changes.

The file never holds a key, only its SHA-256 (keys are 256-bit random, so a fast hash is enough).
Every change is read-modify-write under an exclusive lock on a side file, written to a temporary file,
fsynced and renamed over the old one, so a crash leaves either the old or the new file, never half of
one. A file that does not parse is never overwritten: the gateway refuses to start on it, and a running
gateway keeps the last good copy and refuses changes until it is repaired.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import secrets
import tempfile
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, Field, ValidationError, field_validator
from pydantic.fields import FieldInfo

from . import time_text

KEY_PREFIX = "sk-"
# A key's admission weight (admission/local.py): a key of weight 1000 gets 100,000 turns to one of weight
# 0.01. Below that, a weight only made turns longer to count (1e-300 once hung admission); a key file
# written before this minimum keeps loading, its smaller weights read as the minimum.
MIN_WEIGHT = 0.01
MAX_WEIGHT = 1000.0
# Last-used times reach the key file to the minute (as `keys list` shows them); a first use at once.
LAST_USED_RESOLUTION_SECONDS = 60.0
SHOWN_PREFIX_LENGTH = 11
LAST_GOOD_SUFFIX = ".last-good"
M = TypeVar("M", bound="Shown")


class KeyFileError(Exception):
    """The key file exists but cannot be used; the message says which file and why."""


class KeyFieldError(ValueError):
    """A value given for a key field (over the API or the CLI) that the field does not take; the
    message is one sentence: the field, what was given, what it takes."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class AmbiguousKeyName(ValueError):
    """A name that more than one key has (a key file from before names were unique)."""


class LastAdminKeyError(Exception):
    """A change would leave no enabled admin key, and with it no way to manage keys over the API."""


def when(stamp: float | None) -> str:
    """A time as `keys list` shows it: to the minute, local time."""
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(stamp)) if stamp else "never"


@dataclass(frozen=True)
class Shown:
    """Marks a key field `keys list` shows (and `keys update` prints): a column in field order."""

    heading: str = ""  # default: the field's name in capitals
    text: Callable[[Any], str] | None = None  # default: `show`'s rule
    unset: str = "default"  # the text for None: the setting that applies instead

    def show(self, value: Any) -> str:
        if self.text is not None:
            return self.text(value)
        if value is None:
            return self.unset
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, list):
            return ",".join(value)
        if isinstance(value, float):
            return f"{value:g}"
        return str(value)


@dataclass(frozen=True)
class Editable(Shown):
    """Marks a key field admins set: the bodies of `POST`/`PATCH /admin/keys` and the options of `keys
    create`/`keys update` are made from these fields, with their types, defaults and checks. `keys
    update` takes the `unset` word to set it back to None (fields whose default is None)."""

    create_help: str | None = None
    update_help: str | None = None
    at_creation: bool = True  # False: only a change sets it
    accepts: str = ""  # what the field takes, for the sentence that refuses a bad value (field_error)
    flag: str = ""  # the CLI's option, when not --the-field-name
    parse: Callable[[str], Any] | None = None  # how the CLI reads the option's text, when not by its type


class KeyRecord(BaseModel):
    """A key in the key file, and the one declaration of a key's fields: the Editable ones are what an
    admin sets (over the API and the CLI), the others the store keeps; the Shown ones are the columns of
    `keys list`, in this order. A new field is declared here once."""

    id: Annotated[str, Shown()]
    name: Annotated[str, Field(min_length=1, max_length=200), Editable(accepts="a name of 1 to 200 characters")]
    prefix: Annotated[str, Shown(text=lambda prefix: prefix + "...")]
    hash: str
    admin: Annotated[bool, Editable(create_help="may use /admin/keys", accepts="true or false")] = False
    models: Annotated[
        list[str] | None,
        Editable(
            unset="all",
            create_help="comma-separated models this key may use (default: all)",
            update_help="comma-separated models; 'all' lifts the restriction",
            accepts="a list of model names, or null for every model",
        ),
    ] = None
    rate_limit: Annotated[
        str | None,
        Editable(
            create_help='this key\'s limit, e.g. "100/minute" (default: GATEWAY_RATE_LIMIT)',
            update_help="e.g. 100/minute; 'default' goes back to GATEWAY_RATE_LIMIT",
            accepts='requests per window, such as "100/minute" or "10/second;1000/hour" '
            "(windows: second, minute, hour, day)",
        ),
    ] = None
    token_limit: Annotated[
        str | None,
        Editable(
            create_help='tokens this key may use, e.g. "40000/minute" (default: GATEWAY_TOKEN_LIMIT)',
            update_help="e.g. 40000/minute; 'default' goes back to GATEWAY_TOKEN_LIMIT",
            accepts='tokens per window, such as "40000/minute" or "40000/minute;2000000/day" '
            "(windows: second, minute, hour, day)",
        ),
    ] = None
    # Admission (admission/local.py): this key's share of a busy model's turns, and its most requests in
    # flight and waiting together; None: 1, and GATEWAY_MAX_PARALLEL_REQUESTS.
    weight: Annotated[
        float | None,
        Field(ge=MIN_WEIGHT, le=MAX_WEIGHT),
        Editable(
            create_help="this key's share of a busy model's turns, 0.01 to 1000, e.g. 2 (default: 1)",
            update_help="0.01 to 1000, e.g. 2; 'default' goes back to 1",
            accepts=f"a number from {MIN_WEIGHT:g} to {MAX_WEIGHT:g}",
        ),
    ] = None
    max_parallel_requests: Annotated[
        int | None,
        Field(ge=1),
        Editable(
            heading="PARALLEL",
            create_help="requests in flight and waiting at once (default: GATEWAY_MAX_PARALLEL_REQUESTS)",
            update_help="e.g. 8; 'default' goes back to GATEWAY_MAX_PARALLEL_REQUESTS",
            accepts="a whole number from 1",
        ),
    ] = None
    created_at: Annotated[float, Shown("CREATED", when)]
    last_used_at: Annotated[float | None, Shown("LAST USED", when)] = None
    # Refused from then on (401 key_expired); None: never.
    expires_at: Annotated[
        float | None,
        Editable(
            heading="EXPIRES",
            text=time_text.shown,
            unset="never",
            create_help="when the key stops working: 30d, 12h, a date (2027-01-31) or a time (default: never)",
            update_help="30d, 12h, a date or a time; 'never' lifts it",
            accepts="unix seconds, an ISO 8601 time such as 2027-01-31T00:00:00Z, or (the CLI) a span such as 30d",
            flag="--expires",
            parse=time_text.expiry_from_cli,
        ),
    ] = None
    # After a rotation with a grace period: the old secret's hash, and until when it still works.
    previous_hash: str | None = None
    previous_until: float | None = None
    disabled: Annotated[
        bool,
        Editable(
            heading="STATE",
            text=lambda disabled: "disabled" if disabled else "active",
            at_creation=False,
            accepts="true or false",
        ),
    ] = False

    @field_validator("rate_limit", "token_limit")
    @classmethod
    def _limit_parses(cls, value: str | None) -> str | None:
        from .ratelimit import check_limit_text

        return check_limit_text(value)

    @field_validator("expires_at", mode="before")
    @classmethod
    def _expiry_is_a_moment(cls, value: Any) -> Any:
        return None if value is None else time_text.moment(value)

    @field_validator("weight", mode="before")
    @classmethod
    def _weight_at_least_the_minimum(cls, value: Any) -> Any:
        """A key file written before the minimum keeps loading: its smaller positive weights read as the
        minimum. (A weight given to `create` or `update` is checked before: `check_weight`.)"""
        if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < MIN_WEIGHT:
            return MIN_WEIGHT
        return value

    def may_use(self, model_name: str) -> bool:
        return self.models is None or model_name in self.models

    def public(self) -> dict[str, object]:
        """What admins may see: everything but the hash."""
        return self.model_dump(exclude={"hash", "previous_hash"})

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and self.expires_at <= now


def marked(kind: type[M]) -> list[tuple[str, FieldInfo, M]]:
    """The key fields marked `kind` (Shown, or Editable), in declaration order, with their field info."""
    return [
        (name, field, mark)
        for name, field in KeyRecord.model_fields.items()
        for mark in field.metadata
        if isinstance(mark, kind)
    ]


class KeyFile(BaseModel):
    version: int = 1
    keys: list[KeyRecord] = []


def check_weight(weight: object) -> None:
    """For a weight given to `create` or `update`: None (the default), or from MIN_WEIGHT to MAX_WEIGHT."""
    if weight is None:
        return
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not MIN_WEIGHT <= weight <= MAX_WEIGHT:
        raise refusal("weight", weight)


def refusal(field: str, given: object) -> KeyFieldError:
    """The one sentence that refuses `given` for `field`, saying what the field takes."""
    accepts = next((mark.accepts for name, _, mark in marked(Editable) if name == field), "")
    if not accepts:
        names = ", ".join(name for name, _, _ in marked(Editable))
        return KeyFieldError(field, f"`{field}` is not a field of a key; the fields are {names}.")
    try:
        shown = json.dumps(given)
    except (TypeError, ValueError):
        shown = repr(given)
    return KeyFieldError(field, f"`{field}` does not take {shown}: it takes {accepts}.")


def check_name_free(keys: list[KeyRecord], record: KeyRecord) -> None:
    """Names are unique, so that a name says which key (the CLI and the API take either)."""
    taken = next((key for key in keys if key.name == record.name and key.id != record.id), None)
    if taken is not None:
        raise KeyFieldError("name", f"a key named {record.name} exists already ({taken.id}): choose another name.")


def check_not_expired(record: KeyRecord) -> None:
    """A key given an expiry in the past would be refused from its first request: say so now."""
    if record.expired(time.time()):
        raise KeyFieldError(
            "expires_at", f"`expires_at` is {time_text.shown(record.expires_at)}, in the past: give a later time."
        )


def check_models(models: object, known: Collection[str]) -> None:
    """A key's model list may name only the config's models and aliases (`known`): a typo would give
    a key that can use nothing, silently."""
    if not isinstance(models, list):
        return
    unknown = [name for name in models if name not in known]
    if unknown:
        raise KeyFieldError(
            "models",
            f"`models` names {', '.join(unknown)}, neither a model nor an alias of the model config; "
            f"it has {', '.join(sorted(known)) or 'none'}.",
        )


def field_error(error: ValidationError) -> KeyFieldError:
    """A key field's refusal (refusal) from pydantic's error, whose own text names its internals."""
    first = error.errors()[0]
    location = [part for part in first["loc"] if part != "body"]
    return refusal(str(location[0]) if location else "body", first.get("input"))


def write_private(path: Path, raw: bytes) -> None:
    """Write `raw` to `path` whole (a temporary file renamed over it), readable by its owner only."""
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(raw)
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise


def hash_key(secret: str) -> str:
    return "sha256:" + hashlib.sha256(secret.encode()).hexdigest()


def new_secret() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def new_record(name: str, **fields: Any) -> tuple[KeyRecord, str]:
    """A fresh key and its record, with `fields` (editable ones: admin, models, ...); the record holds
    only the key's hash and first characters."""
    secret = new_secret()
    record = KeyRecord.model_validate(
        {
            **fields,
            "id": "key_" + secrets.token_hex(6),
            "name": name,
            "prefix": secret[:SHOWN_PREFIX_LENGTH],
            "hash": hash_key(secret),
            "created_at": time.time(),
        }
    )
    return record, secret


class KeyStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock_path = path.with_name(path.name + ".lock")
        self._records: dict[str, KeyRecord] = {}
        self._by_hash: dict[str, KeyRecord] = {}
        self._stamp: tuple[int, int, int] | None = None
        self._used: dict[str, float] = {}
        self._had_file = False  # once a file was read or written here, its absence is an error
        # The last file that read well, kept beside it for `keys restore` (owner only, as the file).
        self.last_good_path = path.with_name(path.name + LAST_GOOD_SUFFIX)
        self._last_good: bytes | None = None  # what last_good_path holds, as this process wrote or read it
        self.problem: str | None = None  # why the file on disk is not in force (/health, the metrics)

    # -- reading --

    def load(self) -> None:
        """Read the file now; raises KeyFileError if it is unreadable or invalid."""
        stamp = self._current_stamp()
        self._install(self._read() if stamp is not None else KeyFile())
        self._stamp = stamp

    def refresh_if_changed(self) -> bool:
        """Reload when another process changed the file; raises KeyFileError on a bad file.

        A key file that vanishes revokes every key, as a restart would: what is not in the file does
        not authenticate. It is never written back from memory; `keys init` or a backup restores it."""
        stamp = self._current_stamp()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        if stamp is None:
            self._install(KeyFile())
            self.problem = (
                f"key file {self.path} is missing: every key is refused until `python3 vllm_api_server.py "
                "keys restore` puts its last good copy back or `keys init` creates a new admin key"
            )
            raise KeyFileError(self.problem)
        try:
            self._install(self._read())
        except KeyFileError as error:
            self.problem = f"{error}; still using the last good copy"
            raise KeyFileError(self.problem) from None
        self.problem = None
        return True

    def authenticate(self, secret: str) -> KeyRecord | None:
        digest = hash_key(secret)
        record = self._by_hash.get(digest)
        if record is None and self._reload_if_newer():
            record = self._by_hash.get(digest)
        if record is not None and record.hash != digest and (record.previous_until or 0) <= time.time():
            return None  # a rotated key's old secret, after its grace
        if record is not None:
            self._used[record.id] = time.time()
        return record

    def _reload_if_newer(self) -> bool:
        """An unknown key may be one made a moment ago (by the CLI, another worker), before the
        watcher's next look (app.watch_key_file): read the file now if it changed since it was read.
        A stat per refused request; a file that cannot be read is left to the watcher, which reports it."""
        stamp = self._current_stamp()
        if stamp is None or stamp == self._stamp:
            return False
        try:
            content = self._read()
        except KeyFileError:
            return False
        self._install(content)
        self._stamp = stamp
        self.problem = None
        return True

    def restore(self) -> int:
        """Put the last good copy back in place of a missing or broken key file; how many keys it has.
        Raises KeyFileError when there is no good copy, or the file in place reads well."""
        try:
            raw = self.last_good_path.read_bytes()
            content = KeyFile.model_validate_json(raw)
        except (OSError, ValidationError):
            raise KeyFileError(f"no good copy to restore at {self.last_good_path}") from None
        with self._locked():
            if self.path.exists():
                try:
                    KeyFile.model_validate_json(self.path.read_bytes())
                except (OSError, ValidationError):
                    pass
                else:
                    raise KeyFileError(f"key file {self.path} reads well: nothing to restore")
            self._write(content)
        return len(content.keys)

    def by_id(self, key_id: str) -> KeyRecord | None:
        """The key of this id as the file has it now (a console session's, console/session.py)."""
        return self._records.get(key_id)

    def records(self) -> list[KeyRecord]:
        return [
            record.model_copy(update={"last_used_at": max(record.last_used_at or 0, self._used[record.id])})
            if record.id in self._used
            else record
            for record in self._records.values()
        ]

    @property
    def exists(self) -> bool:
        return self.path.exists()

    # -- changing --

    def create(self, name: str, **fields: Any) -> tuple[KeyRecord, str]:
        """Add a key with the editable `fields` given (the others take their defaults); returns its record
        and the key itself, which is never stored or shown again."""
        check_weight(fields.get("weight"))
        try:
            record, secret = new_record(name, **fields)
        except ValidationError as error:
            raise field_error(error) from None

        check_not_expired(record)

        def add(keys: list[KeyRecord]) -> None:
            check_name_free(keys, record)
            keys.append(record)

        self._change(add)
        return record, secret

    def rotate(self, key_id: str, grace: float = 0.0) -> tuple[KeyRecord, str] | None:
        """A new secret for the key (same id, limits and usage); the old one works `grace` seconds
        more (0: not at all). Returns the record and the new secret, None for no such key."""
        if grace < 0:
            raise KeyFieldError("grace", f"a grace period of {grace:g} s is negative")
        secret = new_secret()
        rotated: list[KeyRecord] = []

        def apply(keys: list[KeyRecord]) -> None:
            for index, record in enumerate(keys):
                if record.id == key_id:
                    keys[index] = record.model_copy(
                        update={
                            "hash": hash_key(secret),
                            "prefix": secret[:SHOWN_PREFIX_LENGTH],
                            "previous_hash": record.hash if grace > 0 else None,
                            "previous_until": time.time() + grace if grace > 0 else None,
                        }
                    )
                    rotated.append(keys[index])

        self._change(apply)
        return (rotated[0], secret) if rotated else None

    def key_id_of(self, reference: str) -> str:
        """The id of the key `reference` names: its id, or its name (names are unique; a key file
        written before they were may hold two, and then the id must say which)."""
        records = self.records()
        if not any(reference in (record.id, record.name) for record in records) and self._reload_if_newer():
            records = self.records()  # a key made a moment ago, elsewhere
        if any(record.id == reference for record in records):
            return reference
        named = [record.id for record in records if record.name == reference]
        if len(named) > 1:
            raise AmbiguousKeyName(f"{len(named)} keys are named {reference}: name one by its id ({', '.join(named)})")
        if not named:
            raise LookupError(f"no key with the id or name {reference}")
        return named[0]

    def duplicate_names(self) -> list[str]:
        """Names more than one key has (key files written before names were unique)."""
        names = [record.name for record in self._records.values()]
        return sorted({name for name in names if names.count(name) > 1})

    def create_first_admin_key(self) -> str | None:
        """On first start (no file yet), create an admin key and return it; otherwise None."""
        with self._locked():
            if self.path.exists():
                return None
            record, secret = new_record("admin", admin=True)
            self._save(KeyFile(keys=[record]))
            return secret

    def revoke(self, key_id: str) -> bool:
        found: list[KeyRecord] = []

        def remove(keys: list[KeyRecord]) -> None:
            found.extend(k for k in keys if k.id == key_id)
            keys[:] = [k for k in keys if k.id != key_id]

        self._change(remove)
        return bool(found)

    def update(self, key_id: str, changes: dict[str, object]) -> KeyRecord | None:
        """Change some of the key's editable fields; returns the new record or None."""
        check_weight(changes.get("weight"))
        updated: list[KeyRecord] = []

        def apply(keys: list[KeyRecord]) -> None:
            for index, record in enumerate(keys):
                if record.id == key_id:
                    try:
                        keys[index] = KeyRecord.model_validate({**record.model_dump(), **changes})
                    except ValidationError as error:
                        raise field_error(error) from None
                    if "name" in changes:
                        check_name_free(keys, keys[index])
                    if "expires_at" in changes:
                        check_not_expired(keys[index])
                    updated.append(keys[index])

        self._change(apply)
        return updated[0] if updated else None

    def usage_due(self) -> bool:
        """Whether a key's use is worth writing down: a first use, or one a minute newer than the
        file says. Cheap, in memory: the gateway asks every few seconds, and a rewrite of the key
        file each time cost the relay about 5% of its CPU under load (measured with py-spy)."""
        for key_id, used_at in self._used.items():
            record = self._records.get(key_id)
            if record is not None and (
                record.last_used_at is None or used_at - record.last_used_at >= LAST_USED_RESOLUTION_SECONDS
            ):
                return True
        return False

    def flush_usage(self) -> None:
        """Write last-used times gathered in memory to the file (merged with other workers')."""
        if not self._used or not self.path.exists():
            return  # a vanished file is not recreated just to record when keys were used
        used, self._used = self._used, {}

        def merge(keys: list[KeyRecord]) -> None:
            for index, record in enumerate(keys):
                if record.id in used and used[record.id] > (record.last_used_at or 0):
                    keys[index] = record.model_copy(update={"last_used_at": used[record.id]})

        try:
            self._change(merge)
        except KeyFileError:
            self._used = {**used, **self._used}
            raise

    # -- internals --

    def _change(self, mutate: Callable[[list[KeyRecord]], None]) -> None:
        with self._locked():
            if not self.path.exists() and self._had_file:
                raise KeyFileError(f"key file {self.path} is missing; restore it or run `keys init` first")
            current = self._read() if self.path.exists() else KeyFile()
            keys = list(current.keys)
            had_admin = any(k.admin and not k.disabled for k in keys)
            mutate(keys)
            if had_admin and not any(k.admin and not k.disabled for k in keys):
                raise LastAdminKeyError("this would leave no enabled admin key; create another admin key first")
            self._save(KeyFile(version=current.version, keys=keys))

    def _save(self, content: KeyFile) -> None:
        """Write `content` to disk and make it the keys in force; the caller holds the lock."""
        self._write(content)
        self._had_file = True
        self._install(content)
        self._stamp = self._current_stamp()
        self.problem = None
        self._keep_last_good(content.model_dump_json(indent=2).encode() + b"\n")

    def _read(self) -> KeyFile:
        try:
            raw = self.path.read_bytes()
        except OSError as error:
            raise KeyFileError(f"cannot read key file {self.path}: {error.strerror}") from error
        self._had_file = True
        try:
            content = KeyFile.model_validate_json(raw)
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "top level"
            raise KeyFileError(
                f"key file {self.path} is not valid ({where}: {first['msg']}); fix it by hand, or put its "
                "last good copy back with `python3 vllm_api_server.py keys restore`: the gateway will not "
                "overwrite it"
            ) from None
        self._keep_last_good(raw)
        return content

    def _keep_last_good(self, raw: bytes) -> None:
        """Copy a file that read (or was written) well beside it, for `keys restore`. Best effort: a
        copy that cannot be written leaves the keys in force as they are."""
        if raw == self._last_good:
            return
        try:
            if self.last_good_path.read_bytes() == raw:
                self._last_good = raw
                return
        except OSError:
            pass
        try:
            write_private(self.last_good_path, raw)
        except OSError:
            return
        self._last_good = raw

    def _write(self, content: KeyFile) -> None:
        directory = self.path.parent
        directory.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=directory, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(content.model_dump_json(indent=2).encode() + b"\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, self.path)
        except BaseException:
            if os.path.exists(temp):
                os.unlink(temp)
            raise
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _install(self, content: KeyFile) -> None:
        self._records = {record.id: record for record in content.keys}
        # A rotated key's old secret too, while its grace lasts (authenticate checks the time again).
        self._by_hash = {
            record.previous_hash: record
            for record in content.keys
            if record.previous_hash and record.previous_until and record.previous_until > time.time()
        }
        self._by_hash.update({record.hash: record for record in content.keys})

    def _current_stamp(self) -> tuple[int, int, int] | None:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return None
        return stat.st_ino, stat.st_mtime_ns, stat.st_size

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)
