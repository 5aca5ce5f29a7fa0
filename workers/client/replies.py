"""What a client takes from its next hop's reply, checked before anything uses it.

The server (or relay) a client trusts may still be buggy, out of date or hostile: an
enrolled key proves who answers, not that the answer fits. So every tensor a step takes
from a reply is checked here first: the reply's kind, the tensor's exact shape (a cut
gradient has the shape of the activations sent; an output the batch's size and the width
the client's head takes), its dtype (values travel as floats or quantised codes), and its
values (finite, within ``limits.max_abs_value``), and the loss it reports is a number.
A reply that fails is refused with a ``ProtocolError`` (exit 3) naming what is wrong, before
any of it reaches the weights: the client's state stays that of its last applied step, and
the same command carries on against an honest server.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from sl_pipeline.errors import ProtocolError, ReplyMismatchError
from sl_pipeline.messages import Kind, Message
from sl_pipeline.runid import RUN_ID
from sl_pipeline.tensors import announced_shape, read_tensor

log = logging.getLogger("sl_pipeline.client")
# Undo points a client keeps for a server that checkpoints every N > 1 steps (each a copy of
# its whole state): a welcome asking for more gets this many, not a copy per step of the run.
MAX_UNDO_POINTS = 256

# None: any size in that dimension; a last ``...``: any further dimensions (a custom model
# whose layers' input shapes are not known without running them)
Shape = Sequence[Any]


def reply_tensor(
    reply: Message,
    kind: Kind,
    name: str,
    max_abs: float,
    shape: Shape,
) -> torch.Tensor:
    """``name`` from ``reply`` as float32, if the reply is a ``kind`` and the tensor has
    ``shape`` (checked on what the reply announces, before anything is decoded), is finite
    and within ``max_abs``; a ``ProtocolError`` otherwise."""
    if reply.kind is not kind:
        raise ReplyMismatchError(
            f"the {reply.kind.value} reply to step ({reply.epoch}, {reply.step}) is no "
            f"{kind.value}, which this step needs: the server answered another request"
        )
    _check_shape(name, announced_shape(reply, name), shape)
    tensor = read_tensor(reply, name, max_abs=max_abs)
    _check_shape(name, tuple(tensor.shape), shape)  # what was decoded, not announced
    return tensor


def _check_shape(name: str, got: Sequence[int], shape: Shape) -> None:
    open_ended = bool(shape) and shape[-1] is Ellipsis
    dims = list(shape[:-1] if open_ended else shape)
    if (len(got) == len(dims) or (open_ended and len(got) > len(dims))) and all(
        w is None or g == w for g, w in zip(got, dims, strict=False)
    ):
        return
    wanted = ["any" if w is None else w for w in dims] + (["..."] if open_ended else [])
    raise ProtocolError(
        f"the server's {name} has shape {list(got)}; this step needs {wanted}: the reply "
        "does not fit the request it answers (a server with another model config, or a "
        "faulty one); nothing of it was applied"
    )


def reply_loss(reply: Message) -> float:
    """The loss a reply reports (NaN where it reports none); a number or a ProtocolError."""
    loss = reply.meta.get("loss")
    if loss is None:
        return math.nan
    if isinstance(loss, bool) or not isinstance(loss, int | float):
        raise ProtocolError(f"the server's reply reports a loss of {loss!r}, not a number")
    return float(loss)


def checked_welcome(welcome: Mapping[str, Any]) -> dict[str, Any]:
    """``welcome`` if the fields a client uses are what a server or relay sends: ``run`` a
    run id, ``applied`` an ``[epoch, step]`` pair, ``checkpoint_every`` a positive count
    (capped at ``MAX_UNDO_POINTS``); a ``ProtocolError`` naming the field otherwise."""
    run = welcome.get("run")
    if run is not None and run != "" and not is_run_id(run):
        raise _bad_field("run", run)
    applied = welcome.get("applied")
    pair = isinstance(applied, list | tuple) and len(applied) == 2
    if applied is not None and not (pair and all(_count(v) for v in applied)):
        raise _bad_field("applied", applied)
    every = welcome.get("checkpoint_every")
    if every is not None and not (_count(every) and every >= 1):
        raise _bad_field("checkpoint_every", every)
    if every is not None and every > MAX_UNDO_POINTS:
        log.warning(
            "the server checkpoints every %d steps; this client keeps at most %d undo points "
            "(a restart of that server may lose steps it cannot redo)",
            every,
            MAX_UNDO_POINTS,
        )
        every = MAX_UNDO_POINTS
    return {**welcome, "checkpoint_every": every}


def check_same_run(trained_in: str, joined: str) -> None:
    """A rejoin's welcome must name the run this client trains in: its weights and step
    count belong to that run, and carried into another they would train it wrongly."""
    if trained_in and joined != trained_in:
        raise ProtocolError(
            f"on rejoining, the server put this client in run {shown(joined)}, but it trains "
            f"in run {trained_in!r}: refusing to carry that run's state into another one; "
            "the same command resumes from its state when the server trains it there again"
        )


def is_run_id(value: object) -> bool:
    """Whether ``value`` is a run id (a server's ``run-N`` or a name a client chose)."""
    return isinstance(value, str) and RUN_ID.fullmatch(value) is not None


def shown(value: object) -> str:
    """``value`` as a peer sent it, for a message: its repr, cut at 80 characters."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**53


def _bad_field(name: str, value: object) -> ProtocolError:
    return ProtocolError(f"the server's welcome has {name} = {shown(value)}, which no server sends")


__all__ = [
    "MAX_UNDO_POINTS",
    "check_same_run",
    "checked_welcome",
    "is_run_id",
    "reply_loss",
    "reply_tensor",
    "shown",
]
