"""Production noise is unpredictable: never drawn from torch's global generator, which every
worker seeds with model.seed (a value its peers know)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privacy.config import DPSGDConfig
from privacy.defenses import ActivationNoise
from privacy.dpsgd import SecretPoissonSampler, make_private_client
from privacy.label import GaussianGradientNoise, Marvell
from privacy.randomness import secret_exponential, secret_normal, secret_uniform


def _draw_after_seeding(draw) -> torch.Tensor:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)  # what a peer that knows model.seed can do to the global generator
    return draw()


def test_activation_noise_cannot_be_replayed_from_the_global_seed() -> None:
    x = torch.zeros(4, 8)
    first = _draw_after_seeding(lambda: ActivationNoise(1.0, 1.0).apply(x))
    second = _draw_after_seeding(lambda: ActivationNoise(1.0, 1.0).apply(x))
    torch.manual_seed(0)
    replay = torch.randn(x.shape) * 1.0
    assert not torch.equal(first, second)
    assert not torch.allclose(first, replay, atol=1e-3)


def test_label_noise_cannot_be_replayed_from_the_global_seed() -> None:
    grads, labels = torch.randn(16, 4), torch.tensor([0, 1] * 8)
    for make in (lambda: Marvell(4.0), lambda: GaussianGradientNoise(1.0)):
        first = _draw_after_seeding(lambda make=make: make().protect(grads, labels))
        second = _draw_after_seeding(lambda make=make: make().protect(grads, labels))
        assert not torch.equal(first, second)


def test_a_seeded_generator_still_makes_audits_repeat() -> None:
    x = torch.zeros(4, 8)
    a = ActivationNoise(1.0, 1.0, generator=torch.Generator().manual_seed(3)).apply(x)
    b = ActivationNoise(1.0, 1.0, generator=torch.Generator().manual_seed(3)).apply(x)
    assert torch.equal(a, b)


def _dpsgd_step(noise_generator: torch.Generator | None = None) -> torch.Tensor:
    """One DP-SGD step (noise multiplier 1) after seeding the global generator as a peer
    that knows model.seed could; returns the weights."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    loader = DataLoader(TensorDataset(torch.randn(32, 4), torch.zeros(32)), batch_size=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = DPSGDConfig(noise_multiplier=1.0, max_grad_norm=1.0)
    private = make_private_client(
        model, optimizer, loader, cfg, epochs=1, noise_generator=noise_generator
    )
    if noise_generator is None:  # nor is the Poisson sampling drawn from a torch generator
        assert isinstance(private.data_loader.batch_sampler, SecretPoissonSampler)
    x, _ = next(iter(private.data_loader))
    private.module(x).sum().backward()
    private.optimizer.step()
    return torch.cat([p.detach().reshape(-1) for p in private.unwrapped.parameters()])


