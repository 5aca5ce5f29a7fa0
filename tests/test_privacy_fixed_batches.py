"""DP-SGD with fixed batches (``poisson_sampling = false``): the same batches in the same
order every epoch, so an example is in one batch per pass and a pass is one unamplified
Gaussian mechanism on it. Before, Opacus' per-step count at sample rate 1/len(loader)
(which assumes Poisson sampling) was reported: 1.26 for what is 4.73 at a noise multiplier
of 1 over one epoch, 1.52 for 9.01 over three."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from opacus.accountants import create_accountant
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privacy.config import DPSGDConfig
from privacy.dpsgd import make_private_client
from sl_pipeline.config import TrainConfig
from sl_pipeline.data import Split
from workers.client.private import PrivateBatches
from workers.tools.inprocess import run_deployment

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
ROWS, BATCH, DELTA = 40, 8, 1e-5


def _epsilon(sigma: float, passes: int) -> float:
    accountant = create_accountant("rdp")
    accountant.history = [(sigma, 1.0, passes)]
    return float(accountant.get_epsilon(delta=DELTA))


def _attach(**dpsgd: float) -> PrivateBatches:
    torch.manual_seed(0)
    bottom = nn.Linear(4, 3)
    optimizer = torch.optim.SGD(bottom.parameters(), lr=0.1)
    train = Split(torch.randn(ROWS, 4), torch.randint(0, 2, (ROWS,)), torch.arange(ROWS))
    cfg = DPSGDConfig(poisson_sampling=False, delta=DELTA, **dpsgd)  # type: ignore[arg-type]
    return PrivateBatches.attach(
        bottom, optimizer, train, cfg, TrainConfig(batch_size=BATCH, epochs=3)
    )


def _step(private: PrivateBatches, x: torch.Tensor) -> None:
    private.dp.optimizer.zero_grad(set_to_none=True)
    act = private.dp.module(x)
    act.backward(torch.ones_like(act))
    private.dp.optimizer.step()


def test_a_pass_over_fixed_batches_is_one_unamplified_gaussian_mechanism() -> None:
    # Prepare
    private = _attach(noise_multiplier=1.0)
    # Execute: two epochs of five steps, the second one cut short by a rewind of two steps
    for _step_no, x, _y, _ids in private.batches(0):
        _step(private, x)
    after_one = private.dp.epsilon()
    batches = private.batches(0)
    for _step_no, x, _y, _ids in itertools.islice(batches, 2):
        _step(private, x)
    undo_point = private.state()
    for _step_no, x, _y, _ids in itertools.islice(batches, 2):
        _step(private, x)
    private.load_state(undo_point, rewind=True)
    for _step_no, x, _y, _ids in private.batches(2):
        _step(private, x)
    # Assert: one pass each epoch, and one more for the batches the rewind released again
    assert after_one == pytest.approx(_epsilon(1.0, 1))
    assert after_one > 4  # Opacus' per-step count said about 1.3
    assert private.dp.epsilon() == pytest.approx(_epsilon(1.0, 3))


def test_the_library_counts_a_pass_at_every_len_loader_th_step() -> None:
    """make_private_client used alone (no PrivateBatches): its own hook counts passes."""
    torch.manual_seed(0)
    bottom = nn.Linear(4, 3)
    loader = DataLoader(TensorDataset(torch.randn(ROWS, 4)), batch_size=BATCH)
    cfg = DPSGDConfig(noise_multiplier=1.0, poisson_sampling=False, delta=DELTA)
    optimizer = torch.optim.SGD(bottom.parameters(), lr=0.1)
    private = make_private_client(bottom, optimizer, loader, cfg, epochs=2)
    epsilons = []
    for _epoch in range(2):
        for (x,) in private.data_loader:
            private.optimizer.zero_grad(set_to_none=True)
            act = private.module(x)
            act.backward(torch.ones_like(act))
            private.optimizer.step()
            epsilons.append(private.epsilon())
    assert epsilons[:5] == [pytest.approx(_epsilon(1.0, 1))] * 5
    assert epsilons[5:] == [pytest.approx(_epsilon(1.0, 2))] * 5


def test_target_epsilon_with_fixed_batches_derives_the_noise_for_its_passes() -> None:
    private = _attach(target_epsilon=8.0)
    for _ in range(3):  # train.epochs
        for _step_no, x, _y, _ids in private.batches(0):
            _step(private, x)
    honest = _epsilon(private.dp.noise_multiplier, 3)  # before: 10.2, noise for amplified steps
    assert 7.5 < honest <= 8.0
    assert private.dp.epsilon() == pytest.approx(honest)


async def test_a_client_with_fixed_batches_reports_the_epsilon_of_its_passes(
    deployment,  # type: ignore[no-untyped-def]
) -> None:
    files: dict[str, Path] = deployment(clients=1, dataset="breast_cancer", epochs=2)
    sets = ("privacy.dpsgd.noise_multiplier=1.0", "privacy.dpsgd.poisson_sampling=false")
    run = await run_deployment(files, *sets, "train.batch_size=35")  # 455 rows: 13 batches
    assert run.summaries[0]["steps"] == 26
    assert run.summaries[0]["dpsgd_epsilon"] == round(_epsilon(1.0, 2), 4)
