"""`sl-pipeline audit` and `sl-pipeline tune`: the privacy commands.

:mod:`workers.cli.commands` adds their parsers with ``add_parsers(sub)`` and dispatches to them
through ``COMMANDS``.
Every bad input raises an :class:`~sl_pipeline.errors.SLError` naming the flag or key, which
the CLI prints as one line.
"""

from __future__ import annotations

import argparse
import json
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sl_pipeline.config import TOPOLOGIES, read_toml
from sl_pipeline.errors import ConfigError
from workers.tools.localdeploy import free_port
from workers.tools.tune_store import jsonable

FSHA_STEPS = 2000  # privacy.hijack.FSHA_STEPS (the parser loads no torch; a test checks they match)

AUDIT_KEYS = (
    "test_accuracy",
    "dcor",
    "attack_releases",
    "reconstruction_mse",
    "reconstruction_mse_ci",
    "baseline_mean_mse",
    "baseline_class_mean_mse",
    "baseline_nearest_aux_mse",
    "ssim",
    "ssim_ci",
    "baseline_mean_ssim",
    "baseline_class_mean_ssim",
    "baseline_nearest_aux_ssim",
    "unsplit_mse",
    "unsplit_ssim",
    "baseline_grey_mse",
    "baseline_grey_ssim",
    "label_leak_auc",
    "norm_auc",
    "direction_auc",
    "spread_auc",
    "projection_auc",
    "offdir_auc",
    "offdir_projection_auc",
    "batch_spread_auc",
    "row_mean_auc",
    "label_leak_last_epoch_auc",
    "eval_output_auc",
    "completion_auc",
    "completion_accuracy",
    "completion_chance",
    "cluster_label_accuracy",
    "cluster_label_chance",
    "representation_auc",
    "representation_cluster_accuracy",
    "representation_input_auc",
    "representation_input_cluster_accuracy",
    "activation_epsilon_per_release",
    "activation_releases",
    "activation_epsilon",
    "dpsgd_epsilon",
    "hijack_min_score",
    "hijack_reference_score",
    "fsha_runs",
    "fsha_steps",
    "fsha_detected",
    "fsha_detected_within_batches",
    "fsha_epoch_batches",
    "fsha_cannot_judge",
    "fsha_mse",
    "fsha_nearest_public_mse",
    "fsha_ssim",
    "fsha_nearest_public_ssim",
    "canary_accountant_epsilon",
    "canary_epsilon_lower_bound",
    "canary_epsilon_lower_bound_frozen_server",
)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="digits", choices=["digits", "breast_cancer"])
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fixed override: privacy.label.* and server.* go to the server, other "
        "privacy.*, client.*, data.* to the clients, train.*, model.* to both",
    )
    p.add_argument("--epochs", type=int, default=None, help="training epochs per run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--attack-seeds",
        type=int,
        default=3,
        metavar="N",
        help="seeds of the reconstruction attacker (figures carry a 95%% interval over them)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON, last line")


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    audit = sub.add_parser("audit", help="train in-process, then measure what leaks")
    where = audit.add_mutually_exclusive_group(required=True)
    where.add_argument("--topology", choices=list(TOPOLOGIES))
    where.add_argument(
        "--config",
        type=Path,
        help="a client TOML of an existing deployment (server.toml beside it)",
    )
    audit.add_argument("--clients", type=int, default=None)
    audit.add_argument(
        "--canary-runs",
        type=int,
        default=0,
        metavar="N",
        help="DP-SGD only: train 2N times with/without a canary and bound epsilon from below",
    )
    audit.add_argument(
        "--fsha-runs",
        type=int,
        default=0,
        metavar="N",
        help="vanilla: play the FSHA malicious server N times against the client's segment",
    )
    audit.add_argument(
        "--fsha-steps",
        type=int,
        default=FSHA_STEPS,
        metavar="S",
        help=f"client steps each FSHA run lasts (default {FSHA_STEPS}; the detector is judged "
        "on the first epoch of them)",
    )
    _common(audit)
    tune = sub.add_parser("tune", help="sweep privacy settings; write results and a frontier")
    tune.add_argument("--topology", required=True, choices=list(TOPOLOGIES))
    tune.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="KEY=V1,V2,...",
        help="a setting and its values (repeatable; all combinations run)",
    )
    tune.add_argument("--out", required=True, type=Path, help="folder for the results")
    tune.add_argument("--no-progress", action="store_true")
    _common(tune)


def _quiet() -> None:
    """Warnings only, one torch thread (the workers share this process)."""
    import torch

    from workers.ops.logs import configure_logging

    # A message the in-process server failed (a full disk) ends the command as its one line
    # (inprocess.raise_failure), not also as the server's log line. A filter on this
    # command's handler, not the logger's level: main() called in a process that goes on
    # (tests, an embedding program) must leave that logger as it found it.
    configure_logging("text", "WARNING", "audit", quiet=("sl_pipeline.service",))
    torch.set_num_threads(1)
    # Opacus says this on every DP-SGD step of a first segment (its inputs need no grad).
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message="Optimal order is the smallest alpha")


