"""The gateway's Prometheus figures: recorded per request in plain counters, rendered only on a scrape.

Recording runs for every relayed request, so it is a dictionary lookup by a tuple of labels and a few
additions on a flat list of numbers (histograms are per-bucket counts found by bisect, made
cumulative when rendered); prometheus_client's objects, with a lock and a label lookup per family,
would cost several times that.

Several workers: each worker writes its figures to run/metrics/<parent pid>-<pid>.json about once a
second (snapshot()); the worker that answers a scrape adds the other live workers' last snapshots to
its own live figures, so a scrape shows the whole gateway, up to a snapshot interval behind.
"""

from __future__ import annotations

import contextlib
import json
import os
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from time import perf_counter
from typing import Protocol

from .keystore import KeyRecord
from .registry import BackendState, Registry

PREFIX = "vllm_gateway_"
# What stands for a model the registry does not know: client input never becomes a label value.
UNKNOWN = "unknown"

DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
QUEUE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

# A series' figures, one flat list: the counts and sums below, then each histogram's bucket counts
# (one more than its bounds: the last counts what is above every bound).
REQUESTS, PROMPT, COMPLETION, DURATION_SUM, TTFT_SUM, TTFT_COUNT, OVERHEAD_SUM, OVERHEAD_COUNT = range(8)
DURATION_AT = 8
TTFT_AT = DURATION_AT + len(DURATION_BUCKETS) + 1
OVERHEAD_AT = TTFT_AT + len(TTFT_BUCKETS) + 1
SERIES_SIZE = OVERHEAD_AT + len(OVERHEAD_BUCKETS) + 1

# The gateway's 429s, by their error's type (errors.rate_limited, errors.tokens_limited).
RATE_LIMIT_KINDS = {"rate_limit_error": "requests", "tokens": "tokens", "parallel_requests_exceeded": "parallel"}

STATUS_CLASSES = ("0xx", "1xx", "2xx", "3xx", "4xx", "5xx")

# (model, backend, key name, status class)
Labels = tuple[str, ...]


# What the figures are read from, declared here so that this module imports neither the request path
# (proxy.Outcome) nor admission (admission.Admission), both of which reach this module through state.py.


class Outcome(Protocol):
    """One request as it ended (proxy.Outcome)."""

    @property
    def status(self) -> int: ...
    @property
    def model(self) -> str: ...
    @property
    def backend(self) -> str: ...
    @property
    def prompt_tokens(self) -> int | None: ...
    @property
    def completion_tokens(self) -> int | None: ...
    @property
    def upstream_seconds(self) -> float: ...
    @property
    def first_byte_at(self) -> float: ...
    @property
    def error_type(self) -> str | None: ...
    @property
    def queued(self) -> float | None: ...


class Admission(Protocol):
    """What admission holds now (admission.Admission): the requests waiting, and those of each key."""

    @property
    def per_key(self) -> dict[str, int]: ...
    def waiting(self, model_name: str) -> int: ...


