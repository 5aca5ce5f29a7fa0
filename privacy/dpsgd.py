"""DP-SGD for the client segment, driven by the cut-layer gradient the server returns.

The client runs ``act = module(x)``, sends ``act``, receives ``grad = d loss / d act`` and calls
``act.backward(grad)``; Opacus' hooks then compute per-sample gradients of the client's
weights, and its ``DPOptimizer`` clips each to ``max_grad_norm``, sums, adds
N(0, (noise_multiplier * max_grad_norm)^2) and rescales.

**Loss reduction.** Opacus must know how the server reduced the loss over the batch:

* ``"mean"`` (the default, and what the server should use): the returned cut gradient is
  ``d(mean loss)/d act``, i.e. already divided by the batch size B. Opacus' ``GradSampleModule``
  multiplies the backprops by B to recover each example's own gradient, and the optimizer
  divides the clipped sum by the *expected* batch size;
* ``"sum"``: no rescaling either way.

A mismatch silently scales every per-sample gradient by B (or 1/B) before clipping, which
changes both the update and what clipping does — hence ``server_loss_reduction`` must match
the server's loss. ``tests/test_privacy_dpsgd.py`` checks that, with no noise and no clipping,
a step driven by the server's gradient equals plain training of the joint model.

**Sampling.** With ``poisson_sampling=True`` (default, what the accountant assumes) Opacus
replaces the data loader by a Poisson-sampled one with the same expected batch size: batch
sizes vary; an empty batch is a step of noise alone (:meth:`PrivateClient.noise_only_step`),
which the server never sees. With
``poisson_sampling=False`` the loader is kept (the same batches, in the same order, every
epoch), the dataset size must be a multiple of the batch size (Opacus divides by
``len(dataset) / len(loader)``, which otherwise differs from the real batch size), and the
accountant counts each pass over the data as one unamplified Gaussian mechanism
(:meth:`PrivateClient.count_pass`), not Opacus' per-step count, which assumes Poisson sampling.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from opacus import PrivacyEngine
from opacus.accountants.utils import get_noise_multiplier
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader

from privacy.accounting import DPSGDAccountantView
from privacy.config import DPSGDConfig
from privacy.randomness import secret_normal, secret_uniform
from sl_pipeline.errors import PrivacyError

LOSS_REDUCTIONS = ("mean", "sum")


@dataclass
class PrivateClient:
    """What :func:`make_private_client` returns: use these in place of the originals."""

    module: nn.Module
    optimizer: Any  # opacus DPOptimizer
    data_loader: DataLoader[Any]
    engine: PrivacyEngine
    noise_multiplier: float
    delta: float

    def forget_forward(self) -> None:
        """Drop what Opacus' hooks captured for a forward that got no backward (a step
        abandoned by a rewind): else the next backward pairs with the newest capture, its
        count of open forwards stays above zero, and no per-sample gradient is promoted
        ("Per sample gradient is not initialized", the red team's rewound DP-SGD client)."""
        for module in self.module.modules():
            if getattr(module, "activations", None):
                module.activations = []  # type: ignore[assignment]
            if hasattr(module, "max_batch_len"):
                del module.max_batch_len
        for param in self.module.parameters():
            if hasattr(param, "_forward_counter"):
                param._forward_counter = 0
            if hasattr(param, "_current_grad_sample"):
                del param._current_grad_sample

    def count_pass(self) -> None:
        """Fixed batches (``poisson_sampling = false``) are counted here, not per step: an
        example is in exactly one batch of each pass over the data, so a pass is one
        Gaussian mechanism on it, unamplified (sample rate 1). Opacus' per-step count at
        rate 1/len(loader) assumes Poisson sampling; it gave ε 1.26 for what is 4.73 here
        (noise multiplier 1, one epoch; 1.52 for 9.01 over three). Call it at each pass's
        first batch, and once more after a rewind (its redone steps release their batches
        again)."""
        self.engine.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=1.0)

    @property
    def unwrapped(self) -> nn.Module:
        """The client segment inside Opacus' ``GradSampleModule`` (same parameters)."""
        inner = getattr(self.module, "_module", self.module)
        assert isinstance(inner, nn.Module)
        return inner

    def epsilon(self) -> float:
        return epsilon_spent(self.engine, self.delta)

    def noise_only_step(self) -> None:
        """The step of an empty Poisson batch, as Opacus takes it: no example, so the update
        is the Gaussian noise alone (scaled like any other step), and the accountant counts
        it. Its analysis assumes a step for every batch drawn, empty or not."""
        optimizer = self.optimizer
        optimizer.zero_grad(set_to_none=True)
        for param in optimizer.params:  # no example: per-example gradients of batch size 0
            param.grad_sample = param.new_zeros((0, *param.shape))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _check_fixed_batches(data_loader: DataLoader[Any]) -> None:
    batch_size = data_loader.batch_size
    size = len(data_loader.dataset)  # type: ignore[arg-type]
    if batch_size is None or size % batch_size != 0:
        raise PrivacyError(
            f"poisson_sampling = false needs a dataset size that is a multiple of the batch "
            f"size; got {size} examples and batch_size {batch_size}",
            hint="enable poisson_sampling, or trim the dataset (e.g. with a Subset)",
        )


