"""Joining a server: the HELLO/WELCOME exchange, carried inside a Noise IK handshake.

Sans-IO: functions take and return frames. The client's hello (name, topology, model
fingerprint, where it stands) travels encrypted in Noise message 1; the server's welcome
(session id, where the server stands) in message 2. A refusal before authentication is a
small plaintext JSON frame: it carries a reason and nothing about the model.

Frames on the wire::

    hello:   [b"sl-hello", b"<protocol version>", b"noise" | b"plain", payload]
    welcome: [b"sl-welcome", payload]
    refuse:  [b"sl-refuse", json {"code", "reason"}]
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .ciphers import DEFAULT_CIPHERS, CipherSuite, check_names, client_check, server_choice
from .crypto import Initiator, PlainSession, Responder, Session
from .errors import CryptoError, PeerError, ProtocolError, ReplayError, SLError, VersionError
from .gate import connect_token
from .keys import KeyPair
from .messages import PROTOCOL_VERSION
from .session import DEFAULT_MAX_FRAMES

HELLO = b"sl-hello"
WELCOME = b"sl-welcome"
REFUSE = b"sl-refuse"
MAX_PAYLOAD = 16 * 1024

AnySession = Session | PlainSession
Buffer = bytes | bytearray | memoryview


def is_handshake(frames: Sequence[Buffer]) -> bool:
    return len(frames) > 0 and bytes(frames[0][:10]) in (HELLO, WELCOME, REFUSE)


def _dump(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _load(blob: Buffer, what: str) -> dict[str, Any]:
    if len(blob) > MAX_PAYLOAD:
        raise ProtocolError(f"{what} payload is {len(blob)} bytes; limit {MAX_PAYLOAD}")
    try:
        obj = json.loads(bytes(blob).decode())
    except (UnicodeDecodeError, ValueError, RecursionError):
        # ValueError: bad JSON or an integer of more than 4300 digits; RecursionError: nesting
        raise ProtocolError(f"{what} payload is not JSON within this protocol's limits") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{what} payload must be a JSON object")
    return obj


@dataclass
class ClientHandshake:
    """Client side: build the hello, then read the server's answer."""

    hello: Mapping[str, Any]
    static: KeyPair | None
    server_key: bytes | None
    max_frames: int = DEFAULT_MAX_FRAMES  # per message, for the session (limits.max_frames)
    ciphers: Sequence[str] = DEFAULT_CIPHERS  # transport suites offered, preferred first

    def __post_init__(self) -> None:
        self.ciphers = check_names(self.ciphers)
        self._initiator: Initiator | None = None
        self._last_ts = 0

    def connect_token(self, now_s: float) -> bytes | None:
        """The gate token for one new connection (None in --insecure mode): see gate.py."""
        if self.static is None or self.server_key is None:
            return None
        return connect_token(self.static, self.server_key, now_s)

    def start(self) -> list[bytes]:
        """Hello frames for a fresh attempt (a Noise handshake state is single-use).

        Each attempt carries a timestamp newer than the last (``ts``, ns since the epoch):
        the server refuses a hello that is not newer than the last one from the same key,
        so a captured hello replayed by someone without the key gets nowhere."""
        version = str(PROTOCOL_VERSION).encode()
        self._last_ts = max(self._last_ts + 1, time.time_ns())
        hello = {**self.hello, "ts": self._last_ts}
        if self.static is not None and self.server_key is not None:
            self._initiator = Initiator(self.static, self.server_key, max_frames=self.max_frames)
        if self._initiator is None:
            return [HELLO, version, b"plain", _dump(hello)]
        offer = _dump({**hello, "ciphers": list(self.ciphers)})
        return [HELLO, version, b"noise", self._initiator.write_message1(offer)]

    def finish(self, frames: Sequence[Buffer]) -> tuple[AnySession, dict[str, Any]]:
        """The session and the welcome; PeerError if the server refused us.

        The welcome's ``cipher`` is what seals the session (``none`` in plaintext mode), not
        what the server wrote: an older server names none and its session is AES-256-GCM."""
        error = refused(frames)
        if error is not None:
            raise error
        if len(frames) != 2 or bytes(frames[0]) != WELCOME:
            raise ProtocolError("expected a welcome or refusal from the server")
        session: AnySession
        if self._initiator is None:
            session, welcome = PlainSession(max_frames=self.max_frames), _load(frames[1], "welcome")
        else:
            payload, session = self._initiator.read_message2(bytes(frames[1]), self._cipher)
            welcome = _load(payload, "welcome")
        return session, {**welcome, "cipher": session.cipher_name}

    def _cipher(self, payload: bytes) -> CipherSuite:
        return client_check(_load(payload, "welcome").get("cipher"), self.ciphers)


