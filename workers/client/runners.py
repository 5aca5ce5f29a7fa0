"""The client's step for the topologies whose step differs from vanilla's: u-shaped (the
client keeps the head and the labels), vertical (feature parties, and the label client) and
multi-task (each client names its task)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sl_pipeline.errors import ConfigError
from sl_pipeline.messages import Kind, Message
from sl_pipeline.models import build_segments, segment_inputs, vertical_bottom
from sl_pipeline.tensors import wire_tensors
from workers.client.replies import Shape, reply_tensor
from workers.client.steps import StepRunner


class UShapedRunner(StepRunner):
    """Labels and the last layers stay here: two exchanges per step, no labels sent."""

    sends_labels = False
    protects_labels = True  # the gradient of the server's output carries the labels
    supports_pipelining = False

    def build_modules(self) -> dict[str, nn.Module]:
        segments = build_segments(self.cfg.model, self.host.topology)
        if len(segments) != 3:
            raise ConfigError("ushaped needs model.cuts with two cut indices")
        self.head_in = segment_inputs(segments, self.cfg.model.in_shape)[2]
        return {"bottom": segments[0], "head": segments[2]}

    @property
    def out_sample(self) -> Shape:
        """The server's output is the head's input (any shape where that is not known)."""
        return self.head_in if self.head_in is not None else (...,)

    async def train_step(
        self, step: int, x: torch.Tensor, y: torch.Tensor | None, ids: torch.Tensor
    ) -> float:
        if y is None:
            raise ConfigError("ushaped: the client holds the labels; set data.label")
        act, sent = self.cut(x)
        msg = self.forward_message(step, sent, None, ids)
        head, target = self.modules["head"], y.to(self.device)
        loss, grad_reply = await self.exchange_twice(
            msg,
            (len(x), *self.out_sample),
            lambda out: F.cross_entropy(head(out), target),
            protect_with=target,
        )
        cut_grad = reply_tensor(grad_reply, Kind.BACKWARD, "grad", self.cfg.max_abs, sent.shape)
        self.scrutinize(cut_grad, y, sent)
        self.apply_gradient(x, act, sent, cut_grad)
        return float(loss.detach())


class VerticalRunner(StepRunner):
    """A feature party: its own bottom on its features; sample ids align the batch.
    The designated label client (``client.role = "label"``) also computes the loss."""

    sends_labels = False
    supports_pipelining = False
    adaptive_wait = False
    replicable = False  # the server fuses every party's activations: no one replicates it

    async def train_step(
        self, step: int, x: torch.Tensor, y: torch.Tensor | None, ids: torch.Tensor
    ) -> float:
        if self.cfg.client.role != "label":
            return await super().train_step(step, x, y, ids)
        if y is None:
            raise ConfigError("vertical: the label client needs labels; set data.label")
        act, sent = self.cut(x)
        msg = self.forward_message(step, sent, None, ids)
        target = y.to(self.device)
        logits = (len(x), self.cfg.model.classes)  # the server's output
        loss, reply = await self.exchange_twice(msg, logits, lambda o: F.cross_entropy(o, target))
        grad = reply_tensor(reply, Kind.BACKWARD, "grad", self.cfg.max_abs, sent.shape)
        self.apply_gradient(x, act, sent, grad)
        return float(loss.detach())

    @property
    def out_sample(self) -> Shape:
        """The label client's outputs are the server's logits, one score per class (an
        evaluation's decide its accuracy); a feature party's evaluation gets none."""
        return (self.cfg.model.classes,) if self.cfg.client.role == "label" else (None,)

    def build_modules(self) -> dict[str, nn.Module]:
        group = self.cfg.client.group
        name = self.cfg.client.name
        index = sorted(group).index(name) if name in group else 0
        return {"bottom": vertical_bottom(self.cfg.model, index)}

    def forward_message(
        self, step: int, sent: torch.Tensor, y: torch.Tensor | None, ids: torch.Tensor
    ) -> Message:
        tensors = {**wire_tensors("act", sent, self.cfg.train.wire_dtype), "ids": ids}
        return self.host.message(Kind.FORWARD, step, tensors=tensors)


class MultitaskRunner(StepRunner):
    replicable = False  # the server's head is this client's task's, not model.classes'

    def forward_meta(self) -> dict[str, Any]:
        if not self.cfg.data.task:
            raise ConfigError("multitask: set data.task to this client's task")
        return {"task": self.cfg.data.task}
