"""The gateway's log file: one line per request plus gateway events, rotated by size.

Request lines are formatted cheaply on the event loop, gathered for 50 ms and handed to a writer
thread in one piece, so no request waits on the disk, the logging module's per-record cost stays off
the hot path, and the writer thread wakes (and takes the GIL) a few times a second, not per request.
Several workers may share the file: rotation happens under a lock, and a worker whose file was
rotated by another reopens it.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import logging
import os
import queue
import re
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, Final
from urllib.parse import unquote

from mypy_extensions import mypyc_attr

from .settings import Settings

EVENT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s %(message)s"
FLUSH_SECONDS: Final = 0.05
SAFE_VALUE: Final = re.compile(r"[!#-<>-\[\]-~]{1,200}")  # printable ASCII but space, quote, = and backslash
KEY_SHAPED: Final = re.compile(r"sk-[A-Za-z0-9_\-]{6,}", re.I)
PERCENT_DECODE_ROUNDS: Final = 3  # a key encoded twice over is still found; more rounds decode nothing new


class LogWriter:
    """Owns the log file: appends queued lines, rotates at max_bytes keeping `backups` old files.

    It runs a thread rather than being one: the compiled build (scripts/compile_gateway.py) makes a
    subclass of a Python class such as threading.Thread without clearing the weak references to it when
    it is freed, and threading keeps one to every thread."""

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        self.thread = threading.Thread(target=self.write_until_stopped, name="log-writer", daemon=True)
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self.lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self.file = self._open()
        self._stamp_second = -1
        self._stamp_text = ""
        self._pending: list[str] = []

    def write(self, line: str) -> None:
        self.lines.put(line)

    def request(
        self,
        request_id: str,
        method: str,
        path: str,
        status: int,
        duration: float,
        key: str = "-",
        model: str = "-",
        backend: str = "-",
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        queued: float | None = None,
        prompt_from: str | None = None,
    ) -> None:
        """One request line. `path` must not carry the query string: it may hold an api_key. A
        request that waited for a free backend (admission/local.py) says how long, as queue_ms; one whose
        usage never came, how its prompt was counted (prompt_count.py), as prompt_from."""
        line = self._line(escape, request_id, method, path, status, duration, key, model, backend)
        if may_hide_key(line):
            # Rarely: something in it may spell a key. Build it again, each value searched and masked.
            line = self._line(clean, request_id, method, path, status, duration, key, model, backend)
        self._add(line, prompt_tokens, completion_tokens, queued, prompt_from)

    def relayed(
        self,
        request_id: str,
        path: str,
        status: int,
        duration: float,
        key: str,
        model: str,
        backend: str,
        prompt_tokens: int | None,
        completion_tokens: int | None,
        queued: float | None,
        prompt_from: str | None,
        wake: float | None = None,
    ) -> None:
        """request() for a relayed POST, the line of nearly every request, at about half the cost: its
        id is one the relay checked (proxy.REQUEST_ID, no key's shape) and its path one of the relayed
        ones, both log-safe as they are, and `key` is a key_label; only the model and backend names are
        made safe, each name once (safe_name's cache)."""
        line = (
            f"{self._timestamp()} INFO access rid={request_id} POST {path} status={status} "
            f"duration_ms={duration * 1000:.1f} key={key} model={safe_name(clean, model)} "
            f"backend={safe_name(clean, backend)}"
        )
        self._add(line, prompt_tokens, completion_tokens, queued, prompt_from, wake)

    def _add(
        self,
        line: str,
        prompt_tokens: int | None,
        completion_tokens: int | None,
        queued: float | None,
        prompt_from: str | None,
        wake: float | None = None,
    ) -> None:
        if prompt_tokens is not None or completion_tokens is not None:
            line += f" prompt_tokens={prompt_tokens} completion_tokens={completion_tokens}"
        if prompt_from is not None:
            line += f" prompt_from={prompt_from}"
        if queued is not None:
            line += f" queue_ms={queued * 1000:.1f}"
        if wake is not None:
            line += f" wake_ms={wake * 1000:.1f}"  # of its queue_ms, the wait for its server to wake
        self._pending.append(line)
        if len(self._pending) == 1:
            asyncio.get_running_loop().call_later(FLUSH_SECONDS, self.flush)

    def _line(
        self,
        safe: Callable[[object], str],
        request_id: str,
        method: str,
        path: str,
        status: int,
        duration: float,
        key: str,
        model: str,
        backend: str,
    ) -> str:
        return (
            f"{self._timestamp()} INFO access rid={safe(request_id)} {method} {safe(path)} status={status} "
            f"duration_ms={duration * 1000:.1f} key={key} model={safe_name(safe, model)} "
            f"backend={safe_name(safe, backend)}"
        )

    def _timestamp(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._stamp_second:
            self._stamp_second = second
            self._stamp_text = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        return f"{self._stamp_text},{int((now - second) * 1000):03d}"

    def flush(self) -> None:
        if self._pending:
            lines, self._pending = self._pending, []
            self.lines.put("\n".join(lines))

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.flush()
        self.lines.put(None)
        self.thread.join(timeout=5)

    def write_until_stopped(self) -> None:
        """The writer thread: the queued lines to the file, in batches, until stop()."""
        while True:
            batch = [self.lines.get()]
            while len(batch) < 1000:
                try:
                    batch.append(self.lines.get_nowait())
                except queue.Empty:
                    break
            stopping = None in batch
            text = "".join(line + "\n" for line in batch if line is not None)
            try:
                self._append(text.encode("utf-8", "replace"))
            except OSError as error:  # a full disk must not take the gateway down
                print(f"vllm_api_server: cannot write the log {self.path}: {error}", file=sys.stderr)
            if stopping:
                self.file.close()
                return

    def _append(self, data: bytes) -> None:
        if self._rotated_elsewhere():
            self.file.close()
            self.file = self._open()
        if self.file.tell() + len(data) > self.max_bytes and self.file.tell() > 0:
            self._rotate()
        self.file.write(data)
        self.file.flush()

    def _open(self) -> BinaryIO:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return open(self.path, "ab")

    def _rotated_elsewhere(self) -> bool:
        try:
            on_disk = os.stat(self.path)
        except FileNotFoundError:
            return True
        mine = os.fstat(self.file.fileno())
        return (on_disk.st_ino, on_disk.st_dev) != (mine.st_ino, mine.st_dev)

    def _rotate(self) -> None:
        lock = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            # Another worker may have rotated while this one waited for the lock.
            if not self._rotated_elsewhere() and os.stat(self.path).st_size > 0:
                for index in range(self.backups - 1, 0, -1):
                    older = Path(f"{self.path}.{index}")
                    if older.exists():
                        os.replace(older, f"{self.path}.{index + 1}")
                os.replace(self.path, f"{self.path}.1")
        finally:
            os.close(lock)
        self.file.close()
        self.file = self._open()


# Not a native class of the compiled build: logging keeps a weak reference to every handler, which a
# compiled subclass of logging.Handler would leave dangling once freed (see LogWriter). Events are few.
@mypyc_attr(native_class=False)
class EventHandler(logging.Handler):
    """Sends the gateway's event log records through the same writer as the request lines."""

    def __init__(self, writer: LogWriter) -> None:
        super().__init__()
        self.writer = writer
        self.setFormatter(logging.Formatter(EVENT_FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.writer.write(self.format(record))
        except Exception:
            self.handleError(record)


def setup_logging(settings: Settings) -> LogWriter:
    """Start the writer; gateway events go to the log file and to stderr."""
    writer = LogWriter(settings.log_path, settings.log_max_bytes, settings.log_backups)
    writer.start()
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter(EVENT_FORMAT))
    root = logging.getLogger("vllm_gateway")
    root.handlers[:] = [EventHandler(writer), console]
    root.setLevel(logging.INFO)
    root.propagate = False
    return writer


# A gateway has few keys, models and backends, and each request's line names one of each: their
# labels are worked out once (a bounded cache: model names are the client's to choose).
@functools.lru_cache(maxsize=1024)
def safe_name(safe: Callable[[object], str], name: str) -> str:
    return safe(name)


@functools.lru_cache(maxsize=1024)
def key_label(key_id: str, name: str) -> str:
    """How the log names a key: its id and name, never the key."""
    return f"{key_id}({clean(name)})"


def may_hide_key(text: str) -> bool:
    """Whether `text` may hide a key: one of the key's shape (`sk-` in any case), or percent-encoding
    that could spell one. Three substring searches in C: a case-insensitive regex walked every position
    of a request's log line, about 4 us, the largest single cost of the line."""
    return "%" in text or "k-" in text or "K-" in text


def without_keys(text: str) -> str:
    """`text`, percent-decoded, with anything of a key's shape masked: a client may put its key in a
    path, a model name or a request id, and no key may reach a log line in any encoding."""
    if not may_hide_key(text):
        return text
    for _ in range(PERCENT_DECODE_ROUNDS):
        decoded = unquote(text)
        if decoded == text:
            break
        text = decoded
    return KEY_SHAPED.sub("sk-***", text)


def clean(value: object) -> str:
    """A log-safe value: no key, and no spaces, quotes or control characters an attacker could use to
    forge lines."""
    return escape(without_keys(str(value)))


def escape(value: object) -> str:
    """`value` with no spaces, quotes or control characters (quoted and escaped when it has any)."""
    text = str(value)
    if SAFE_VALUE.fullmatch(text):
        return text
    return '"' + text[:200].encode("unicode_escape").decode("ascii").replace('"', '\\"') + '"'
