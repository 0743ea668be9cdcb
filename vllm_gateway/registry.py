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
    # A model with idle= in the config, as the supervisor put it: asleep (vLLM's sleep mode) or
    # stopped once idle, or coming back for a request. Requests for it wait (admission) and wake it.
    SLEEPING = "sleeping"
    STOPPED = "stopped"
    WAKING = "waking"
    DOWN = "down"
    UNKNOWN = "unknown"


# States a request waits through: the server comes back for it (wake_on_demand.py).
DORMANT = frozenset({BackendState.SLEEPING, BackendState.STOPPED, BackendState.WAKING})


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
    # Its wakes as the supervisor counted them: (bounds, counts per bound and above, seconds, wakes).
    wakes: tuple[tuple[float, ...], tuple[float, ...], float, float] | None = None
    # For an idle= server (wake_on_demand.py): when its use was last told to the supervisor
    # (time.monotonic), when a request first asked a dormant one to wake (0: none asked), and when it
    # was last seen ready again after being dormant (time.perf_counter, for the requests' wake_ms).
    use_told: float = 0.0
    wake_asked: float = 0.0
    woke_at: float = 0.0
    # The header the server's key asks for (the config's api_key, or the fleet's, which health.py
    # reads each round); empty when it has none. Every request upstream carries it.
    auth: list[tuple[bytes, bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.take(self.spec)

    def take(self, spec: BackendSpec) -> None:
        """Serve as `spec` says (a config reload); the fleet's key is kept while the spec still uses it."""
        if spec.api_key:
            self.auth = bearer(spec.api_key)
        elif not (spec.fleet_key and self.spec.fleet_key):
            self.auth = []
        self.spec = spec

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
        if changed and state is BackendState.READY and self.state in DORMANT:
            self.woke_at = time.perf_counter()
        if state not in DORMANT:
            self.wake_asked = 0.0
        self.state, self.detail, self.checked_at = state, detail, time.time()
        return changed


def bearer(key: str) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", b"Bearer " + key.encode())]


CLOSEST_TO_SERVING = (
    BackendState.READY,
    BackendState.WAKING,
    BackendState.LOADING,
    BackendState.SLEEPING,
    BackendState.STOPPED,
    BackendState.RESTARTING,
    BackendState.UNKNOWN,
    BackendState.FAILED,
)


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
        for state in CLOSEST_TO_SERVING:
            if state in states:
                return state
        return BackendState.DOWN

    @property
    def wakeable(self) -> bool:
        """A server of it sleeps, stopped as idle or is waking: a request waits for it."""
        return any(backend.state in DORMANT for backend in self.backends)

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
            backend.take(spec)
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

    def names(self) -> frozenset[str]:
        """Every name a request may give: the models' names and their aliases."""
        return frozenset(self._by_name)

    def backends(self) -> list[Backend]:
        return [backend for model in self.models.values() for backend in model.backends]