class Metrics:
    """One worker's figures."""

    def __init__(self, registry: Registry, enabled: bool = True) -> None:
        self.registry = registry
        self.enabled = enabled
        self.series: dict[Labels, list[float]] = {}
        self.rate_limited: dict[Labels, float] = {}  # (key name, kind)
        self.upstream_errors: dict[Labels, float] = {}  # (model, backend, kind)
        # (model,) -> [seconds waited, requests that waited, bucket counts...]: admission's queue
        self.queue_waits: dict[Labels, list[float]] = {}
        # What admission holds now (read at a scrape): set by GatewayState once both exist.
        self.admission: Admission | None = None
        self.key_names: Callable[[], dict[str, str]] = dict

    # -- recording: the request path --

    def model_label(self, name: str) -> str:
        if name == "-":
            return name
        model = self.registry.resolve(name)
        return model.name if model is not None else UNKNOWN

    def request(self, outcome: Outcome, key: KeyRecord | None, started: float) -> None:
        """Count one relayed request as it ends (proxy.handle)."""
        if not self.enabled:
            return
        elapsed = perf_counter() - started
        status = outcome.status // 100
        labels = (
            self.model_label(outcome.model),
            outcome.backend,
            key.name if key is not None else "-",
            STATUS_CLASSES[status] if 0 <= status < 6 else "5xx",
        )
        series = self.series.get(labels)
        if series is None:
            series = self.series[labels] = [0.0] * SERIES_SIZE
        series[REQUESTS] += 1
        if outcome.prompt_tokens:
            series[PROMPT] += outcome.prompt_tokens
        if outcome.completion_tokens:
            series[COMPLETION] += outcome.completion_tokens
        series[DURATION_SUM] += elapsed
        series[DURATION_AT + bisect_left(DURATION_BUCKETS, elapsed)] += 1
        if outcome.upstream_seconds:
            overhead = max(0.0, elapsed - outcome.upstream_seconds)
            series[OVERHEAD_SUM] += overhead
            series[OVERHEAD_COUNT] += 1
            series[OVERHEAD_AT + bisect_left(OVERHEAD_BUCKETS, overhead)] += 1
            if outcome.first_byte_at:
                ttft = outcome.first_byte_at - started
                series[TTFT_SUM] += ttft
                series[TTFT_COUNT] += 1
                series[TTFT_AT + bisect_left(TTFT_BUCKETS, ttft)] += 1
        if outcome.queued:
            waits = self.queue_waits.get(labels[:1])
            if waits is None:
                waits = self.queue_waits[labels[:1]] = [0.0] * (len(QUEUE_BUCKETS) + 3)
            waits[0] += outcome.queued
            waits[1] += 1
            waits[2 + bisect_left(QUEUE_BUCKETS, outcome.queued)] += 1
        if outcome.status == 429 and outcome.error_type in RATE_LIMIT_KINDS:
            limited = (labels[2], RATE_LIMIT_KINDS[outcome.error_type])
            self.rate_limited[limited] = self.rate_limited.get(limited, 0.0) + 1

    def upstream_error(self, model: str, backend: str, kind: str) -> None:
        """A backend failed: kind is connect, connect_timeout, timeout, protocol or mid_stream."""
        if not self.enabled:
            return
        labels = (self.model_label(model), backend, kind)
        self.upstream_errors[labels] = self.upstream_errors.get(labels, 0.0) + 1

    # -- snapshots and scrapes: off the request path --

    def figures(self) -> Figures:
        """A copy of this worker's figures, safe to read in another thread."""
        in_flight: dict[Labels, float] = {
            (model.name, backend.spec.id): float(backend.in_flight)
            for model in self.registry.models.values()
            for backend in model.backends
        }
        figures = Figures(
            {labels: list(values) for labels, values in self.series.items()},
            dict(self.rate_limited),
            dict(self.upstream_errors),
            in_flight,
            [os.getpid()],
        )
        figures.queue_waits = {labels: list(values) for labels, values in self.queue_waits.items()}
        if self.admission is not None:
            figures.queue_length = {(model,): float(self.admission.waiting(model)) for model in self.registry.models}
            names = self.key_names()
            figures.key_requests = {
                (names.get(key_id, "-"),): float(count) for key_id, count in self.admission.per_key.items()
            }
        return figures

    def backend_states(self) -> dict[Labels, float]:
        states: dict[Labels, float] = {
            (model.name, backend.spec.id): 1.0 if backend.state is BackendState.READY else 0.0
            for model in self.registry.models.values()
            for backend in model.backends
        }
        return states


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


# -- the exposition --


def escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def label_text(names: Sequence[str], values: Sequence[str]) -> str:
    return ",".join(f'{name}="{escape(value)}"' for name, value in zip(names, values, strict=True))


def number(value: float) -> str:
    return str(int(value)) if value == int(value) else repr(value)


class Exposition:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]

    def samples(self, name: str, names: Sequence[str], table: dict[Labels, float]) -> None:
        for labels, value in sorted(table.items()):
            self.lines.append(f"{name}{{{label_text(names, labels)}}} {number(value)}")

    def histogram(
        self, name: str, names: Sequence[str], bounds: Sequence[float], tables: dict[Labels, list[float]]
    ) -> None:
        """tables: labels -> [sum, count, bucket counts...]."""
        for labels, values in sorted(tables.items()):
            if not values[1]:
                continue
            text = label_text(names, labels)
            cumulative = 0.0
            for bound, count in zip(bounds, values[2:], strict=False):
                cumulative += count
                self.lines.append(f'{name}_bucket{{{text},le="{bound}"}} {number(cumulative)}')
            self.lines.append(f'{name}_bucket{{{text},le="+Inf"}} {number(values[1])}')
            self.lines.append(f"{name}_sum{{{text}}} {values[0]!r}")
            self.lines.append(f"{name}_count{{{text}}} {number(values[1])}")

    def text(self) -> bytes:
        return ("\n".join(self.lines) + "\n").encode()


def summed(
    series: dict[Labels, list[float]], keep: Sequence[int], pick: Sequence[int] | slice
) -> dict[Labels, list[float]]:
    """The figures at `pick` summed over the labels not in `keep`."""
    out: dict[Labels, list[float]] = {}
    for labels, values in series.items():
        chosen = values[pick] if isinstance(pick, slice) else [values[i] for i in pick]
        key = tuple(labels[i] for i in keep)
        mine = out.get(key)
        if mine is None:
            out[key] = list(chosen)
        else:
            for index, value in enumerate(chosen):
                mine[index] += value
    return out


