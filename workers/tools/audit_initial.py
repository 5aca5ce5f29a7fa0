"""The first batch, inverted with no query access: ``python -m workers.tools.audit_initial``.

Every peer builds its segment from ``model.seed``, and the handshake checks that the
``[model]`` sections match, so the server can rebuild the client's **initial** segment exactly.
The first training batch goes through those weights (the next ones through weights a few steps
from them). This trains the reconstruction attacker of ``sl-pipeline audit``
(:func:`privacy.reconstruction.reconstruction_audit`) on auxiliary rows (the client's training
split) through that initial segment and the run's cut-layer defense, and inverts one release
of each test row through it: what the server reads of the first batch's rows without ever
querying the client, and whatever the hijack detector flags later (FSHA is flagged at batch 6).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from sl_pipeline.config import ClientConfig, load
from sl_pipeline.data import load_party_data
from sl_pipeline.errors import ConfigError
from sl_pipeline.models import build_segments
from workers.tools.audit import pinned_threads
from workers.tools.audit_link import run_tool
from workers.tools.localdeploy import init_deployment

ROUTED = ("privacy.noise.", "model.", "data.")  # what the initial release depends on


def initial_release_attack(
    dataset: str, overrides: Sequence[str], attack_seeds: int = 1
) -> dict[str, Any]:
    """The attacker's figures and baselines on the test rows' release through the initial
    segment (vanilla's client segment, the run's ``privacy.noise``)."""
    from privacy.config import PrivacyConfig
    from privacy.reconstruction import reconstruction_audit, release_of

    for key in overrides:
        if not key.startswith(ROUTED):
            raise ConfigError(f"--set {key!r}: the initial release reads only {', '.join(ROUTED)}")
    if attack_seeds < 1:
        raise ConfigError(f"--attack-seeds {attack_seeds} must be at least 1")
    with tempfile.TemporaryDirectory(prefix="sl-initial-") as tmp:
        path = Path(init_deployment(Path(tmp) / "d", dataset=dataset)["files"]["client-1"])
        cfg = load(ClientConfig, path, list(overrides))
        data = load_party_data(cfg.data, path.parent, cfg.model.classes, cfg.model.in_shape)
    noise = PrivacyConfig.from_mapping(cfg.privacy).noise
    with pinned_threads(), torch.random.fork_rng(devices=[]), torch.no_grad():
        initial = build_segments(cfg.model, "vanilla")[0].eval()  # seeds from model.seed
        aux, victim = initial(data.train.x), initial(data.test.x)
    image = tuple(data.test.x.shape[1:]) if data.test.x.dim() == 4 else None
    with pinned_threads():
        found = reconstruction_audit(
            (data.train.x, aux),
            (data.test.x, victim),
            release_of(noise, 1),
            seeds=attack_seeds,
            image_shape=image,
        )
    keep = {k: v for k, v in found.items() if isinstance(v, float) and v == v and v != float("inf")}
    return {"dataset": dataset, "set": list(overrides), **keep}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.tools.audit_initial")
    parser.add_argument("--dataset", default="digits", choices=["digits", "breast_cancer"])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--attack-seeds", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    return run_tool(
        lambda: initial_release_attack(args.dataset, args.set, args.attack_seeds), args.json
    )


if __name__ == "__main__":
    sys.exit(main())
