"""Shared test setup: make the repository root importable (`vllm_gateway`, `tests.support`)."""

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import pytest  # noqa: E402

# First: in the compiled phase of scripts/test.sh (GATEWAY_COMPILED=1), what the tests import of the
# gateway in their own process is the compiled build too.
import tests.support.suite_build  # noqa: E402, F401
from tests.support.gateway import Backend, Gateway  # noqa: E402
from tests.support.memory_gateway import MemoryGateway  # noqa: E402
from tests.support.processes import Simulator, free_port, start_process  # noqa: E402


@pytest.fixture(scope="module")
def simulator(tmp_path_factory):
    """A fast simulated vLLM server serving the model `sim` (alias `sim-alias`)."""
    with Simulator.start(
        tmp_path_factory.mktemp("sim"), "--served-model-name", "sim", "sim-alias", "--model", "/models/sim"
    ) as simulator:
        yield simulator


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, simulator):
    """The gateway in front of `simulator`, with an admin key and a user key."""
    backend = Backend("sim", simulator.base_url, path="/models/sim", aliases="sim-alias")
    with Gateway.start(tmp_path_factory.mktemp("gateway"), [backend]) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def memory_gateway(tmp_path_factory, simulator):
    """The same gateway in the test's process, over in-memory connections (tests/support/memory_gateway.py)."""
    backend = Backend("sim", simulator.base_url, path="/models/sim", aliases="sim-alias")
    with MemoryGateway.start(tmp_path_factory.mktemp("memory-gateway"), [backend]) as gateway:
        yield gateway


@pytest.fixture(autouse=True)
def _fresh_simulator_state(request):
    """Tests sharing the module's simulator start with no faults and empty stats."""
    if "simulator" in request.fixturenames:
        simulator = request.getfixturevalue("simulator")
        simulator.clear_faults()
        simulator.reset_stats()
    yield


@pytest.fixture
def redis_url(tmp_path):
    """A real redis-server on a free port, for the stores that workers share."""
    import shutil
    import socket
    import time

    server = shutil.which("redis-server")
    assert server, "redis-server is missing: scripts/install_test_deps.sh installs it"
    port = free_port()
    handle = start_process(
        [server, "--port", str(port), "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        log_path=tmp_path / "redis.log",
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            assert time.monotonic() < deadline, handle.log_tail()
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    handle.stop()


@pytest.fixture
def redis(tmp_path):
    """A real redis-server that the test may stop, pause and start again (tests/support/redis_server.py)."""
    from tests.support.redis_server import Redis

    server = Redis(tmp_path)
    server.start()
    yield server
    server.stop()
