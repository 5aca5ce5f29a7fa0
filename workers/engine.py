"""What the server computes for each topology. No sockets here: messages in, messages out.

An engine owns the server's segment(s) and optimizer(s). ``train`` answers a FORWARD with a
BACKWARD carrying the cut-layer gradient; ``evaluate``/``predict`` answer with outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sl_pipeline.config import ServerConfig
from sl_pipeline.errors import ProtocolError
from sl_pipeline.messages import Kind, Message
from sl_pipeline.models import build_segments, make_optimizer


def as_input(tensor: torch.Tensor, requires_grad: bool) -> torch.Tensor:
    """A received tensor as float32 leaf (received buffers may be read-only or half precision)."""
    out = tensor.detach().to(torch.float32)
    if out.data_ptr() == tensor.data_ptr():
        out = out.clone()  # never let autograd or the optimizer touch a peer's buffer
    return out.requires_grad_(requires_grad)


def wire(tensor: torch.Tensor, dtype: str) -> torch.Tensor:
    """Cast a tensor for the wire (optional fp16/bf16 compression)."""
    if dtype == "float16":
        return tensor.detach().to(torch.float16)
    if dtype == "bfloat16":
        return tensor.detach().to(torch.bfloat16)
    return tensor.detach()


def check_labels(labels: torch.Tensor, batch: int, classes: int) -> torch.Tensor:
    if labels.dtype not in (torch.int64, torch.int32) or labels.shape != (batch,):
        raise ProtocolError(f"labels must be an int tensor of shape ({batch},)")
    if batch and (int(labels.min()) < 0 or int(labels.max()) >= classes):
        raise ProtocolError(f"labels must be class indices in [0, {classes})")
    return labels.to(torch.int64)


class Engine:
    """Base: one segment, one optimizer; subclasses decide loss and replies."""

    def __init__(self, segment: nn.Module, cfg: ServerConfig) -> None:
        self.cfg = cfg
        self.model = segment
        self.optimizer = make_optimizer(
            list(segment.parameters()), cfg.train.optimizer, cfg.train.lr, cfg.train.momentum
        )

    def _forward(self, msg: Message, requires_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        act = as_input(msg.tensor("act"), requires_grad)
        try:
            out = self.model(act)
        except RuntimeError as exc:
            raise ProtocolError(
                f"activations of shape {tuple(act.shape)} do not fit the server segment: "
                f"{str(exc).splitlines()[0]}"
            ) from None
        return act, out

    def train(self, msg: Message) -> Message:
        raise NotImplementedError

    def evaluate(self, msg: Message) -> Message:
        self.model.eval()
        with torch.no_grad():
            _, out = self._forward(msg, requires_grad=False)
        self.model.train()
        return msg.reply(Kind.RESULT, tensors={"out": wire(out, self.cfg.train.wire_dtype)})

    def state_dict(self) -> dict[str, object]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.model.load_state_dict(state["model"])  # type: ignore[arg-type]
        self.optimizer.load_state_dict(state["optimizer"])  # type: ignore[arg-type]


class VanillaEngine(Engine):
    """The server holds the last layers and computes the loss from labels the client sends."""

    def train(self, msg: Message) -> Message:
        act, out = self._forward(msg, requires_grad=True)
        labels = check_labels(msg.tensor("labels"), act.shape[0], out.shape[-1])
        loss = F.cross_entropy(out, labels)  # mean reduction: what Opacus assumes too
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        assert act.grad is not None
        return msg.reply(
            Kind.BACKWARD,
            meta={"loss": float(loss.detach())},
            tensors={"grad": wire(act.grad, self.cfg.train.wire_dtype)},
        )


class MiddleEngine(Engine):
    """U-shaped: the server holds only the middle; labels and loss stay with the client.

    FORWARD(act) -> RESULT(out of the middle); then BACKWARD(grad of out) -> BACKWARD(grad
    at the client's cut). The graph of the pending step is kept per client between the two.
    """

    def __init__(self, segment: nn.Module, cfg: ServerConfig) -> None:
        super().__init__(segment, cfg)
        self._pending: dict[str, tuple[int, int, torch.Tensor, torch.Tensor]] = {}

    def train(self, msg: Message) -> Message:
        if "labels" in msg.tensors:
            raise ProtocolError("u-shaped topology: labels must stay at the client; do not send them")
        act, out = self._forward(msg, requires_grad=True)
        self._pending[msg.client] = (msg.epoch, msg.step, act, out)
        return msg.reply(Kind.RESULT, tensors={"out": wire(out, self.cfg.train.wire_dtype)})

    def backward(self, msg: Message) -> Message:
        pending = self._pending.pop(msg.client, None)
        if pending is None or pending[:2] != (msg.epoch, msg.step):
            raise ProtocolError("backward for a step this server has no forward for")
        _, _, act, out = pending
        grad = as_input(msg.tensor("grad"), requires_grad=False)
        if grad.shape != out.shape:
            raise ProtocolError(f"gradient shape {tuple(grad.shape)} != output {tuple(out.shape)}")
        self.optimizer.zero_grad(set_to_none=True)
        out.backward(grad)
        self.optimizer.step()
        assert act.grad is not None
        return msg.reply(Kind.BACKWARD, tensors={"grad": wire(act.grad, self.cfg.train.wire_dtype)})

    def forget(self, client: str) -> None:
        self._pending.pop(client, None)


def build_engine(cfg: ServerConfig) -> Engine:
    topology = cfg.server.topology
    segments = build_segments(cfg.model, topology)
    if topology == "ushaped":
        return MiddleEngine(segments[1], cfg)
    if topology == "multihop":
        return VanillaEngine(segments[-1], cfg)
    return VanillaEngine(segments[-1], cfg)