def render(figures: Figures, backend_up: dict[Labels, float]) -> bytes:
    out = Exposition()
    series = figures.series
    model_backend_key_status = ("model", "backend", "key", "status")
    model_backend_key = ("model", "backend", "key")

    name = PREFIX + "requests_total"
    out.family(name, "counter", "Relayed requests, by model, backend, key name and status class.")
    out.samples(name, model_backend_key_status, {k: v[0] for k, v in summed(series, (0, 1, 2, 3), (REQUESTS,)).items()})

    for field, family, text in (
        (PROMPT, "prompt_tokens_total", "Prompt tokens of relayed requests, as the backend's usage said."),
        (COMPLETION, "completion_tokens_total", "Completion tokens of relayed requests, as the backend's usage said."),
    ):
        out.family(PREFIX + family, "counter", text)
        out.samples(
            PREFIX + family, model_backend_key, {k: v[0] for k, v in summed(series, (0, 1, 2), (field,)).items()}
        )

    def histogram(
        family: str, text: str, keep: Sequence[int], at: int, sums: tuple[int, int], bounds: Sequence[float]
    ) -> None:
        names = [model_backend_key_status[i] for i in keep]
        pick = [sums[0], sums[1], *range(at, at + len(bounds) + 1)]
        out.family(PREFIX + family, "histogram", text)
        out.histogram(PREFIX + family, names, bounds, summed(series, keep, pick))

    histogram(
        "request_duration_seconds",
        "Time from a relayed request's head to its last byte.",
        (0, 1, 2, 3),
        DURATION_AT,
        (DURATION_SUM, REQUESTS),
        DURATION_BUCKETS,
    )
    histogram(
        "time_to_first_token_seconds",
        "Streams only: time from the request's head to the backend's first body bytes.",
        (0, 1, 2),
        TTFT_AT,
        (TTFT_SUM, TTFT_COUNT),
        TTFT_BUCKETS,
    )
    histogram(
        "overhead_seconds",
        "Time in the gateway itself: a request's whole time less the time waiting on its backend.",
        (0, 1),
        OVERHEAD_AT,
        (OVERHEAD_SUM, OVERHEAD_COUNT),
        OVERHEAD_BUCKETS,
    )

    name = PREFIX + "requests_in_flight"
    out.family(name, "gauge", "Requests being relayed now, by model and backend, over all workers.")
    out.samples(name, ("model", "backend"), figures.in_flight)

    name = PREFIX + "queue_length"
    out.family(name, "gauge", "Requests waiting for a free sequence of their model (admission), over all workers.")
    out.samples(name, ("model",), figures.queue_length)

    name = PREFIX + "queue_seconds"
    out.family(name, "histogram", "Time requests waited in their model's queue, of those that waited.")
    out.histogram(name, ("model",), QUEUE_BUCKETS, figures.queue_waits)

    name = PREFIX + "key_requests_in_flight"
    out.family(name, "gauge", "Requests of each key in flight or waiting (what max_parallel_requests caps).")
    out.samples(name, ("key",), figures.key_requests)

    name = PREFIX + "backend_up"
    out.family(name, "gauge", "1 when the backend's last health check found it ready, else 0.")
    out.samples(name, ("model", "backend"), backend_up)

    name = PREFIX + "rate_limited_total"
    out.family(name, "counter", "Requests refused with 429 by a key's rate limit, by key name and kind.")
    out.samples(name, ("key", "kind"), figures.rate_limited)

    name = PREFIX + "upstream_errors_total"
    out.family(name, "counter", "Backend failures, by model, backend and kind.")
    out.samples(name, ("model", "backend", "kind"), figures.upstream_errors)

    cpu, resident, fds = process_figures(figures.pids)
    for family, kind, text, value in (
        ("process_cpu_seconds_total", "counter", "User and system CPU time of the gateway's workers.", cpu),
        ("process_resident_memory_bytes", "gauge", "Resident memory of the gateway's workers.", resident),
        ("process_open_fds", "gauge", "Open file descriptors of the gateway's workers.", fds),
    ):
        out.family(family, kind, text)
        out.lines.append(f"{family} {number(value)}")
    out.family(PREFIX + "workers", "gauge", "Worker processes whose figures this scrape holds.")
    out.lines.append(f"{PREFIX}workers {len(figures.pids)}")
    return out.text()


def exposition(figures: Figures, backend_up: dict[Labels, float], run_dir: Path | None) -> bytes:
    """The whole gateway's figures as Prometheus text: `figures` (this worker's copy) plus, when
    `run_dir` is given, the other live workers' snapshots. Reads files: run it off the event loop."""
    if run_dir is not None:
        for other in sibling_figures(run_dir):
            figures.add(other)
    return render(figures, backend_up)
