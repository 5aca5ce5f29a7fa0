"""FSHA's inversion when the hijack detector fires: ``python -m workers.tools.fsha_curve``.

The audit (``sl-pipeline audit --fsha-runs N``) reports the inversion after ``--fsha-steps``
only. This plays :func:`privacy.hijack.fsha_game` on the split of
``tests/test_privacy_hijack.py`` (digits, the first ``--private`` images the client's, the rest
the server's public data, the client segment at the default cut) once per ``--steps`` value,
with the same game seed: the game has no schedule, so a game of N steps is the first N steps of
a longer one. docs/privacy.md quotes it at 6 steps (the detector's first flag), 45 (one epoch)
and 400.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

import torch

from privacy.hijack import FSHASetup, GradientScrutinizer, fsha_game
from sl_pipeline.config import ModelConfig
from sl_pipeline.errors import ConfigError, SLError
from sl_pipeline.models import build_segments
from workers.tools.audit import pinned_threads

DIGITS = 1797  # scikit-learn's digits: the rows the split divides


def curve(steps: Sequence[int], private: int = 1400, seed: int = 0) -> list[dict[str, Any]]:
    """One FSHA game per entry of ``steps``: the inversion's SSIM and MSE after that many
    client steps, the nearest public image's, and the batch the detector flagged at."""
    from sklearn.datasets import load_digits

    if not 0 < private < DIGITS:
        raise ConfigError(f"--private {private} must be in [1, {DIGITS - 1}]")
    if not steps or min(steps) < 1:
        raise ConfigError(f"--steps {list(steps)}: give one or more counts of at least 1")
    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target)
    model = ModelConfig(builtin="cnn", in_shape=[1, 8, 8], classes=10)
    rows = []
    with pinned_threads():
        for n in steps:
            setup = FSHASetup(
                lambda: build_segments(model)[0], x[:private], y[:private], x[private:], steps=n
            )
            found = fsha_game(setup, seed=seed, detector=GradientScrutinizer())
            rows.append({"steps": n, **found})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m workers.tools.fsha_curve", description=__doc__)
    p.add_argument("--steps", type=int, nargs="+", default=[6, 45, 400])
    p.add_argument("--private", type=int, default=1400, help="the client's images (default 1400)")
    p.add_argument("--seed", type=int, default=0, help="the game seed (default 0)")
    p.add_argument("--json", action="store_true", help="a JSON list instead of lines")
    args = p.parse_args(argv)
    try:
        rows = curve(args.steps, args.private, args.seed)
    except SLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        print(
            f"after {r['steps']} steps: SSIM {r['fsha_ssim']:.3f} (MSE {r['fsha_mse']:.4f}); "
            f"nearest public image SSIM {r['fsha_nearest_public_ssim']:.3f}; "
            f"flagged at batch {r['flagged_at_batch']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
