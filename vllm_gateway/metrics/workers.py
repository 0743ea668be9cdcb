"""The workers' figures, off the request path: a copy of one worker's counters that another thread
may read (Figures), the snapshots that let one worker answer a scrape for all, and the processes'
own figures from /proc.

Several workers: each writes its figures to run/metrics/<parent pid>-<pid>.json about once a second
(write_snapshot); the worker that answers a scrape adds the other live workers' last snapshots to its
own live figures, so a scrape shows the whole gateway, up to a snapshot interval behind.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..registry import BackendState, Registry
from .recording import QUEUE_BUCKETS, SERIES_SIZE, Labels, Metrics


def figures_of(metrics: Metrics) -> Figures:
    """A copy of this worker's figures, safe to read in another thread: taken on the event loop,
    where the figures change."""
    registry = metrics.registry
    in_flight: dict[Labels, float] = {
        (model.name, backend.spec.id): float(backend.in_flight)
        for model in registry.models.values()
        for backend in model.backends
    }
    figures = Figures(
        {labels: series.figures() for labels, series in metrics.series.items()},
        dict(metrics.rate_limited),
        dict(metrics.upstream_errors),
        in_flight,
        [os.getpid()],
    )
    figures.queue_waits = {labels: list(values) for labels, values in metrics.queue_waits.items()}
    if metrics.admission is not None:
        admission = metrics.admission
        figures.queue_length = {(model,): float(admission.waiting(model)) for model in registry.models}
        names = metrics.key_names()
        figures.key_requests = {(names.get(key_id, "-"),): float(count) for key_id, count in admission.per_key.items()}
    return figures


class BackendFigures:
    """Each backend as its last health check found it: up (ready), its state, the supervisor's restarts."""

    def __init__(self, registry: Registry) -> None:
        backends = [(model.name, backend) for model in registry.models.values() for backend in model.backends]
        self.up: dict[Labels, float] = {
            (name, b.spec.id): 1.0 if b.state is BackendState.READY else 0.0 for name, b in backends
        }
        # every state, 1 for the current one: a state's series exists before the first time it holds
        self.state: dict[Labels, float] = {
            (name, b.spec.id, state.value): 1.0 if b.state is state else 0.0
            for name, b in backends
            for state in BackendState
        }
        self.restarts: dict[Labels, float] = {(name, b.spec.id): float(b.restarts) for name, b in backends}
        # Wakes of servers that sleep or stop when idle, as the supervisor counted them: the bounds,
        # and per backend [seconds, wakes, count up to each bound..., above them all].
        self.wake_bounds: tuple[float, ...] = ()
        self.wakes: dict[Labels, list[float]] = {}
        for name, backend in backends:
            if backend.wakes is None:
                continue
            bounds, counts, seconds, wakes = backend.wakes
            self.wake_bounds = self.wake_bounds or bounds
            if bounds == self.wake_bounds:
                self.wakes[(name, backend.spec.id)] = [seconds, wakes, *counts]