def test_dpsgd_noise_comes_from_the_os_not_a_torch_generator() -> None:
    # Execute: the same step twice from the same global seed, no generator given
    first, second = _dpsgd_step(), _dpsgd_step()
    # Assert: the noise differs (drawn from the OS), and the optimizer holds no torch
    # generator whose outputs would reveal its state; a seeded one (audits) still repeats
    assert not torch.allclose(first, second)
    seeded = [_dpsgd_step(torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(seeded[0], seeded[1])


def test_dpsgd_os_noise_has_the_calibrated_spread() -> None:
    # The noise added to a zero gradient sum: std noise_multiplier * max_grad_norm
    model = nn.Linear(400, 500, bias=False)
    loader = DataLoader(TensorDataset(torch.zeros(8, 400), torch.zeros(8)), batch_size=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    cfg = DPSGDConfig(noise_multiplier=2.0, max_grad_norm=3.0, poisson_sampling=False)
    private = make_private_client(
        model, optimizer, loader, cfg, epochs=1, server_loss_reduction="sum"
    )
    assert private.optimizer.generator is None
    x, _ = next(iter(private.data_loader))
    private.module(x).sum().backward()
    private.optimizer.pre_step()
    grad = model.weight.grad
    assert grad is not None
    assert abs(float(grad.std()) - 6.0) < 0.06 and abs(float(grad.mean())) < 0.05


def test_production_noise_comes_from_the_os_not_a_torch_generator() -> None:
    # A torch generator's draws reveal its Mersenne Twister state; production noise must not
    # come from one, so no generator appears even after drawing.
    noise, marvell = ActivationNoise(1.0, 1.0), Marvell(4.0)
    noise.apply(torch.zeros(4, 8))
    marvell.protect(torch.randn(16, 4), torch.tensor([0, 1] * 8))
    assert noise.generator is None and marvell.generator is None


def test_secret_draws_have_the_distributions_the_accounting_assumes() -> None:
    # Gaussian: mean 0, variance 1; Laplace (difference of exponentials): variance 2 b^2
    z = secret_normal((200_000,))
    assert abs(float(z.mean())) < 0.01 and abs(float(z.var()) - 1.0) < 0.02
    assert abs(float((z.abs() > 1.96).double().mean()) - 0.05) < 0.005  # the tails too
    e = secret_exponential((200_000,))
    assert float(e.min()) > 0 and abs(float(e.mean()) - 1.0) < 0.01
    rows = torch.rand(400, 500, generator=torch.Generator().manual_seed(0))  # 400 distinct rows
    # clip at the largest allowed (1e6): the noise is 1e5 times any row's entries
    laplace = ActivationNoise(1.0, 1e6, mechanism="laplace").apply(rows)
    assert abs(float(laplace.var()) / 1e12 - 2.0) < 0.05
    gauss = ActivationNoise(1.0, 1e6).apply(rows) / 1e6
    assert abs(float(gauss.mean())) < 0.01 and abs(float(gauss.var()) - 1.0) < 0.02
    assert abs(float((gauss.abs() > 1.96).double().mean()) - 0.05) < 0.005
    u = secret_uniform(100_000)
    assert float(u.min()) > 0 and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.005


def _poisson_batches(rows: int, batch: int, generator: torch.Generator | None) -> list[list[int]]:
    """Every batch of one epoch of DP-SGD's Poisson sampling, after seeding the global
    generator (as a peer that knows model.seed could); ``generator``: the sampler's, set
    afterwards as the audits do (workers.tools.audit_taps.seed_workers)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    loader = DataLoader(TensorDataset(torch.randn(rows, 4), torch.zeros(rows)), batch_size=batch)
    cfg = DPSGDConfig(noise_multiplier=1.0, max_grad_norm=1.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    private = make_private_client(model, optimizer, loader, cfg, epochs=1)
    sampler = private.data_loader.batch_sampler
    assert isinstance(sampler, SecretPoissonSampler)
    sampler.generator = generator
    torch.manual_seed(0)
    return list(sampler)


def test_poisson_sampling_does_not_repeat_under_a_known_or_searched_seed() -> None:
    # Prepare + Execute: two epochs' batch memberships, each after torch.manual_seed(0); a
    # seeded generator (what a 32-bit secret seed amounts to, once searched) for comparison
    first, second = _poisson_batches(64, 8, None), _poisson_batches(64, 8, None)
    seeded = [_poisson_batches(64, 8, torch.Generator().manual_seed(7)) for _ in range(2)]
    # Assert: the OS-drawn memberships differ; a seeded generator's repeat exactly (so a seed
    # found by search would replay them: the must-fail counterpart)
    assert first != second
    assert seeded[0] == seeded[1]
    assert len(first) == len(seeded[0]) == 8


def test_poisson_sampling_from_the_os_keeps_the_sampling_rate() -> None:
    # Prepare: 1000 rows, expected batch 100 (rate 0.1), 200 batches drawn from the OS
    sampler = SecretPoissonSampler(num_samples=1000, sample_rate=0.1, steps=200)
    # Execute
    batches = list(sampler)
    sizes = torch.tensor([len(b) for b in batches], dtype=torch.float64)
    counts = torch.zeros(1000)
    for b in batches:
        counts[b] += 1
    # Assert: Binomial(1000, 0.1) sizes (mean 100, variance 90; bounds ~6 and ~4.5 standard
    # errors), valid distinct rows, and no row range favoured (each half ~10,000 picks)
    assert len(batches) == len(sampler) == 200
    assert abs(float(sizes.mean()) - 100.0) < 4.0
    assert 50.0 < float(sizes.var()) < 135.0
    assert all(b == sorted(set(b)) and b[0] >= 0 and b[-1] < 1000 for b in batches if b)
    assert abs(float(counts[:500].sum() - counts[500:].sum())) < 600


def test_a_row_released_again_through_the_same_weights_is_the_same_release() -> None:
    # Prepare: a server that makes the client redo a step (a rewind, which it can ask for at
    # will) gets each of its rows again; with fresh draws, the mean of 16 releases kept noise
    # of std sigma * clip / 4, the noise averaged away
    noise = ActivationNoise(0.5, 1.0)
    act = torch.rand(64, 32, generator=torch.Generator().manual_seed(1)) * 0.05
    # Execute
    releases = torch.stack([noise.apply(act) for _ in range(16)])
    # Assert: every repeat is the first release, bit for bit; the mean keeps all the noise
    assert all(torch.equal(r, releases[0]) for r in releases)
    residual = float((releases.mean(dim=0) - act).std())
    assert abs(residual - 0.5) < 0.03
    # anything else about a row draws independent noise: another activation of it (the
    # next encoder's), and the same activation under another client's key
    moved = act.clone()
    moved[:, 0] += 1e-6
    first, again = (releases[0] - act)[:, 1:], (noise.apply(moved) - moved)[:, 1:]
    elsewhere = ActivationNoise(0.5, 1.0).apply(act) - act
    for other in (again, elsewhere[:, 1:]):
        correlation = torch.corrcoef(torch.stack([first.flatten(), other.flatten()]))[0, 1]
        assert abs(float(correlation)) < 0.1
