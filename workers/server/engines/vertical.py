"""Vertically partitioned data: several parties hold different features of the same samples.

Each feature party sends its cut-layer output for a batch together with the batch's sample
ids; the server (the only label holder) waits until every party has sent its part of that
batch, fuses them (concat, sum or mean), computes the loss and sends each party only the
gradient of its own part, after the configured label protection. A party that falls behind
or sends another batch's ids gets an error and never touches the others' step.

Before training, parties with ``data.id`` align their rows by private set intersection
(:mod:`sl_pipeline.psi`): the server only relays their sealed PSI payloads (WEIGHTS messages,
``op = "psi"``), pairing each round's posts, and never holds a key to open them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from privacy.config import LabelConfig, PrivacyConfig
from privacy.label import LabelProtection, build_label_protection
from sl_pipeline.config import ServerConfig
from sl_pipeline.data import load_arrays
from sl_pipeline.errors import ConfigError, OverloadedError, ProtocolError, StepLostError
from sl_pipeline.messages import Kind, Message, error_message
from sl_pipeline.models import vertical_top
from sl_pipeline.tensors import wire_tensors
from workers.server.engines.base import Engine, Reply, log, run_segment

MAX_OPEN_BATCHES = 64  # batches some parties sent and others not yet (pipelining, stragglers)


class BatchKey(NamedTuple):
    """A batch the parties send their parts of: its message kind, and its step. The kind
    is part of the key: an evaluation batch never completes with a party's PREDICT part, so
    one party cannot decide what the others' parts of a batch get back."""

    kind: str  # "forward", "evaluate" or "predict" (Kind values)
    epoch: int
    step: int


@dataclass
class Part:
    identity: bytes
    msg: Message
    act: torch.Tensor


@dataclass(frozen=True)
class OpenBatch:
    """The batch whose fused output went to the label client, awaiting its gradient."""

    epoch: int
    step: int
    parts: list[Part]
    out: torch.Tensor


