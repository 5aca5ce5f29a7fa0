"""What the server computes for each topology. No sockets here: messages in, messages out.

An engine owns the server's segment(s) and optimizer(s). ``handle`` takes one request from
one peer and returns the replies to send now, as ``(peer identity, message)`` pairs: most
requests are answered at once, a vertical party's part waits until every party has sent
its own. ``steps_applied`` counts optimizer steps, for the exactly-once bookkeeping.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sl_pipeline.config import ServerConfig
from sl_pipeline.errors import ConfigError, ProtocolError
from sl_pipeline.lowbit import Residuals
from sl_pipeline.messages import Kind, Message
from sl_pipeline.models import Shape, make_optimizer, resolve_device
from sl_pipeline.tensors import all_finite, as_input, read_tensor, wire_tensors

Reply = tuple[bytes, Message]
EVAL_BATCH = 256  # the batch a client evaluates and predicts with (workers/client/steps.py)
log = logging.getLogger("sl_pipeline.server")


def _no_report(table: str) -> None:
    return None


def check_labels(labels: torch.Tensor, batch: int, classes: int) -> torch.Tensor:
    if labels.dtype not in (torch.int64, torch.int32, torch.uint8) or tuple(labels.shape) != (
        batch,
    ):
        raise ProtocolError(f"labels must be an int tensor of shape ({batch},)")
    low, high = torch.aminmax(labels) if batch else (0, 0)
    if int(low) < 0 or int(high) >= classes:
        raise ProtocolError(f"labels must be class indices in [0, {classes})")
    return labels.to(torch.int64)


def run_segment(module: nn.Module, act: torch.Tensor) -> torch.Tensor:
    try:
        return module(act)  # type: ignore[no-any-return]
    except RuntimeError as exc:
        raise ProtocolError(
            f"activations of shape {tuple(act.shape)} do not fit the server segment: "
            f"{str(exc).splitlines()[0]}"
        ) from None


def _check_cut_grads(grads: list[torch.Tensor]) -> None:
    if not all_finite(grads):
        raise ProtocolError(
            "the gradients at the cut are not finite (overflowing activations); "
            "the step was not applied"
        )


def _grad_of(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.grad is None:
        raise ProtocolError("the loss does not depend on a cut tensor; check the model")
    return tensor.grad


class Engine:
    """Base: one module (possibly several parts), one optimizer; subclasses decide the rest."""

    def __init__(self, module: nn.Module, cfg: ServerConfig) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.train.device)
        self.model = module.to(self.device)
        # Walked twice per step (deferred backward, finite check): the module tree once here.
        self._params = list(self.model.parameters())
        self.wire_dtype = cfg.train.wire_dtype
        self.residuals = Residuals()  # int2-ef: per peer, what its gradients still owe
        self.optimizer = make_optimizer(
            list(module.parameters()), cfg.train.optimizer, cfg.train.lr, cfg.train.momentum
        )
        self.steps_applied = 0
        self.last_loss: float | None = None
        # The server's own test accuracy where it holds the labels (vertical): nobody else
        # can compute it, and telling the feature parties would leak the labels (see vertical).
        self.test_accuracy: float | None = None
        # Whether a training run's members may ask for predictions (PREDICT). Not where the
        # outputs fuse other parties' parts of labelled rows (vertical): there, only peers
        # that joined to infer get outputs (RunHost.evaluate).
        self.predicts_for_members = True
        # Reply-first: the server sets this per request (see ``backprop``).
        self.defer_updates = False
        self.deferred_updates = 0  # how many steps replied first (reported in the summary)
        self.skipped_updates = 0  # deferred steps whose weight gradients were not finite
        self.on_bound: Callable[[str], None] = _no_report  # a bounded table was hit
        self.now = 0.0  # the server's clock (monotonic seconds), as last fed to ``at``
        self._deferred: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.max_batch = cfg.server.max_batch or max(cfg.train.batch_size, EVAL_BATCH)
        if self.max_batch < 1:
            raise ConfigError(f"server.max_batch must be at least 1, got {cfg.server.max_batch}")
        self.max_abs = cfg.limits.max_abs_value  # a peer's activations and gradients
        # One sample of a peer's ``act`` (models.segment_inputs); None: not known, unchecked.
        self.act_shape: Shape | None = None

    def expect(self, act_shape: Shape | None) -> Engine:
        """Refuse activations whose samples are not ``act_shape`` (before any layer runs)."""
        self.act_shape = act_shape
        return self

    def activations(self, msg: Message, requires_grad: bool) -> torch.Tensor:
        """A peer's ``act``: at most ``max_batch`` samples of ``act_shape``, finite and within
        ``max_abs``, a float32 leaf here."""
        act = read_tensor(msg, "act", self.max_batch, self.max_abs, self.act_shape)
        return as_input(act, requires_grad, self.device)

    def handle(self, identity: bytes, msg: Message) -> list[Reply]:
        raise ProtocolError(f"this server does not accept {msg.kind.value} messages")

    def backprop_output(
        self, msg: Message, out: torch.Tensor, cut: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Apply the gradient of ``out`` that a peer computed (where the loss is not here);
        returns the gradients at ``cut``."""
        # the open step's batch bounds the gradient's before anything is decoded
        grad = read_tensor(msg, "grad", len(out), self.max_abs, tuple(out.shape[1:]))
        grad = as_input(grad, requires_grad=False, device=self.device)
        if grad.shape != out.shape:
            raise ProtocolError(f"gradient shape {tuple(grad.shape)} != output {tuple(out.shape)}")
        return self.backprop(out, grad, cut)

    def backprop(
        self,
        root: torch.Tensor,
        grad: torch.Tensor | None,
        cut: list[torch.Tensor],
        loss: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """This step's update, and the gradients at the ``cut`` tensors (what peers get back).

        With ``defer_updates`` the cut gradients come first (``torch.autograd.grad``, which
        skips every weight gradient) and the weight gradients and optimizer step wait for
        :meth:`settle`, which the server calls once the replies have left: the peer's own
        backward then overlaps our weight-gradient work. The update itself is unchanged,
        and anything that reads or runs the weights settles first.
        """
        self.settle()
        # One sync for both the finiteness check and the reported loss.
        value = None if loss is None else float(loss.detach())
        if value is not None and not math.isfinite(value):
            raise ProtocolError(
                "the loss of this batch is not a finite number (NaN or overflowing "
                "activations); the step was not applied"
            )
        if self.defer_updates:
            grads = list(torch.autograd.grad(root, cut, grad, retain_graph=True))
            _check_cut_grads(grads)
            self._deferred = (root, grad)
            self.deferred_updates += 1
            self._count_step(value)
            return grads
        self.optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(root, grad)
        grads = [_grad_of(t) for t in cut]
        _check_cut_grads(grads)
        if not self._weight_grads_finite():
            self.optimizer.zero_grad(set_to_none=True)
            raise ProtocolError(
                "this batch's weight gradients are not finite; the step was not applied"
            )
        self._apply(value)
        return grads

    def settle(self) -> None:
        """Finish a deferred update: weight gradients (only), then the optimizer step.
        Its loss and cut gradients were checked before the reply left; weight gradients
        that still overflow skip the step (counted in ``skipped_updates``), so the shared
        weights never take a NaN."""
        if self._deferred is None:
            return
        root, grad = self._deferred
        self._deferred = None
        self.optimizer.zero_grad(set_to_none=True)
        params = [p for p in self._params if p.requires_grad]
        torch.autograd.backward(root, grad, inputs=params)
        if not self._weight_grads_finite():
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_updates += 1
            log.warning("a deferred step's weight gradients were not finite: step skipped")
            return
        self.optimizer.step()

    def _weight_grads_finite(self) -> bool:
        return all_finite([p.grad for p in self._params if p.grad is not None])

    def outputs(self, msg: Message, act: torch.Tensor) -> torch.Tensor:
        """What the server's layers make of ``act`` (multitask picks the task's head)."""
        return run_segment(self.model, act)

    def evaluate(self, identity: bytes, msg: Message) -> list[Reply]:
        self.model.eval()
        with torch.no_grad():
            out = self.outputs(msg, self.activations(msg, False))
        self.model.train()
        reply = msg.reply(Kind.RESULT, tensors=wire_tensors("out", out, self.wire_dtype))
        return [(identity, reply)]

    def at(self, now: float) -> list[Reply]:
        """The server's clock moved on to ``now`` (before each request, and a few times a
        second): the replies that came due meanwhile (none here; see the u-shaped engine)."""
        self.now = now
        return []

    def forget(self, client: str) -> list[Reply]:
        """``client`` left (bye, or its session was dropped or replaced): what it held goes,
        and the replies that frees come back (to other clients it held up)."""
        return []

    def replays(self, msg: Message, applied: bool) -> bool:
        """Whether a resent ``msg`` may get the reply cached for it (``applied``: its step's
        update was applied); always, but where a step needs two exchanges."""
        return True

    def relays_only(self, msg: Message) -> bool:
        """Whether ``msg`` only passes between parties and changes no weights (a vertical
        PSI post): a peer that joined to infer may send it without starting a run."""
        return False

    def queue_depth(self) -> int:
        """Requests waiting for other parties (vertical parts, queued steps, turns)."""
        return 0

    @property
    def coordination_version(self) -> int:
        """Changes when state a client saw changed outside a step (group turns and rounds):
        the server checkpoints then, as it does after a step."""
        return 0

    def _apply(self, loss: float | None = None) -> None:
        self.optimizer.step()
        self._count_step(loss)

    def _count_step(self, loss: float | None) -> None:
        self.steps_applied += 1
        if loss is not None:
            self.last_loss = loss

    def state_dict(self) -> dict[str, Any]:
        self.settle()
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


class VanillaEngine(Engine):
    """The server holds the last layers and computes the loss from labels the client sends."""

    def handle(self, identity: bytes, msg: Message) -> list[Reply]:
        if msg.kind is not Kind.FORWARD:
            return super().handle(identity, msg)
        act = self.activations(msg, True)
        out = self.outputs(msg, act)
        labels = check_labels(msg.tensor("labels"), act.shape[0], out.shape[-1])
        # Mean reduction over the batch: what Opacus' per-sample clipping assumes too.
        loss = F.cross_entropy(out, labels.to(out.device))
        (grad,) = self.backprop(loss, None, [act], loss)
        reply = msg.reply(
            Kind.BACKWARD,
            meta={"loss": self.last_loss},
            tensors=wire_tensors("grad", grad, self.wire_dtype, self.residuals, msg.client),
        )
        return [(identity, reply)]
