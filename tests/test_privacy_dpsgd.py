"""DP-SGD on the client segment driven by the server's cut gradient (Opacus)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privacy.accounting import DPSGDAccountantView
from privacy.config import DPSGDConfig
from privacy.dpsgd import epsilon_spent, make_private_client
from sl_pipeline.errors import PrivacyError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def make_parts(seed: int = 0) -> tuple[nn.Module, nn.Module, TensorDataset]:
    torch.manual_seed(seed)
    client = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    server = nn.Linear(4, 3)
    data = TensorDataset(torch.randn(32, 6), torch.randint(0, 3, (32,)))
    return client, server, data


def split_step(
    client: nn.Module,
    optimizer: torch.optim.Optimizer,
    server: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    reduction: str,
) -> None:
    """One split-learning step: the 'server' sees only detached activations."""
    optimizer.zero_grad()
    act = client(x)
    received = act.detach().requires_grad_(True)
    loss = nn.functional.cross_entropy(server(received), y, reduction=reduction)
    loss.backward()
    assert received.grad is not None
    act.backward(received.grad)  # the gradient the server returns
    optimizer.step()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_noiseless_split_step_equals_joint_training(reduction: str) -> None:
    # Prepare: identical copies for the joint (non-private) model and the split private one.
    client, server, data = make_parts()
    joint_client, joint_server = copy.deepcopy(client), copy.deepcopy(server)
    joint_opt = torch.optim.SGD(joint_client.parameters(), lr=0.1)
    loader = DataLoader(data, batch_size=8, shuffle=False)
    cfg = DPSGDConfig(noise_multiplier=0.0, max_grad_norm=1e6, poisson_sampling=False)
    private = make_private_client(
        client,
        torch.optim.SGD(client.parameters(), lr=0.1),
        loader,
        cfg,
        epochs=1,
        server_loss_reduction=reduction,
    )
    # Execute: two steps each way on the same batches.
    for step, (x, y) in enumerate(private.data_loader):
        if step == 2:
            break
        split_step(private.module, private.optimizer, server, x, y, reduction)
        joint_opt.zero_grad()
        loss = nn.functional.cross_entropy(joint_server(joint_client(x)), y, reduction=reduction)
        loss.backward()
        joint_opt.step()
    # Assert: same client weights, and they did move.
    for p_private, p_joint, p_start in zip(
        private.unwrapped.parameters(),
        joint_client.parameters(),
        make_parts()[0].parameters(),
        strict=True,
    ):
        assert torch.allclose(p_private, p_joint, atol=1e-6)
        assert not torch.allclose(p_joint, p_start)


def manual_clipped_step(
    client: nn.Module,
    server: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    clip: float,
    lr: float,
    reduction: str,
) -> None:
    """Reference DP-SGD step without noise: clip each example's own gradient, sum, rescale."""
    params = list(client.parameters())
    total = [torch.zeros_like(p) for p in params]
    for i in range(len(x)):
        loss = nn.functional.cross_entropy(server(client(x[i : i + 1])), y[i : i + 1])
        grads = torch.autograd.grad(loss, params)
        norm = torch.sqrt(torch.stack([g.square().sum() for g in grads]).sum())
        factor = min(1.0, clip / (float(norm) + 1e-6))
        total = [t + factor * g for t, g in zip(total, grads, strict=True)]
    scale = 1.0 / len(x) if reduction == "mean" else 1.0
    with torch.no_grad():
        for p, t in zip(params, total, strict=True):
            p.sub_(lr * scale * t)


@pytest.mark.parametrize(
    ("server_reduction", "declared", "matches"),
    [("mean", "mean", True), ("sum", "sum", True), ("mean", "sum", False)],
)
def test_clipping_acts_on_each_examples_own_gradient(
    server_reduction: str, declared: str, matches: bool
) -> None:
    # Prepare: a clip bound small enough to be active for every example.
    client, server, data = make_parts()
    reference = copy.deepcopy(client)
    loader = DataLoader(data, batch_size=8)
    cfg = DPSGDConfig(noise_multiplier=0.0, max_grad_norm=0.05, poisson_sampling=False)
    private = make_private_client(
        client,
        torch.optim.SGD(client.parameters(), lr=0.1),
        loader,
        cfg,
        epochs=1,
        server_loss_reduction=declared,
    )
    x, y = next(iter(private.data_loader))
    # Execute
    split_step(private.module, private.optimizer, server, x, y, server_reduction)
    manual_clipped_step(reference, server, x, y, clip=0.05, lr=0.1, reduction=server_reduction)
    # Assert: a declared reduction that differs from the server's changes the update.
    same = all(
        torch.allclose(a, b, atol=1e-6)
        for a, b in zip(private.unwrapped.parameters(), reference.parameters(), strict=True)
    )
    assert same is matches


