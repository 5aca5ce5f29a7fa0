"""Protocol messages: immutable typed values, validated when built.

A :class:`Message` is what the workers exchange: a kind, the routing ids that make every
step addressable (session, client, epoch, step), for a reply the kind of the request it
answers (``answers``, the header's ``re``), a small JSON-able ``meta`` mapping and named
tensors. The codec turns it into ZeroMQ frames; nothing here does I/O.
"""

from __future__ import annotations

import enum
import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

import torch

from .errors import CheckpointError, ProtocolError, ReplyMismatchError

# 2: a reply names the request it answers (header "re"); 1 had no "re" and is refused.
PROTOCOL_VERSION = 2
MAX_ID_CHARS = 128
MAX_META_KEYS = 256  # per object of meta, meta itself included


class Kind(enum.StrEnum):
    """Every message kind on the wire. Values are stable: they appear in logs and metrics.
    The hello and the welcome are no messages: they travel inside the handshake's frames."""

    FORWARD = "forward"  # cut-layer activations (+ labels in vanilla)
    BACKWARD = "backward"  # gradient at a cut layer
    EVALUATE = "evaluate"  # activations for evaluation: no update
    PREDICT = "predict"  # activations for inference
    RESULT = "result"  # reply to evaluate/predict (outputs)
    HEARTBEAT = "heartbeat"
    ERROR = "error"  # code + reason as data
    BYE = "bye"
    WEIGHTS = "weights"  # segment weights between clients (opaque to the server)


_META_SCALARS = (str, int, float, bool, type(None))


def _check_meta_value(key: str, value: Any, depth: int = 0) -> Any:
    if depth > 4:
        raise ProtocolError(f"meta value for {key!r} is nested too deeply (max 4 levels)")
    if isinstance(value, _META_SCALARS):
        if isinstance(value, float) and not math.isfinite(value):
            raise ProtocolError(f"meta value for {key!r} is not a finite number")
        if isinstance(value, int) and not -(2**63) <= value < 2**63:
            raise ProtocolError(f"meta value for {key!r} is not a 64-bit integer")
        return value
    if isinstance(value, list | tuple):
        return tuple(_check_meta_value(key, v, depth + 1) for v in value)
    if isinstance(value, Mapping):
        if len(value) > MAX_META_KEYS:
            raise ProtocolError(
                f"meta value for {key!r} has too many entries (max {MAX_META_KEYS})"
            )
        return MappingProxyType(
            {str(k): _check_meta_value(f"{key}.{k}", v, depth + 1) for k, v in value.items()}
        )
    raise ProtocolError(
        f"meta value for {key!r} has type {type(value).__name__}; "
        "only str, int, float, bool, None, lists and mappings of them are allowed"
    )


_KINDS = {kind.value: kind for kind in Kind}


def _kind(value: Any) -> Kind:
    # A dict lookup, not ``Kind(value)``: an enum call costs microseconds per message.
    if value.__class__ is Kind:
        return value  # type: ignore[no-any-return]
    try:
        return _KINDS[value]
    except (KeyError, TypeError):
        raise ProtocolError(f"unknown message kind {value!r}") from None


def _check_id(name: str, value: str) -> None:
    if not isinstance(value, str) or len(value) > MAX_ID_CHARS or not value.isprintable():
        raise ProtocolError(f"{name} must be a printable string of at most {MAX_ID_CHARS} chars")


