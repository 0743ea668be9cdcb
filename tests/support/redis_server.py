"""A redis-server of a test's own, which the test may stop and start again on the same port, or pause
(a Redis that accepts connections and answers nothing, like one cut off by the network)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import time
from pathlib import Path

from tests.support.processes import ProcessHandle, free_port, start_process


class Redis:
    """A redis-server of our own, on a port that stays the same when it restarts."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.handle: ProcessHandle | None = None

    def start(self) -> None:
        server = shutil.which("redis-server")
        assert server, "redis-server is missing: scripts/install_test_deps.sh installs it"
        argv = [server, "--port", str(self.port), "--save", "", "--appendonly", "no", "--dir", str(self.directory)]
        self.handle = start_process(argv, log_path=self.directory / "redis.log")
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                assert time.monotonic() < deadline, self.handle.log_tail()
                time.sleep(0.05)

    def stop(self) -> None:
        if self.handle is not None:
            self.resume()
            self.handle.stop()
            self.handle = None

    def pause(self) -> None:
        assert self.handle is not None
        os.kill(self.handle.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.handle is not None:
            os.kill(self.handle.pid, signal.SIGCONT)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/2"