# What torch says on each first backward through Opacus' hooks when the segment's input needs
# no gradient (the first segment's never does): the hooks then get no input gradient, which
# they never use (a per-example gradient is the weights', from activations and backprops).
# (a pattern for filterwarnings: it holds no character special to a regular expression)
NO_INPUT_GRADIENT = (
    "Full backward hook is firing when gradients are computed with respect to module outputs "
    "since no inputs require gradients"
)


def _quiet_hooks() -> None:
    """Ignore that one message, as a UserWarning (another warning, or another message, still
    shows). Process-wide, not a ``catch_warnings`` around each step: the warning comes in the
    step's backward, and a ``catch_warnings`` per step would reset every module's registry of
    warnings shown once, which then repeat every step."""
    warnings.filterwarnings("ignore", NO_INPUT_GRADIENT, UserWarning)


def _quiet_engine(accountant: str) -> PrivacyEngine:
    """Opacus' engine, without its "Secure RNG turned off ... turn it on before production":
    the noise and the batches come from the OS's generator (or an audit's seeded one), not
    from the one that warning is about, so it would tell every DP-SGD client the opposite.
    Nor, later, torch's message on its hooks (:func:`_quiet_hooks`)."""
    _quiet_hooks()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Secure RNG turned off", UserWarning)
        return PrivacyEngine(accountant=accountant)


def make_private_client(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader[Any],
    cfg: DPSGDConfig,
    epochs: int,
    *,
    server_loss_reduction: str = "mean",
    noise_generator: torch.Generator | None = None,
) -> PrivateClient:
    """Wrap the client segment with Opacus DP-SGD (``make_private`` or ``_with_epsilon``).

    ``epochs`` is used to derive the noise when ``cfg.target_epsilon`` is set.
    ``noise_generator`` is for audits and tests; without it the noise comes from the operating
    system's cryptographic generator (:func:`_draw_noise_from_the_os`), and so does the Poisson
    sampling (:class:`SecretPoissonSampler`): never torch's global generator (peers know its
    seed), nor a secretly seeded one (32 bits of seed, searchable from batch sizes).
    Opacus' own ``secure_mode`` needs ``torchcsprng``, which has no build for this torch: it is
    not offered.
    """
    _check_arguments(server_loss_reduction, epochs, cfg, data_loader)
    _check_module(module)  # before the engine, whose warnings would come first
    engine = _quiet_engine(cfg.accountant)
    common: dict[str, Any] = {
        "module": module,
        "optimizer": optimizer,
        "data_loader": data_loader,
        "max_grad_norm": cfg.max_grad_norm,
        "loss_reduction": server_loss_reduction,
        "poisson_sampling": cfg.poisson_sampling,
        "noise_generator": noise_generator,
    }
    wrapped, dp_optimizer, loader = _make_private(engine, cfg, epochs, common)
    if cfg.poisson_sampling and data_loader.batch_size:
        # A "mean" step divides the noisy sum by the expected batch. Opacus' figure, the row
        # count times the rate rounded down, was 1 instead of 2 at 455 rows in 228 batches
        # (twice the update), and any figure from the row count differs between neighbouring
        # datasets; the configured batch size is a public constant (within one row of it)
        dp_optimizer.expected_batch_size = data_loader.batch_size
    if noise_generator is None:
        _draw_noise_from_the_os(dp_optimizer)
        _sample_from_the_os(loader)
    return PrivateClient(
        module=wrapped,
        optimizer=dp_optimizer,
        data_loader=loader,
        engine=engine,
        noise_multiplier=float(dp_optimizer.noise_multiplier),
        delta=cfg.delta,
    )


def _make_private(
    engine: PrivacyEngine, cfg: DPSGDConfig, epochs: int, common: dict[str, Any]
) -> tuple[Any, Any, Any]:
    """Opacus' module, optimizer and loader. Fixed batches are counted per pass, not by
    Opacus' per-step hook: here at every ``len(loader)``-th step from the first (a caller
    that resumes or redoes steps replaces the hook and calls
    :meth:`PrivateClient.count_pass` itself, as ``workers.client.private`` does)."""
    if cfg.target_epsilon is not None and cfg.poisson_sampling:
        private = engine.make_private_with_epsilon(
            target_epsilon=cfg.target_epsilon, target_delta=cfg.delta, epochs=epochs, **common
        )
    else:
        private = engine.make_private(noise_multiplier=_noise(cfg, epochs), **common)
    if not cfg.poisson_sampling:
        private[1].step_hook = _pass_counter(engine, len(common["data_loader"]))
    return private[0], private[1], private[-1]


