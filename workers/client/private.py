"""DP-SGD on a client's segment: Opacus' batches, drawn so that a resume continues them.

Opacus (:func:`privacy.dpsgd.make_private_client`) wraps the segment and its optimizer and
draws the batches (Poisson-sampled by default). :class:`PrivateBatches` draws them one at a
time and keeps what a checkpoint needs to continue exactly where training stopped.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privacy.config import DPSGDConfig
from sl_pipeline.config import MAX_PIPELINE_DEPTH, ClientConfig, TrainConfig
from sl_pipeline.data import Split
from sl_pipeline.errors import ConfigError

Batch = tuple[int, torch.Tensor, torch.Tensor | None, torch.Tensor]


# What fixes a DP-SGD run's mechanism, with the key that sets it (checked at a resume)
MECHANISM_KEYS = {
    "rows": "data",
    "poisson_sampling": "privacy.dpsgd.poisson_sampling",
    "accountant": "privacy.dpsgd.accountant",
    "sample_rate": "train.batch_size",
    "noise_multiplier": "privacy.dpsgd.noise_multiplier",
}


class PrivateBatches:
    def __init__(
        self, dp: Any, poisson_sampling: bool, has_labels: bool, mechanism: dict[str, Any]
    ) -> None:
        self.dp = dp  # Opacus' handle: module, optimizer, data_loader, engine, epsilon()
        self.poisson_sampling = poisson_sampling
        self.has_labels = has_labels
        self.mechanism = mechanism  # saved with the state; a resume must find it unchanged
        self.drawn = 0  # batches drawn from the sampler this epoch
        self.next_batch: list[int] | None = None  # drawn, not yet handed out
        self.empty_before_next = 0  # empty batches drawn before next_batch: noise-only steps
        self.handed: list[tuple[int, list[int]]] = []  # the last steps handed out, with rows
        # the next epoch's first batch, drawn with the epoch's last: (draws, empties, rows)
        self.ahead: tuple[int, int, list[int]] | None = None
        self._epsilon: tuple[tuple[Any, ...], float] | None = None  # (history, its epsilon)

    @classmethod
    def attach(
        cls,
        bottom: nn.Module,
        optimizer: torch.optim.Optimizer,
        train: Split,
        cfg: DPSGDConfig,
        t: TrainConfig,
    ) -> PrivateBatches:
        from privacy.dpsgd import make_private_client  # Opacus loads only where DP-SGD is on

        labels = train.y if train.y is not None else torch.zeros(len(train), dtype=torch.int64)
        loader = DataLoader(TensorDataset(train.x, labels, train.ids), batch_size=t.batch_size)
        dp = make_private_client(bottom, optimizer, loader, cfg, t.epochs)
        if not cfg.poisson_sampling:  # counted per pass by batches(), which knows a rewind
            dp.optimizer.step_hook = None
        mechanism = {
            "rows": _digest(train.x, labels, train.ids),
            "poisson_sampling": cfg.poisson_sampling,
            "accountant": cfg.accountant,
            "sample_rate": 1.0 / len(dp.data_loader),
            "noise_multiplier": dp.noise_multiplier,
            "derived": cfg.target_epsilon is not None,  # from target_epsilon and train.epochs
        }
        return cls(dp, cfg.poisson_sampling, train.y is not None, mechanism)

    def batches(self, first_step: int, more: bool = False) -> Iterator[Batch]:
        """``(step, x, y, ids)`` from ``first_step``. Each batch's successor is drawn before
        the batch is handed out, so the checkpoint saved after a step holds the rows of the
        next one (``next_batch``): the Poisson mask comes from the operating system, and a
        client resumed after sending a step the server applied must send the same rows again
        (the server answers from its cache); it also holds the last steps handed out with
        their rows, so a pipelining client resends the steps it had in flight as they were,
        and how many batches of the epoch were drawn (empty ones included: each is a
        noise-only step, :meth:`_release_empty_batches`): the rest are drawn from there,
        none again. With ``more`` epochs to come, the next epoch's first batch is drawn with
        this epoch's last (``ahead``): the epoch's last checkpoint holds it, so a client
        killed after the server applied it sends it again (before, a fresh draw: refused)."""
        loader = self.dp.data_loader
        x_all, y_all, ids_all = loader.dataset.tensors
        if first_step == 0:
            self.drawn, self.next_batch, self.handed = 0, None, []
            if self.ahead is not None:
                self.drawn, self.empty_before_next, self.next_batch = self.ahead
                self.ahead = None
        # steps a pipelining client had in flight when it stopped: sent, so sent again as they were
        replay = [rows for step, rows in self.handed if step >= first_step]
        self.handed = [(step, rows) for step, rows in self.handed if step < first_step]
        draws = self._draws(loader)
        if self.next_batch is None:
            self.empty_before_next, self.next_batch = next(draws, (0, None))
        step = first_step
        while True:
            if replay:
                rows = replay.pop(0)
            else:
                self._release_empty_batches()
                if not self.next_batch:  # the epoch's end (after any empty batches at its end)
                    return
                rows = self.next_batch
                self.empty_before_next, self.next_batch = next(draws, (0, None))
                if more and not self.next_batch:  # this epoch's last: draw the next's first
                    self.ahead = self._first_of_next_epoch(loader)
                if step == 0 and not self.poisson_sampling:  # fixed batches: step = batch
                    self.dp.count_pass()
            self.handed = [*self.handed[-MAX_PIPELINE_DEPTH:], (step, rows)]
            idx = torch.as_tensor(rows, dtype=torch.long)
            yield step, x_all[idx], (y_all[idx] if self.has_labels else None), ids_all[idx]
            step += 1

    def last_replayable(self, epoch: int, first_step: int) -> tuple[int, int]:
        """The last (epoch, step) that a resume at ``first_step`` of ``epoch`` sends with the
        rows it had: the steps in flight at the checkpoint, then the batch drawn ahead
        (``next_batch``, or at the epoch's end the next epoch's first, ``ahead``)."""
        if first_step == 0:
            return (epoch, 0 if self.ahead and self.ahead[2] else -1)
        in_flight = sum(1 for step, _ in self.handed if step >= first_step)
        if not self.next_batch and self.ahead and self.ahead[2]:
            return (epoch + 1, 0)
        return (epoch, first_step + in_flight - (not self.next_batch))

    def _first_of_next_epoch(self, loader: Any) -> tuple[int, int, list[int]]:
        """The next epoch's first draws: its empty batches before its first rows, and those
        rows (none if the whole epoch drew none), with how many draws that took."""
        drawn, self.drawn = self.drawn, 0
        try:
            empties, rows = next(self._draws(loader), (0, []))
            return self.drawn, empties, rows
        finally:
            self.drawn = drawn

    def _draws(self, loader: Any) -> Iterator[tuple[int, list[int]]]:
        """The epoch's batches not drawn yet, counted in ``drawn``: each non-empty one with
        the number of empty ones drawn just before it, and the empty ones at the epoch's end
        as ``(count, [])``."""
        sampler = iter(loader.batch_sampler)
        if self.poisson_sampling:  # each draw is fresh: draw only what is left
            left = len(loader.batch_sampler) - self.drawn
            batches: Iterator[Any] = (next(sampler) for _ in range(max(0, left)))
        else:  # a fixed order: skip what was drawn
            batches = itertools.islice(sampler, self.drawn, None)
        empty = 0
        for indices in batches:
            self.drawn += 1
            if len(indices):
                yield empty, [int(i) for i in indices]
                empty = 0
            else:
                empty += 1
        if empty:
            yield empty, []

    def epsilon(self) -> float:
        """The accountant's epsilon, computed again only once its history changed (a scrape
        of ``sl_privacy_epsilon`` reads it: RDP takes ~25 ms, PRV ~150 ms)."""
        history = tuple(self.dp.engine.accountant.history)
        if self._epsilon is None or self._epsilon[0] != history:
            self._epsilon = (history, float(self.dp.epsilon()))
        return self._epsilon[1]

    def _release_empty_batches(self) -> None:
        """An empty Poisson batch is a step too: Opacus' update for it is the noise alone,
        and the accountant counts it. Skipping it (as before) counted fewer steps than the
        mechanism took (a third fewer at an expected batch of one; the epsilon then read
        2.4 % low at sigma 1, RDP's growth in steps being sublinear), and a skipped update
        told whoever sees the weights that no row was drawn. Run after the previous step's
        checkpoint, which holds the count, so a resume releases them once."""
        for _ in range(self.empty_before_next):
            self.dp.noise_only_step()
        self.empty_before_next = 0

    def state(self) -> dict[str, Any]:
        """Batches drawn this epoch, the next batch's rows, the accountant's history (so
        epsilon keeps counting every step released before a crash) and any dedicated
        generators (the global RNG is saved with the client)."""
        state: dict[str, Any] = {
            "drawn": self.drawn,
            "next_batch": self.next_batch,
            "empty_before_next": self.empty_before_next,
            "handed": [[step, rows] for step, rows in self.handed],
            "ahead": None if self.ahead is None else list(self.ahead),
            "accountant": dict(self.dp.engine.accountant.state_dict()),
            "mechanism": dict(self.mechanism),
        }
        for name, gen in self._generators().items():
            state[name] = gen.get_state()
        return state

    def load_state(self, state: dict[str, Any], rewind: bool = False) -> None:
        """A checkpoint's state, or an undo point's (``rewind``): the accountant then keeps
        counting as it is, as releases are never taken back."""
        if not rewind:  # a rewind is this process's own state
            self.check_mechanism(dict(state.get("mechanism") or self.mechanism))
        self.dp.forget_forward()  # a rewind abandons the open step's forward
        self.drawn = int(state["drawn"])
        pending = state.get("next_batch")  # absent from checkpoints of older versions
        self.next_batch = None if pending is None else [int(i) for i in pending]
        self.empty_before_next = int(state.get("empty_before_next", 0))
        self.handed = [
            (int(step), [int(i) for i in rows]) for step, rows in state.get("handed", [])
        ]
        ahead = state.get("ahead")
        self.ahead = (
            None if ahead is None else (int(ahead[0]), int(ahead[1]), [int(i) for i in ahead[2]])
        )
        if not rewind:
            self.dp.engine.accountant.load_state_dict(state["accountant"])
        elif not self.poisson_sampling:
            self.dp.count_pass()  # the redone steps release their fixed batches once more
        else:
            self._forget_drawn_ahead()
        for name, gen in self._generators().items():
            if name in state:
                gen.set_state(state[name])

    def _forget_drawn_ahead(self) -> None:
        """After a rewind the server holds no step past the undo point, so the batch drawn
        ahead there (and the empty draws before it, or the next epoch's first) is drawn
        afresh: its step was released once already, and two noisy updates on one batch are
        one Gaussian at noise / sqrt(2) on it, not the two independent Poisson steps the
        accountant counts (2.94 reported for 3.94 at noise 1, 15 + 2 steps at rate 1/15)."""
        if self.next_batch is not None:
            self.drawn -= self.empty_before_next + bool(self.next_batch)
            self.next_batch, self.empty_before_next = None, 0
        self.ahead = None

    def check_mechanism(self, saved: dict[str, Any]) -> None:
        """A resume continues the mechanism its checkpoint's steps went through. Otherwise
        the epsilon reads low: over fixed batches the pass under way was counted at its start
        (at the old noise; a new batch size or data order sent rows twice in one pass: 4.73
        reported for 7.08), and a Poisson batch drawn ahead at the old rate was counted at the
        new one."""
        for field, key in MECHANISM_KEYS.items():
            was, now = saved.get(field), self.mechanism[field]
            if was == now:
                continue
            if field == "noise_multiplier" and self.mechanism["derived"]:
                key = "privacy.dpsgd.target_epsilon (with train.epochs)"
            shown = "" if field == "rows" else f" ({field} {was} there, {now} now)"
            raise ConfigError(
                f"{key} changed since this DP-SGD client's checkpoint{shown}: its steps so far "
                "were drawn and counted with the checkpoint's, and a run keeps one mechanism "
                "for its epsilon to hold; set it back to resume, or train a new run afresh"
            )

    def _generators(self) -> dict[str, torch.Generator]:
        found = {
            "sampler_rng": getattr(self.dp.data_loader.batch_sampler, "generator", None),
            "noise_rng": getattr(self.dp.optimizer, "generator", None),
        }
        return {name: gen for name, gen in found.items() if gen is not None}


def _digest(*tensors: torch.Tensor) -> str:
    """The training rows' fingerprint: other rows, or the same in another order, after a
    resume change which rows the checkpoint's counts (and fixed batches) refer to."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(str((tensor.dtype, tuple(tensor.shape))).encode())
        rows = tensor.detach().cpu().reshape(-1).view(torch.uint8)
        digest.update(rows.numpy().data)  # hashed in place: no bytes copy of the data set
    return digest.hexdigest()


def check_dpsgd_kept(private: PrivateBatches | None, saved: dict[str, Any]) -> dict[str, Any]:
    """``saved``, the DP-SGD part of a client's state, if that state trained with DP-SGD
    exactly when this client does. Otherwise its weights are of the other kind (Opacus'
    wrapped segment or the plain one: a state_dict traceback before), and a DP-SGD client
    resumed from weights trained without it would report the epsilon of its own steps for
    weights that no accountant bounds."""
    if (private is None) == (not saved):
        return saved
    if private is not None:
        raise ConfigError(
            "privacy.dpsgd is set, but this client's checkpoint trained without it: its "
            "weights went through steps no accountant counted; train a new run afresh with "
            "privacy.dpsgd from its first step"
        )
    raise ConfigError(
        "privacy.dpsgd is not set, but this client's checkpoint trained with it; set it back "
        "to resume, or train a new run afresh"
    )


def check_checkpoints(cfg: ClientConfig) -> None:
    """A DP-SGD client checkpoints after every step. Its batches come from the operating
    system, so a client killed between checkpoints drew other rows for the steps after its
    checkpoint: the server answered them from its cache with gradients of the old rows (a
    shape mismatch traceback, or wrong gradients where the sizes agreed), and its epsilon
    no longer counted the steps it had released before the kill."""
    every = cfg.checkpoint.every_steps
    if cfg.privacy.get("dpsgd") is not None and cfg.checkpoint.dir and every > 1:
        raise ConfigError(
            f"checkpoint.every_steps = {every} with privacy.dpsgd: a DP-SGD client's batches "
            "cannot be drawn again, so a resume must start from its last step; set "
            "checkpoint.every_steps = 1"
        )


def check_replayable(
    private: PrivateBatches | None, welcome: dict[str, Any], resumed_at: tuple[int, int] | None
) -> None:
    """The next hop holds steps of this client past its state (a fresh start, or a resume at
    ``resumed_at`` = (epoch, next step) from a checkpoint older than them: ``every_steps >
    1``): a client without DP-SGD sends them again, the same requests, and is answered from
    the cache; a DP-SGD client can only for the steps its state holds the rows of, as its
    batches come from the operating system, and the cached gradients of other rows failed
    it (a shape mismatch traceback, or, where the sizes agreed, wrong gradients applied)."""
    applied = welcome.get("applied")
    if private is None or not applied:
        return
    held = (int(applied[0]), int(applied[1]))
    if resumed_at is not None and held <= private.last_replayable(*resumed_at):
        return
    run = welcome.get("run") or "its run"
    where = (
        "without the client's state"
        if resumed_at is None
        else (
            f"past its checkpoint's step {(resumed_at[0], resumed_at[1] - 1)}: its checkpoints "
            "come every checkpoint.every_steps steps, and a kill between two loses the rows "
            "(checkpoint.every_steps = 1, init's, loses none)"
        )
    )
    raise ConfigError(
        f"run {run} already applied this client's steps up to {held}, and DP-SGD batches "
        f"cannot be drawn again {where}: resume it from a checkpoint that holds them, else "
        f"stop that run (`sl-pipeline runs stop {run}`) and start it again"
    )
