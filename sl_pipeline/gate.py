"""The connection gate: only holders of an admitted key get past the ZMTP handshake.

Sans-IO. A check on a message's first frame comes too late for a stranger's 1 GB message,
so the gate runs earlier: a client puts a *connection token* in the ZMTP PLAIN password
(sent before any message), and the listener (``zmtp_router.ZmtpRouter.admit``, as a ZAP
handler would) admits the connection only if the token verifies. A stranger's connection
is closed during the ZMTP handshake, before a single message frame is read.

Token (56 bytes) = ``ts`` (8, seconds, BE) | ``nonce`` (16) | ``HMAC-SHA256(K, ts | nonce)``
with ``K = SHA-256(label | X25519(client static, server static) | client pub | server pub)``:
only the holder of an admitted private key (or of the server's) can make one. A token is
good for :data:`WINDOW_S` either side of the server's clock and opens one connection: a
copy replayed from the wire is refused. The Noise handshake that follows still does the
real authentication; the gate only decides who may make the server buffer anything.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import secrets
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from .keys import KeyPair

USERNAME = b"sl-pipeline/1"
WINDOW_S = 600  # how far apart the client's and the server's clocks may be
TOKEN_BYTES = 56
# Connections one admitted key may open inside one window (20 minutes): far above any honest
# reconnect rate, and it bounds the replay table at this many entries per admitted key.
MAX_TOKENS_PER_KEY = 4096
# Connections one admitted key may hold open at once (the listener refuses the next with a
# ZAP status 300, ZAP_TOO_MANY): a client needs one, and one more while a reconnect overlaps
# its old connection not yet seen closed. Each connection may make a worker buffer up to
# zmtp_router.INBOX_BYTES, so this bounds what one key can hold.
MAX_CONNECTIONS_PER_KEY = 4
ZAP_TOO_MANY = 300
_LABEL = b"sl-pipeline connection gate v1"
_TS = struct.Struct(">Q")


def _gate_key(static: KeyPair, peer: bytes, client: bytes, server: bytes) -> bytes:
    shared = static.private.exchange(X25519PublicKey.from_public_bytes(peer))
    return hashlib.sha256(_LABEL + shared + client + server).digest()


def connect_token(static: KeyPair, server_key: bytes, now_s: float) -> bytes:
    """A fresh token for one connection to the server whose static key is ``server_key``."""
    head = _TS.pack(int(now_s)) + secrets.token_bytes(16)
    key = _gate_key(static, server_key, static.public, server_key)
    return head + hmac.new(key, head, hashlib.sha256).digest()


@dataclass(frozen=True)
class Verdict:
    """The gate's answer: ``key`` is the admitted key that made the token, or None."""

    key: bytes | None
    # "connections" (the listener's: the key holds MAX_CONNECTIONS_PER_KEY open already),
    # "ok", "not_admitted" (no admitted key made it), "stale", "replay", or "rate" (this key
    # opened MAX_TOKENS_PER_KEY connections inside the window)
    reason: str


class Gate:
    """Server side: one shared key per admitted client, computed once at start."""

    def __init__(self, static: KeyPair, admitted: Iterable[bytes]) -> None:
        self._keys = {pub: _gate_key(static, pub, pub, static.public) for pub in admitted}
        self._seen: dict[bytes, bytes] = {}  # nonce -> key, for tokens inside the window
        self._expiry: list[tuple[int, bytes]] = []  # (ts, nonce), a heap: oldest first
        self._live: dict[bytes, int] = {}  # key -> its tokens in the table

    def check(self, username: bytes, token: bytes, now_s: float) -> Verdict:
        if username != USERNAME or len(token) != TOKEN_BYTES:
            return Verdict(None, "not_admitted")
        head, tag = token[:24], token[24:]
        key = next(
            (
                pub
                for pub, secret in self._keys.items()
                if hmac.compare_digest(hmac.new(secret, head, hashlib.sha256).digest(), tag)
            ),
            None,
        )
        if key is None:
            return Verdict(None, "not_admitted")
        (ts,) = _TS.unpack(head[:8])
        if abs(now_s - ts) > WINDOW_S:
            return Verdict(None, "stale")
        self._forget_old(now_s)
        nonce = head[8:]
        if nonce in self._seen:
            return Verdict(None, "replay")
        if self._live.get(key, 0) >= MAX_TOKENS_PER_KEY:
            return Verdict(None, "rate")
        self._seen[nonce] = key
        self._live[key] = self._live.get(key, 0) + 1
        heapq.heappush(self._expiry, (ts, nonce))
        return Verdict(key, "ok")

    def __len__(self) -> int:
        """Tokens remembered (inside the window), for replay checks."""
        return len(self._seen)

    def _forget_old(self, now_s: float) -> None:
        """Drop tokens that left the window: oldest first from the heap, so a check costs
        O(log n) however many tokens a flood put in the table (a scan cost O(n) per check)."""
        while self._expiry and now_s - self._expiry[0][0] > WINDOW_S:
            _, nonce = heapq.heappop(self._expiry)
            key = self._seen.pop(nonce)
            self._live[key] -= 1
            if not self._live[key]:
                del self._live[key]
