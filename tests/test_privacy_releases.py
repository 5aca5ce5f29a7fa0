"""Activation noise's accountant counts the worst row's releases: every row handed out for a
step, with fixed or DP-SGD's Poisson batches (workers/client/releases.py)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from privacy.accounting import activation_release_statement
from privacy.config import NoiseConfig
from tests.conftest import Procs, wait_listening
from workers.client.releases import ActivationAccounting, Releases


def test_the_most_released_row_is_counted_whatever_drew_the_batches() -> None:
    releases = Releases()
    for batch in ([0, 1, 2], [1, 2], [], [2]):  # Poisson: row 2 in three batches of an epoch
        releases.handed_out(torch.tensor(batch, dtype=torch.long))
    assert releases.total == 3
    releases.handed_out(torch.tensor([0, 1]))  # a redone step's rows go out again
    releases.handed_out(torch.tensor([0, 1]))
    assert releases.total == 4 and releases.counts[0] == 3  # row 1: 2 + 2
    releases.restore(releases.state())  # a resume: the figure kept, the rows counted afresh
    releases.handed_out(torch.tensor([5]))
    assert releases.total == 5  # 4 before, 1 since: never below what was sent


def test_checkpoints_written_before_the_count_restore_to_a_bound() -> None:
    releases = Releases()
    releases.restore({"accounted_epochs": 5, "steps_done": 80, "dpsgd": {}})
    assert releases.total == 5  # fixed batches: one release per epoch ended
    releases.restore({"accounted_epochs": 2, "steps_done": 30, "dpsgd": {"drawn": 3}})
    assert releases.total == 30  # Poisson: at most one release per step
    releases.restore({"activation_releases": 7, "accounted_epochs": 2})
    assert releases.total == 7


def test_the_accountant_composes_each_release_once() -> None:
    noise = NoiseConfig(sigma=1.0, clip=1.0)
    accounting = ActivationAccounting(noise)
    accounting.handed_out(torch.tensor([4, 4, 4, 5]))
    first = accounting.epsilon()
    assert accounting.report()["activation_releases"] == 3
    assert accounting.epsilon() == first  # asking again composes nothing more
    expected = activation_release_statement(noise, 3)["activation_epsilon"]
    assert first == pytest.approx(expected, rel=1e-6)
    silent = ActivationAccounting(None)  # no noise: nothing counted, nothing reported
    silent.handed_out(torch.tensor([1]))
    assert silent.epsilon() is None and silent.report() == {} and not silent.releases.counts


@pytest.mark.timeout(300)
def test_a_dpsgd_client_reports_the_epsilon_of_its_most_sent_row(
    deployment: Callable[..., dict[str, Path]], procs: Procs
) -> None:
    # Prepare: Poisson batches (DP-SGD) and activation noise, two epochs
    files = deployment(clients=1, dataset="breast_cancer", epochs=2)
    server = procs.fork("server", files["server"])
    wait_listening(files["server"], server)
    private = ("privacy.dpsgd.noise_multiplier=1", "privacy.noise.sigma=1", "privacy.noise.clip=1")
    sets = [arg for value in private for arg in ("--set", value)]

    # Execute
    client = procs.fork("client", files["client-1"], *sets, "--json", "--no-progress")
    out, err = client.communicate(timeout=240)

    # Assert: some row went more than once an epoch (Poisson), and the epsilon composes
    # that row's releases, not one per epoch
    assert client.returncode == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    releases = summary["activation_releases"]
    assert releases > 2, summary
    noise = NoiseConfig(sigma=1.0, clip=1.0)
    expected = activation_release_statement(noise, releases)["activation_epsilon"]
    assert summary["activation_epsilon"] == pytest.approx(expected, rel=1e-3)
    assert (
        summary["activation_epsilon"] > activation_release_statement(noise, 2)["activation_epsilon"]
    )
