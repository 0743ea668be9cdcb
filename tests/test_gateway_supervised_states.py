"""How the gateway names a server that does not answer: loading, restarting or failed as the fleet's
supervisor says in the run directory, else down; and a model's state from its replicas'."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

import pytest

from tests.support.processes import free_port
from vllm_gateway.health import check_backend, probe, probe_pool, supervisor_view
from vllm_gateway.model_config import BackendSpec
from vllm_gateway.registry import Backend, BackendState, Model


def closed_backend(backend_id: str = "beta") -> Backend:
    """A backend whose port nothing listens on: every probe is refused."""
    url = f"http://127.0.0.1:{free_port()}"
    return Backend(BackendSpec(backend_id, "beta", (), "/m", url, None, None))


def supervised(run_dir: Path, want: str, status: dict) -> None:
    run_dir.mkdir(exist_ok=True)
    (run_dir / "beta.want").write_text(want + "\n")
    (run_dir / "beta.status.json").write_text(json.dumps(status) + "\n")


def probed(backend: Backend, run_dir: Path) -> tuple[BackendState, str]:
    async def run() -> tuple[BackendState, str]:
        pool = probe_pool(3.0, 65536)
        try:
            state, detail, _ = await probe(pool, backend, run_dir, supervisor_view(run_dir, backend.spec.id) or {})
        finally:
            pool.close()
        return state, detail

    return asyncio.run(run())


@pytest.mark.parametrize("state", ["restarting", "failed"])
def test_a_server_the_supervisor_restarts_or_gave_up_on_shows_its_state_and_reason(tmp_path: Path, state) -> None:
    supervised(tmp_path, "run T1", {"state": state, "token": "T1", "reason": "exit code 3; restarts in 4s"})
    assert probed(closed_backend(), tmp_path) == (BackendState(state), "exit code 3; restarts in 4s")


def test_a_status_of_an_older_start_or_of_a_stopped_model_is_not_believed(tmp_path: Path) -> None:
    supervised(tmp_path, "run T2", {"state": "failed", "token": "T1", "reason": "old"})
    assert probed(closed_backend(), tmp_path)[0] is BackendState.DOWN
    supervised(tmp_path, "stop", {"state": "restarting", "token": "T1", "reason": "old"})
    assert probed(closed_backend(), tmp_path)[0] is BackendState.DOWN
    assert probed(closed_backend(), tmp_path / "no-run-dir")[0] is BackendState.DOWN


def test_a_model_shows_the_state_of_its_replica_closest_to_serving() -> None:
    def model_of(*states: BackendState) -> Model:
        model = Model("m", "/m")
        for number, state in enumerate(states):
            backend = closed_backend(f"b{number}")
            backend.state = state
            model.backends.append(backend)
        return model

    assert model_of(BackendState.FAILED, BackendState.READY).state is BackendState.READY
    assert model_of(BackendState.RESTARTING, BackendState.LOADING).state is BackendState.LOADING
    assert model_of(BackendState.DOWN, BackendState.RESTARTING).state is BackendState.RESTARTING
    assert model_of(BackendState.DOWN, BackendState.FAILED).state is BackendState.FAILED
    assert model_of(BackendState.DOWN).state is BackendState.DOWN


@pytest.mark.parametrize("state", ["sleeping", "stopped", "waking"])
def test_an_idle_server_is_in_the_supervisors_state_even_while_its_health_answers(
    tmp_path: Path, state: str, simulator
) -> None:
    supervised(tmp_path, "run T1", {"state": state, "token": "T1", "reason": "idle 900s: sleeping"})
    backend = Backend(BackendSpec("beta", "beta", (), "/m", simulator.base_url, None, None, idles=True))
    assert probed(backend, tmp_path) == (BackendState(state), "idle 900s: sleeping")


def test_a_model_waits_for_a_dormant_replica_but_not_for_a_failed_one() -> None:
    model = Model("m", "/m")
    backend = closed_backend("b0")
    model.backends.append(backend)
    for state, wakeable in ((BackendState.SLEEPING, True), (BackendState.WAKING, True), (BackendState.FAILED, False)):
        backend.state = state
        assert model.wakeable is wakeable
    backend.state = BackendState.STOPPED
    assert model.state is BackendState.STOPPED and model.wakeable


def test_a_server_restarted_while_its_probe_waited_is_ready_with_the_restarts_said_after_it(tmp_path: Path) -> None:
    """The probe reads the supervisor's view, then asks the server; on a busy host the supervisor may
    restart the server in between. The view after the answer counts: 1 restart, not the 0 of before."""
    supervised(tmp_path, "run T1", {"state": "restarting", "token": "T1", "restarts": 0, "reason": "killed"})

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError):  # the pool closes its connection at the end
            while request := await reader.readuntil(b"\r\n\r\n"):
                await reply(request, writer)

    async def reply(request: bytes, writer: asyncio.StreamWriter) -> None:
        if request.startswith(b"GET /health"):
            # The supervisor's restart, written while this probe waits for its answer.
            supervised(tmp_path, "run T1", {"state": "loading", "token": "T1", "restarts": 1, "reason": ""})
            body = b""
        else:
            body = json.dumps({"data": [{"id": "beta"}]}).encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()

    async def run() -> tuple[bool, Backend]:
        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        backend = Backend(BackendSpec("beta", "beta", (), "/m", f"http://127.0.0.1:{port}", None, None))
        pool = probe_pool(3.0, 65536)
        try:
            return await check_backend(pool, backend, tmp_path), backend
        finally:
            pool.close()
            server.close()

    changed, backend = asyncio.run(run())
    assert changed and backend.state is BackendState.READY
    assert backend.restarts == 1
