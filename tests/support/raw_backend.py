"""A backend written by hand for tests that need bytes no real server sends: a socket on a free port
whose connections are each answered by `connection()` in a thread of its own."""

from __future__ import annotations

import socket
import threading


class ThreadedBackend:
    """Listens on 127.0.0.1 (`url`); subclasses answer each accepted connection in connection()."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def connection(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.sock.close()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self.connection, args=(conn,), daemon=True).start()
