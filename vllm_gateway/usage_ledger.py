"""The usage ledger: requests, tokens and errors per key, model and hour, kept in a store that outlives
the process (SQLite by default).

A request adds to a dictionary in this process (a few hundred nanoseconds); once a second the
figures gathered since go to the store in one transaction, from a thread, so the request path never
waits for a disk. Several workers write to one SQLite file at once: each batch is one transaction
of additions (`INSERT ... ON CONFLICT DO UPDATE SET n = n + excluded.n`), so none overwrites another.
A crash (kill -9) loses the batch not yet written, at most a second of requests; a batch is written
whole or not at all.

`UsageStore` is what a store must do; `SQLiteUsageStore` is the one there is. A store shared by
gateways on several hosts (PostgreSQL, with the same additive upsert) would implement the same two
methods.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

log = logging.getLogger("vllm_gateway")

HOUR: Final = 3600

# (hour, key id, model) -> [requests, prompt tokens, completion tokens, errors, aborted, aborted tokens]
Counts = list[int]
Batch = dict[tuple[int, str, str], Counts]
# A bucket's sums: (bucket start, key id or None, model or None, requests, prompt tokens, completion tokens)
Sum = tuple[int, str | None, str | None, int, int, int]
FIELDS: Final = ("requests", "prompt_tokens", "completion_tokens", "errors", "aborted", "aborted_completion_tokens")


@dataclass(frozen=True)
class UsageRow:
    """One key's use of one model in one hour."""

    hour: int  # unix time of the hour's start (UTC)
    key_id: str
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    errors: int
    # Requests whose client left before the answer ended, and the completion tokens delivered to them
    # (counted from the stream's events, since vLLM's usage never came): included in the figures above.
    aborted: int
    aborted_completion_tokens: int


class UsageStore(Protocol):
    def add(self, batch: Batch) -> None:
        """Add the batch's counts to the stored ones, all of them or none."""

    def rows(self, start: int, end: int, key_ids: Sequence[str] = (), models: Sequence[str] = ()) -> list[UsageRow]:
        """Rows of the hours that start in [start, end), optionally of some keys and models only."""

    def sums(
        self,
        start: int,
        end: int,
        width: int,
        by: Sequence[str],
        key_ids: Sequence[str] = (),
        models: Sequence[str] = (),
    ) -> list[Sum]:
        """Requests, prompt and completion tokens of the hours in [start, end), added up per bucket of
        `width` seconds and per key and model where `by` names them ("api_key_id", "model")."""


SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS usage (
    hour INTEGER NOT NULL,
    key_id TEXT NOT NULL,
    model TEXT NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    errors INTEGER NOT NULL DEFAULT 0,
    aborted INTEGER NOT NULL DEFAULT 0,
    aborted_completion_tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (hour, key_id, model)
) WITHOUT ROWID
"""

UPSERT: Final = f"""
INSERT INTO usage (hour, key_id, model, {", ".join(FIELDS)}) VALUES (?, ?, ?, {", ".join("?" for _ in FIELDS)})
ON CONFLICT (hour, key_id, model) DO UPDATE SET {", ".join(f"{name} = {name} + excluded.{name}" for name in FIELDS)}
"""


class SQLiteUsageStore:
    """One SQLite file in WAL mode: readers never block the writers, and writers from several worker
    processes take turns (each waits up to BUSY_TIMEOUT_MS for the others' transactions)."""

    BUSY_TIMEOUT_MS = 10_000

    def __init__(self, path: Path) -> None:
        self.path = path
        self._create()

    def _create(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = self._connect()
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute(SCHEMA)
        finally:
            connection.close()

    def _recreated(self, error: sqlite3.OperationalError) -> bool:
        """Whether the error was the file (or its table) gone, deleted while the gateway ran, and the
        file is made again: SQLite answers an empty new file with `no such table`."""
        if "no such table" not in str(error) and self.path.exists():
            return False
        log.warning("the usage ledger %s was gone (deleted?): it is made again and counting goes on", self.path)
        self._create()
        return True

    def _connect(self) -> sqlite3.Connection:
        # A connection per call: each is used by whichever thread flushes or reads, and opening one
        # costs far less than the second between batches.
        connection = sqlite3.connect(self.path, timeout=self.BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        connection.execute(f"PRAGMA busy_timeout={self.BUSY_TIMEOUT_MS}")
        connection.execute("PRAGMA synchronous=NORMAL")  # WAL: a power cut may lose the last batch, never corrupt
        return connection

    def add(self, batch: Batch) -> None:
        try:
            self._add(batch)
        except sqlite3.OperationalError as error:
            if not self._recreated(error):
                raise
            self._add(batch)  # the batch failed whole, so it goes whole into the new file

    def _add(self, batch: Batch) -> None:
        connection = self._connect()
        try:
            connection.execute("BEGIN IMMEDIATE")
            connection.executemany(UPSERT, [(*where, *counts) for where, counts in batch.items()])
            connection.execute("COMMIT")
        except BaseException:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise
        finally:
            connection.close()

    def rows(self, start: int, end: int, key_ids: Sequence[str] = (), models: Sequence[str] = ()) -> list[UsageRow]:
        where, parameters = self._where(start, end, key_ids, models)
        query = f"SELECT hour, key_id, model, {', '.join(FIELDS)} FROM usage {where} ORDER BY hour, key_id, model"
        return [UsageRow(*row) for row in self._query(query, parameters)]

    def sums(
        self,
        start: int,
        end: int,
        width: int,
        by: Sequence[str],
        key_ids: Sequence[str] = (),
        models: Sequence[str] = (),
    ) -> list[Sum]:
        # Summed by SQLite: a year of 100 keys' hours is some 200,000 rows, which Python would fetch
        # and add up in over a second; SQLite does it in a fraction of that.
        key = "key_id" if "api_key_id" in by else "NULL"
        model = "model" if "model" in by else "NULL"
        where, parameters = self._where(start, end, key_ids, models)
        query = (
            f"SELECT hour / {int(width)} * {int(width)} AS bucket, {key}, {model}, SUM(requests), SUM(prompt_tokens), "
            f"SUM(completion_tokens) FROM usage {where} GROUP BY bucket, {key}, {model}"
        )
        return self._query(query, parameters)

    @staticmethod
    def _where(start: int, end: int, key_ids: Sequence[str], models: Sequence[str]) -> tuple[str, list[object]]:
        where = "WHERE hour >= ? AND hour < ?"
        parameters: list[object] = [start, end]
        for column, values in (("key_id", key_ids), ("model", models)):
            if values:
                where += f" AND {column} IN ({', '.join('?' for _ in values)})"
                parameters += values
        return where, parameters

    def _query(self, query: str, parameters: list[object]) -> list[Any]:
        """The query's rows; once more from a new file when the ledger was deleted (_recreated)."""
        try:
            return self._fetch(query, parameters)
        except sqlite3.OperationalError as error:
            if not self._recreated(error):
                raise
            return self._fetch(query, parameters)

    def _fetch(self, query: str, parameters: list[object]) -> list[Any]:
        connection = self._connect()
        try:
            return connection.execute(query, parameters).fetchall()
        finally:
            connection.close()


@dataclass
class HourCounts:
    """What one key did with one model in one hour, since the last batch: counted with every request.

    A class of int attributes rather than a list: compiled (scripts/compile_gateway.py), each is a C
    integer, added to without making and freeing an int object as a list's items are."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    errors: int = 0
    aborted: int = 0
    aborted_completion_tokens: int = 0

    def as_counts(self) -> Counts:
        """In the order of FIELDS, as the store takes them."""
        return [
            self.requests,
            self.prompt_tokens,
            self.completion_tokens,
            self.errors,
            self.aborted,
            self.aborted_completion_tokens,
        ]

    def add(self, other: HourCounts) -> None:
        """Counts of a batch the store could not take, kept for the next."""
        self.requests += other.requests
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.errors += other.errors
        self.aborted += other.aborted
        self.aborted_completion_tokens += other.aborted_completion_tokens


class UsageLedger:
    """What this process counted since its last batch, and the task that writes the batches."""

    def __init__(self, store: UsageStore, flush_seconds: float) -> None:
        self.store = store
        self.flush_seconds = flush_seconds
        self.pending: dict[tuple[int, str, str], HourCounts] = {}
        self._task: asyncio.Task[None] | None = None

    def record(
        self,
        key_id: str,
        model: str,
        prompt_tokens: int,
        completion_tokens: int,
        error: bool,
        aborted: bool,
    ) -> None:
        where = (int(time.time()) // HOUR * HOUR, key_id, model)
        counts = self.pending.get(where)
        if counts is None:
            counts = self.pending[where] = HourCounts()
        counts.requests += 1
        counts.prompt_tokens += prompt_tokens
        counts.completion_tokens += completion_tokens
        if error:
            counts.errors += 1
        if aborted:
            counts.aborted += 1
            counts.aborted_completion_tokens += completion_tokens

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.flush_seconds)
            await self.flush()

    async def flush(self) -> None:
        if not self.pending:
            return
        pending, self.pending = self.pending, {}
        batch = {where: counts.as_counts() for where, counts in pending.items()}
        try:
            await asyncio.to_thread(self.store.add, batch)
        except (sqlite3.Error, OSError) as error:
            # Kept for the next batch rather than lost: the store may be busy or its disk full.
            log.error("could not write the usage ledger (%s); the counts wait for the next batch", error)
            for where, counts in pending.items():
                mine = self.pending.get(where)
                if mine is None:
                    self.pending[where] = counts  # nothing counted there meanwhile: the batch's own
                else:
                    mine.add(counts)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        await self.flush()
