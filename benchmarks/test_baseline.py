"""The baseline target's worktree (baseline.py): at the commit --baseline names, reused or moved on later
runs, and the gateway started from it runs that checkout's code, not the installed one.

    .venv/bin/pytest benchmarks/test_baseline.py
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from baseline import build_request_path, checkout, git
from servers import REPO, start_gateway


def commit_file(repo: Path, text: str) -> str:
    (repo / "version.txt").write_text(text)
    git(repo, "add", "version.txt")
    git(repo, "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-q", "-m", text)
    return git(repo, "rev-parse", "HEAD")


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    path = tmp_path / "repo"
    path.mkdir()
    git(path, "init", "-q")
    return path


def test_worktree_is_checked_out_detached_at_the_commit_the_revision_names(repo, tmp_path):
    first = commit_file(repo, "one")
    commit_file(repo, "two")

    tree = checkout(repo, "HEAD~1", tmp_path / "tree")

    assert tree.commit == first
    assert tree.short == git(repo, "rev-parse", "--short", first)
    assert (tree.path / "version.txt").read_text() == "one"
    assert git(tree.path, "rev-parse", "HEAD") == first
    assert git(tree.path, "branch", "--show-current") == ""  # detached: no branch is taken from the repo
    assert (repo / "version.txt").read_text() == "two"  # the repository's own checkout is untouched


def test_worktree_is_reused_at_the_same_commit_and_moved_to_another(repo, tmp_path):
    first = commit_file(repo, "one")
    second = commit_file(repo, "two")
    tree = checkout(repo, first, tmp_path / "tree")
    leftover = tree.path / "left-by-the-last-run"
    leftover.write_text("")

    again = checkout(repo, first[:7], tmp_path / "tree")
    assert again.path == tree.path and leftover.exists()  # the same folder, not made anew

    (tree.path / "version.txt").write_text("edited by hand")
    assert (checkout(repo, first, tmp_path / "tree").path / "version.txt").read_text() == "one"

    moved = checkout(repo, second, tmp_path / "tree")
    assert moved.commit == second
    assert (moved.path / "version.txt").read_text() == "two"
    assert git(moved.path, "rev-parse", "HEAD") == second


def test_worktree_whose_folder_was_deleted_is_made_again(repo, tmp_path):
    first = commit_file(repo, "one")
    shutil.rmtree(checkout(repo, first, tmp_path / "tree").path)

    tree = checkout(repo, first, tmp_path / "tree")

    assert (tree.path / "version.txt").read_text() == "one"


def test_folder_of_another_repository_in_the_way_is_replaced(repo, tmp_path):
    first = commit_file(repo, "one")
    stranger = tmp_path / "tree"
    stranger.mkdir()
    git(stranger, "init", "-q")

    tree = checkout(repo, first, stranger)

    assert git(tree.path, "rev-parse", "HEAD") == first


def test_plain_folder_in_the_way_inside_the_repository_is_replaced_and_the_repository_left_alone(repo):
    first = commit_file(repo, "one")
    commit_file(repo, "two")
    plain = repo / "work" / "tree"
    plain.mkdir(parents=True)
    (plain / "stale").write_text("")

    tree = checkout(repo, first, plain)

    assert git(tree.path, "rev-parse", "--show-toplevel") == str(plain.resolve())
    assert (tree.path / "version.txt").read_text() == "one" and not (plain / "stale").exists()
    assert git(repo, "rev-parse", "HEAD") != first
    assert (repo / "version.txt").read_text() == "two"


def test_unknown_revision_is_a_clear_error(repo, tmp_path):
    commit_file(repo, "one")
    with pytest.raises(RuntimeError, match="--baseline no-such-branch: no such commit"):
        checkout(repo, "no-such-branch", tmp_path / "tree")
    assert not (tmp_path / "tree").exists()


def test_gateway_started_from_the_worktree_runs_the_worktree_code(tmp_path):
    tree = checkout(REPO, "HEAD", tmp_path / "tree")
    try:
        # Lines only this checkout has: each process that imports its package says so, in a file named by
        # its pid.
        init = tree.path / "vllm_gateway" / "__init__.py"
        marker = tmp_path / "imported-by"
        marker.mkdir()
        init.write_text(
            init.read_text() + "\nimport os as _os\n"
            "if _os.environ.get('BENCH_MARKER'):\n"
            "    with open(_os.path.join(_os.environ['BENCH_MARKER'], str(_os.getpid())), 'w') as _f:\n"
            "        _f.write(__file__)\n"
        )
        gateway = start_gateway(
            tmp_path / "gateway",
            sys.executable,
            {"bench": "http://127.0.0.1:9"},
            None,
            # Another tree's package, not the one scripts/test.sh measures: no coverage for it.
            overrides={"BENCH_MARKER": str(marker), "GATEWAY_COVERAGE_HOOK": ""},
            repo=tree.path,
        )
        gateway.child.stop()
        assert str(gateway.child.pid) in {path.name for path in marker.iterdir()}
        assert {Path(path.read_text()) for path in marker.iterdir()} == {init}
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree.path)], check=False)


def test_a_revision_that_compiles_its_request_path_is_built_with_its_own_script_and_an_older_one_is_not(repo, tmp_path):
    older = checkout(repo, commit_file(repo, "before mypyc"), tmp_path / "older")
    (repo / "scripts").mkdir()
    # The revision's own build script, run in its tree with the interpreter given: here it leaves a note.
    (repo / "scripts" / "compile_gateway.py").write_text(
        "import pathlib, sys\npathlib.Path('built-by').write_text(sys.executable)\n"
    )
    git(repo, "add", "scripts")
    git(repo, "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-q", "-m", "mypyc")
    newer = checkout(repo, "HEAD", tmp_path / "newer")

    assert build_request_path(older.path, sys.executable) is False
    assert build_request_path(newer.path, sys.executable) is True
    assert (newer.path / "built-by").read_text() == sys.executable
    assert not (older.path / "built-by").exists()


def test_a_build_that_fails_is_a_clear_error(repo, tmp_path):
    (repo / "scripts").mkdir()
    (repo / "scripts" / "compile_gateway.py").write_text("raise SystemExit('no compiler here')\n")
    git(repo, "add", "scripts")
    git(repo, "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-q", "-m", "mypyc")
    tree = checkout(repo, "HEAD", tmp_path / "tree")
    with pytest.raises(RuntimeError, match="no compiler here"):
        build_request_path(tree.path, sys.executable)
