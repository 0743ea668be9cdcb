"""The models the gateway serves, their backends, and which backend takes the next request."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from .model_config import BackendSpec


class BackendState(StrEnum):
    READY = "ready"
    LOADING = "loading"
    RESTARTING = "restarting"  # exited or hung; the fleet's supervisor starts it after a backoff
    FAILED = "failed"  # the supervisor gave up (a crash loop) until someone starts it
    DOWN = "down"
    UNKNOWN = "unknown"


@dataclass(eq=False)
class Backend:
    spec: BackendSpec
    state: BackendState = BackendState.UNKNOWN
    detail: str = "not checked yet"
    in_flight: int = 0
    checked_at: float = 0.0
    # The names its server answered to in /v1/models at the last check that got a list (health.py).
    served: frozenset[str] = frozenset()
    restarts: int = 0  # by the fleet's supervisor, since the server's last start by the scripts

    @property
    def base_url(self) -> str:
        return self.spec.base_url

    @property
    def has_room(self) -> bool:
        """Fewer requests in flight than the server's capacity (always, for a server without one)."""
        capacity = self.spec.capacity
        return capacity is None or self.in_flight < capacity

    def mark(self, state: BackendState, detail: str) -> bool:
        """Record a health result; returns whether the state changed."""
        changed = state is not self.state
        self.state, self.detail, self.checked_at = state, detail, time.time()
        return changed


@dataclass(eq=False)
class Model:
    name: str
    path: str
    aliases: tuple[str, ...] = ()
    backends: list[Backend] = field(default_factory=list)
    created: int = field(default_factory=lambda: int(time.time()))
    # The names every server of the model answers to (learn_served): a request that names another of
    # the model's names, such as an alias added to the config since its servers started, goes
    # upstream under `name`, which each ready server serves.
    served: frozenset[str] = frozenset()

    def learn_served(self) -> None:
        """Recompute `served` from the backends' last lists: until each backend has answered one,
        only `name` counts."""
        lists = [backend.served for backend in self.backends]
        self.served = (frozenset.intersection(*lists) if lists else frozenset()) | {self.name}

    @property
    def state(self) -> BackendState:
        states = {backend.state for backend in self.backends}
        # The state of the replica closest to serving.
        for state in (BackendState.READY, BackendState.LOADING, BackendState.RESTARTING, BackendState.UNKNOWN):
            if state in states:
                return state
        return BackendState.FAILED if BackendState.FAILED in states else BackendState.DOWN

    def pick(self, exclude: Sequence[Backend] = (), with_room: bool = False) -> Backend | None:
        """The ready backend with the fewest requests in flight (replicas share the load); with
        `with_room`, only one below its capacity."""
        best = None
        for backend in self.backends:
            if (
                backend.state is BackendState.READY
                and backend not in exclude
                and (not with_room or backend.has_room)
                and (best is None or backend.in_flight < best.in_flight)
            ):
                best = backend
        return best


class Registry:
    def __init__(self, specs: Iterable[BackendSpec] = ()) -> None:
        self.models: dict[str, Model] = {}
        self._by_name: dict[str, Model] = {}
        # Called when a backend's state changed or a new config came (admission/local.py listens).
        self.listeners: list[Callable[[], None]] = []
        self.replace(specs)

    def replace(self, specs: Iterable[BackendSpec]) -> None:
        """Load a new config, keeping the health state of backends that did not change."""
        old = {(backend.spec.name, backend.spec.base_url): backend for backend in self.backends()}
        models: dict[str, Model] = {}
        for spec in specs:
            model = models.setdefault(spec.name, Model(spec.name, spec.path, spec.aliases))
            model.aliases = tuple(dict.fromkeys((*model.aliases, *spec.aliases)))
            backend = old.get((spec.name, spec.base_url)) or Backend(spec)
            backend.spec = spec
            model.backends.append(backend)
        by_name = dict(models)
        for model in models.values():
            model.learn_served()
            for alias in model.aliases:
                by_name.setdefault(alias, model)
        self.models, self._by_name = models, by_name

    def changed(self) -> None:
        for listener in self.listeners:
            listener()

    def resolve(self, name: str) -> Model | None:
        return self._by_name.get(name)

    def backends(self) -> list[Backend]:
        return [backend for model in self.models.values() for backend in model.backends]