def _check_module(module: nn.Module) -> None:
    """Opacus refuses a segment whose layers mix the rows of a batch (BatchNorm: a row's
    output depends on its batch, so clipping its gradient no longer bounds its influence);
    its traceback becomes one line naming what to change."""
    errors = ModuleValidator.validate(module, strict=False)
    if errors:
        why = str(errors[0]).split(". ")[0].strip("'\" ")
        raise PrivacyError(
            f"privacy.dpsgd cannot train this client segment: {why}",
            hint="use layers that treat each row alone in model.sequential or model.factories "
            "(GroupNorm or LayerNorm for BatchNorm)",
        )


def _pass_counter(engine: PrivacyEngine, steps_per_pass: int) -> Any:
    taken = [0]  # steps so far

    def hook(optimizer: Any) -> None:
        if taken[0] % steps_per_pass == 0:  # a pass's first step
            engine.accountant.step(noise_multiplier=optimizer.noise_multiplier, sample_rate=1.0)
        taken[0] += 1

    return hook


def _noise(cfg: DPSGDConfig, epochs: int) -> float:
    """The noise multiplier: given, or (fixed batches) derived for ``target_epsilon`` over
    ``epochs`` passes of one unamplified Gaussian mechanism each."""
    if cfg.target_epsilon is None:
        assert cfg.noise_multiplier is not None
        return float(cfg.noise_multiplier)
    return float(
        get_noise_multiplier(
            target_epsilon=cfg.target_epsilon,
            target_delta=cfg.delta,
            sample_rate=1.0,
            steps=epochs,
            accountant=cfg.accountant,
        )
    )


def _sample_from_the_os(loader: DataLoader[Any]) -> None:
    sampler = getattr(loader, "batch_sampler", None)
    if type(sampler) is UniformWithReplacementSampler:
        # the loader refuses a new batch_sampler once built; this one only gains an
        # __iter__ drawing from the OS (same fields, no state of its own)
        sampler.__class__ = SecretPoissonSampler


class SecretPoissonSampler(UniformWithReplacementSampler):
    """Opacus' Poisson sampler with its mask drawn from the operating system's generator.

    A torch generator keeps only 32 bits of any seed (CPU Mersenne Twister), so a server that
    sees the batch sizes could try every seed of Opacus' sampler until the sizes match, then
    know which rows each batch holds, which voids the subsampling amplification the
    accountant counts. Each row here is in a batch with probability ``sample_rate``, drawn
    from :func:`privacy.randomness.secret_uniform`: no seed to search. An audit that sets
    ``generator`` gets Opacus' draws from it (figures that repeat)."""

    def __iter__(self) -> Iterator[list[int]]:
        if self.generator is not None:
            yield from super().__iter__()
            return
        for _ in range(self.steps):
            mask = secret_uniform(self.num_samples) < self.sample_rate
            yield mask.nonzero(as_tuple=False).reshape(-1).tolist()


def _draw_noise_from_the_os(optimizer: Any) -> None:
    """Make ``optimizer`` (Opacus' ``DPOptimizer``, this instance only) draw its Gaussian noise
    from the operating system's cryptographic generator, as the activation and label noise do
    (:mod:`privacy.randomness`), unless an audit gives it a seeded ``generator`` later.

    Opacus takes only a ``torch.Generator``, a Mersenne Twister whose state follows linearly
    from its outputs; where a peer sees the client's weights move (split-fed averaging,
    round-robin turns), each update is that noise plus a bounded clipped sum. The noise is
    drawn in float64 as the sum of four standard normals halved (Opacus' ``secure_mode`` guard
    against floating-point attacks on the noise's low bits), then cast to the gradient's
    dtype."""
    opacus_add_noise = optimizer.add_noise

    def add_noise() -> None:
        if optimizer.generator is not None:  # an audit's seeded generator: figures repeat
            opacus_add_noise()
            return
        std = optimizer.noise_multiplier * optimizer.max_grad_norm
        for p in optimizer.params:
            summed = p.summed_grad
            _check_processed_flag(summed)
            noise = std * secret_normal((4, *summed.shape)).sum(dim=0) / 2.0
            p.grad = (summed + noise.to(device=summed.device, dtype=summed.dtype)).view_as(p)
            _mark_as_processed(summed)

    optimizer.add_noise = add_noise


def _check_arguments(
    server_loss_reduction: str, epochs: int, cfg: DPSGDConfig, data_loader: DataLoader[Any]
) -> None:
    if server_loss_reduction not in LOSS_REDUCTIONS:
        raise PrivacyError(
            f"server_loss_reduction = {server_loss_reduction!r} is not supported; allowed: "
            f"{', '.join(LOSS_REDUCTIONS)}",
            hint="pass the reduction of the server's loss",
        )
    if epochs < 1:
        raise PrivacyError(f"epochs = {epochs} is out of range; allowed: >= 1")
    if not cfg.poisson_sampling:
        _check_fixed_batches(data_loader)


def epsilon_spent(engine: PrivacyEngine, delta: float) -> float:
    """DP-SGD epsilon spent so far at ``delta`` (0 before the first step)."""
    return DPSGDAccountantView(engine, delta).epsilon()


__all__ = ["LOSS_REDUCTIONS", "PrivateClient", "epsilon_spent", "make_private_client"]
