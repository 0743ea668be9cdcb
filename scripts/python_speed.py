"""Run by a candidate interpreter for the gateway's virtualenv (scripts/install_lib.sh, pick_python):
prints `EXECUTABLE VERSION MICROSECONDS`, the time this interpreter takes for a fixed piece of
pure-Python work of the kind the relay does per request (calls, dict lookups, bytes joins, f-strings),
best of ROUNDS. Exit status 1 when it cannot make the virtualenv (older than 3.11, or no venv).

Why measure rather than trust the version: the same CPython release runs the gateway about 1.3x faster
when built with profile-guided and link-time optimisation (Debian's and Ubuntu's python3 are; pyenv's
and many hand builds are not), and nothing in sysconfig says reliably how it was built
(docs/performance.md, "Which Python runs the gateway").
"""

from __future__ import annotations

import os
import sys
import time

ROUNDS = 30


def work() -> int:
    headers = {b"content-type": b"application/json", b"authorization": b"Bearer x", b"accept": b"*/*"}
    total = 0
    for i in range(2000):
        name = headers.get(b"content-type", b"")
        line = f"rid={i} status=200 duration_ms={i / 7:.1f} model={name!r}"
        parts = [b"HTTP/1.1 200 OK\r\n", *[k + b": " + v + b"\r\n" for k, v in headers.items()], b"\r\n"]
        total += len(line) + len(b"".join(parts))
    return total


def main() -> int:
    if sys.version_info < (3, 11):  # noqa: UP036 (this runs under any python3 the install finds)
        return 1
    try:
        import ensurepip  # noqa: F401
        import venv  # noqa: F401
    except ImportError:
        return 1
    best = float("inf")
    for _ in range(ROUNDS):
        started = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - started)
    # The executable itself, not the name it was run by: a pyenv shim picks one by the directory, and
    # python3 and python3.11 are often one file.
    print(f"{os.path.realpath(sys.executable)} {sys.version.split()[0]} {best * 1e6:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
