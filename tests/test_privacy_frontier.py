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
