"""What a client does in one step, per topology, with its privacy defenses.

A :class:`StepRunner` owns the client's segment(s), optimizer and defenses. The worker
(:mod:`workers.client.worker`) owns the connection and the loop, and calls the runner's hooks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from privacy.config import DPSGDConfig
from privacy.defenses import build_defenses
from privacy.randomness import export_keys, import_keys
from sl_pipeline.config import resolve_path
from sl_pipeline.data import Split, batch_order, iter_batches
from sl_pipeline.errors import ConfigError, PeerError, PrivacyError, ProtocolError, StepLostError
from sl_pipeline.lowbit import Residuals
from sl_pipeline.messages import Kind, Message
from sl_pipeline.models import build_segments, make_optimizer, resolve_device
from sl_pipeline.tensors import as_input, wire_labels, wire_tensors
from workers.client.hijack_watch import HijackWatch, build_detector
from workers.client.host import RunnerConfig, RunnerHost
from workers.client.private import PrivateBatches
from workers.client.releases import ActivationAccounting
from workers.client.replies import Shape, reply_loss, reply_tensor
from workers.runtime.savedmodel import load_weights, save_weights

log = logging.getLogger("sl_pipeline.client")
MAX_STEP_REDOS = 10
Batch = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]
DATA_STATE = "data"  # key of the saved data encoding beside the segments' weights


class StepRunner:
    """Vanilla (and the base of the others): act + labels out, gradient at the cut back."""

    sends_labels = True
    protects_labels = False  # label protection runs here (this client sends label gradients)
    supports_pipelining = True  # one exchange per step: the forward can run ahead
    # The reply wait follows the measured round trip; off where a reply waits for other
    # parties (their pace is no round trip of ours, and a resent evaluation part is refused).
    adaptive_wait = True
    # The rest of the model after the first segment is what an honest party computes with
    # cross-entropy on this client's labels: the hijack detector can replicate it.
    replicable = True

    def __init__(self, worker: RunnerHost, cfg: RunnerConfig) -> None:
        self.host = worker
        self.cfg = cfg
        if self.sends_labels and cfg.train.epochs > 0 and worker.data.train.y is None:
            raise ConfigError("this topology needs labels at the client; set data.label")
        self.privacy = cfg.privacy
        self.label_protection: Any = None
        if self.privacy.label_protection_on:
            if not self.protects_labels:
                raise PrivacyError("privacy.label belongs in the label holder's config")
            from privacy.label import build_label_protection

            label = self.privacy.label
            assert label is not None
            if label.mechanism == "marvell" and cfg.model.classes != 2:
                raise PrivacyError(
                    f"privacy.label.mechanism 'marvell' needs binary labels; "
                    f"model.classes = {cfg.model.classes}",
                    hint="use mechanism 'gaussian' for more than two classes",
                )
            self.label_protection = build_label_protection(label)
        self.defense = build_defenses(self.privacy)
        self.nopeek = None
        if self.privacy.nopeek is not None and self.privacy.nopeek.alpha > 0:
            from privacy.nopeek import NoPeekLoss

            self.nopeek = NoPeekLoss(self.privacy.nopeek.alpha)
        self.device = resolve_device(cfg.train.device)
        self.watch: HijackWatch | None = None
        if self.privacy.hijack is not None:
            args = (cfg.model, cfg.train, worker.topology)
            found = build_detector(
                self.privacy, *args, replicable=self.replicable, device=self.device
            )
            self.watch = HijackWatch(found, self.privacy.hijack, worker.metrics)
        self.modules = {n: m.to(self.device) for n, m in self.build_modules().items()}
        params = [p for m in self.modules.values() for p in m.parameters()]
        t = cfg.train
        self.optimizer = make_optimizer(params, t.optimizer, t.lr, t.momentum)
        self.dp: Any = None  # Opacus' handle, with DP-SGD
        self.private: PrivateBatches | None = None
        if self.privacy.dpsgd is not None:
            self._attach_dpsgd(self.privacy.dpsgd)
        self.activation = ActivationAccounting(self.privacy.noise)
        self.activation.track(worker.metrics)
        self.residuals = Residuals()  # int2-ef (u-shaped): what our output gradients owe

    # ---- set-up --------------------------------------------------------------------------
    def build_modules(self) -> dict[str, nn.Module]:
        return {"bottom": build_segments(self.cfg.model, self.host.topology)[0]}

    def _attach_dpsgd(self, cfg: DPSGDConfig) -> None:
        """Opacus' segment, optimizer and batches in place of the plain ones; the epsilon
        gauge reads the accountant at each scrape (it counts every step)."""
        self.private = PrivateBatches.attach(
            self.bottom, self.optimizer, self.host.data.train, cfg, self.cfg.train
        )
        self.dp = self.private.dp
        self.modules["bottom"] = self.dp.module
        self.optimizer = self.dp.optimizer
        self.host.metrics.track_privacy("dpsgd", self.private.epsilon, cfg.target_epsilon)

    @property
    def bottom(self) -> nn.Module:
        return self.modules["bottom"]

    @property
    def out_sample(self) -> Shape:
        """One sample of the output an evaluation's reply holds: the server's logits."""
        return (None,)

    # ---- batches -------------------------------------------------------------------------
    def epoch_batches(self, epoch: int, first_step: int = 0) -> Iterator[tuple[int, *Batch]]:
        """``(step, x, y, ids)`` of this epoch from ``first_step`` (after a resume)."""
        if self.private is not None:
            for batch in self.private.batches(first_step, epoch + 1 < self.cfg.train.epochs):
                self.activation.handed_out(batch[3])
                yield batch
            return
        train = self.host.data.train
        order = batch_order(len(train), self.cfg.train.batch_size, self.cfg.train.seed, epoch)
        for step, idx in enumerate(order):
            if step >= first_step:
                y = train.y[idx] if train.y is not None else None
                self.activation.handed_out(train.ids[idx])
                yield step, train.x[idx], y, train.ids[idx]

    def dp_state(self) -> dict[str, Any]:
        """DP-SGD's part of the client checkpoint (see :class:`PrivateBatches`)."""
        return self.private.state() if self.private is not None else {}

    def load_dp_state(self, state: dict[str, Any], rewind: bool = False) -> None:
        if self.private is not None and state:
            self.private.load_state(state, rewind)

    # ---- one step ------------------------------------------------------------------------
    def cut(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(raw activations, what is sent): the defenses run here, before the wire."""
        act = self.bottom(x.to(self.device))
        return act, self.defense.apply(act)

    def forward_message(
        self, step: int, sent: torch.Tensor, y: torch.Tensor | None, ids: torch.Tensor
    ) -> Message:
        tensors = wire_tensors("act", sent, self.cfg.train.wire_dtype)
        if self.sends_labels:
            if y is None:
                raise ConfigError("this topology needs labels at the client; set data.label")
            tensors["labels"] = wire_labels(y, self.cfg.train.wire_dtype)
        return self.host.message(Kind.FORWARD, step, tensors=tensors, meta=self.forward_meta())

    def forward_meta(self) -> dict[str, Any]:
        return {}

    def apply_gradient(
        self, x: torch.Tensor, act: torch.Tensor, sent: torch.Tensor, grad: torch.Tensor
    ) -> None:
        """Finish backpropagation locally (plus the NoPeek term), then step."""
        roots, grads = [sent], [as_input(grad, requires_grad=False, device=self.device)]
        if self.nopeek is not None:
            penalty = self.nopeek(x.to(self.device), act)  # alpha * dCor(x, act)
            self.host.metrics.dcor_last.set(float(penalty.detach()) / self.nopeek.alpha)
            roots.append(penalty)
            grads.append(torch.ones_like(penalty))  # on its device
        torch.autograd.backward(roots, grads)
        self.optimizer.step()

    @property
    def pipelines(self) -> bool:
        return self.supports_pipelining and self.dp is None

    def stash_forward(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """The forward on a copy of the current weights (weight stashing for pipelining)."""
        stash = {
            n: p.detach().clone().requires_grad_(True) for n, p in self.bottom.named_parameters()
        }
        state = {**stash, **dict(self.bottom.named_buffers())}
        act = torch.func.functional_call(self.bottom, state, (x.to(self.device),))
        return act, self.defense.apply(act), stash

    def apply_stashed(
        self,
        x: torch.Tensor,
        act: torch.Tensor,
        sent: torch.Tensor,
        stash: dict[str, torch.Tensor],
        grad: torch.Tensor,
    ) -> None:
        """Backward through the stashed weights; apply that gradient to the current ones."""
        self.optimizer.zero_grad(set_to_none=True)
        roots, grads = [sent], [as_input(grad, requires_grad=False, device=self.device)]
        if self.nopeek is not None:
            roots.append(self.nopeek(x.to(self.device), act))
            grads.append(torch.ones_like(roots[-1]))
        torch.autograd.backward(roots, grads)
        for name, param in self.bottom.named_parameters():
            param.grad = stash[name].grad
        self.optimizer.step()

    async def train_step(
        self, step: int, x: torch.Tensor, y: torch.Tensor | None, ids: torch.Tensor
    ) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        act, sent = self.cut(x)
        reply = await self.host.request(self.forward_message(step, sent, y, ids))
        grad = reply_tensor(reply, Kind.BACKWARD, "grad", self.cfg.max_abs, sent.shape)
        loss = reply_loss(reply)  # all of the reply checked before any of it is applied
        self.scrutinize(grad, y, sent)
        self.apply_gradient(x, act, sent, grad)
        return loss

    def scrutinize(self, grad: torch.Tensor, y: torch.Tensor | None, sent: torch.Tensor) -> None:
        """Feed the hijack detector (if on) the cut gradient, and the activations it answers,
        before it is applied; with ``privacy.hijack.stop`` a flag ends training before the
        gradient touches the weights."""
        if self.watch is not None and y is not None and grad.shape[0] == y.shape[0]:
            self.watch.observe(grad, y, sent)

    async def exchange_twice(
        self,
        msg: Message,
        out_shape: Shape,
        loss_of: Callable[[torch.Tensor], torch.Tensor],
        protect_with: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Message]:
        """FORWARD -> the server's output (of ``out_shape``); the loss here; BACKWARD(its
        gradient) -> the gradient at the cut. With ``protect_with`` (labels) the label
        protection runs on that gradient before it leaves (the server may cluster it).
        A server that lost the open step between the two (it restarted, or dropped our old
        session) answers ``step_lost``: redo the step."""
        why = ""
        for _ in range(MAX_STEP_REDOS):
            self.optimizer.zero_grad(set_to_none=True)  # a redo must not add a second head grad
            reply = await self.host.request(msg)
            out = reply_tensor(reply, Kind.RESULT, "out", self.cfg.max_abs, out_shape)
            out = as_input(out, True, self.device)
            loss = loss_of(out)
            loss.backward()
            assert out.grad is not None
            grad = out.grad
            if self.label_protection is not None and protect_with is not None:
                grad = self.label_protection.protect(grad, protect_with)
            tensors = wire_tensors(
                "grad", grad, self.cfg.train.wire_dtype, self.residuals, "server"
            )
            try:
                return loss, await self.host.request(msg.follow(Kind.BACKWARD, tensors=tensors))
            except PeerError as exc:
                if exc.remote_code != StepLostError.code:
                    raise
                log.warning("the server lost open step %s (%s); redoing it", msg.step, exc)
                why = exc.reason
        raise ProtocolError(f"step {msg.step} was lost {MAX_STEP_REDOS} times ({why}); giving up")

    # ---- evaluation and inference ----------------------------------------------------------
    async def predict(
        self,
        x: torch.Tensor,
        step: int = 0,
        ids: torch.Tensor | None = None,
        kind: Kind = Kind.PREDICT,
    ) -> torch.Tensor:
        out, _ = await self._infer(x, step, ids, kind)
        return out

    async def _infer(
        self, x: torch.Tensor, step: int, ids: torch.Tensor | None, kind: Kind
    ) -> tuple[torch.Tensor, Message]:
        for module in self.modules.values():
            module.eval()
        try:  # a rewind raised out of the request must find the segments training again
            with torch.no_grad():
                act = self.bottom(x.to(self.device))
                sent = self.defense.apply(act) if self.privacy.noise else act
            tensors = wire_tensors("act", sent, self.cfg.train.wire_dtype)
            if ids is not None and not self.sends_labels and "head" not in self.modules:
                tensors["ids"] = ids
            reply = await self.host.request(
                self.host.message(kind, step, tensors=tensors, meta=self.forward_meta())
            )
            shape = (len(x), *self.out_sample)
            out = reply_tensor(reply, Kind.RESULT, "out", self.cfg.max_abs, shape)
            out = as_input(out, requires_grad=False, device=self.device)
            if "head" in self.modules:
                with torch.no_grad():
                    out = self.modules["head"](out)
        finally:
            for module in self.modules.values():
                module.train()
        return out.cpu(), reply

    async def evaluate(self, test: Split) -> float | None:
        """Test accuracy; None for a party that holds no labels (a vertical feature party:
        only the label holder scores the evaluation, see the vertical engine)."""
        correct, known = 0, True
        for step, (x, y, ids) in enumerate(_eval_batches(test)):
            out, _ = await self._infer(x, step, ids, Kind.EVALUATE)
            if y is not None:
                correct += int((out.argmax(dim=1) == y).sum())
            else:
                known = False
        return correct / max(1, len(test)) if known else None

    # ---- hooks and reports -----------------------------------------------------------------
    async def before_epoch(self, epoch: int) -> None:
        return None

    def restore_accounting(self, state: dict[str, Any]) -> None:
        """After a resume: the releases already made still count (never rolled back)."""
        self.activation.restore(state)

    async def after_epoch(self, epoch: int) -> None:
        return None

    async def after_training(self) -> bool:
        """True when the weights changed after the last evaluation (group topologies)."""
        return False

    def extra_state(self) -> dict[str, Any]:
        """What this runner adds to the client's checkpoint: its keyed noise's keys (a step
        recomputed after a restart is released as before), round-robin its run nonce."""
        return {"noise_keys": export_keys(self._keyed())}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        import_keys(self._keyed(), state.get("noise_keys"))

    def _keyed(self) -> dict[str, object]:
        return {"defense": self.defense, "label": self.label_protection}

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = self.activation.report()
        if self.private is not None:
            out["dpsgd_epsilon"] = round(self.private.epsilon(), 4)
        if self.watch is not None:
            out.update(self.watch.report())
        return out

    def save(self) -> None:
        """Each party saves only its own segment(s)."""
        if not self.cfg.client.save:
            return
        path = resolve_path(self.host.base, self.cfg.client.save, "client.save", must_exist=False)
        state: dict[str, Any] = {name: _plain_state(m) for name, m in self.modules.items()}
        data_state = self.host.data.saved_state()  # predict encodes/scales new rows the same
        if data_state is not None:
            state[DATA_STATE] = data_state
        save_weights(state, path, "the trained segment (client.save)")

    def load(self, path: Path) -> None:
        state = load_weights(path, "client.save")
        for name, module in self.modules.items():
            _unwrap(module).load_state_dict(state[name])


def _unwrap(module: nn.Module) -> nn.Module:
    return getattr(module, "_module", module)  # Opacus' GradSampleModule wraps the segment


def _plain_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return dict(_unwrap(module).state_dict())


def _eval_batches(test: Split) -> Iterator[Batch]:
    for start, (x, y) in zip(range(0, len(test), 256), iter_batches(test, 256), strict=True):
        yield x, y, test.ids[start : start + 256]


__all__ = ["StepRunner"]
