"""The Prometheus text (version 0.0.4) of the workers' figures, made only on a scrape."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .recording import (
    COMPLETION,
    DURATION_AT,
    DURATION_BUCKETS,
    DURATION_SUM,
    OVERHEAD_AT,
    OVERHEAD_BUCKETS,
    OVERHEAD_COUNT,
    OVERHEAD_SUM,
    PROMPT,
    QUEUE_BUCKETS,
    REQUESTS,
    TTFT_AT,
    TTFT_BUCKETS,
    TTFT_COUNT,
    TTFT_SUM,
    Labels,
)
from .workers import BackendFigures, Figures, process_figures, sibling_figures

PREFIX = "vllm_gateway_"


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


def render(figures: Figures, backends: BackendFigures, key_file_ok: bool = True) -> bytes:
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
    out.samples(name, ("model", "backend"), backends.up)

    name = PREFIX + "backend_state"
    out.family(name, "gauge", "1 for the backend's state at its last health check, 0 for the other states.")
    out.samples(name, ("model", "backend", "state"), backends.state)

    name = PREFIX + "backend_restarts"
    out.family(name, "gauge", "Restarts of the backend's server by the fleet's supervisor since its last start.")
    out.samples(name, ("model", "backend"), backends.restarts)

    name = PREFIX + "backend_wake_seconds"
    out.family(
        name, "histogram", "Wakes of a server that sleeps or stops when idle: from the request that woke it to ready."
    )
    out.histogram(name, ("model", "backend"), backends.wake_bounds, backends.wakes)

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
    name = PREFIX + "key_file_ok"
    out.family(
        name, "gauge", "1 while the key file reads well; 0 while it is broken or missing (the last good keys serve)."
    )
    out.lines.append(f"{name} {1 if key_file_ok else 0}")
    out.family(PREFIX + "workers", "gauge", "Worker processes whose figures this scrape holds.")
    out.lines.append(f"{PREFIX}workers {len(figures.pids)}")
    return out.text()


def exposition(figures: Figures, backends: BackendFigures, run_dir: Path | None, key_file_ok: bool = True) -> bytes:
    """The whole gateway's figures as Prometheus text: `figures` (this worker's copy) plus, when
    `run_dir` is given, the other live workers' snapshots. Reads files: run it off the event loop."""
    if run_dir is not None:
        for other in sibling_figures(run_dir):
            figures.add(other)
    return render(figures, backends, key_file_ok)
