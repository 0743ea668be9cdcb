"""How many client connections the gateway takes by default: what its descriptors allow."""

from __future__ import annotations

import resource
import subprocess
import sys

from tests.support.processes import REPO_ROOT
from vllm_gateway.server.file_limits import RESERVED_DESCRIPTORS, default_max_connections


def test_clients_get_what_the_relayed_requests_leave():
    assert default_max_connections(65536, 100) == 65536 - RESERVED_DESCRIPTORS - 100


def test_a_concurrency_limit_beyond_the_descriptors_leaves_half_for_the_clients():
    # Every client then may hold an upstream connection: half the budget each, never 1 (as a
    # subtraction alone gave for GATEWAY_CONCURRENCY_LIMIT=100000).
    budget = 65536 - RESERVED_DESCRIPTORS
    assert default_max_connections(65536, 100_000) == budget - budget // 2


def test_the_default_never_drops_below_one():
    assert default_max_connections(10, 100) == 1


def test_raising_the_soft_limit_reaches_the_hard_one():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    code = (
        "import resource, sys; from vllm_gateway.server.file_limits import raise_open_files_limit; "
        "print(raise_open_files_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])"
    )
    lowered = min(soft, 256)

    def lower() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))

    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, preexec_fn=lower, timeout=30, cwd=REPO_ROOT
    )
    reported, now = map(int, out.stdout.split())
    assert reported == now
    assert now == (hard if hard != resource.RLIM_INFINITY else lowered)
