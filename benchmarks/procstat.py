"""CPU time and resident memory of a process tree, and per-core busy time, read from /proc."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")
PROC = Path("/proc")


def _stat_fields(pid: int) -> list[str]:
    text = (PROC / str(pid) / "stat").read_text()
    # The command name may hold spaces and parentheses; the fields after the last ")" are fixed.
    return text[text.rindex(")") + 2 :].split()


def tree(root: int) -> list[int]:
    """root and all its descendants alive right now."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int(_stat_fields(int(entry.name))[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def cpu_split(root: int) -> tuple[float, float]:
    """utime and stime of the tree (all threads), in seconds: the process's own work, and the kernel's
    on its behalf (its system calls, the network stack's share)."""
    user = system = 0
    for pid in tree(root):
        try:
            fields = _stat_fields(pid)
        except OSError:
            continue
        user += int(fields[11])
        system += int(fields[12])
    return user / TICKS, system / TICKS


def cpu_seconds(root: int) -> float:
    """utime + stime of the tree (all threads), in seconds."""
    return sum(cpu_split(root))


def rss_kb(root: int) -> int:
    """VmRSS summed over the tree, in KiB."""
    total = 0
    for pid in tree(root):
        try:
            for line in (PROC / str(pid) / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
        except OSError:
            continue
    return total


@dataclass(frozen=True)
class CoreTimes:
    busy: dict[int, int]
    total: dict[int, int]

    def busy_fraction_since(self, before: CoreTimes) -> dict[int, float]:
        out = {}
        for core, total in self.total.items():
            elapsed = total - before.total.get(core, total)
            out[core] = (self.busy[core] - before.busy[core]) / elapsed if elapsed > 0 else 0.0
        return out


def core_times() -> CoreTimes:
    busy, total = {}, {}
    for line in (PROC / "stat").read_text().splitlines():
        name, *values = line.split()
        if not name.startswith("cpu") or name == "cpu":
            continue
        ticks = [int(v) for v in values]
        core = int(name[3:])
        total[core] = sum(ticks[:8])
        busy[core] = total[core] - ticks[3] - ticks[4]  # minus idle and iowait
    return CoreTimes(busy, total)
