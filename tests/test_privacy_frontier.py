"""Pareto fronts and the frontier plot."""

from __future__ import annotations

from pathlib import Path

import pytest

from privacy.frontier import pareto_front, plot_frontier
from sl_pipeline.errors import PrivacyError

ROWS = [
    {"name": "off", "test_accuracy": 0.95, "dcor": 0.9, "reconstruction_mse": 0.01},
    {"name": "s=0.5", "test_accuracy": 0.93, "dcor": 0.6, "reconstruction_mse": 0.03},
    {"name": "s=1", "test_accuracy": 0.90, "dcor": 0.7, "reconstruction_mse": 0.02},  # dominated
    {"name": "s=2", "test_accuracy": 0.85, "dcor": 0.3, "reconstruction_mse": 0.08},
]


def test_pareto_front_drops_dominated_rows_sorted_by_accuracy() -> None:
    front = pareto_front(ROWS, "test_accuracy", ["dcor"])
    assert [r["name"] for r in front] == ["s=2", "s=0.5", "off"]


def test_reconstruction_mse_is_maximised_by_default() -> None:
    front = pareto_front(ROWS, "test_accuracy", ["reconstruction_mse"])
    assert "s=1" not in [r["name"] for r in front]
    flipped = pareto_front(ROWS, "test_accuracy", ["reconstruction_mse"], maximize=())
    assert [r["name"] for r in flipped] == ["off"]


def test_missing_key_is_named() -> None:
    with pytest.raises(PrivacyError, match="'dcor'"):
        pareto_front([{"test_accuracy": 0.5}], "test_accuracy", ["dcor"])


def test_plot_frontier_writes_png(tmp_path: Path) -> None:
    out = plot_frontier(ROWS, tmp_path / "frontier.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_assess_holds_a_setting_to_the_strongest_attacker_and_3_points() -> None:
    from privacy.frontier import assess

    base = {"test_accuracy": 0.975}
    held = {
        "test_accuracy": 0.972,
        "ssim": 0.84,
        "ssim_ensemble": 0.86,
        "baseline_nearest_aux_ssim": 0.912,
        "reconstruction_mse": 0.028,
        "baseline_nearest_aux_mse": 0.018,
    }
    found = assess(held, base)
    assert found["accuracy_change_points"] == pytest.approx(-0.3)
    assert found["reconstruction_held"] is True and found["reconstruction_target"] is True
    assert "label_target" not in found  # no label figure: that target does not apply
    # the ensemble attacker reaches the baseline: not held, whatever the mean says
    assert assess({**held, "ssim_ensemble": 0.913}, base)["reconstruction_target"] is False
    # 3.5 points lost: held, but not within the target
    lost = assess({**held, "test_accuracy": 0.94}, base)
    assert lost["reconstruction_held"] is True and lost["reconstruction_target"] is False
    # tabular: MSE must stay at or above the nearest auxiliary row's
    tabular = {"test_accuracy": 0.97, "reconstruction_mse": 0.3, "baseline_nearest_aux_mse": 0.35}
    assert assess(tabular, base)["reconstruction_held"] is False
    # labels stand on their own: AUC at most 0.65, whatever reconstruction does
    labels = assess({**tabular, "label_leak_auc": 0.64}, base)
    assert labels["label_target"] is True and labels["reconstruction_target"] is False
    assert assess({"test_accuracy": 0.97, "label_leak_auc": 0.651}, base)["label_held"] is False
