"""A table with a bound on its number of entries, for state that peers' messages create.

Every per-name table a peer can grow (the server's reply cache, a relay's cache, queued
requests) is one of these: at the bound it either evicts the least recently used entry or
refuses the newcomer, and reports the hit (``sl_bound_hits_total``) through ``on_hit``.
"""

from __future__ import annotations

import ctypes
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from sl_pipeline.errors import OverloadedError

K = TypeVar("K")
V = TypeVar("V")
# No legitimate ZeroMQ message is this big (messages over a chunk travel chunked): one that
# is was a hostile peer's, and its memory is given back once it is refused and freed.
TRIM_BYTES = 64 * 1024 * 1024


def trim_heap() -> bool:
    """Give freed heap memory back to the OS. glibc keeps large freed blocks in its arenas,
    so a huge message libzmq buffered (thousands of frames, which no socket option bounds)
    would otherwise hold the resident size up long after it was refused and freed."""
    try:
        return bool(ctypes.CDLL(None).malloc_trim(0))
    except (OSError, AttributeError):  # not glibc: nothing to do
        return False


# Freed buffers go back to the OS at least this often, from an idle tick: the 1 MiB buffers
# libzmq fills per connection (half-open strangers' included) stay in glibc's heap otherwise.
# (A fixed mmap threshold did that too, but cost every step of a CIFAR-sized model 50%.)
TRIM_EVERY_S = 5.0


def no_hit() -> None:
    return None


class LruTable(Generic[K, V]):
    """At most ``limit`` entries; reading or writing an entry makes it the most recent."""

    def __init__(self, limit: int, on_hit: Callable[[], None] = no_hit) -> None:
        if limit < 1:
            raise ValueError(f"a bounded table needs a limit of at least 1, got {limit}")
        self.limit = limit
        self.on_hit = on_hit
        self._items: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        """Store ``value``; at the bound the least recently used entry goes."""
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.limit:
            self._items.popitem(last=False)
            self.on_hit()

    def add(self, key: K, value: V, what: str) -> None:
        """Store ``value`` for a new key only while there is room: a full table refuses
        the newcomer (OverloadedError, retryable) instead of pushing out somebody else."""
        if key not in self._items and len(self._items) >= self.limit:
            self.on_hit()
            raise OverloadedError(f"{what}: {self.limit} already waiting; retry later")
        self._items[key] = value

    def pop(self, key: K) -> V | None:
        return self._items.pop(key, None)

    def setdefault(self, key: K, value: V) -> V:
        found = self.get(key)
        if found is None:
            self.put(key, value)
            return value
        return found

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[K]:
        return iter(list(self._items))

    def items(self) -> list[tuple[K, V]]:
        return list(self._items.items())

    def values(self) -> list[V]:
        return list(self._items.values())


class RateLimiter:
    """A token bucket per source (``burst`` at once, ``rate_per_s`` after that), for
    ``limit`` sources at most: the least recently seen source's bucket goes first."""

    def __init__(
        self, rate_per_s: float, burst: int, limit: int = 4096, on_hit: Callable[[], None] = no_hit
    ) -> None:
        self.rate_per_s = rate_per_s
        self.burst = max(1, burst)
        self.on_hit = on_hit
        self._buckets: LruTable[str, tuple[float, float]] = LruTable(limit)

    def ready(self, source: str, now_s: float) -> bool:
        """Whether :meth:`allow` would say yes now (it takes no token)."""
        tokens, then = self._buckets.get(source) or (float(self.burst), now_s)
        return min(float(self.burst), tokens + (now_s - then) * self.rate_per_s) >= 1.0

    def allow(self, source: str, now_s: float) -> bool:
        tokens, then = self._buckets.get(source) or (float(self.burst), now_s)
        tokens = min(float(self.burst), tokens + (now_s - then) * self.rate_per_s)
        if tokens < 1.0:
            self._buckets.put(source, (tokens, now_s))
            self.on_hit()
            return False
        self._buckets.put(source, (tokens - 1.0, now_s))
        return True
