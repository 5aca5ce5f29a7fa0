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

import math
from collections.abc import Sequence
from typing import Any

import torch

from sl_pipeline.errors import ProtocolError, ReplyMismatchError
from sl_pipeline.messages import Kind, Message
from sl_pipeline.tensors import announced_shape, read_tensor

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


__all__ = ["reply_loss", "reply_tensor"]
