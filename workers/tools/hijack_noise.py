"""The hijack detector under the client's own activation noise:
``python -m workers.tools.hijack_noise``.

For each ``--sigmas`` value (at ``--clip``) and each ``--seeds`` seed, on the digits split of
``tests/test_privacy_hijack.py`` (the first ``--private`` images the client's, the rest the
server's public data, the client segment at the default cut), this plays the same client, with
that noise on what it sends, against an honest server (:func:`privacy.hijack.honest_game`) and
against FSHA (:func:`privacy.hijack.fsha_game`) for ``--steps`` steps each, the detector built
as a live client builds it (an honest reference whenever the noise is on). It reports, per
sigma, the false-alarm rate (honest runs flagged), FSHA's detection rate within the first epoch,
the runs of each that ended ``cannot_judge``, and FSHA's inversion against the nearest public
image. ``--games patient --patient-steps N`` adds the attacker that plays honest for N steps
(until the client's noise has starved the detector's reference) and only then hijacks.
docs/privacy.md quotes it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from typing import Any

import torch

from privacy.config import HijackConfig, NoiseConfig, PrivacyConfig
from privacy.defenses import build_defenses
from privacy.hijack import FSHASetup, fsha_game, honest_game
from sl_pipeline.config import ModelConfig, TrainConfig
from sl_pipeline.errors import ConfigError, SLError
from sl_pipeline.models import build_segments
from workers.client.hijack_watch import build_detector
from workers.tools.audit import pinned_threads
from workers.tools.fsha_curve import DIGITS

MODEL = ModelConfig(builtin="cnn", in_shape=[1, 8, 8], classes=10)
TRAIN = TrainConfig(batch_size=32, lr=0.05, momentum=0.9)  # the demo's digits run
GAMES = ("honest", "fsha", "patient")


def _client() -> torch.nn.Module:
    return build_segments(MODEL)[0]


def _server() -> torch.nn.Module:
    return build_segments(MODEL)[1]


def _game(
    sigma: float, clip: float, seed: int, args: dict[str, Any], games: Sequence[str]
) -> dict[str, Any]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target)
    privacy = PrivacyConfig(noise=NoiseConfig(sigma=sigma, clip=clip), hijack=HijackConfig())
    private, steps, patient = args["private"], args["steps"], args["patient"]
    epoch = -(-private // TRAIN.batch_size)
    row: dict[str, Any] = {"sigma": sigma, "clip": clip, "seed": seed}
    for name in games:
        noise = build_defenses(privacy, generator=torch.Generator().manual_seed(seed))
        setup = FSHASetup(
            _client, x[:private], y[:private], x[private:], steps, TRAIN.batch_size, TRAIN.lr,
            TRAIN.momentum, defense=noise.apply,
        )  # fmt: skip
        cpu = torch.device("cpu")
        detector = build_detector(privacy, MODEL, TRAIN, "vanilla", replicable=True, device=cpu)
        if name == "honest":
            found = honest_game(setup, _server, seed=seed, detector=detector)
        else:
            late = {"honest_steps": patient, "steps": patient + steps, "rest": _server}
            setup = dataclasses.replace(setup, **late) if name == "patient" else setup
            found = fsha_game(setup, seed=seed, detector=detector)
        at = found["flagged_at_batch"]
        # FSHA is judged on its first epoch; a false alarm or the patient attacker on the run
        row[f"{name}_flagged"] = at is not None and (name != "fsha" or at <= epoch)
        row[f"{name}_verdict"] = found["verdict"]
        row[f"{name}_flagged_at_batch"] = at
        row[f"{name}_reference_score"] = detector.reference_score
        if name != "honest":
            row[f"{name}_ssim"] = found["fsha_ssim"]
            row["nearest_public_ssim"] = found["fsha_nearest_public_ssim"]
    return row


def sweep(
    sigmas: Sequence[float],
    clip: float,
    seeds: Sequence[int],
    steps: int,
    private: int = 1400,
    *,
    games: Sequence[str] = ("honest", "fsha"),
    patient: int = 0,
) -> list[dict[str, Any]]:
    """One row per (sigma, seed): see the module's docstring."""
    if not 0 < private < DIGITS:
        raise ConfigError(f"--private {private} must be in [1, {DIGITS - 1}]")
    if steps < 1 or not seeds or not sigmas:
        raise ConfigError("give --steps of at least 1, one or more --seeds and --sigmas")
    if ("patient" in games) != (patient > 0):
        raise ConfigError("--games patient and --patient-steps N (N > 0) go together")
    args = {"private": private, "steps": steps, "patient": patient}
    with pinned_threads():
        return [_game(s, clip, seed, args, games) for s in sigmas for seed in seeds]


def summary(rows: list[dict[str, Any]], games: Sequence[str]) -> list[dict[str, Any]]:
    """Per sigma and game: how often the detector flagged and said ``cannot_judge``, over the
    seeds (for ``honest`` a flag is a false alarm), and the attacks' mean inversion SSIM."""
    out = []
    for sigma in dict.fromkeys(r["sigma"] for r in rows):
        mine = [r for r in rows if r["sigma"] == sigma]
        n = len(mine)
        found: dict[str, Any] = {"sigma": sigma, "runs": n}
        for g in games:
            found[f"{g}_flagged_rate"] = sum(r[f"{g}_flagged"] for r in mine) / n
            found[f"{g}_cannot_judge"] = sum(r[f"{g}_verdict"] == "cannot_judge" for r in mine)
            if g != "honest":
                found[f"{g}_ssim"] = sum(r[f"{g}_ssim"] for r in mine) / n
                found["nearest_public_ssim"] = mine[0]["nearest_public_ssim"]
        out.append(found)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m workers.tools.hijack_noise", description=__doc__)
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.0, 0.1, 0.3, 1.0])
    p.add_argument("--clip", type=float, default=5.0)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=400, help="client steps per game (default 400)")
    p.add_argument("--private", type=int, default=1400, help="the client's images (default 1400)")
    p.add_argument("--games", nargs="+", choices=GAMES, default=["honest", "fsha"])
    p.add_argument(
        "--patient-steps",
        type=int,
        default=0,
        metavar="N",
        help="the patient attacker: honest for N steps, then FSHA for --steps",
    )
    p.add_argument("--json", action="store_true", help="rows and summary as JSON")
    args = p.parse_args(argv)
    try:
        rows = sweep(
            args.sigmas, args.clip, args.seeds, args.steps, args.private,
            games=args.games, patient=args.patient_steps,
        )  # fmt: skip
    except SLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    rates = summary(rows, args.games)
    if args.json:
        print(json.dumps({"rows": rows, "summary": rates}, indent=2))
        return 0
    for r in rates:
        print(
            ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items())
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
