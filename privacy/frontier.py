"""Accuracy/leakage trade-off: Pareto fronts and a plot, one point per privacy setting.

Rows are mappings such as ``{"name": "sigma=0.5", "test_accuracy": 0.91, "dcor": 0.42,
"label_leak_auc": 0.71, "reconstruction_mse": 0.05}``. Accuracy is maximised; a leakage
measure is minimised unless it is listed in ``maximize`` (by default the reconstruction MSE,
where a larger error means less leakage).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sl_pipeline.errors import PrivacyError

Row = Mapping[str, Any]
MAXIMIZE_DEFAULT = frozenset({"reconstruction_mse"})
LEAKAGE_KEYS = ("dcor", "label_leak_auc", "reconstruction_mse", "ssim", "epsilon")


def _oriented(row: Row, key: str, maximize: Collection[str]) -> float:
    """The row's value for ``key`` turned into a 'larger is better' score."""
    value = row.get(key)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise PrivacyError(
            f"row {dict(row)!r} has no numeric {key!r}",
            hint="give every row a number for each plotted key",
        )
    return float(value) if key in maximize else -float(value)


def pareto_front(
    rows: Sequence[Row],
    x_key: str,
    y_keys: Sequence[str],
    *,
    maximize: Collection[str] = MAXIMIZE_DEFAULT,
) -> list[Row]:
    """Rows not dominated on (``x_key`` maximised, each ``y_key`` oriented), sorted by x.

    A row is dominated if another is at least as good on every objective and strictly
    better on one. Rows that tie on every objective are all kept.
    """
    keep_max = set(maximize) | {x_key}
    scores = [[_oriented(r, k, keep_max) for k in (x_key, *y_keys)] for r in rows]

    def dominated(i: int) -> bool:
        return any(
            all(o >= s for o, s in zip(other, scores[i], strict=True)) and other != scores[i]
            for other in scores
        )

    front = [r for i, r in enumerate(rows) if not dominated(i)]
    return sorted(front, key=lambda r: float(r[x_key]))


def plot_frontier(
    rows: Sequence[Row],
    out_png: str | Path,
    *,
    x_key: str = "test_accuracy",
    y_keys: Sequence[str] | None = None,
    label_key: str = "name",
    maximize: Collection[str] = MAXIMIZE_DEFAULT,
) -> Path:
    """One panel per leakage measure: accuracy (x) vs leakage (y), Pareto front marked.

    ``y_keys`` defaults to the known leakage keys present in every row. Renders with the Agg
    canvas directly, so no global matplotlib backend is touched. Returns the written path.
    """
    if not rows:
        raise PrivacyError("plot_frontier needs at least one row")
    keys = (
        list(y_keys)
        if y_keys is not None
        else [k for k in LEAKAGE_KEYS if all(isinstance(r.get(k), int | float) for r in rows)]
    )
    if not keys:
        raise PrivacyError("no leakage measure to plot", hint=f"pass y_keys; known: {LEAKAGE_KEYS}")
    fig = Figure(figsize=(4.5 * len(keys), 4.0))
    FigureCanvasAgg(fig)
    for i, key in enumerate(keys):
        ax = fig.add_subplot(1, len(keys), i + 1)
        _panel(ax, rows, x_key, key, label_key, maximize)
    fig.tight_layout()
    out = Path(out_png)
    fig.savefig(out, format="png")
    return out


def _panel(
    ax: Any, rows: Sequence[Row], x_key: str, key: str, label_key: str, maximize: Collection[str]
) -> None:
    """One leakage measure against accuracy: every setting, its Pareto front, its labels."""
    ax.scatter([r[x_key] for r in rows], [r[key] for r in rows], color="tab:blue", label="setting")
    front = pareto_front(rows, x_key, [key], maximize=maximize)
    ax.plot(
        [r[x_key] for r in front],
        [r[key] for r in front],
        "o-",
        color="tab:red",
        mfc="none",
        ms=10,
        label="Pareto front",
    )
    for r in rows:
        if label_key in r:
            ax.annotate(
                str(r[label_key]),
                (r[x_key], r[key]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    better = "higher" if key in maximize else "lower"
    ax.set_xlabel(x_key)
    ax.set_ylabel(f"{key} ({better} = less leakage)")
    ax.legend(fontsize=8)


TARGET_LOSS_POINTS = 3.0  # issue 16: at most 3 points of accuracy below the undefended run
TARGET_LABEL_AUC = 0.65


def _number(row: Row, key: str) -> float | None:
    value = row.get(key)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def _reconstruction_held(row: Row) -> bool | None:
    """Whether the strongest reconstruction attacker (each variant's mean over seeds, or the
    ensemble of its decoders) stays at or below the nearest auxiliary row: SSIM for images,
    MSE otherwise. ``None`` where the row has no such figures."""
    baseline = _number(row, "baseline_nearest_aux_ssim")
    found = [v for k in ("ssim", "ssim_ensemble") if (v := _number(row, k)) is not None]
    if baseline is not None and found:
        return max(found) <= baseline
    baseline = _number(row, "baseline_nearest_aux_mse")
    keys = ("reconstruction_mse", "reconstruction_mse_ensemble")
    found = [v for k in keys if (v := _number(row, k)) is not None]
    if baseline is not None and found:
        return min(found) >= baseline
    return None


def assess(
    row: Row,
    base: Row,
    *,
    max_loss_points: float = TARGET_LOSS_POINTS,
    max_label_auc: float = TARGET_LABEL_AUC,
) -> dict[str, Any]:
    """How a defended ``row`` stands against the targets of issue 16, beside the undefended
    ``base`` of the same run: its accuracy change in points; whether reconstruction is held at
    the nearest auxiliary row (:func:`_reconstruction_held`) and whether the label AUC over the
    run is at most ``max_label_auc``; and for each measure that applies, whether its target is
    met (``reconstruction_target``, ``label_target``): held, at most ``max_loss_points`` below
    the base's accuracy. Each target stands on its own: a label sweep on tabular data need not
    also hide the features."""
    out: dict[str, Any] = {}
    accuracy, reference = _number(row, "test_accuracy"), _number(base, "test_accuracy")
    change = None
    if accuracy is not None and reference is not None:
        change = out["accuracy_change_points"] = round(100.0 * (accuracy - reference), 6)
    within = change is not None and change >= -max_loss_points
    held = _reconstruction_held(row)
    if held is not None:
        out["reconstruction_held"] = held
        out["reconstruction_target"] = held and within
    auc = _number(row, "label_leak_auc")
    if auc is not None:
        out["label_held"] = auc <= max_label_auc
        out["label_target"] = out["label_held"] and within
    return out


__all__ = [
    "LEAKAGE_KEYS",
    "TARGET_LABEL_AUC",
    "TARGET_LOSS_POINTS",
    "assess",
    "pareto_front",
    "plot_frontier",
]
