"""vllm_fleet's entry and its protocol with lib.sh: the config document in, NUL-terminated fields out.

The commands run as lib.sh runs them, `python3 vllm_fleet COMMAND` with the machine's python3.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.processes import REPO_ROOT, free_port
from vllm_fleet.config import MODEL_KEYS
from vllm_fleet.document import ConfigDocument, DocumentError, decode_fields, read_document, write_document

PACKAGE = REPO_ROOT / "vllm_fleet"
PYTHON3 = shutil.which("python3") or "python3"


def fleet_command(
    *args: str, document: ConfigDocument | None = None, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    stdin = write_document(document) if document is not None else b""
    clean = {name: value for name, value in os.environ.items() if not name.startswith("VLLM_")}
    return subprocess.run(
        [PYTHON3, str(PACKAGE), *args],
        input=stdin,
        capture_output=True,
        cwd=cwd,
        env={**clean, **(env or {})},
        timeout=60,
        check=False,
    )


def pairs(output: bytes) -> dict[str, str]:
    fields = decode_fields(output)
    return {fields[k]: fields[k + 1] for k in range(0, len(fields), 2)}


def test_the_document_carries_any_byte_but_nul() -> None:
    document = ConfigDocument(
        file="/c.sh",
        calls=[["name=a\tb", "env=x\ny", "path=/\udcff"], []],
        bindings=["0=0-15"],
        variables={"MODEL_ROOT": ""},
        evaluated=False,
    )
    data = write_document(document)
    assert b"path=/\xff\0" in data  # the byte bash had, not its UTF-8 escape
    assert read_document(data) == document


@pytest.mark.parametrize("data", [b"file", b"model\x002\x00name=a\x00", b"model\x00two\x00", b"colour\x00red\x00"])
def test_a_document_lib_sh_would_not_write_is_refused(data: bytes) -> None:
    with pytest.raises(DocumentError):
        read_document(data)


def test_models_prints_every_key_of_each_model_and_the_settings_bash_uses() -> None:
    document = ConfigDocument(
        file="/c.sh",
        calls=[["name=a", "path=/m", "port=9001", "gpus=0,1"], ["name=far", "url=http://h:1"]],
        variables={"VLLM_HOST": "0.0.0.0"},
    )
    result = fleet_command("models", "--log-dir", "/logs", document=document)
    assert result.returncode == 0, result.stderr
    values = pairs(result.stdout)
    assert (values["VLLM_HOST"], values["VLLM_START_INTERVAL"], values["models"]) == ("0.0.0.0", "15", "2")
    assert {key for key in values if key.startswith("0.")} == {
        f"0.{key}" for key in (*MODEL_KEYS, "log_path", "base_url", "config_line")
    }
    assert (values["0.id"], values["0.tensor_parallel_size"], values["0.log_path"], values["0.base_url"]) == (
        "a",
        "2",
        "/logs/a_vllm.log",
        "http://127.0.0.1:9001",
    )
    assert (values["1.log_path"], values["1.base_url"]) == ("", "http://h:1")
    # The console's config line: the keys given and the defaults filled, in the keys' order.
    assert values["0.config_line"] == (
        "name=a id=a path=/m port=9001 gpus=0,1 device=gpu tensor_parallel_size=2 log=a_vllm.log idle=none"
    )


def test_models_refuses_a_bad_config_with_one_prefixed_line_each_and_exit_2() -> None:
    document = ConfigDocument(file="/c.sh", calls=[["name=a", "path=/m", "port=9001", "gpu=0"], ["path=/\udcff"]])
    result = fleet_command("models", document=document)
    assert result.returncode == 2 and result.stdout == b""
    assert result.stderr == (
        b"vllm_model_configs: model #1 (a): unknown key 'gpu' (did you mean gpus?)\n"
        b"vllm_model_configs: model #2: no name=\n"
        b"vllm_model_configs: model #2: no port=\n"
    )


def test_the_environment_and_the_files_variables_both_reach_the_rules() -> None:
    document = ConfigDocument(
        file="/c.sh", calls=[["name=a", "path=/m", "port=9001"]], variables={"VLLM_START_INTERVAL": "7"}
    )
    result = fleet_command("models", document=document, env={"VLLM_HOST": "10.1.1.1"})
    values = pairs(result.stdout)
    assert (values["VLLM_HOST"], values["VLLM_START_INTERVAL"], values["0.base_url"]) == (
        "10.1.1.1",
        "7",
        "http://10.1.1.1:9001",
    )


PORT = str(free_port())


def simulated() -> ConfigDocument:
    return ConfigDocument(
        file="/c.sh", calls=[["name=big", "path=/no/weights", f"port={PORT}", "gpus=0,1", "api_key=k"]]
    )


def test_plan_reads_back_as_each_models_place_warning_logged_command_and_argv() -> None:
    result = fleet_command("plan", "--simulate", "--python", "/venv/bin/python", "0", document=simulated())
    assert result.returncode == 0, result.stderr
    fields = decode_fields(result.stdout)
    index, place_text, warning, logged, count, *argv = fields
    assert (index, place_text, warning) == ("0", "unbound", "")
    assert int(count) == len(argv) and argv[:2] == ["setsid", "env"]
    assert argv[argv.index("/venv/bin/python") :][:3] == ["/venv/bin/python", "-m", "vllm_simulator"]
    assert logged.endswith(f"--port {PORT} \\\n  >> logs/big_vllm.log 2>&1 < /dev/null &")
    assert "k" not in argv  # the key goes in the server's environment, never on its command line


def test_plan_dry_run_prints_a_script_that_starts_in_the_repo() -> None:
    result = fleet_command("plan", "--simulate", "--dry-run", "--repo", "/srv/my repo", "0", document=simulated())
    lines = result.stdout.decode().splitlines()
    assert lines[:2] == ["cd '/srv/my repo'", f"# big: big on port {PORT}, GPUs 0,1, unbound"]
    assert "--api-key" not in result.stdout.decode() and "VLLM_API_KEY" not in result.stdout.decode()


def test_plan_stops_on_a_machine_problem_with_the_scripts_prefix_and_exit_2() -> None:
    result = fleet_command(
        "plan",
        "--prog",
        "start_all_models",
        "0",
        document=ConfigDocument(
            file="/c.sh", calls=[["name=a", "path=/no/such/weights", f"port={PORT}", "device=cpu"]]
        ),
    )
    assert result.returncode == 2 and result.stdout == b""
    assert result.stderr.decode().splitlines() == [
        "start_all_models: model a: model path /no/such/weights does not exist",
        "start_all_models: error: nothing was started",
    ]


def test_plan_of_no_model_checks_nothing() -> None:
    result = fleet_command("plan", "--dry-run", "--repo", "/r", document=simulated())
    assert (result.returncode, result.stdout, result.stderr) == (0, b"cd /r\n", b"")


def test_print_command_quotes_like_the_dry_runs() -> None:
    result = fleet_command("print-command", "--", "export", "GATEWAY_X=a b")
    assert result.stdout == b"export 'GATEWAY_X=a b'\n"
    result = fleet_command("print-command", "--log", "/l", "--", "setsid", "python3", "-m", "x")
    assert result.stdout == b"setsid python3 -m x \\\n  >> /l 2>&1 < /dev/null &\n"


def test_the_entry_runs_from_any_directory_and_ignores_a_vllm_fleet_found_there(tmp_path: Path) -> None:
    impostor = tmp_path / "vllm_fleet"
    impostor.mkdir()
    (impostor / "__init__.py").write_text("raise SystemExit('the wrong vllm_fleet')\n")
    result = fleet_command("print-command", "--", "ok", cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)})
    assert (result.returncode, result.stdout) == (0, b"ok\n"), result.stderr


@pytest.mark.parametrize("command", ["models", "plan", "print-command", "placement"])
def test_every_command_explains_itself_with_help(command: str) -> None:
    result = fleet_command(command, "--help")
    assert result.returncode == 0
    assert result.stdout.startswith(f"usage: vllm_fleet {command}".encode())


def keyed_document(*api_keys: str) -> ConfigDocument:
    """One simulated model per api_key= word ("" for none given), each on a port of its own."""
    calls = []
    for number, api_key in enumerate(api_keys):
        words = [f"name=m{number}", "path=/no/weights", f"port={free_port()}"]
        calls.append([*words, f"api_key={api_key}"] if api_key else words)
    return ConfigDocument(file="/c.sh", calls=calls)


def test_plan_makes_each_model_a_key_of_its_own_at_its_first_start_and_keeps_it(tmp_path) -> None:
    document = keyed_document("", "")
    planned = fleet_command("plan", "--simulate", "--run-dir", str(tmp_path), "0", "1", document=document)
    first = [(tmp_path / f"m{number}.api_key").read_text().strip() for number in (0, 1)]
    modes = [(tmp_path / f"m{number}.api_key").stat().st_mode & 0o777 for number in (0, 1)]
    records = [json.loads((tmp_path / f"m{number}.launch.json").read_text()) for number in (0, 1)]
    again = fleet_command("plan", "--simulate", "--run-dir", str(tmp_path), "0", "1", document=document)
    second = [(tmp_path / f"m{number}.api_key").read_text().strip() for number in (0, 1)]

    assert planned.returncode == 0 and again.returncode == 0, planned.stderr
    assert len(first[0]) >= 40 and first[0] != first[1]  # random, one per model
    assert modes == [0o600, 0o600]
    assert second == first  # kept: restarts and the gateway agree on it
    assert [record["keyed"] for record in records] == [True, True]
    assert not any(key in json.dumps(record) for key in first for record in records)


def test_plan_takes_a_configured_key_and_makes_none_for_api_key_none(tmp_path) -> None:
    result = fleet_command(
        "plan", "--simulate", "--run-dir", str(tmp_path), "0", "1", document=keyed_document("sk-mine", "none")
    )
    records = [json.loads((tmp_path / f"m{number}.launch.json").read_text()) for number in (0, 1)]

    assert result.returncode == 0, result.stderr
    assert (tmp_path / "m0.api_key").read_text() == "sk-mine\n"
    assert not (tmp_path / "m1.api_key").exists()
    assert [record["keyed"] for record in records] == [True, False]
    assert "sk-mine" not in json.dumps(records[0])
