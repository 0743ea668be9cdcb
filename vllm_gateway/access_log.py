"""The gateway's log: one line per request plus gateway events, in a rotating file.

Lines are handed to a background thread through a queue, so the event loop never waits on the disk.
Several workers may append to the same file: rotation happens under a lock, and a worker whose file
was rotated by another reopens it.
"""

from __future__ import annotations

import fcntl
import logging
import logging.handlers
import os
import queue
import sys
from pathlib import Path

from .settings import Settings

ACCESS = logging.getLogger("vllm_gateway.access")
FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


class SharedRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A RotatingFileHandler that more than one process can share."""

    def shouldRollover(self, record: logging.LogRecord) -> bool:  # noqa: N802 (logging's name)
        if self.stream is not None and self._rotated_elsewhere():
            self.stream.close()
            self.stream = self._open()
        return super().shouldRollover(record)

    def doRollover(self) -> None:  # noqa: N802
        lock_fd = os.open(f"{self.baseFilename}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            try:
                already_rotated = os.stat(self.baseFilename).st_size < self.maxBytes
            except FileNotFoundError:
                already_rotated = True
            if already_rotated:
                if self.stream:
                    self.stream.close()
                self.stream = self._open()
            else:
                super().doRollover()
        finally:
            os.close(lock_fd)

    def _rotated_elsewhere(self) -> bool:
        try:
            on_disk = os.stat(self.baseFilename)
        except FileNotFoundError:
            return True
        mine = os.fstat(self.stream.fileno())
        return (on_disk.st_ino, on_disk.st_dev) != (mine.st_ino, mine.st_dev)


def setup_logging(settings: Settings) -> logging.handlers.QueueListener:
    """Route the gateway's loggers through a queue to the log file (and events to stderr)."""
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    file_handler = SharedRotatingFileHandler(
        settings.log_path, maxBytes=settings.log_max_bytes, backupCount=settings.log_backups, encoding="utf-8"
    )
    file_handler.setFormatter(logging.Formatter(FORMAT))
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter(FORMAT))
    console.addFilter(lambda record: record.name != ACCESS.name)

    log_queue: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    listener = logging.handlers.QueueListener(log_queue, file_handler, console, respect_handler_level=True)
    root = logging.getLogger("vllm_gateway")
    root.handlers[:] = [logging.handlers.QueueHandler(log_queue)]
    root.setLevel(logging.INFO)
    root.propagate = False
    listener.start()
    return listener


def clean(value: object, limit: int = 200) -> str:
    """A log-safe value: no spaces, quotes or control characters an attacker could use to forge lines."""
    text = str(value)[:limit]
    if text and all(33 <= ord(ch) < 127 and ch not in '"\\=' for ch in text):
        return text
    return '"' + text.encode("unicode_escape").decode("ascii").replace('"', '\\"') + '"'


def log_request(
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
) -> None:
    """One access line. `path` must not carry the query string: it may hold an api_key."""
    line = (
        f"rid={clean(request_id)} {method} {clean(path)} status={status} "
        f"duration_ms={duration * 1000:.1f} key={key} model={clean(model)} backend={clean(backend)}"
    )
    if prompt_tokens is not None or completion_tokens is not None:
        line += f" prompt_tokens={prompt_tokens} completion_tokens={completion_tokens}"
    ACCESS.info(line)
