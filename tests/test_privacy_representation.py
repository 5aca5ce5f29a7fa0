"""The u-shaped server's own representations as a label channel
(:func:`privacy.label_attacks.representation_leak`)."""

from __future__ import annotations

import torch

from privacy.label_attacks import representation_leak


def _steps(outputs: torch.Tensor, epochs: int = 2, batch: int = 50) -> list[tuple[int, ...]]:
    ids = torch.arange(len(outputs))
    return [
        (epoch, ids[i : i + batch], outputs[i : i + batch] + 0.1 * epoch)
        for epoch in range(epochs)
        for i in range(0, len(outputs), batch)
    ]


def test_outputs_that_separate_the_classes_give_the_labels_without_any_label() -> None:
    # Prepare: outputs shifted by class along one direction, and outputs that ignore the label
    g = torch.Generator().manual_seed(0)
    labels = (torch.arange(300) % 3 == 0).to(torch.int64)
    shifted = torch.randn(300, 6, generator=g) + 4.0 * (2 * labels[:, None].float() - 1)
    blank = torch.randn(300, 6, generator=g)
    # Execute: on the last epoch's outputs of each row
    found = representation_leak(_steps(shifted), labels, 2)  # type: ignore[arg-type]
    none = representation_leak(_steps(blank), labels, 2)  # type: ignore[arg-type]
    # Assert: the top singular vector and k-means find the classes, a head on 40 rows too
    assert found["representation_auc"] > 0.95 and found["completion_auc"] > 0.95
    assert found["representation_cluster_accuracy"] > 0.9 and found["completion_known"] == 40
    assert none["representation_auc"] < 0.65 and none["completion_auc"] < 0.65
    assert none["representation_cluster_accuracy"] < 0.75  # the majority share is 0.667


def test_a_row_seen_twice_in_the_last_epoch_is_counted_once() -> None:
    labels = torch.tensor([0, 1] * 20)
    outputs = labels[:, None].float().repeat(1, 3) * 5.0
    steps = [(0, torch.arange(40), outputs), (0, torch.arange(10), outputs[:10])]
    found = representation_leak(steps, labels, 2, known=10)  # type: ignore[arg-type]
    assert found["representation_auc"] == 1.0 and found["representation_cluster_accuracy"] == 1.0
