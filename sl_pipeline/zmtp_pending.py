"""Connections still in the ZMTP handshake: how many a listener holds, and from whom.

Anyone who reaches a worker's port may open a connection, and holds it (and one of the
worker's file descriptors) until the handshake's 15 s are up. Nothing bounded how many:
strangers holding more connections than the worker had descriptors (1,024 is the common
default) left it unable to accept its clients' connections or open a file. So:

- one address (an IPv6 address's /64) holds at most :data:`PER_ADDRESS` of them; the next
  is closed as it is accepted;
- all addresses together hold at most :data:`MAX_PENDING`, and never more than a quarter
  of the process's descriptor limit; at the bound, the oldest connection of the address
  holding the most goes, so a flood from a few addresses cannot push out a client's
  handshake from an address of its own (an honest handshake takes milliseconds).

Pure: identities and addresses in, decisions out; :mod:`sl_pipeline.zmtp_router` closes.
"""

from __future__ import annotations

import ipaddress
import resource

PER_ADDRESS = 32
MAX_PENDING = 256


def source_of(address: str) -> str:
    """Who holds connections: the address, or an IPv6 address's /64 (one host holds it)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if ip.version == 4:
        return address
    mapped = ip.ipv4_mapped  # type: ignore[union-attr]
    return str(mapped) if mapped else str(ipaddress.IPv6Network(f"{address}/64", False))


def descriptor_share() -> int:
    """A quarter of the descriptors this process may open now (it may change at run time)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return MAX_PENDING if soft == resource.RLIM_INFINITY else max(1, soft // 4)


class PendingHandshakes:
    """The connections of each source that have not finished their handshake, oldest first."""

    def __init__(self, per_address: int = PER_ADDRESS, max_pending: int = MAX_PENDING) -> None:
        self.per_address, self.max_pending = per_address, max_pending
        self._by_source: dict[str, dict[bytes, None]] = {}  # in the order they came
        self._source: dict[bytes, str] = {}

    def __len__(self) -> int:
        return len(self._source)

    def open(self, identity: bytes, address: str) -> tuple[bool, bytes | None]:
        """A new connection: (whether it may stay, the connection to close to make room)."""
        source = source_of(address)
        mine = self._by_source.get(source, {})
        if len(mine) >= self.per_address:
            return False, None
        evicted = None
        if len(self._source) >= min(self.max_pending, descriptor_share()):
            most = max(self._by_source.values(), key=len)
            evicted = next(iter(most))
            self.close(evicted)
        self._by_source.setdefault(source, {})[identity] = None
        self._source[identity] = source
        return True, evicted

    def close(self, identity: bytes) -> None:
        """The connection finished its handshake, or closed: it holds no place any more."""
        source = self._source.pop(identity, None)
        if source is None:
            return
        held = self._by_source[source]
        del held[identity]
        if not held:
            del self._by_source[source]
