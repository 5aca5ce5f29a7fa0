"""Free TCP ports for generated deployments, never the same one twice in a process.

A port is "free" only until someone binds it: ``init`` picks every port of a deployment
before any worker binds one, and the kernel, asked for a free port (``bind`` to port 0),
picks at random and may offer a port it offered a moment ago (about one pair in ten
thousand: measured, 12 of 20,000 four-port picks held a repeat). Two workers of one
deployment would then share a port, and the second to start fails with "address already
in use". So each process remembers the ports it handed out and never hands one out again.

A process can also pick from a range of its own (:func:`use_port_range`): processes that
pick ports side by side on one machine (the test suite's parallel workers) then cannot
offer each other's ports, and a range below the kernel's ephemeral range
(``net.ipv4.ip_local_port_range``) is never taken by an outgoing connection's source port.
"""

from __future__ import annotations

import random
import socket
import threading

_lock = threading.Lock()
_handed_out: set[int] = set()
_range: tuple[int, int] | None = None  # None: the kernel picks (bind to port 0)
MAX_TRIES = 200


def use_port_range(low: int, high: int) -> None:
    """Pick ports from ``low``..``high`` (inclusive) in this process from now on."""
    if not 1024 <= low <= high <= 65535:
        raise ValueError(f"port range {low}-{high}: expected 1024 <= low <= high <= 65535")
    global _range
    with _lock:
        _range = (low, high)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that is free now and that this process has not handed out
    before (see the module's note)."""
    with _lock:
        for _ in range(MAX_TRIES):
            port = _try_port(host, 0 if _range is None else random.randint(*_range))
            if port is not None and port not in _handed_out:
                _handed_out.add(port)
                return port
    where = "the kernel's range" if _range is None else f"{_range[0]}-{_range[1]}"
    raise OSError(f"no free TCP port on {host} in {where} after {MAX_TRIES} tries")


def _try_port(host: str, port: int) -> int | None:
    """``port`` (0: one the kernel picks) if it can be bound on ``host`` now, else None."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return None
        return int(sock.getsockname()[1])