class Figures:
    """Figures of one worker or, merged, of several."""

    def __init__(
        self,
        series: dict[Labels, list[float]],
        rate_limited: dict[Labels, float],
        upstream_errors: dict[Labels, float],
        in_flight: dict[Labels, float],
        pids: list[int],
    ) -> None:
        self.series = series
        self.rate_limited = rate_limited
        self.upstream_errors = upstream_errors
        self.in_flight = in_flight
        self.pids = pids
        self.queue_waits: dict[Labels, list[float]] = {}  # (model,) -> [sum, count, buckets...]
        self.queue_length: dict[Labels, float] = {}  # (model,)
        self.key_requests: dict[Labels, float] = {}  # (key name,): in flight or waiting

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "series": [[list(labels), values] for labels, values in self.series.items()],
                "rate_limited": [[list(labels), value] for labels, value in self.rate_limited.items()],
                "upstream_errors": [[list(labels), value] for labels, value in self.upstream_errors.items()],
                "in_flight": [[list(labels), value] for labels, value in self.in_flight.items()],
                "queue_waits": [[list(labels), values] for labels, values in self.queue_waits.items()],
                "queue_length": [[list(labels), value] for labels, value in self.queue_length.items()],
                "key_requests": [[list(labels), value] for labels, value in self.key_requests.items()],
                "pids": self.pids,
            }
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Figures:
        raw = json.loads(data)

        def table(name: str) -> dict[Labels, float]:
            return {tuple(labels): float(value) for labels, value in raw[name]}

        series = {tuple(labels): [float(v) for v in values] for labels, values in raw["series"]}
        if any(len(values) != SERIES_SIZE for values in series.values()):
            raise ValueError("a snapshot of another version's layout")
        figures = cls(
            series, table("rate_limited"), table("upstream_errors"), table("in_flight"), [int(p) for p in raw["pids"]]
        )
        figures.queue_waits = {tuple(labels): [float(v) for v in values] for labels, values in raw["queue_waits"]}
        if any(len(values) != len(QUEUE_BUCKETS) + 3 for values in figures.queue_waits.values()):
            raise ValueError("a snapshot of another version's layout")
        figures.queue_length = table("queue_length")
        figures.key_requests = table("key_requests")
        return figures

    def add(self, other: Figures) -> None:
        for labels, values in other.series.items():
            mine = self.series.get(labels)
            if mine is None:
                self.series[labels] = list(values)
            else:
                for index, value in enumerate(values):
                    mine[index] += value
        for labels, values in other.queue_waits.items():
            waits = self.queue_waits.setdefault(labels, [0.0] * len(values))
            for index, value in enumerate(values):
                waits[index] += value
        for name in ("rate_limited", "upstream_errors", "in_flight", "queue_length", "key_requests"):
            mine_table: dict[Labels, float] = getattr(self, name)
            for labels, value in getattr(other, name).items():
                mine_table[labels] = mine_table.get(labels, 0.0) + value
        self.pids += other.pids


# -- snapshots of the other workers --


def snapshot_dir(run_dir: Path) -> Path:
    return run_dir / "metrics"


def snapshot_path(run_dir: Path) -> Path:
    return snapshot_dir(run_dir) / f"{os.getppid()}-{os.getpid()}.json"


def write_snapshot(run_dir: Path, figures: Figures) -> None:
    """This worker's figures, replaced atomically: a reader sees the old file or the new one."""
    path = snapshot_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(figures.to_json())
    os.replace(temporary, path)


def remove_snapshot(run_dir: Path) -> None:
    with contextlib.suppress(OSError):
        snapshot_path(run_dir).unlink()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sibling_figures(run_dir: Path) -> Iterable[Figures]:
    """The last snapshots of this worker's live siblings (same parent); files of dead ones are removed."""
    directory = snapshot_dir(run_dir)
    parent, me = os.getppid(), os.getpid()
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        stem, dot, suffix = name.partition(".")
        ppid_text, _, pid_text = stem.partition("-")
        if suffix != "json" or not dot or not ppid_text.isdigit() or not pid_text.isdigit():
            continue
        ppid, pid = int(ppid_text), int(pid_text)
        if pid == me or ppid != parent:
            continue
        if not pid_alive(pid):
            with contextlib.suppress(OSError):
                (directory / name).unlink()
            continue
        try:
            yield Figures.from_json((directory / name).read_bytes())
        except (OSError, ValueError, KeyError, TypeError):
            continue  # replaced or removed while being read, or not a snapshot: skipped this once


# -- process figures, summed over the workers --

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def process_figures(pids: Sequence[int]) -> tuple[float, float, float]:
    """(cpu seconds, resident bytes, open file descriptors) summed over `pids`, from /proc."""
    cpu = resident = fds = 0.0
    for pid in pids:
        try:
            raw = Path(f"/proc/{pid}/stat").read_text()
            fields = raw[raw.rindex(")") + 2 :].split()
            cpu += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
            resident += int(fields[21]) * PAGE_SIZE
            fds += len(os.listdir(f"/proc/{pid}/fd"))
        except (OSError, ValueError, IndexError):
            continue
    return cpu, resident, fds
