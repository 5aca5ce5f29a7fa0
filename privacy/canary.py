"""An empirical lower bound on DP-SGD's epsilon from canary records.

In the style of Jagielski et al. 2020 ("Auditing Differentially Private Machine Learning") and
Nasr et al. 2021 ("Adversary Instantiation"): train many times with a canary record and many
times without it, score the canary after each run, and turn the attacker's false-positive and
false-negative rates into a lower bound on epsilon. If training is (epsilon, delta)-DP, every
test satisfies ``FPR + e^eps * FNR >= 1 - delta`` (and with the roles swapped), so

    eps >= log((1 - delta - FNR) / FPR)

for the true rates. We use Clopper-Pearson upper confidence bounds on FPR and FNR, and pick the
threshold on one half of the runs and measure on the other, so the bound holds with the stated
confidence. A bound above the accountant's epsilon proves the accountant's premise false.

The game trains a real split step: the client segment under DP-SGD (Opacus, driven by the cut
gradient), the server segment either trained without DP on the activations (as the platform
does) or frozen (the premise under which DP-SGD's epsilon is a guarantee).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from scipy.stats import beta
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler, TensorDataset

from privacy.config import DPSGDConfig
from privacy.dpsgd import make_private_client
from sl_pipeline.errors import PrivacyError

Segments = Callable[[], tuple[nn.Module, nn.Module]]


def clopper_pearson_upper(k: int, n: int, alpha: float) -> float:
    """The one-sided (1 - alpha) upper confidence bound on p from k successes in n trials."""
    if not (0 <= k <= n and n > 0):
        raise PrivacyError(f"need 0 <= k <= n and n > 0, got k = {k}, n = {n}")
    if k == n:
        return 1.0
    return float(beta.ppf(1.0 - alpha, k + 1, n - k))


def _rates(inside: Sequence[float], outside: Sequence[float], t: float) -> tuple[int, int]:
    """(false positives, false negatives) when a score >= t means 'the canary was in'.
    Both lists must be sorted."""
    return len(outside) - bisect.bisect_left(outside, t), bisect.bisect_left(inside, t)


def _bound(fp: int, fn: int, n_in: int, n_out: int, delta: float, alpha: float) -> float:
    fpr = clopper_pearson_upper(fp, n_out, alpha / 2)
    fnr = clopper_pearson_upper(fn, n_in, alpha / 2)
    candidates = [0.0]
    for a, b in ((fpr, fnr), (fnr, fpr)):
        if 1 - delta - b > 0 and a > 0:
            candidates.append(math.log((1 - delta - b) / a))
    return max(candidates)


def epsilon_lower_bound(
    inside: Sequence[float],
    outside: Sequence[float],
    *,
    delta: float = 1e-5,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """A lower bound on epsilon from canary scores of runs with (``inside``) and without it.

    The threshold is chosen on the first half of each list and the rates are measured on the
    second half, so the bound holds with probability ``confidence``. Returns the bound, the
    threshold, and the measured rates.
    """
    if min(len(inside), len(outside)) < 4:
        raise PrivacyError(
            "epsilon_lower_bound needs at least 4 runs with and 4 without the canary",
            hint="run more canary trials",
        )
    alpha = 1.0 - confidence
    half_in, half_out = len(inside) // 2, len(outside) // 2
    pick_in, test_in = sorted(inside[:half_in]), sorted(inside[half_in:])
    pick_out, test_out = sorted(outside[:half_out]), sorted(outside[half_out:])

    def bound_at(t: float, ins: Sequence[float], outs: Sequence[float]) -> float:
        fp, fn = _rates(ins, outs, t)
        return _bound(fp, fn, len(ins), len(outs), delta, alpha)

    def merit(t: float) -> tuple[float, float]:  # ties (often all 0 on few runs): fewest errors
        return bound_at(t, pick_in, pick_out), -sum(_rates(pick_in, pick_out, t))

    best = max(sorted({*pick_in, *pick_out}), key=merit)
    fp, fn = _rates(test_in, test_out, best)
    return {
        "epsilon_lower_bound": bound_at(best, test_in, test_out),
        "threshold": best,
        "false_positive_rate": fp / len(test_out),
        "false_negative_rate": fn / len(test_in),
        "runs": len(inside) + len(outside),
        "confidence": confidence,
        "delta": delta,
    }


@dataclass(frozen=True)
class CanaryGame:
    """One training set, one canary, and how each run trains."""

    segments: Segments  # fresh (client, server) segments, initialised from the global RNG
    x: Tensor
    y: Tensor
    canary_x: Tensor  # (1, ...)
    canary_y: Tensor  # (1,)
    dpsgd: DPSGDConfig
    epochs: int
    batch_size: int
    lr: float
    momentum: float = 0.0
    train_server: bool = True
    init_seed: int = 0


@dataclass(frozen=True)
class _Run:
    score: float  # the canary's -loss under the trained split model
    epsilon: float  # what the run's accountant reports
    sample_rate: float
    steps: int


def _loader(game: CanaryGame, with_canary: bool) -> DataLoader[Any]:
    """The run's loader. Opacus takes the sampling rate and the steps per epoch from the
    loader's length (1 / len, len); a loader over the rows with the canary would be one batch
    longer whenever the batch size divides the other rows' count, so both worlds would run
    different mechanisms (more, smaller-rate steps with the canary) and the audit would not
    test the mechanism the accountant counts. Both get the length of the loader without it."""
    x, y = game.x, game.y
    if with_canary:
        x, y = torch.cat([x, game.canary_x]), torch.cat([y, game.canary_y])
    # Poisson sampling replaces this sampler (every row, the canary too, is drawn w.p. 1/len);
    # only its length is read.
    batches = BatchSampler(SequentialSampler(range(len(game.x))), game.batch_size, False)
    return DataLoader(TensorDataset(x, y), batch_sampler=batches)


def _train_once(game: CanaryGame, with_canary: bool) -> _Run:
    """Train one split model (client under DP-SGD); return the canary's score and what the
    accountant counted."""
    state = torch.random.get_rng_state()
    torch.manual_seed(game.init_seed)  # one fixed start: only DP noise and sampling vary
    client, server = game.segments()
    torch.random.set_rng_state(state)
    loader = _loader(game, with_canary)
    opt = torch.optim.SGD(client.parameters(), lr=game.lr, momentum=game.momentum)
    # The game's noise follows the caller's seed (a canary audit must repeat exactly); a
    # worker's DP-SGD noise comes from a secret generator instead.
    noise = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
    private = make_private_client(
        client, opt, loader, game.dpsgd, game.epochs, noise_generator=noise
    )
    server_opt = torch.optim.SGD(server.parameters(), lr=game.lr, momentum=game.momentum)
    server.requires_grad_(game.train_server)
    for _ in range(game.epochs):
        for bx, by in private.data_loader:
            if len(by) == 0:
                private.noise_only_step()  # as a worker's client does
                continue
            private.optimizer.zero_grad(set_to_none=True)
            server_opt.zero_grad(set_to_none=True)
            act = private.module(bx)
            cut = act.detach().requires_grad_(True)  # what crosses the wire
            nn.functional.cross_entropy(server(cut), by).backward()
            act.backward(cut.grad)
            private.optimizer.step()
            if game.train_server:
                server_opt.step()
    with torch.no_grad():
        out = server(private.unwrapped(game.canary_x))
        score = -float(nn.functional.cross_entropy(out, game.canary_y))
    history = private.engine.accountant.history  # [(noise multiplier, sample rate, steps)]
    steps = sum(int(n) for _, _, n in history)
    return _Run(score, private.epsilon(), float(history[0][1]) if history else 0.0, steps)


def run_canary_game(game: CanaryGame, runs: int, *, seed: int = 0) -> dict[str, Any]:
    """``runs`` trainings with the canary and ``runs`` without, alternating, each seeded.

    Returns the canary scores' :func:`epsilon_lower_bound` figures and the accountant's epsilon
    with what it counted (sample rate and steps, the same in every run).
    """
    if runs < 4:
        raise PrivacyError(f"runs = {runs} is out of range; allowed: >= 4")
    if not game.dpsgd.poisson_sampling:
        raise PrivacyError(
            "the canary game needs privacy.dpsgd.poisson_sampling = true: fixed batches give "
            "the runs with and without the canary different batches and an approximate epsilon",
            hint="enable poisson_sampling",
        )
    done: list[_Run] = []
    with torch.random.fork_rng(devices=[]):
        for i in range(2 * runs):
            torch.manual_seed(seed * 100_003 + i)
            done.append(_train_once(game, i % 2 == 0))
    rates, steps = {run.sample_rate for run in done}, {run.steps for run in done}
    if len(rates) != 1 or len(steps) != 1:  # _loader makes them equal: else two mechanisms
        raise PrivacyError(
            f"internal: the canary game's runs took different mechanisms: sample rates {rates}, "
            f"steps {steps}"
        )
    return {
        **epsilon_lower_bound(
            [run.score for run in done[0::2]],
            [run.score for run in done[1::2]],
            delta=game.dpsgd.delta,
        ),
        "accountant_epsilon": max(run.epsilon for run in done),
        "accountant_sample_rate": rates.pop(),
        "accountant_steps": steps.pop(),
        "server_trained": game.train_server,
    }


__all__ = [
    "CanaryGame",
    "clopper_pearson_upper",
    "epsilon_lower_bound",
    "run_canary_game",
]
