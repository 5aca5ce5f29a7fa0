"""A server that links a row's releases voids DP-SGD's subsampling amplification
(``privacy.accounting.linked_dpsgd_epsilon``, ``python -m workers.tools.audit_link``)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from privacy.accounting import linked_dpsgd_epsilon
from sl_pipeline.errors import PrivacyError
from workers.tools.audit_link import link_share, main


def test_linked_epsilon_composes_each_participation_unamplified() -> None:
    # Fixed values: Opacus' RDP accountant at sample rate 1, delta 1e-5
    assert linked_dpsgd_epsilon(1.0, 2, 1e-5) == pytest.approx(7.0774, abs=1e-4)
    assert linked_dpsgd_epsilon(1.0, 7, 1e-5) == pytest.approx(15.1754, abs=1e-4)
    assert linked_dpsgd_epsilon(1.0, 9, 1e-5) == pytest.approx(17.8036, abs=1e-4)
    assert linked_dpsgd_epsilon(1.0, 0, 1e-5) == 0.0
    assert linked_dpsgd_epsilon(0.0, 1, 1e-5) == math.inf
    with pytest.raises(PrivacyError, match="participations = -1 is out of range"):
        linked_dpsgd_epsilon(1.0, -1, 1e-5)


def test_rows_whose_activations_barely_move_are_linked_and_noise_hides_them() -> None:
    g = torch.Generator().manual_seed(0)
    ids = torch.arange(50)
    rows = torch.randn(50, 8, generator=g)
    drift = rows + 0.01 * torch.randn(50, 8, generator=g)
    order = torch.randperm(50, generator=g)  # the next epoch's batches hold them in another order
    found = link_share([(0, ids, rows), (1, ids[order], drift[order])])
    assert found["linked"] == found["linked_one_to_one"] == 1.0 and found["linkable"] == 50
    noisy = drift + 10.0 * torch.randn(50, 8, generator=g)
    assert link_share([(0, ids, rows), (1, ids, noisy)])["linked_one_to_one"] < 0.3


@pytest.mark.filterwarnings("ignore")
def test_the_server_links_poisson_batches_and_the_unamplified_epsilon_is_reported(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Execute: vanilla breast_cancer, DP-SGD with Poisson batches, two epochs
    argv = ["--set", "privacy.dpsgd.noise_multiplier=1.0", "--epochs", "2", "--json"]
    assert main(argv) == 0
    found = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # Assert: most rows linked with no id (chance is 1 in 455), and against that party the
    # epsilon is the worst row's participations composed, far above the amplified figure
    assert found["linked"] > 0.5 > 100 * found["chance"]
    worst = found["dpsgd_most_participations"]
    assert found["dpsgd_epsilon_if_linked"] == linked_dpsgd_epsilon(1.0, worst, 1e-5)
    assert found["dpsgd_epsilon_if_linked"] > 2 * found["dpsgd_epsilon"]


def test_one_epoch_is_refused_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --epochs 1 must be at least 2") and "\n" not in err
