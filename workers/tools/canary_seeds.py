"""The canary audit's spread over game seeds: ``python -m workers.tools.canary_seeds``.

``sl-pipeline audit --canary-runs N`` plays the canary game once, at the audit's seed; with 40
runs a side its bound is coarse, and one game seed says little about how coarse. This plays the
same game (the audit's deployment, client segment and data at deployment seed 0, the game of
:func:`workers.tools.audit_canary.canary_audit`) at each of ``--game-seeds``, without training
the deployment first, and prints each seed's 95 % lower bound with the server trained and frozen.
``--game-seeds 0`` gives the audit's own figures (docs/privacy.md, the canary table's seed column).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sl_pipeline.config import ClientConfig, load
from sl_pipeline.data import load_party_data
from sl_pipeline.errors import ConfigError, SLError
from workers.tools.audit import pinned_threads
from workers.tools.audit_canary import canary_audit, check_canary
from workers.tools.localdeploy import init_deployment

ROUTED = ("privacy.", "train.", "model.", "data.")  # the client's own keys: what the game reads


def spread(
    dataset: str, overrides: Sequence[str], runs: int, seeds: Sequence[int], epochs: int | None
) -> dict[str, Any]:
    """Each game seed's bounds (server trained and frozen) and the accountant's epsilon."""
    from privacy.config import PrivacyConfig

    for key in overrides:
        if not key.startswith(ROUTED):
            raise ConfigError(f"--set {key!r}: the game reads only {', '.join(ROUTED)} keys")
    with tempfile.TemporaryDirectory(prefix="sl-canary-") as tmp:
        files = init_deployment(Path(tmp) / "d", dataset=dataset, epochs=epochs)["files"]
        path = Path(files["client-1"])
        cfg = load(ClientConfig, path, list(overrides))
        privacy = PrivacyConfig.from_mapping(cfg.privacy)
        check_canary(cfg.client.topology, privacy, runs)
        data = load_party_data(cfg.data, path.parent, cfg.model.classes, cfg.model.in_shape)
    rows = []
    with pinned_threads():  # the audit's thread count: the same float sums, the same figures
        for seed in seeds:
            found = canary_audit(cfg, data, privacy, runs, seed)
            print(f"canary_seeds: seed {seed} done", file=sys.stderr)
            rows.append({"seed": seed, **found})
    trained = [r["canary_epsilon_lower_bound"] for r in rows]
    frozen = [r["canary_epsilon_lower_bound_frozen_server"] for r in rows]
    return {
        "dataset": dataset,
        "runs": runs,
        "seeds": rows,
        "trained_min": min(trained),
        "trained_max": max(trained),
        "trained_median": statistics.median(trained),
        "frozen_max": max(frozen),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m workers.tools.canary_seeds", description=__doc__)
    p.add_argument("--dataset", default="breast_cancer", choices=("breast_cancer", "digits"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides")
    p.add_argument("--runs", type=int, default=40, help="runs a side per seed (default: 40)")
    p.add_argument("--game-seeds", type=int, nargs="+", default=list(range(8)))
    p.add_argument("--epochs", type=int, default=None, help="default: the audit's for the data")
    p.add_argument("--json", action="store_true", help="one JSON object instead of lines")
    args = p.parse_args(argv)
    try:
        out = spread(args.dataset, args.overrides, args.runs, args.game_seeds, args.epochs)
    except SLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    for row in out["seeds"]:
        print(
            f"seed {row['seed']}: trained {row['canary_epsilon_lower_bound']:.4f}, "
            f"frozen {row['canary_epsilon_lower_bound_frozen_server']:.4f}, "
            f"accountant {row['canary_accountant_epsilon']:.4f}"
        )
    print(
        f"trained {out['trained_min']:.3f} - {out['trained_max']:.3f} "
        f"(median {out['trained_median']:.3f}); frozen at most {out['frozen_max']:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
