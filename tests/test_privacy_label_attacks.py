"""Label leakage over the whole run: cross-epoch attacks, evaluation outputs, per-party plans."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from privacy.label import Marvell
from privacy.label_attacks import (
    ATTACKS,
    PER_STEP_ATTACKS,
    cluster_label_attack,
    label_leak_over_run,
    model_completion,
    output_leak_auc,
)
from sl_pipeline.config import ServerConfig, load
from workers.server.engines.vertical import VerticalEngine
from workers.tools.localdeploy import init_deployment


def noisy_rounds(epochs: int, n: int = 200, noise: float = 6.0) -> tuple[list, torch.Tensor]:
    """Each epoch: class-dependent gradient directions buried in noise, a random sign of the
    singular vector, and the examples in a fresh order."""
    g = torch.Generator().manual_seed(0)
    labels = (torch.arange(n) % 2).long()
    signal = torch.where(labels[:, None] == 1, 1.0, -1.0) * torch.ones(n, 8)
    rounds = []
    for epoch in range(epochs):
        ids = torch.randperm(n, generator=g)
        grads = signal[ids] + noise * torch.randn(n, 8, generator=g)
        rounds.append((ids, grads * (-1) ** epoch))
    return rounds, labels


def test_averaging_epochs_recovers_what_one_epoch_hides() -> None:
    # Prepare
    rounds, labels = noisy_rounds(epochs=10)
    # Execute
    found = label_leak_over_run(rounds, labels)
    # Assert
    assert found["last_epoch_auc"] < 0.75
    # signs aligned across epochs, noise averaged: 0.86 against 0.65 for the last epoch
    assert found["direction_auc"] > found["last_epoch_auc"] + 0.15
    assert found["label_leak_auc"] >= found["best_epoch_auc"] and found["epochs"] == 10


def test_no_signal_stays_near_chance() -> None:
    rounds, labels = noisy_rounds(epochs=5)
    blank = [
        (ids, torch.randn(g.shape, generator=torch.Generator().manual_seed(7))) for ids, g in rounds
    ]
    assert label_leak_over_run(blank, labels)["label_leak_auc"] < 0.62


def test_output_leak_auc_of_logits_and_of_nothing() -> None:
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    logits = torch.stack([1 - labels.float(), labels.float()], dim=1)
    assert output_leak_auc(logits, labels) == 1.0
    assert output_leak_auc(logits[:, :0], labels) == 0.5


def test_vertical_engine_keeps_one_marvell_plan_per_party(tmp_path: Path) -> None:
    # Prepare
    files = init_deployment(tmp_path / "d", topology="vertical", clients=2, dataset="breast_cancer")
    cfg = load(
        ServerConfig,
        Path(files["files"]["server"]),
        ['privacy.label.mechanism="marvell"', "privacy.label.scale=2.0"],
    )
    engine = VerticalEngine(cfg, Path(files["files"]["server"]).parent)
    # Execute
    first, second = engine._protection("client-1"), engine._protection("client-2")
    # Assert
    assert isinstance(first, Marvell) and isinstance(second, Marvell)
    assert first is not second and engine._protection("client-1") is first


@pytest.fixture(scope="module")
def vertical_audit() -> dict[str, Any]:
    """One audit of a vertical deployment (seeded: every call gives the same figures), which
    the tests below read (two audits cost 8.7 + 8.5 s in CI)."""
    import warnings

    from workers.tools.audit import run_audit

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_audit("vertical", "breast_cancer", epochs=2, attack_seeds=1)


# `make test` hands tests to its two workers one at a time: the group keeps the readers of
# the one audit on one worker, which runs it once
@pytest.mark.xdist_group("vertical-audit")
def test_audit_vertical_reports_label_leakage(vertical_audit: dict[str, Any]) -> None:
    result = vertical_audit
    assert 0.5 <= result["label_leak_auc"] <= 1.0
    attacks = (*ATTACKS, *PER_STEP_ATTACKS)
    assert result["label_leak_auc"] == max(result[f"{a}_auc"] for a in attacks)
    assert result["label_leak_auc"] == result[f"{result['label_leak_attack']}_auc"]
    assert set(result["label_leak_by_party"]) == {"client-1", "client-2"}
    assert result["test_accuracy"] > 0.8
    assert 0.0 <= result["dcor"] <= 1.0 and result["reconstruction_mse"] > 0


@pytest.mark.xdist_group("vertical-audit")
def test_vertical_audit_closes_the_evaluation_leak_and_aggregates_epochs(
    vertical_audit: dict[str, Any],
) -> None:
    result = vertical_audit
    assert result["eval_output_auc"] == 0.5  # feature parties receive no outputs
    # ... and nothing beside their tensors: no loss, no evaluation score
    assert result["feature_party_told"] == []
    assert result["label_leak_auc"] >= result["label_leak_last_epoch_auc"] - 0.05
    assert {p["epochs"] for p in result["label_leak_by_party"].values()} == {2}
    assert result["test_accuracy"] > 0.8
    assert "label_leakage" in result["threat_models"]


def test_clustering_names_the_classes_of_separable_gradients() -> None:
    # Prepare: three classes, each with its own gradient direction; one epoch of noise only.
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(90) % 3
    centres = torch.eye(3, 6) * 5
    ids = torch.randperm(90, generator=g)
    clear = centres[labels[ids]] + 0.5 * torch.randn(90, 6, generator=g)
    blank = torch.randn(90, 6, generator=g)
    # Execute
    found = cluster_label_attack([(ids, blank), (ids, clear)], labels, 3)
    # Assert
    assert found["cluster_label_accuracy"] == 1.0  # the last epoch
    assert found["cluster_label_chance"] == pytest.approx(1 / 3)
    assert cluster_label_attack([(ids, blank)], labels, 3)["cluster_label_accuracy"] < 0.6


@pytest.mark.filterwarnings("ignore")
def test_ushaped_label_protection_runs_at_the_client_and_blunts_clustering() -> None:
    from workers.tools.audit import run_audit, split_overrides

    # Prepare: label keys go to the u-shaped client, which holds the labels.
    sets = ['privacy.label.mechanism="marvell"', "privacy.label.scale=4.0"]
    client, server = split_overrides(sets, "ushaped")
    assert client == sets and server == []
    # Execute
    plain = run_audit("ushaped", "breast_cancer", epochs=2, attack_seeds=1)
    protected = run_audit("ushaped", "breast_cancer", client, server, epochs=2, attack_seeds=1)
    # Assert
    assert plain["cluster_label_accuracy"] > 0.9 and "label_clustering" in plain["threat_models"]
    assert protected["label_leak_auc"] < plain["label_leak_auc"] - 0.1
    # The server's own outputs, which no label protection touches, still give the labels
    # away without any label (its top singular vector), and to a head on 40 known labels.
    assert protected["representation_auc"] > 0.9 and protected["completion_auc"] > 0.9
    assert "representation" in protected["threat_models"]
    assert "model_completion" not in protected["threat_models"]  # that is vertical's
    # Protected label gradients make the honest cut gradients label-independent: the hijack
    # detector, which would flag that, does not run there (and is refused beside it).
    assert plain["hijack_flagged"] is False and "hijack_flagged" not in protected


def test_model_completion_labels_the_rest_from_a_few_known_rows() -> None:
    # Prepare: representations that carry the label, and ones that do not.
    g = torch.Generator().manual_seed(2)
    labels = torch.arange(300) % 2
    informative = torch.randn(300, 4, generator=g) + 3.0 * labels[:, None].float()
    blank = torch.randn(300, 4, generator=g)
    # Execute
    found = model_completion(informative, labels, known=20)
    none = model_completion(blank, labels, known=20)
    # Assert
    assert found["completion_known"] == 20 and found["completion_auc"] > 0.95
    assert none["completion_auc"] < 0.65
    three = torch.arange(300) % 3
    spread = torch.randn(300, 3, generator=g) + 3.0 * torch.nn.functional.one_hot(three)
    assert model_completion(spread, three, known=30)["completion_accuracy"] > 0.8


def test_spread_attack_reads_labels_from_a_class_dependent_noise_variance() -> None:
    # Prepare: zero-mean noise whose variance along one direction depends on the class (what
    # Marvell adds): the signed cosine averages to zero for both classes, |cosine| does not.
    g = torch.Generator().manual_seed(3)
    n, d = 300, 16
    labels = (torch.arange(n) % 2).long()
    axis = torch.zeros(d)
    axis[0] = 1.0
    rounds = []
    for _ in range(6):
        ids = torch.randperm(n, generator=g)
        spread = torch.where(labels[ids] == 1, 6.0, 1.0)[:, None]
        grads = torch.randn(n, d, generator=g) + spread * torch.randn(n, 1, generator=g) * axis
        rounds.append((ids, grads))
    # Execute
    found = label_leak_over_run(rounds, labels)
    # Assert
    assert found["direction_auc"] < 0.6 and found["norm_auc"] > 0.8
    assert found["spread_auc"] > 0.9 and found["projection_auc"] > 0.9
    assert found["label_leak_attack"] in ("spread", "projection")
    assert found["label_leak_auc"] == max(found[f"{a}_auc"] for a in ATTACKS)


def offdir_rounds(
    seed: int,
    residual: tuple[float, float] = (0.6, 0.4),
    epochs: int = 6,
    n: int = 300,
    d: int = 16,
) -> tuple[list, Tensor]:
    """The leak a diagonal-only Marvell left (red team 16): a large zero-mean component along
    one direction, the same for both classes, and energy off that direction that depends on
    the class (the well-classified majority got isotropic noise)."""
    g = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) % 3 == 0).long()
    v = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    rounds = []
    for _ in range(epochs):
        ids = torch.randperm(n, generator=g)
        off = (
            torch.randn(n, d, generator=g)
            * torch.where(labels[ids] == 1, residual[1], residual[0])[:, None]
        )
        along = 10.0 * torch.randn(n, generator=g)
        rounds.append((ids, along[:, None] * v + off - (off @ v)[:, None] * v))
    return rounds, labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_offdir_reads_labels_from_energy_off_the_main_direction(seed: int) -> None:
    # Prepare
    rounds, labels = offdir_rounds(seed)
    # Execute
    found = label_leak_over_run(rounds, labels)
    # Assert: the earlier attacks stay at or under 0.71 (norm and direction near chance),
    # offdir separates the classes, and the combined score keeps most of it.
    earlier = ("norm", "direction", "spread", "projection")
    assert max(found[f"{a}_auc"] for a in earlier) < 0.72
    assert found["offdir_auc"] > 0.97 and found["offdir_projection_auc"] > 0.85
    assert found["label_leak_attack"] == "offdir"


def test_offdir_stays_near_chance_when_both_classes_share_the_residual() -> None:
    # What the full-covariance Marvell plan aims at: the same energy off the main direction.
    rounds, labels = offdir_rounds(0, residual=(0.5, 0.5))
    found = label_leak_over_run(rounds, labels)
    assert found["offdir_auc"] < 0.62 and found["offdir_projection_auc"] < 0.62


def test_one_party_marvell_plan_never_reaches_another_party(tmp_path: Path) -> None:
    # Prepare: client-1 has a two-class batch (its protection fits a plan to it)
    files = init_deployment(tmp_path / "d", topology="vertical", clients=2, dataset="breast_cancer")
    server = Path(files["files"]["server"])
    sets = ['privacy.label.mechanism="marvell"', "privacy.label.scale=2.0"]
    engine = VerticalEngine(load(ServerConfig, server, sets), server.parent)
    g = torch.Generator().manual_seed(4)
    labels = torch.tensor([0, 1] * 8)
    grads = torch.randn(16, 6, generator=g) + 5.0 * labels[:, None]
    engine._protection("client-1").protect(grads, labels)
    # Execute: client-2's first batch holds one class only
    engine._protection("client-2").protect(torch.randn(8, 6, generator=g), torch.ones(8).long())
    # Assert: client-2 fell back to isotropic noise; it never used client-1's direction
    first, second = engine._protection("client-1"), engine._protection("client-2")
    assert isinstance(first, Marvell) and isinstance(second, Marvell)
    assert first.last_plan is not None and second.last_plan is None


def test_batch_spread_reads_a_direction_that_changes_every_batch() -> None:
    # Prepare: Marvell-like noise whose class-dependent variance lies along a new random
    # direction in every batch: an epoch's top singular vector blurs them, a batch's does not.
    from privacy.label_attacks import batch_spread_over_run

    g = torch.Generator().manual_seed(5)
    n, d, batch = 256, 16, 32
    labels = (torch.arange(n) % 2).long()
    batches, rounds = [], []
    for _ in range(4):
        ids = torch.randperm(n, generator=g)
        grads = []
        for part in ids.split(batch):
            axis = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
            spread = torch.where(labels[part] == 1, 8.0, 1.0)[:, None]
            noise = torch.randn(len(part), d, generator=g)
            grads.append(noise + spread * torch.randn(len(part), 1, generator=g) * axis)
            batches.append((part, grads[-1]))
        rounds.append((ids, torch.cat(grads)))
    # Execute
    per_batch = batch_spread_over_run(batches, labels)["batch_spread_auc"]
    per_epoch = label_leak_over_run(rounds, labels)["spread_auc"]
    # Assert
    assert per_batch > 0.9 and per_batch > per_epoch + 0.1


def test_audit_seeds_the_ushaped_clients_label_protection() -> None:
    # Prepare: a u-shaped client runner (it protects the gradients it sends) and a server
    # without a vertical engine; Marvell draws from the OS until the audit seeds it
    from types import SimpleNamespace

    from workers.tools.audit_taps import seed_workers

    def client() -> Any:
        runner = SimpleNamespace(defense=None, dp=None, label_protection=Marvell(4.0))
        return SimpleNamespace(runner=runner)

    grads = torch.randn(32, 6, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(32) % 2
    draws = []
    for _ in range(2):
        clients = [client()]
        assert clients[0].runner.label_protection.generator is None
        # Execute
        seed_workers(SimpleNamespace(engine=object()), clients, seed=3)  # type: ignore[arg-type]
        draws.append(clients[0].runner.label_protection.protect(grads, labels))
    # Assert: two audits of one seed draw the same noise
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], grads)


def fresh_noise_steps(epochs: int, seed: int = 6, n: int = 320, d: int = 32) -> tuple[list, Tensor]:
    """What label protection leaves over a run: a small class-dependent component along one
    direction, under isotropic noise drawn afresh at every step, plus a drift common to each
    batch (training moves every row's gradient); (epoch, ids, gradients) per step of 32 rows."""
    g = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) % 3 == 0).long()
    w = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    signal = torch.where(labels == 1, 0.5, -0.5)[:, None] * w
    steps = []
    for epoch in range(epochs):
        for ids in torch.randperm(n, generator=g).split(32):
            drift = 3.0 * torch.randn(1, d, generator=g)
            steps.append((epoch, ids, signal[ids] + drift + torch.randn(len(ids), d, generator=g)))
    return steps, labels


def test_averaging_each_rows_gradients_beats_averaging_its_scores() -> None:
    from privacy.label_attacks import label_leak_whole_run, row_mean_over_run

    # Prepare: ten epochs of fresh noise, each too loud for one epoch's singular vector
    steps, labels = fresh_noise_steps(epochs=10)
    # Execute
    found = label_leak_whole_run(steps, labels)
    # Assert: the score-averaging attacks stay near chance, the row mean reads the labels
    assert max(found[f"{a}_auc"] for a in (*ATTACKS, "batch_spread")) < 0.65
    assert found["row_mean_auc"] > 0.95
    assert found["label_leak_attack"] == "row_mean"
    assert found["label_leak_auc"] == found["row_mean_auc"]
    # one epoch has no average to take: the same attack is near chance there
    one = [(i, grads) for e, i, grads in steps if e == 0]
    assert row_mean_over_run(one, labels)["row_mean_auc"] < 0.75
