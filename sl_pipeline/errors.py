"""One root exception for the whole project, with stable codes.

Every error a user can see derives from :class:`SLError`. Subclasses also inherit a
builtin category (``ValueError``, ``ConnectionError`` ...) so callers that only know
the builtins still catch them sensibly. Each class carries a stable ``code`` that
travels in ERROR messages and a process ``exit_code`` for the CLI.
"""

from __future__ import annotations


class SLError(Exception):
    """Root of every sl-pipeline error. ``str(err)`` is the message shown to users."""

    code: str = "internal"
    exit_code: int = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message} ({hint})")


class ConfigError(SLError, ValueError):
    """A configuration file, flag or value is invalid. Exit status 2."""

    code = "config"
    exit_code = 2


class ProtocolError(SLError, ValueError):
    """A message could not be decoded or broke the protocol's rules."""

    code = "protocol"
    exit_code = 3


class LimitError(ProtocolError):
    """A message exceeded a configured limit (frames, bytes, dims, dtype)."""

    code = "limit"


class ReplyMismatchError(ProtocolError):
    """A reply that does not answer the request waiting for it (another kind or step)."""

    code = "reply_mismatch"


class StepLostError(ProtocolError):
    """The peer no longer has this step open (it restarted from a checkpoint taken before
    the step began): redo the step from its first message."""

    code = "step_lost"


class StaleStepError(ProtocolError):
    """A step older than the newest one this run applied for the client: it restarted
    without its checkpoint, or joined a run it already trained in."""

    code = "stale_step"


class RedoError(StaleStepError):
    """A step the peer applied already, sent again with other inputs (a redo, not a resend):
    answering it from the reply cache would hand back the other inputs' gradients."""

    code = "redo"


class RunEndedError(ProtocolError):
    """The training run this peer belongs to has finished or was stopped."""

    code = "run_ended"


# In a ``run_ended`` reason where the same command starts a new run: a client with checkpoints
# of the ended run adds which of its files to move first (they would resume the ended run)
START_AGAIN = "start the client again to begin a new run"


class NameInUseError(ProtocolError):
    """Another live session already trains under this client's name."""

    code = "name_in_use"


class VersionError(ProtocolError):
    """The peer speaks a protocol version we do not."""

    code = "version"


class CryptoError(ProtocolError):
    """Authentication failed: bad tag, replay, unknown key or broken handshake."""

    code = "crypto"


class CipherError(CryptoError):
    """The peers share no transport cipher suite, or a server picked one not offered."""

    code = "cipher"


class ReplayError(CryptoError):
    """A message counter was reused or went backwards."""

    code = "replay"


class UnauthenticatedError(CryptoError):
    """A sealed message arrived from a peer with no session (e.g. after a restart)."""

    code = "unauthenticated"


class BadTagError(CryptoError):
    """A sealed frame failed authentication: altered in transit or sealed under another
    session."""

    code = "bad_tag"


class NotAdmittedError(CryptoError, PermissionError):
    """The peer's static key is not in the admitted set."""

    code = "not_admitted"


class OverloadedError(ProtocolError):
    """The worker is at a bound (peers, pending handshakes, hello rate); retry later."""

    code = "overloaded"


def one_line(text: str, limit: int) -> str:
    """``text`` as one printable line of at most ``limit`` characters: a peer's words reach
    the terminal and the log, and a newline or an escape sequence in them must not forge
    lines there or move the cursor (each such character shows as ``\\xNN``)."""
    shown = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text[: limit + 1])
    return shown if len(shown) <= limit else f"{shown[: limit - 3]}..."


class PeerError(SLError, RuntimeError):
    """The peer replied with an ERROR message; ``remote_code`` is its code. Both are the
    peer's words: shown as one printable line (a code at most 64 characters, a reason 2000)."""

    code = "peer"
    exit_code = 4

    def __init__(self, remote_code: str, message: str, *, retryable: bool = False) -> None:
        self.remote_code = remote_code = one_line(remote_code, 64)
        self.reason = message = one_line(message, 2000) or "no reason given"
        self.retryable = retryable
        super().__init__(f"peer error [{remote_code}]: {message}")


class TransportError(SLError, ConnectionError):
    """The network failed: peer unreachable, timed out or gone."""

    code = "transport"
    exit_code = 5


class ReplyTimeoutError(TransportError, TimeoutError):
    """No reply came within the wait (the request or its reply may have been lost)."""

    code = "timeout"


class PrivacyError(SLError, ValueError):
    """A privacy setting is invalid or two settings contradict each other."""

    code = "privacy"
    exit_code = 2


class CheckpointError(SLError, OSError):
    """A checkpoint could not be written or read."""

    code = "checkpoint"
    exit_code = 6


__all__ = [
    "START_AGAIN",
    "BadTagError",
    "CheckpointError",
    "ConfigError",
    "CryptoError",
    "LimitError",
    "NameInUseError",
    "NotAdmittedError",
    "OverloadedError",
    "PeerError",
    "PrivacyError",
    "ProtocolError",
    "ReplayError",
    "ReplyTimeoutError",
    "RunEndedError",
    "SLError",
    "StaleStepError",
    "StepLostError",
    "TransportError",
    "VersionError",
]