@dataclass(frozen=True)
class Message:
    """One protocol message. Build it; it validates itself; it never changes."""

    kind: Kind
    session: str = ""
    client: str = ""
    epoch: int = 0
    step: int = 0
    meta: Mapping[str, Any] = field(default_factory=dict)
    tensors: Mapping[str, torch.Tensor] = field(default_factory=dict)
    answers: Kind | None = None  # a reply: the kind of the request it answers (same step)

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", _kind(self.kind))
        if self.answers is not None:
            object.__setattr__(self, "answers", _kind(self.answers))
        _check_id("session", self.session)
        _check_id("client", self.client)
        for name in ("epoch", "step"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**53:
                raise ProtocolError(f"{name} must be an integer in [0, 2**53), got {value!r}")
        if len(self.meta) > MAX_META_KEYS:
            raise ProtocolError(f"meta has {len(self.meta)} keys; at most {MAX_META_KEYS}")
        meta = {str(k): _check_meta_value(str(k), v) for k, v in self.meta.items()}
        object.__setattr__(self, "meta", MappingProxyType(meta))
        for name, tensor in self.tensors.items():
            if not isinstance(tensor, torch.Tensor):
                raise ProtocolError(f"tensor {name!r} is a {type(tensor).__name__}, not a tensor")
            _check_id("tensor name", name)
        object.__setattr__(self, "tensors", MappingProxyType(dict(self.tensors)))

    def follow(self, kind: Kind, **changes: Any) -> Message:
        """A request that continues this one's step (same routing ids unless overridden):
        the u-shaped client's BACKWARD after its FORWARD, a relay's request upstream."""
        base: dict[str, Any] = {
            "session": self.session,
            "client": self.client,
            "epoch": self.epoch,
            "step": self.step,
        }
        base.update(changes)
        return Message(kind=kind, **base)

    def reply(self, kind: Kind, **changes: Any) -> Message:
        """A message answering this one: it names this one's kind in ``answers`` and keeps
        its step (its routing ids unless overridden), so the requester can check it."""
        return self.follow(kind, answers=self.kind, **changes)

    def spoken_by(self, client: str) -> Message:
        """This message as sent by ``client``: a server or relay files what a peer sends
        under the peer's admitted name (or a relay's client's), never a name it claims."""
        return self if client == self.client else replace(self, client=client)

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor called ``name``, or a ProtocolError saying which one is missing."""
        try:
            return self.tensors[name]
        except KeyError:
            raise ProtocolError(
                f"{self.kind.value} message lacks tensor {name!r} "
                f"(has: {', '.join(self.tensors) or 'none'})"
            ) from None


def check_answers(request: Message, reply: Message) -> Message:
    """``reply`` if it answers ``request`` (it names the request's kind and carries its
    epoch and step); a :class:`ReplyMismatchError` otherwise, instead of assuming it does."""
    if reply.answers is request.kind and (reply.epoch, reply.step) == (
        request.epoch,
        request.step,
    ):
        return reply
    answered = reply.answers.value if reply.answers is not None else "no request"
    raise ReplyMismatchError(
        f"a {reply.kind.value} reply to {answered} at step ({reply.epoch}, {reply.step}) came "
        f"while waiting for the reply to {request.kind.value} at step "
        f"({request.epoch}, {request.step})"
    )


def request_digest(msg: Message) -> str:
    """What a request asks, as 32 hex digits: its kind, step and tensors (name, dtype, shape
    and bytes). Two sends of one request (a resend after a lost reply, a client replaying
    its recorded steps) have the same digest; a redo of a step with other inputs (a rewound
    client that drew other rows) has another, and is never answered with the first one's
    reply."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{msg.kind.value}|{msg.epoch}|{msg.step}".encode())
    for name in sorted(msg.tensors):
        t = msg.tensors[name].detach()
        h.update(f"|{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def error_message(
    code: str, reason: str, *, retryable: bool = False, request: Message | None = None
) -> Message:
    """An ERROR message: errors travel as data, answering the request they refuse."""
    meta = {"code": code, "reason": reason[:1000], "retryable": retryable}
    if request is None:
        return Message(kind=Kind.ERROR, meta=meta)
    return request.reply(Kind.ERROR, meta=meta)


# ---- a message as plain state, for checkpoints (``torch.load(weights_only=True)``) ------
def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def message_state(msg: Message) -> dict[str, Any]:
    """A message (e.g. a cached reply) as a ``weights_only``-safe dict."""
    return {
        "kind": msg.kind.value,
        "session": msg.session,
        "client": msg.client,
        "epoch": msg.epoch,
        "step": msg.step,
        "meta": _plain(msg.meta),
        "tensors": dict(msg.tensors),
        "re": msg.answers.value if msg.answers is not None else None,
    }


def message_from_state(state: Mapping[str, Any], answers: str | None = None) -> Message:
    """Undo :func:`message_state`; the message validates itself again. ``answers`` is the
    request kind of a reply saved before replies named it (a checkpoint of protocol 1)."""
    answered = state.get("re") or answers
    try:
        return Message(
            kind=Kind(state["kind"]),
            session=state["session"],
            client=state["client"],
            epoch=state["epoch"],
            step=state["step"],
            meta=state["meta"],
            tensors=state["tensors"],
            answers=None if answered is None else Kind(answered),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"cannot restore a cached message from checkpoint: {exc}") from None
