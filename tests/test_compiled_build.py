"""Which build of the request path a gateway runs: the one mypyc compiled (scripts/compile_gateway.py)
while it matches the sources, unless GATEWAY_COMPILED=0; the sources as Python otherwise.

scripts/test.sh runs this file twice: with the other tests (GATEWAY_COMPILED=0, as Python) and with the
compiled ones (GATEWAY_COMPILED=1, after building), so the gateway test checks each in turn.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest

import vllm_api_server
from tests.support.gateway import Backend, Gateway
from tests.support.processes import REPO_ROOT, Simulator, wait_until
from vllm_gateway.settings import checkout_of

sys.path.insert(0, str(REPO_ROOT / "scripts"))
from compile_gateway import HOT_MODULES


def build_is_current() -> bool:
    check = [sys.executable, str(REPO_ROOT / "scripts" / "compile_gateway.py"), "--check"]
    return subprocess.run(check, check=False).returncode == 0


def expected_build() -> str:
    """What a gateway's log calls the build it should run, as GATEWAY_COMPILED asks."""
    wanted = os.environ.get("GATEWAY_COMPILED", "auto")
    return "compiled" if wanted == "1" or (wanted == "auto" and build_is_current()) else "as Python"


def test_a_gateway_runs_the_build_gateway_compiled_asks_for_and_relays_with_it(gateway: Gateway) -> None:
    build = expected_build()
    answer = gateway.openai().chat.completions.create(
        model="sim", messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    assert answer.usage is not None and answer.usage.completion_tokens == 3
    assert f"(request path {build})" in gateway.log_text()
    if build == "compiled":  # and each module of the request path is an extension there
        for module in HOT_MODULES:
            folder = vllm_api_server.BUILD_DIR / "vllm_gateway" / Path(module).parent
            assert list(folder.glob(f"{Path(module).stem}.cpython-*.so")), module


def test_every_worker_of_a_gateway_runs_the_build_gateway_compiled_asks_for(
    tmp_path: Path, simulator: Simulator, redis_url: str
) -> None:
    # Its workers import the package afresh, from the import path the gateway had: this module put the
    # sources first on the tests' own (importing compile_gateway), which must not decide it.
    build = expected_build()
    backend = Backend("sim", simulator.base_url, path="/models/sim")
    env = {"GATEWAY_WORKERS": "2", "GATEWAY_REDIS_URL": redis_url}
    with Gateway.start(tmp_path, [backend], env=env) as gateway:
        listening = wait_until(
            lambda: (
                len(lines := [line for line in gateway.log_text(settle=0).splitlines() if "listening" in line]) == 2
                and lines
            ),
            timeout=30,
        )
    assert all(f"(request path {build})" in line for line in listening), listening


def test_every_hot_module_is_a_module_of_the_package() -> None:
    for module in HOT_MODULES:
        assert (REPO_ROOT / "vllm_gateway" / module).is_file(), module


# -- vllm_api_server.choose_build, on a package and a build of its own --


@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    source = tmp_path / "vllm_gateway"
    source.mkdir()
    (source / "proxy.py").write_text("RELAY = 1\n")
    monkeypatch.setattr(vllm_api_server, "SOURCE_DIR", source)
    monkeypatch.setattr(vllm_api_server, "BUILD_DIR", tmp_path / "build")
    monkeypatch.setattr(sys, "path", list(sys.path))
    return source


def make_build(digest: str) -> None:
    vllm_api_server.BUILD_DIR.mkdir()
    (vllm_api_server.BUILD_DIR / vllm_api_server.SOURCE_STAMP).write_text(digest + "\n")


def test_a_build_of_the_current_sources_goes_first_on_the_import_path(
    package: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_build(vllm_api_server.source_digest())
    monkeypatch.delenv("GATEWAY_COMPILED", raising=False)
    vllm_api_server.choose_build()
    assert sys.path[0] == str(vllm_api_server.BUILD_DIR)


def test_a_build_of_older_sources_is_passed_over_with_a_warning(
    package: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    make_build(vllm_api_server.source_digest())
    (package / "proxy.py").write_text("RELAY = 2\n")  # edited since the build
    monkeypatch.setenv("GATEWAY_COMPILED", "auto")
    vllm_api_server.choose_build()
    assert str(vllm_api_server.BUILD_DIR) not in sys.path
    assert "older than the sources" in capsys.readouterr().err


@pytest.mark.parametrize("build", ["missing", "stale"])
def test_gateway_compiled_1_refuses_to_run_without_a_current_build(
    package: Path, monkeypatch: pytest.MonkeyPatch, build: str
) -> None:
    if build == "stale":
        make_build("0" * 64)
    monkeypatch.setenv("GATEWAY_COMPILED", "1")
    with pytest.raises(SystemExit, match="missing" if build == "missing" else "older than the sources"):
        vllm_api_server.choose_build()


def test_gateway_compiled_0_runs_the_sources_even_beside_a_current_build(
    package: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_build(vllm_api_server.source_digest())
    monkeypatch.setenv("GATEWAY_COMPILED", "0")
    vllm_api_server.choose_build()
    assert str(vllm_api_server.BUILD_DIR) not in sys.path


def test_gateway_compiled_takes_auto_1_or_0_only(package: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_COMPILED", "yes")
    with pytest.raises(SystemExit, match="auto, 1 or 0"):
        vllm_api_server.choose_build()


def test_the_compiled_build_finds_the_checkout_it_was_built_in(tmp_path: Path) -> None:
    # Defaults such as the key file, logs/ and run/ hang off the checkout, not off the package's copy.
    (tmp_path / "vllm_api_server.py").write_text("")
    built = tmp_path / ".build" / "compiled" / "vllm_gateway"
    built.mkdir(parents=True)
    (tmp_path / "vllm_gateway").mkdir()
    assert checkout_of(built) == tmp_path
    assert checkout_of(tmp_path / "vllm_gateway") == tmp_path


def test_the_log_writer_and_its_event_handler_leave_no_weak_reference_behind_once_freed(tmp_path: Path) -> None:
    # threading keeps a weak reference to every thread and logging one to every handler. A compiled
    # subclass of a Python class left those dangling once freed, and the next garbage collection
    # crashed the process (a gateway made in the tests' own process, then another).
    import vllm_gateway.access_log as access_log

    assert access_log.__file__.endswith(".so") == (expected_build() == "compiled")
    writer = access_log.LogWriter(tmp_path / "gateway.log", 1_000_000, 1)
    writer.start()
    handler = access_log.EventHandler(writer)  # logging takes its weak reference to it here
    handler_reference = weakref.ref(handler)
    writer.stop()
    del writer, handler
    gc.collect()
    assert handler_reference() is None
