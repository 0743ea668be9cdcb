"""Every README example marked `<!-- tested: ... -->` runs as printed against the shipped config in
--simulate mode: the whole stack started by start_all_services.sh, the example run by bash with the
first-start admin key in $KEY. Only the port differs: the test's gateway listens on a free one."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from tests.support.fleet import Fleet
from tests.support.processes import REPO_ROOT, free_port

MARKER = "<!-- tested: tests/test_readme_examples.py -->"
BLOCK = re.compile(re.escape(MARKER) + r"\s*```bash\n(.*?)```", re.S)


def readme_examples() -> list[str]:
    return BLOCK.findall((REPO_ROOT / "README.md").read_text())


def test_the_readme_marks_its_examples():
    assert len(readme_examples()) >= 4


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """The shipped vllm_model_configs.sh with free ports, started as the README's first command does."""
    root = tmp_path_factory.mktemp("readme")
    fleet = Fleet(root)
    config = (REPO_ROOT / "vllm_model_configs.sh").read_text()
    config = re.sub(r"\bport=800\d\b", lambda _: f"port={free_port()}", config)
    fleet.write_config(config)
    gateway_port = free_port()
    (root / "gateway.env").write_text("")
    fleet.env.update(
        {
            "GATEWAY_PORT": str(gateway_port),
            "GATEWAY_HOST": "127.0.0.1",
            "GATEWAY_KEY_FILE": str(root / "api_keys.json"),
            "GATEWAY_ENV_FILE": str(root / "gateway.env"),
            "GATEWAY_HEALTH_INTERVAL": "0.5",
        }
    )
    try:
        started = fleet.run("start_all_services.sh", "--simulate", "--wait", timeout=180)
        assert started.returncode == 0, started.stderr
        key = re.search(r"^\s+(sk-\S+)$", started.stdout, re.MULTILINE)
        assert key, started.stdout
        yield fleet, gateway_port, key.group(1)
    finally:
        fleet.run("stop_all_services.sh")
        fleet.stop_everything()


@pytest.mark.parametrize("index", range(len(readme_examples())))
def test_readme_example_runs_as_printed(stack, index):
    fleet, port, key = stack
    example = readme_examples()[index].replace("localhost:1024", f"localhost:{port}")
    env = {**os.environ, **fleet.env, "KEY": key}
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", example], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"{example}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    assert '"error"' not in result.stdout, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stdout.strip(), "the example printed nothing"
