"""The one object that holds the gateway's mutable state, created at start-up and passed down."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .access_log import LogWriter
from .admission.local import Admission
from .admission.shared import SharedAdmission
from .body_parser import BodyParser
from .console.session import Sessions
from .console_figures import FigureHistory
from .health import HealthChecker
from .key_limits import KeyLimitsCache
from .keystore import KeyStore
from .metrics.recording import Metrics
from .ratelimit import RateLimiter
from .registry import Registry
from .settings import Settings
from .upstream import UpstreamPool
from .usage_ledger import UsageLedger
from .wake_on_demand import WakeOnDemand


@dataclass(eq=False)
class GatewayState:
    settings: Settings
    registry: Registry
    keys: KeyStore
    limiter: RateLimiter
    # Made once the event loop runs (app.py's create_app and lifespan), before the first request.
    upstream: UpstreamPool = field(init=False)
    health: HealthChecker = field(init=False)
    log: LogWriter = field(init=False)
    ledger: UsageLedger | None = None  # None when GATEWAY_USAGE_LEDGER is off
    in_flight: int = 0
    body_parser: BodyParser = field(default_factory=BodyParser)
    started_at: float = field(default_factory=time.time)
    metrics: Metrics = field(init=False)
    admission: Admission = field(init=False)
    key_limits: KeyLimitsCache = field(init=False)  # each key's limits in force, from its record and the settings
    wakes: WakeOnDemand = field(init=False)  # tells the supervisor of uses of servers that idle
    sessions: Sessions | None = field(init=False)  # the console's sign-ins; None with the console off
    figures: FigureHistory = field(init=False)  # the overview's last day of requests and tokens, sampled

    def __post_init__(self) -> None:
        self.key_limits = KeyLimitsCache(self.settings)
        self.metrics = Metrics(self.registry, self.settings.metrics)
        # Several workers share their counts and queues through Redis (admission/shared.py).
        shared = self.settings.workers > 1 and self.settings.admission
        self.admission = (SharedAdmission if shared else Admission)(self.settings, self.registry)
        self.wakes = WakeOnDemand(self.settings.run_dir)
        self.figures = FigureHistory(self.settings.console_sample_seconds)
        settings = self.settings
        self.sessions = None
        if settings.console:
            lifetime, attempts = settings.console_session_seconds, settings.console_sign_in_limit
            self.sessions = Sessions(settings.console_secret_path, self.keys, lifetime, attempts)
        self.admission.wake = self.wakes.wake  # a request for a dormant model wakes it
        # A scrape reads the queues and each key's requests (by name, never by key) from admission.
        self.metrics.admission = self.admission
        self.metrics.key_names = lambda: {record.id: record.name for record in self.keys.records()}
