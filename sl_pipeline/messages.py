"""Protocol messages: immutable typed values, validated when built.

A :class:`Message` is what the workers exchange: a kind, the routing ids that make every
step addressable (session, client, epoch, step), a small JSON-able ``meta`` mapping and
named tensors. The codec turns it into ZeroMQ frames; nothing here does I/O.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from .errors import CheckpointError, ProtocolError

PROTOCOL_VERSION = 1
MAX_ID_CHARS = 128


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
        if len(value) > 256:
            raise ProtocolError(f"meta value for {key!r} has too many entries (max 256)")
        return MappingProxyType(
            {str(k): _check_meta_value(f"{key}.{k}", v, depth + 1) for k, v in value.items()}
        )
    raise ProtocolError(
        f"meta value for {key!r} has type {type(value).__name__}; "
        "only str, int, float, bool, None, lists and mappings of them are allowed"
    )


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

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "kind", Kind(self.kind))
        except ValueError as exc:
            raise ProtocolError(f"unknown message kind {self.kind!r}") from exc
        _check_id("session", self.session)
        _check_id("client", self.client)
        for name in ("epoch", "step"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**53:
                raise ProtocolError(f"{name} must be an integer in [0, 2**53), got {value!r}")
        meta = {str(k): _check_meta_value(str(k), v) for k, v in self.meta.items()}
        object.__setattr__(self, "meta", MappingProxyType(meta))
        for name, tensor in self.tensors.items():
            if not isinstance(tensor, torch.Tensor):
                raise ProtocolError(f"tensor {name!r} is a {type(tensor).__name__}, not a tensor")
            _check_id("tensor name", name)
        object.__setattr__(self, "tensors", MappingProxyType(dict(self.tensors)))

    def reply(self, kind: Kind, **changes: Any) -> Message:
        """A message answering this one: same routing ids unless overridden."""
        base: dict[str, Any] = {
            "session": self.session,
            "client": self.client,
            "epoch": self.epoch,
            "step": self.step,
        }
        base.update(changes)
        return Message(kind=kind, **base)

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor called ``name``, or a ProtocolError saying which one is missing."""
        try:
            return self.tensors[name]
        except KeyError:
            raise ProtocolError(
                f"{self.kind.value} message lacks tensor {name!r} "
                f"(has: {', '.join(self.tensors) or 'none'})"
            ) from None


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
    }


def message_from_state(state: Mapping[str, Any]) -> Message:
    """Undo :func:`message_state`; the message validates itself again."""
    try:
        return Message(
            kind=Kind(state["kind"]),
            session=state["session"],
            client=state["client"],
            epoch=state["epoch"],
            step=state["step"],
            meta=state["meta"],
            tensors=state["tensors"],
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"cannot restore a cached message from checkpoint: {exc}") from None