class VerticalEngine(Engine):
    def __init__(self, cfg: ServerConfig, base: Path | None = None) -> None:
        if cfg.server.parties < 2:
            raise ConfigError("vertical: server.parties must be at least 2 feature parties")
        super().__init__(vertical_top(cfg.model, cfg.server.parties, cfg.server.fuse), cfg)
        self.act_shape = (cfg.model.hidden,)  # each party's cut: models.vertical_bottom
        self.predicts_for_members = False  # a PREDICT part would fetch the fused test outputs
        self.parties = cfg.server.parties
        self.label_holder = cfg.server.label_holder
        privacy = PrivacyConfig.from_mapping(cfg.privacy) if cfg.privacy else PrivacyConfig()
        if self.label_holder and privacy.label_protection_on:
            raise ConfigError(
                "vertical: privacy.label runs where the labels are; with server.label_holder "
                "set, this server has no labels to protect: remove [privacy.label]"
            )
        self.labels = None if self.label_holder else self._load_labels(cfg, base or Path("."))
        # One protection per party: Marvell's plan is fitted to a party's own gradients, and
        # a shared instance would carry one party's direction into another's batches.
        self.label_config = privacy.label or LabelConfig()
        self.label_generator: torch.Generator | None = None  # seeded by audits
        self.label_protections: dict[str, LabelProtection] = {}
        self._open: OpenBatch | None = None
        self._waiting: dict[BatchKey, dict[str, Part]] = {}
        self._done: dict[str, tuple[int, int]] = {}  # per kind: newest completed batch
        self.last_grads: dict[str, torch.Tensor] = {}  # what each party got (for audits)
        self._psi: dict[int, dict[str, tuple[bytes, Message]]] = {}  # round -> posts
        self._eval_counts = (0, 0, 0)  # this evaluation pass so far: epoch, correct, rows

    @staticmethod
    def _load_labels(cfg: ServerConfig, base: Path) -> torch.Tensor:
        if not cfg.data.label and not cfg.data.dataset:
            raise ConfigError("vertical: the server holds the labels; set [data] on the server")
        _, y, _ = load_arrays(cfg.data, base)
        if y is None:
            raise ConfigError("vertical: the server's [data] has no labels (set data.label)")
        return torch.from_numpy(y)

    def handle(self, identity: bytes, msg: Message) -> list[Reply]:
        if msg.kind is Kind.BACKWARD and self.label_holder:
            return self._label_backward(msg)
        if self.relays_only(msg):
            return self._relay_psi(identity, msg)
        if msg.kind is not Kind.FORWARD:
            return super().handle(identity, msg)
        return self._gather(identity, msg, train=True)

    def evaluate(self, identity: bytes, msg: Message) -> list[Reply]:
        return self._gather(identity, msg, train=False)

    def relays_only(self, msg: Message) -> bool:
        return msg.kind is Kind.WEIGHTS and msg.meta.get("op") == "psi"

    def _gather(self, identity: bytes, msg: Message, train: bool) -> list[Reply]:
        kind = msg.kind.value
        key = BatchKey(kind, msg.epoch, msg.step)
        if (msg.epoch, msg.step) <= self._done.get(kind, (-1, -1)):
            raise ProtocolError(
                f"batch {(msg.epoch, msg.step)} is already done; this party fell behind"
            )
        if "labels" in msg.tensors:
            raise ProtocolError("vertical: feature parties must not send labels")
        if key not in self._waiting and len(self._waiting) >= MAX_OPEN_BATCHES:
            self.on_bound("waiting")  # parties far ahead of the others cannot pile up batches
            raise OverloadedError(f"vertical: {MAX_OPEN_BATCHES} batches already wait; retry")
        act = self.activations(msg, train)
        # a part's own refusal, before it waits (predicted rows are no rows of the labels)
        self._check_ids(msg.tensor("ids"), len(act), labelled=msg.kind is not Kind.PREDICT)
        parts = self._waiting.setdefault(key, {})
        parts[msg.client] = Part(identity, msg, act)
        if len(parts) < self.parties:
            return []
        del self._waiting[key]
        done = self._done[kind] = (msg.epoch, msg.step)
        for stale in [k for k in self._waiting if k.kind == kind and (k.epoch, k.step) < done]:
            del self._waiting[stale]  # a batch the others abandoned can never complete
        ordered = [parts[name] for name in sorted(parts)]
        ids = ordered[0].msg.tensor("ids")
        if any(not torch.equal(p.msg.tensor("ids"), ids) for p in ordered[1:]):
            # every party of the batch is told (the batch is over for each of them), not
            # only the last to send, while the others waited for a reply that never came
            error = (
                "parties sent different sample ids for the same batch: give every party the "
                "same rows in the same order (as many rows each) and the same data.seed, or "
                "set data.id on each to align the rows by their ids"
            )
            return [(p.identity, error_message("protocol", error, request=p.msg)) for p in ordered]
        return self._step(ordered, ids) if train else self._predict(ordered, ids)

    def _check_ids(self, ids: torch.Tensor, batch: int, labelled: bool) -> None:
        """One int64 sample id per row of the part's ``act`` (and, where the labels are
        here, each a row of them). Checked at completion, ids of another shape were an
        ``internal`` error with a traceback, and the other parties' parts were lost."""
        if ids.dtype != torch.int64 or tuple(ids.shape) != (batch,):
            raise ProtocolError(
                f"vertical: ids must be int64 of shape ({batch},), one per row of act; "
                f"got {ids.dtype} of shape {list(ids.shape)}"
            )
        if labelled and self.labels is not None and batch:
            self._labels_for(ids)

    def _fuse(self, acts: list[torch.Tensor]) -> torch.Tensor:
        if self.cfg.server.fuse == "concat":
            return torch.cat(acts, dim=1)
        if any(a.shape != acts[0].shape for a in acts):
            raise ProtocolError("sum/mean fusion needs every party's output to have one shape")
        total = torch.stack(acts).sum(dim=0)
        return total / len(acts) if self.cfg.server.fuse == "mean" else total

    def _labels_for(self, ids: torch.Tensor) -> torch.Tensor:
        assert self.labels is not None
        if ids.dtype != torch.int64 or int(ids.min()) < 0 or int(ids.max()) >= len(self.labels):
            raise ProtocolError(f"sample ids must be int64 in [0, {len(self.labels)})")
        return self.labels[ids]

    def _step(self, parts: list[Part], ids: torch.Tensor) -> list[Reply]:
        if self.label_holder:
            return self._to_label_holder(parts)
        labels = self._labels_for(ids)
        out = run_segment(self.model, self._fuse([p.act for p in parts]))
        loss = F.cross_entropy(out, labels.to(out.device))
        grads = self.backprop(loss, None, [p.act for p in parts], loss)
        replies = []
        for part, cut_grad in zip(parts, grads, strict=True):
            grad = self._protection(part.msg.client).protect(cut_grad.cpu(), labels)
            self.last_grads[part.msg.client] = grad.detach()
            # No loss: a feature party does not need it, and a batch's loss is a function of
            # its labels that no label protection covers.
            reply = part.msg.reply(
                Kind.BACKWARD,
                tensors=wire_tensors(
                    "grad", grad, self.wire_dtype, self.residuals, part.msg.client
                ),
            )
            replies.append((part.identity, reply))
        return replies

    def _protection(self, party: str) -> LabelProtection:
        if party not in self.label_protections:
            self.label_protections[party] = build_label_protection(
                self.label_config, generator=self.label_generator
            )
        return self.label_protections[party]

    def _predict(self, parts: list[Part], ids: torch.Tensor) -> list[Reply]:
        self.model.eval()
        with torch.no_grad():
            out = run_segment(self.model, self._fuse([p.act for p in parts]))
        self.model.train()
        # every part has one kind (the batch key); PREDICT comes only from peers that joined
        # to infer (RunHost.evaluate refuses it from a training run's members)
        evaluating = parts[0].msg.kind is Kind.EVALUATE
        if any(p.msg.kind is not parts[0].msg.kind for p in parts):
            raise ProtocolError("vertical: the parts of one batch must have one message kind")
        if evaluating and not self.label_holder:
            self._score(parts[0].msg, out, self._labels_for(ids))
        # Evaluation rows are labelled rows: their outputs would hand a feature party the
        # labels (AUC ~1), and so would any score of them: a party that moves one row's
        # activation between passes and watches a batch's count of correct answers reads
        # that row's label. Only the label client gets the outputs; the others get an empty
        # output and nothing else, and the server keeps the accuracy to itself.
        hidden = out[:, :0]
        return [
            (
                p.identity,
                p.msg.reply(
                    Kind.RESULT,
                    tensors=wire_tensors(
                        "out",
                        hidden if evaluating and p.msg.client != self.label_holder else out,
                        self.wire_dtype,
                    ),
                ),
            )
            for p in parts
        ]

    def _score(self, msg: Message, out: torch.Tensor, labels: torch.Tensor) -> None:
        """Count this batch into the server's own evaluation of the pass (``test_accuracy``).
        A pass starts at step 0; the one before is logged then (the last one when the run
        ends, by the server)."""
        epoch, correct, total = self._eval_counts
        if msg.step == 0:
            if total:
                log.info(
                    "vertical evaluation after epoch %d: test accuracy %.4f",
                    epoch + 1,
                    correct / total,
                )
            epoch, correct, total = msg.epoch, 0, 0
        correct += int((out.argmax(1).cpu() == labels).sum())
        total += len(labels)
        self._eval_counts = (epoch, correct, total)
        self.test_accuracy = correct / total

    # ---- a designated label client holds the labels and the loss -------------------------
    def _to_label_holder(self, parts: list[Part]) -> list[Reply]:
        """Send the fused output to the label client only; the others wait for its gradient."""
        holder = [p for p in parts if p.msg.client == self.label_holder]
        if not holder:
            raise ProtocolError(f"vertical: label client {self.label_holder!r} sent no part")
        out = run_segment(self.model, self._fuse([p.act for p in parts]))
        msg = holder[0].msg
        self._open = OpenBatch(msg.epoch, msg.step, parts, out)
        reply = msg.reply(Kind.RESULT, tensors=wire_tensors("out", out, self.wire_dtype))
        return [(holder[0].identity, reply)]

    def _label_backward(self, msg: Message) -> list[Reply]:
        if msg.client != self.label_holder:
            raise ProtocolError("vertical: only the label client sends the output gradient")
        if self._open is None or (self._open.epoch, self._open.step) != (msg.epoch, msg.step):
            # e.g. this server restarted between the fused output and its gradient: the
            # label client redoes the step from its forward (the parties resend theirs)
            raise StepLostError(
                f"vertical: output gradient for batch {(msg.epoch, msg.step)}, which is not "
                "open here; send its forward again"
            )
        parts, out = self._open.parts, self._open.out
        # A bad gradient raises before anything changes and leaves the step open for a resend.
        grads = self.backprop_output(msg, out, [p.act for p in parts])
        self._open = None
        replies = []
        for part, grad in zip(parts, grads, strict=True):
            self.last_grads[part.msg.client] = grad.detach().cpu()
            tensors = wire_tensors("grad", grad, self.wire_dtype, self.residuals, part.msg.client)
            # the label client waits on its BACKWARD, every other party on its FORWARD
            asked = msg if part.msg.client == msg.client else part.msg
            replies.append((part.identity, asked.reply(Kind.BACKWARD, tensors=tensors)))
        return replies

    # ---- private set intersection: relay sealed payloads it cannot open -------------------
    def _relay_psi(self, identity: bytes, msg: Message) -> list[Reply]:
        if not self.label_holder:
            raise ProtocolError(
                "vertical: parties aligning ids by PSI need the labels on a client "
                "(server.label_holder); a server holding labels by row would need the ids"
            )
        if self.parties != 2:
            raise ProtocolError("vertical: PSI alignment supports exactly 2 parties")
        round_ = msg.meta.get("round")
        sealed = msg.tensor("sealed")
        if round_ not in (0, 1) or sealed.dtype != torch.uint8 or sealed.dim() != 1:
            raise ProtocolError("vertical: a PSI post needs round 0 or 1 and 1-D uint8 'sealed'")
        posts = self._psi.setdefault(int(round_), {})
        posts[msg.client] = (identity, msg)  # a resent post replaces the earlier one
        if len(posts) < self.parties:
            return []
        del self._psi[int(round_)]
        (_, (id_a, msg_a)), (_, (id_b, msg_b)) = sorted(posts.items())
        return [
            (id_a, _psi_reply(msg_a, msg_b)),
            (id_b, _psi_reply(msg_b, msg_a)),
        ]

    def queue_depth(self) -> int:
        return sum(len(parts) for parts in self._waiting.values())

    def forget(self, client: str) -> list[Reply]:
        for key in list(self._waiting):
            self._waiting[key].pop(client, None)
        for posts in self._psi.values():
            posts.pop(client, None)
        return []


def _psi_reply(to: Message, other: Message) -> Message:
    """The other party's sealed payload, answering ``to``'s own post of the same round."""
    meta = {"op": "psi", "round": other.meta["round"], "from": other.client}
    return to.reply(Kind.WEIGHTS, meta=meta, tensors={"sealed": other.tensor("sealed")})
