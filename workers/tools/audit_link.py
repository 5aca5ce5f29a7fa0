"""Does a vanilla server know which rows each batch holds? ``python -m workers.tools.audit_link``.

The vanilla wire carries no sample ids, and DP-SGD draws its Poisson batches from the
operating system's generator (:class:`privacy.dpsgd.SecretPoissonSampler`), so that no one
can predict which rows a batch holds: Opacus' epsilon amplifies by the sample rate, which is
sound only while the observer cannot tell. The server sees every row's activation whenever
the row is sampled, though, and a row's activation moves little between epochs. This trains
the built-in vanilla deployment in one process (as ``sl-pipeline audit`` does), records each
training release with its sample id (which the server never gets), and links each row sent in
the last epoch to the nearest activation sent in the epoch before (``linked``), or by the
one-to-one matching of least total distance (``linked_one_to_one``): the share it gets right,
beside chance. With DP-SGD it also reports the epsilon that holds against a party that links
the rows and sees the weights (:func:`privacy.accounting.linked_dpsgd_epsilon`: the worst
row's participations, no amplification) beside the client's own (amplified) figure.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from sl_pipeline.errors import ConfigError, SLError
from workers.client.worker import ClientWorker
from workers.tools.audit import (
    pinned_threads,
    run_keeping_signals,
    split_overrides,
    train_in_process,
)
from workers.tools.localdeploy import init_deployment
from workers.tools.staging import scratch

Releases = list[tuple[int, torch.Tensor, torch.Tensor]]  # (epoch, ids, activations sent)


def record_releases(clients: Sequence[ClientWorker], releases: Releases) -> None:
    """Keep every training activation the first client sends, with its batch's ids."""
    runner: Any = clients[0].runner
    forward = runner.forward_message

    def forward_message(step: int, sent: Any, y: Any, ids: torch.Tensor) -> Any:
        message = forward(step, sent, y, ids)
        releases.append((message.epoch, ids.clone(), sent.detach().reshape(len(ids), -1).clone()))
        return message

    runner.forward_message = forward_message


def link_share(releases: Releases) -> dict[str, Any]:
    """Each row of the last epoch linked to its nearest activation of the epoch before."""
    epochs = sorted({e for e, _, _ in releases})
    if len(epochs) < 2:
        raise ConfigError("--epochs must be at least 2: rows are linked across two epochs")

    def of(epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.cat([i for e, i, _ in releases if e == epoch])
        return ids, torch.cat([a for e, _, a in releases if e == epoch]).to(torch.float64)

    from scipy.optimize import linear_sum_assignment

    (before, seen), (last, now) = of(epochs[-2]), of(epochs[-1])
    distances = torch.cdist(now, seen)
    nearest = before[distances.argmin(dim=1)]
    rows, cols = linear_sum_assignment(distances.numpy())  # one-to-one: each row sent once
    matched = torch.full_like(last, -1)
    matched[torch.as_tensor(rows)] = before[torch.as_tensor(cols)]
    both = torch.isin(last, before)  # only a row sent in both epochs can be linked
    return {
        "linked": float((nearest == last)[both].to(torch.float64).mean()),
        "linked_one_to_one": float((matched == last)[both].to(torch.float64).mean()),
        "linkable": int(both.sum()),
        "chance": 1.0 / len(before),
    }


def measure_links(
    dataset: str, overrides: Sequence[str], epochs: int, seed: int = 0
) -> dict[str, Any]:
    """Train the built-in vanilla deployment with ``overrides`` and link its releases."""
    client_sets, server_sets = split_overrides(overrides, "vanilla")
    shared = [s for s in client_sets if s.startswith(("train.", "model."))]
    releases: Releases = []
    with scratch("audit-link") as tmp:
        made = init_deployment(tmp / "deploy", dataset=dataset, epochs=epochs, seed=seed)
        files = {k: Path(v) for k, v in made["files"].items()}
        with pinned_threads(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            trained = run_keeping_signals(
                train_in_process(
                    files,
                    [*client_sets, 'checkpoint.dir=""'],
                    server_sets,
                    shared,
                    seed=seed,
                    tap=lambda clients: record_releases(clients, releases),
                )
            )
    out: dict[str, Any] = {"dataset": dataset, "set": list(overrides), "epochs": epochs}
    out.update(link_share(releases))
    dp = trained.clients[0].runner.dp  # privacy.dpsgd.PrivateClient, with DP-SGD
    if dp is not None:
        from privacy.accounting import linked_dpsgd_epsilon

        worst = int(torch.bincount(torch.cat([i for _, i, _ in releases])).max())
        out["dpsgd_epsilon"] = dp.epsilon()
        out["dpsgd_most_participations"] = worst
        out["dpsgd_epsilon_if_linked"] = linked_dpsgd_epsilon(dp.noise_multiplier, worst, dp.delta)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.tools.audit_link")
    parser.add_argument("--dataset", default="breast_cancer", choices=["digits", "breast_cancer"])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    def measured() -> dict[str, Any]:
        if args.epochs < 2:
            raise ConfigError(f"--epochs {args.epochs} must be at least 2 (rows are linked)")
        return measure_links(args.dataset, args.set, args.epochs, args.seed)

    return run_tool(measured, args.json)


def run_tool(measured: Callable[[], dict[str, Any]], as_json: bool) -> int:
    """Print what ``measured`` returns (one JSON line, or a line per figure); a bad input is
    one line on stderr and exit status 2."""
    try:
        found = measured()
    except SLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if as_json:
        print(json.dumps(found))
    else:
        for key, value in found.items():
            print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
