"""A one-worker gateway's rate and token windows (ratelimit.LocalWindows), kept across restarts in a
small JSON file: without it a restart would start every window over, a `2000000/day` budget too.

Redis keeps its own counts, so the file serves only the gateway that counts in its memory. The
windows are written whole (a temporary file renamed over the old one) once a second when they
changed, and once more at shutdown: a crash (kill -9) forgets at most the last second's requests and
tokens. The ledger could not stand in: it sums per hour, and a window opens at its first request.

Windows that ended are left out; the file holds a few numbers per key and window, no secret.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from pathlib import Path

from .keystore import write_private
from .ratelimit import LocalWindows, WindowId

log = logging.getLogger("vllm_gateway")

VERSION = 1


class WindowFile:
    def __init__(self, path: Path, windows: LocalWindows) -> None:
        self.path = path
        self.windows = windows
        self.saved_changes = windows.changes

    def load(self) -> int:
        """Put the file's open windows back; returns how many. A missing file is a first start; one
        that does not read is logged and replaced at the next write (the counts start over)."""
        try:
            data = json.loads(self.path.read_bytes())
            entries = data["windows"] if data.get("version") == VERSION else []
            now = time.time()
            restored: dict[WindowId, list[float]] = {}
            for namespace, key_id, amount, expiry, end, count in entries:
                window_id = (str(namespace), str(key_id), int(amount), int(expiry))
                end, count = float(end), int(count)
                # A window ends within its length from now; one that does not came from a wrong clock.
                if math.isfinite(end) and now < end <= now + window_id[3] and count >= 0:
                    restored[window_id] = [end, count]
        except FileNotFoundError:
            return 0
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as error:
            log.error("rate-limit windows in %s not read (%s): the counts start over", self.path, error)
            return 0
        self.windows.windows.update(restored)
        self.saved_changes = self.windows.changes
        return len(restored)

    async def save(self) -> None:
        """Write the open windows, if they changed since the last write, from a thread; a write that
        fails is logged, and tried again at the next."""
        changes = self.windows.changes
        if changes == self.saved_changes:
            return
        entries = self._open_windows()  # on the loop: the requests change the dictionary there
        try:
            await asyncio.to_thread(self._write, entries)
        except OSError as error:
            log.warning("rate-limit windows not written to %s: %s", self.path, error)
            return
        self.saved_changes = changes

    def _open_windows(self) -> list[list[object]]:
        now = time.time()
        windows = list(self.windows.windows.items())
        return [[*window_id, end, int(count)] for window_id, (end, count) in windows if end > now]

    def _write(self, entries: list[list[object]]) -> None:
        raw = json.dumps({"version": VERSION, "saved_at": time.time(), "windows": entries}, separators=(",", ":"))
        write_private(self.path, raw.encode())

    async def keep(self, interval: float) -> None:
        """Write the windows every `interval` seconds when they changed."""
        while True:
            await asyncio.sleep(interval)
            await self.save()
