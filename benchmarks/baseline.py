"""The code of the `baseline` target: a detached git worktree of another revision of this repository, so
that the gateway of that revision runs beside this one, with the same interpreter, in the same run.

A regression shows as a ratio within one run; figures remembered from another day on a shared machine
move more than the regressions being looked for.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Checkout:
    path: Path  # the worktree: run its vllm_api_server.py with it as the working directory
    commit: str  # full hash
    short: str  # the short hash the report labels the target with


def git(directory: Path, *argv: str) -> str:
    done = subprocess.run(["git", "-C", str(directory), *argv], capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"git {' '.join(argv)} (in {directory}) failed: {done.stderr.strip()}")
    return done.stdout.strip()


def resolve(repo: Path, rev: str) -> str:
    """The full hash of the commit `rev` names (a hash, a branch, a tag, HEAD~3)."""
    try:
        return git(repo, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}")
    except RuntimeError:
        raise RuntimeError(f"--baseline {rev}: no such commit in this repository") from None


def _worktree_of(path: Path, repo: Path) -> bool:
    """Whether `path` is the top of a worktree of `repo`'s repository. A plain folder inside the repository
    is not (git would act on the enclosing checkout), nor is a clone from elsewhere."""
    try:
        top = git(path, "rev-parse", "--show-toplevel")
        theirs = git(path, "rev-parse", "--path-format=absolute", "--git-common-dir")
        ours = git(repo, "rev-parse", "--path-format=absolute", "--git-common-dir")
    except RuntimeError:
        return False
    return Path(top).resolve() == path.resolve() and Path(theirs).resolve() == Path(ours).resolve()


def checkout(repo: Path, rev: str, path: Path) -> Checkout:
    """A detached worktree of `rev` at `path`: reused when it is there at that commit with nothing changed,
    moved there when it is at another, created when there is none."""
    commit = resolve(repo, rev)
    path = path.resolve()
    # A worktree whose folder was deleted stays registered and would block `worktree add` on its path.
    git(repo, "worktree", "prune")
    if path.exists() and not _worktree_of(path, repo):
        shutil.rmtree(path)
    if path.exists():
        changed = git(path, "status", "--porcelain", "--untracked-files=no")
        if git(path, "rev-parse", "HEAD") != commit or changed:
            git(path, "checkout", "--quiet", "--detach", "--force", commit)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        git(repo, "worktree", "add", "--quiet", "--detach", str(path), commit)
    return Checkout(path, commit, git(repo, "rev-parse", "--short", commit))


def build_request_path(tree: Path, python: str) -> bool:
    """Compile `tree`'s request path with mypyc as scripts/install.sh ships it, so that its gateway runs
    as its users run it: this checkout's (a build older than the sources would run as Python, silently)
    and the baseline's alike. False for a revision from before the compiled build."""
    script = tree / "scripts" / "compile_gateway.py"
    if not script.exists():
        return False
    done = subprocess.run([python, str(script)], cwd=tree, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"compiling the request path of {tree} failed:\n{done.stdout}{done.stderr}")
    return True
