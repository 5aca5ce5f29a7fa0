"""DP-SGD on a client's segment: Opacus' batches, drawn so that a resume continues them.

Opacus (:func:`privacy.dpsgd.make_private_client`) wraps the segment and its optimizer and
draws the batches (Poisson-sampled by default). :class:`PrivateBatches` draws them one at a
time and keeps what a checkpoint needs to continue exactly where training stopped.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privacy.config import DPSGDConfig
from sl_pipeline.config import TrainConfig
from sl_pipeline.data import Split

Batch = tuple[int, torch.Tensor, torch.Tensor | None, torch.Tensor]


class PrivateBatches:
    def __init__(self, dp: Any, poisson_sampling: bool, has_labels: bool) -> None:
        self.dp = dp  # Opacus' handle: module, optimizer, data_loader, engine, epsilon()
        self.poisson_sampling = poisson_sampling
        self.has_labels = has_labels
        self.drawn = 0  # batches drawn from the sampler this epoch

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
        return cls(dp, cfg.poisson_sampling, train.y is not None)

    def batches(self, first_step: int) -> Iterator[Batch]:
        """``(step, x, y, ids)`` from ``first_step``: the checkpoint holds the RNG state after
        the last step and how many batches of the epoch were drawn (empty ones included,
        which are skipped); the remaining ones are drawn from there, none again."""
        loader = self.dp.data_loader
        x_all, y_all, ids_all = loader.dataset.tensors
        if first_step == 0:
            self.drawn = 0
        sampler = iter(loader.batch_sampler)
        if self.poisson_sampling:  # each draw is fresh: draw only what is left
            left = len(loader.batch_sampler) - self.drawn
            batches: Iterator[Any] = (next(sampler) for _ in range(max(0, left)))
        else:  # a fixed order: skip what was drawn
            batches = itertools.islice(sampler, self.drawn, None)
        step = first_step
        for indices in batches:
            self.drawn += 1
            if len(indices):
                idx = torch.as_tensor(indices, dtype=torch.long)
                yield step, x_all[idx], (y_all[idx] if self.has_labels else None), ids_all[idx]
                step += 1

    def state(self) -> dict[str, Any]:
        """Batches drawn this epoch, the accountant's history (so epsilon keeps counting
        every step released before a crash) and any dedicated generators (the global RNG is
        saved with the client)."""
        state: dict[str, Any] = {
            "drawn": self.drawn,
            "accountant": dict(self.dp.engine.accountant.state_dict()),
        }
        for name, gen in self._generators().items():
            state[name] = gen.get_state()
        return state

    def load_state(self, state: dict[str, Any]) -> None:
        self.drawn = int(state["drawn"])
        self.dp.engine.accountant.load_state_dict(state["accountant"])
        for name, gen in self._generators().items():
            if name in state:
                gen.set_state(state[name])

    def _generators(self) -> dict[str, torch.Generator]:
        found = {
            "sampler_rng": getattr(self.dp.data_loader.batch_sampler, "generator", None),
            "noise_rng": getattr(self.dp.optimizer, "generator", None),
        }
        return {name: gen for name, gen in found.items() if gen is not None}
