"""Shared test setup: make the repository root importable (`vllm_gateway`, `tests.support`)."""

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


import pytest  # noqa: E402

from tests.support.gateway import Backend, Gateway  # noqa: E402
from tests.support.processes import Simulator  # noqa: E402


@pytest.fixture(scope="module")
def simulator(tmp_path_factory):
    """A fast simulated vLLM server serving the model `sim` (alias `sim-alias`)."""
    with Simulator.start(
        tmp_path_factory.mktemp("sim"), "--served-model-name", "sim", "sim-alias", "--model", "/models/sim"
    ) as sim:
        yield sim


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, simulator):
    """The gateway in front of `simulator`, with an admin key and a user key."""
    backend = Backend("sim", simulator.base_url, path="/models/sim", aliases="sim-alias")
    with Gateway.start(tmp_path_factory.mktemp("gateway"), [backend]) as gw:
        yield gw


@pytest.fixture(autouse=True)
def _fresh_simulator_state(request):
    """Tests sharing the module's simulator start with no faults and empty stats."""
    if "simulator" in request.fixturenames:
        sim = request.getfixturevalue("simulator")
        sim.clear_faults()
        sim.reset_stats()
    yield