Accept = Callable[[dict[str, Any], bytes | None], dict[str, Any]]


@dataclass
class ServerHandshake:
    """Server side: authenticate a hello and decide with ``accept``."""

    static: KeyPair | None
    admitted: Callable[[bytes], bool]
    insecure: bool = False
    max_frames: int = DEFAULT_MAX_FRAMES  # per message, for the session (limits.max_frames)
    ciphers: Sequence[str] = DEFAULT_CIPHERS  # transport suites accepted, preferred first

    def __post_init__(self) -> None:
        self.ciphers = check_names(self.ciphers)
        # Per admitted key, the newest hello timestamp seen: one entry per admitted key.
        self._newest: dict[bytes, int] = {}

    def answer(
        self, frames: Sequence[Buffer], accept: Accept
    ) -> tuple[list[bytes], AnySession, dict[str, Any], bytes | None]:
        """(reply frames, session, hello, peer static key). Raises SLError to refuse."""
        if len(frames) != 4 or bytes(frames[0]) != HELLO:
            raise ProtocolError("a hello has exactly 4 frames")
        if bytes(frames[1]) != str(PROTOCOL_VERSION).encode():
            raise VersionError(
                f"client speaks protocol {bytes(frames[1])[:8]!r}; server speaks {PROTOCOL_VERSION}"
            )
        mode = bytes(frames[2])
        if mode == b"plain":
            if not self.insecure:
                raise CryptoError(
                    "this server requires encryption; configure the client's key and "
                    "server_key (sl-pipeline keygen), or run both sides with --insecure"
                )
            hello = _load(frames[3], "hello")
            welcome = accept(hello, None)
            plain = PlainSession(max_frames=self.max_frames)
            return [WELCOME, _dump(welcome)], plain, hello, None
        if mode != b"noise" or self.static is None:
            raise CryptoError("this server runs --insecure; run the client with --insecure too")
        responder = Responder(self.static, self.admitted, max_frames=self.max_frames)
        payload, peer_key = responder.read_message1(bytes(frames[3]))
        hello = _load(payload, "hello")
        self._check_fresh(hello, peer_key)
        suite = server_choice(hello.get("ciphers"), self.ciphers)
        welcome = {**accept(hello, peer_key), "cipher": suite.name}
        reply, session = responder.write_message2(_dump(welcome), suite)
        return [WELCOME, reply], session, hello, peer_key

    def _check_fresh(self, hello: Mapping[str, Any], key: bytes) -> None:
        """Refuse a replayed message 1: it authenticates (IK's known limit) but its
        timestamp is not newer than one this server already accepted from the same key."""
        ts = hello.get("ts")
        if isinstance(ts, bool) or not isinstance(ts, int) or not 0 < ts < 2**63:
            raise ProtocolError("the hello lacks a valid timestamp 'ts'; update the client")
        if ts <= self._newest.get(key, 0):
            raise ReplayError("a replayed hello: its timestamp is not newer than the last one")
        self._newest[key] = ts


COME_BACK_LATER = ("overloaded", "shutting_down")  # refusals of a hello worth retrying


def refused(frames: Sequence[Buffer]) -> PeerError | None:
    """The refusal's code and reason as a PeerError, or None if ``frames`` are no refusal."""
    if len(frames) != 2 or bytes(frames[0]) != REFUSE:
        return None
    info = _load(frames[1], "refusal")
    code = str(info.get("code", "refused"))
    return PeerError(code, str(info.get("reason", ""))[:500], retryable=code in COME_BACK_LATER)


def refusal(error: SLError) -> list[bytes]:
    return [REFUSE, _dump({"code": error.code, "reason": error.message})]