def _deployment_files(client_toml: Path) -> dict[str, Path]:
    """The deployment around a client TOML: server.toml beside it, relay and other clients."""
    if not client_toml.is_file():
        raise ConfigError(f"--config {str(client_toml)!r} is not a file; give a client TOML")
    if client_toml.name in ("server.toml", "relay-1.toml"):
        raise ConfigError(
            f"--config {str(client_toml)!r}: give a client's TOML, not the server's or relay's"
        )
    folder = client_toml.parent
    files = {"server": folder / "server.toml"}
    if not files["server"].exists():
        raise ConfigError(f"--config {str(client_toml)!r}: no server.toml next to it in {folder}")
    if (folder / "relay-1.toml").exists():
        files["relay-1"] = folder / "relay-1.toml"
    for path in sorted(folder.glob("client-*.toml")):
        files[path.stem] = path
    if client_toml.name not in {p.name for p in files.values()}:
        files[f"client-{client_toml.stem}"] = client_toml
    return files


QUIET = ('ops.listen=""', 'checkpoint.dir=""')


def audit_deployment(
    client_toml: Path,
    sets: Sequence[str] = (),
    epochs: int | None = None,
    seed: int = 0,
    timeout_s: float = 900.0,
    canary_runs: int = 0,
    attack_seeds: int = 3,
    fsha_runs: int = 0,
    fsha_steps: int = FSHA_STEPS,
) -> dict[str, Any]:
    """Audit an existing deployment folder with its own settings. It is retrained from
    scratch on fresh loopback ports; its saved state, checkpoints and ops ports are left alone."""
    from workers.tools.audit import SHARED_PREFIXES, audit_files, check_args, split_overrides

    files = _deployment_files(client_toml)
    topology = str(read_toml(files["server"]).get("server", {}).get("topology", "vanilla"))
    client_sets, server_sets = split_overrides(sets, topology)
    if epochs is not None:
        check_args(topology, "digits", epochs)
        client_sets.append(f"train.epochs={epochs}")
        server_sets.append(f"train.epochs={epochs}")
    server_at = f'"tcp://127.0.0.1:{free_port()}"'
    server_sets += [f"server.bind={server_at}", 'server.save=""', *QUIET]
    relay_sets = [s for s in client_sets if s.startswith(SHARED_PREFIXES)]
    upstream = server_at
    if "relay-1" in files:
        upstream = f'"tcp://127.0.0.1:{free_port()}"'
        relay_sets += [
            f"relay.bind={upstream}",
            f"relay.upstream={server_at}",
            'relay.save=""',
            *QUIET,
        ]
    client_sets += [f"client.server={upstream}", 'client.save=""', *QUIET]
    result = audit_files(
        files,
        client_sets,
        server_sets,
        seed,
        timeout_s,
        relay_sets,
        canary_runs=canary_runs,
        attack_seeds=attack_seeds,
        fsha_runs=fsha_runs,
        fsha_steps=fsha_steps,
    )
    return {"topology": topology, "config": str(client_toml), **result}


def cmd_audit(args: argparse.Namespace) -> int:
    from workers.tools.audit import run_audit, split_overrides

    _quiet()
    if args.config is not None:
        result = audit_deployment(
            args.config,
            args.set,
            args.epochs,
            args.seed,
            canary_runs=args.canary_runs,
            attack_seeds=args.attack_seeds,
            fsha_runs=args.fsha_runs,
            fsha_steps=args.fsha_steps,
        )
    else:
        client, server = split_overrides(args.set, args.topology)
        result = run_audit(
            args.topology,
            args.dataset,
            client,
            server,
            args.epochs,
            args.seed,
            clients=args.clients,
            canary_runs=args.canary_runs,
            attack_seeds=args.attack_seeds,
            fsha_runs=args.fsha_runs,
            fsha_steps=args.fsha_steps,
        )
    if args.json:
        print(json.dumps(jsonable(result)), flush=True)
        return 0
    for key in ("hijack_flagged", "hijack_verdict", "label_leak_attack"):
        if key in result:
            print(f"{key:>41}: {result[key]}")
    for key in AUDIT_KEYS:
        if result.get(key) is not None:
            print(f"{key:>41}: {result[key]:.4f}")
    for attack, model in result.get("threat_models", {}).items():
        print(f"threat model, {attack}:")
        for part in ("who", "knows", "sees"):
            print(f"  {part}: {model[part]}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from workers.tools.tune import format_table, plot_results, run_tune, verdict

    _quiet()
    rows = run_tune(
        args.topology,
        args.dataset,
        args.sweep,
        sets=args.set,
        epochs=args.epochs,
        seed=args.seed,
        progress=not args.no_progress,
        attack_seeds=args.attack_seeds,
        out=args.out,
    )
    png = plot_results(rows, args.out)
    print(format_table(rows))
    print(verdict(rows))
    print(f"wrote {args.out / 'results.csv'}, {args.out / 'results.json'}, {png}")
    if args.json:
        print(json.dumps(rows), flush=True)
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "audit": cmd_audit,
    "tune": cmd_tune,
}

__all__ = ["COMMANDS", "add_parsers", "audit_deployment"]
