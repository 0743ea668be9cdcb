"""How many client connections one gateway process may hold: what its file-descriptor limit leaves
after its upstream connections, its log, its key file and its listening sockets."""

from __future__ import annotations

import resource

# Descriptors kept aside for everything that is not a connection: the log and its lock, the key file
# and its lock, listening sockets, the event loop's own, health probes, a parser process's pipes.
RESERVED_DESCRIPTORS = 64


def raise_open_files_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (worker processes inherit it); the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass  # some sandboxes refuse it; the derived cap then fits the soft limit
    return soft


def default_max_connections(open_files: int, concurrency_limit: int) -> int:
    """A relayed request holds an upstream connection beside its client's, and at most
    `concurrency_limit` are relayed at once; the idle pool only keeps connections that were once in
    use together, so upstream connections never outnumber the clients, nor that limit."""
    budget = open_files - RESERVED_DESCRIPTORS
    return max(1, budget - min(concurrency_limit, budget // 2))


def current_open_files_limit() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20
