"""Coverage for the suite's subprocesses, from the moment one imports vllm_gateway.

scripts/test.sh measures vllm_gateway (pyproject.toml's [tool.coverage.run] source) in every process the
tests start: gateways, their workers, the key CLI, pytest's own workers. Coverage's own way, its
`patch = ["subprocess"]`, starts it in every Python process, and that costs about 0.1 s of CPU each: its
import and its start. Most of the suite's processes never import vllm_gateway (the fleet's commands, the
simulators, the helpers of the shell scripts), so they had nothing to measure and paid it all the same:
about 1,300 processes, two minutes of CPU of the parallel phase on two cores.

scripts/test.sh installs a .pth file into .venv that runs this file at every start of .venv's Python where
GATEWAY_COVERAGE_HOOK names it (and only there). It puts a finder first in sys.meta_path; the first import
of vllm_gateway, or of one of its modules, starts coverage with the config file that GATEWAY_COVERAGE_CONFIG
names, before that module's first line runs. A process already measured (`coverage run`) is left as it is.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType

PACKAGE = "vllm_gateway"


def start_coverage() -> None:
    import coverage

    # Set, it says a start is under way: coverage looks up the package while it starts, which comes back here.
    if coverage.Coverage.current() is not None or "COVERAGE_PROCESS_START" in os.environ:
        return
    # process_startup reads its config from COVERAGE_PROCESS_START; taken away again at once, since the
    # .pth coverage installs would otherwise start it at the very start of every child process.
    os.environ["COVERAGE_PROCESS_START"] = os.environ["GATEWAY_COVERAGE_CONFIG"]
    try:
        coverage.process_startup()
    finally:
        os.environ.pop("COVERAGE_PROCESS_START", None)


class StartCoverageOnGatewayImport:
    """A meta-path finder that finds nothing: it only notices the first import of the package."""

    def find_spec(
        self, name: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if name == PACKAGE or name.startswith(PACKAGE + "."):
            sys.meta_path.remove(self)
            start_coverage()
        return None


def install() -> None:
    # By name: the site module may run the .pth file twice (a venv's lib64 is a link to its lib), and each
    # run defines the class anew.
    if not any(type(finder).__name__ == StartCoverageOnGatewayImport.__name__ for finder in sys.meta_path):
        sys.meta_path.insert(0, StartCoverageOnGatewayImport())


if os.environ.get("GATEWAY_COVERAGE_CONFIG"):
    install()
