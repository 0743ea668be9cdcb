"""The end of a log file, read backwards in blocks: the newest lines first, and never more than a
bound of bytes, however large the file (the gateway's log grows to 50 MB before it rotates).

For the console's endpoints (console_api.py), which run in a thread: plain blocking reads.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

BLOCK = 64 * 1024  # a few hundred log lines a read: large reads, and little read past what is asked


class BackwardLines:
    """The lines of `paths` (the newest file first: a log, then its rotated copy), newest first, as
    text, within `max_bytes` of reading in all. `complete` says, once the lines are used up, whether
    they were every line of the files (False: the bound cut them)."""

    def __init__(self, paths: Sequence[Path], max_bytes: int) -> None:
        self.paths = paths
        self.budget = max_bytes
        self.complete = False

    def __iter__(self) -> Iterator[str]:
        for path in self.paths:
            try:
                file = path.open("rb")
            except OSError:
                continue  # no log yet, or no rotated copy
            with file:
                yield from self._lines_of(file)
            if self.budget <= 0:
                return
        self.complete = True

    def _lines_of(self, file: BinaryIO) -> Iterator[str]:
        position = file.seek(0, 2)
        rest = b""  # the start of a line whose beginning is in the block before
        while position > 0:
            if self.budget <= 0:
                return  # `rest` was cut by the bound: it is no whole line
            size = min(BLOCK, position, self.budget)
            position -= size
            self.budget -= size
            file.seek(position)
            data = file.read(size) + rest
            cut = data.find(b"\n")
            if cut < 0:
                rest = data
                continue
            # One decode per block, cut at a line's end (a character is never split there).
            rest, whole = data[:cut], data[cut + 1 :]
            for line in reversed(whole.decode("utf-8", "replace").split("\n")):
                if line:
                    yield line
        if rest:
            yield rest.decode("utf-8", "replace")


def last_lines(path: Path, count: int, max_bytes: int) -> list[str]:
    """The file's last `count` lines, oldest first, read from its last `max_bytes` at most."""
    lines: list[str] = []
    for line in BackwardLines([path], max_bytes):
        lines.append(line)
        if len(lines) == count:
            break
    lines.reverse()
    return lines