def test_poisson_sampling_and_epsilon_spent() -> None:
    # Prepare
    client, server, data = make_parts()
    loader = DataLoader(data, batch_size=8)
    cfg = DPSGDConfig(noise_multiplier=1.0, max_grad_norm=1.0)
    private = make_private_client(
        client,
        torch.optim.SGD(client.parameters(), lr=0.1),
        loader,
        cfg,
        epochs=1,
        noise_generator=torch.Generator().manual_seed(0),
    )
    assert epsilon_spent(private.engine, 1e-5) == 0.0
    # Execute
    steps = 0
    for x, y in private.data_loader:
        if len(x) == 0:
            continue
        split_step(private.module, private.optimizer, server, x, y, "mean")
        steps += 1
    # Assert
    assert type(private.data_loader).__name__ == "DPDataLoader"
    assert steps > 0
    assert private.epsilon() == epsilon_spent(private.engine, 1e-5) > 0
    view = DPSGDAccountantView(private.engine, 1e-5)
    assert view.metric_label == "dpsgd" and view.mechanism_name.startswith("DP-SGD")


def test_target_epsilon_derives_noise() -> None:
    client, _, data = make_parts()
    cfg = DPSGDConfig(target_epsilon=2.0, max_grad_norm=1.0)
    private = make_private_client(
        client,
        torch.optim.SGD(client.parameters(), lr=0.1),
        DataLoader(data, batch_size=8),
        cfg,
        epochs=3,
    )
    assert private.noise_multiplier > 0


def test_fixed_batches_need_divisible_dataset() -> None:
    client, _, data = make_parts()
    cfg = DPSGDConfig(noise_multiplier=1.0, poisson_sampling=False)
    with pytest.raises(PrivacyError, match="multiple of the batch size"):
        make_private_client(
            client,
            torch.optim.SGD(client.parameters(), lr=0.1),
            DataLoader(data, batch_size=5),
            cfg,
            epochs=1,
        )
    with pytest.raises(PrivacyError, match="server_loss_reduction"):
        make_private_client(
            client,
            torch.optim.SGD(client.parameters(), lr=0.1),
            DataLoader(data, batch_size=8),
            cfg,
            epochs=1,
            server_loss_reduction="none",
        )


def test_an_empty_batch_is_a_step_of_noise_alone_that_the_accountant_counts() -> None:
    """Opacus' mechanism takes a step for every batch drawn; an empty one is noise alone."""
    # Prepare
    client, _, data = make_parts()
    private = make_private_client(
        client,
        torch.optim.SGD(client.parameters(), lr=0.1),
        DataLoader(data, batch_size=8),
        DPSGDConfig(noise_multiplier=1.0, max_grad_norm=1.0),
        epochs=1,
        noise_generator=torch.Generator().manual_seed(0),
    )
    before = [p.detach().clone() for p in private.unwrapped.parameters()]
    # Execute
    private.noise_only_step()
    # Assert: counted once, every weight moved by noise of the step's scale, nothing left over
    history = private.engine.accountant.history
    assert [(sigma, steps) for sigma, _, steps in history] == [(1.0, 1)]
    assert private.epsilon() > 0
    expected_std = 0.1 * 1.0 * 1.0 / 8  # lr * sigma * clip / expected batch size
    params = list(private.unwrapped.parameters())
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(params, before, strict=True)])
    assert moved.abs().min() > 0
    assert 0.5 * expected_std < float(moved.std()) < 2 * expected_std
    assert all(p.grad is None for p in private.unwrapped.parameters())
    assert all(getattr(p, "grad_sample", None) is None for p in private.unwrapped.parameters())


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
def test_a_noise_only_step_is_opacus_step_for_an_empty_batch_bit_for_bit(optimizer: str) -> None:
    """Red team (held): the same update as Opacus' own step on a batch of zero rows, its
    noise scaled by the expected batch size and fed through the optimizer's state."""

    def build() -> Any:
        client, _, data = make_parts()
        params = client.parameters()
        opt = {
            "sgd": lambda: torch.optim.SGD(params, lr=0.1),
            "momentum": lambda: torch.optim.SGD(params, lr=0.1, momentum=0.9),
            "adam": lambda: torch.optim.Adam(params, lr=0.01),
        }[optimizer]()
        cfg = DPSGDConfig(noise_multiplier=1.0, max_grad_norm=1.0)
        gen = torch.Generator().manual_seed(7)
        loader = DataLoader(data, batch_size=8)
        private = make_private_client(client, opt, loader, cfg, epochs=1, noise_generator=gen)
        x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
        private.optimizer.zero_grad()
        act = private.module(x)
        act.backward(torch.ones_like(act))
        private.optimizer.step()  # a real step first: momentum and Adam have state
        return private

    opacus, ours = build(), build()
    opacus.optimizer.zero_grad()
    act = opacus.module(torch.zeros(0, 6))  # Opacus' own empty batch
    act.backward(torch.zeros_like(act))
    opacus.optimizer.step()
    ours.noise_only_step()
    pairs = zip(opacus.unwrapped.parameters(), ours.unwrapped.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    assert opacus.engine.accountant.history == ours.engine.accountant.history == [(1.0, 0.25, 2)]


def test_a_step_divides_by_the_configured_batch_not_opacus_rounded_one() -> None:
    """32 rows in 11 Poisson batches of 3: an expected batch of 2.9, which Opacus rounds to 2;
    the configured 3 is a constant, the same for a dataset with a row more or less."""
    client, _, data = make_parts()
    private = make_private_client(
        client,
        torch.optim.SGD(client.parameters(), lr=0.1),
        DataLoader(data, batch_size=3),
        DPSGDConfig(noise_multiplier=1.0, max_grad_norm=1.0),
        epochs=1,
        noise_generator=torch.Generator().manual_seed(0),
    )
    assert private.optimizer.expected_batch_size == 3
