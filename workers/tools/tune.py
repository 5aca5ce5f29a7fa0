"""`sl-pipeline tune`: audit every combination of privacy settings, map the trade-off.

Each ``--sweep KEY=V1,V2,...`` names one setting and its values (TOML scalars; a bare word is
a string). Every combination of the sweeps (their cartesian product) is trained and audited
with :func:`workers.tools.audit.run_audit`; the rows go to ``DIR/results.csv`` and
``DIR/results.json`` after every setting (:mod:`workers.tools.tune_store`: a rerun continues
an interrupted tune), and ``DIR/frontier.png`` plots test accuracy against each leakage
measure with the Pareto front marked.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import re
import signal
import sys
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sl_pipeline.config import TrainConfig, apply_overrides, from_mapping
from sl_pipeline.errors import ConfigError, SLError
from workers.tools.audit import (
    AuditIncomplete,
    check_args,
    run_audit,
    split_overrides,
    stopped_by_signals,
)
from workers.tools.audit_measures import LABEL_LEAK_KEYS
from workers.tools.tune_store import TuneSpec, TuneStore, jsonable

SWEEP_PREFIXES = ("privacy.noise.", "privacy.nopeek.", "privacy.dpsgd.", "privacy.label.", "train.")
MAX_COMBINATIONS = 256
_BARE_WORD = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
METRIC_KEYS = (
    "test_accuracy",
    "dcor",
    "reconstruction_mse",
    "reconstruction_mse_ci",
    "ssim",
    "ssim_ci",
    "attack_variant",
    "ssim_final",
    "ssim_all_passes",
    "ssim_geometric_passes",
    "reconstruction_mse_final",
    "reconstruction_mse_all_passes",
    "reconstruction_mse_geometric_passes",
    "baseline_mean_mse",
    "baseline_class_mean_mse",
    "baseline_nearest_aux_mse",
    "baseline_mean_ssim",
    "baseline_class_mean_ssim",
    "baseline_nearest_aux_ssim",
    "unsplit_mse",
    "unsplit_ssim",
    "attack_releases",
    *LABEL_LEAK_KEYS,
    "label_leak_last_epoch_auc",
    "eval_output_auc",
    "completion_auc",
    "completion_accuracy",
    "cluster_label_accuracy",
    "cluster_label_chance",
    "representation_auc",
    "representation_cluster_accuracy",
    "representation_input_auc",
    "representation_input_cluster_accuracy",
    "hijack_flagged",
    "hijack_min_score",
    "hijack_verdict",
    "hijack_reference_score",
    "epsilon",
    "epsilon_mechanism",
    "activation_epsilon",
    "activation_epsilon_per_release",
    "activation_releases",
    "dpsgd_epsilon",
    "ssim_ensemble",
    "reconstruction_mse_ensemble",
    "accuracy_change_points",
    "reconstruction_held",
    "reconstruction_target",
    "label_held",
    "label_target",
)
Setting = dict[str, Any]
BASE_ROW = "base"  # the undefended run (the --set values without privacy.*), run first
Auditor = Callable[..., dict[str, Any]]


def parse_value(key: str, text: str) -> Any:
    """One sweep value as a TOML scalar (``0.5``, ``true``, ``"marvell"``) or a bare word."""
    text = text.strip()
    if not text:
        raise ConfigError(f"--sweep {key}: an empty value in the list; write {key}=V1,V2,...")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        if not _BARE_WORD.match(text):
            raise ConfigError(f"--sweep {key}: {text!r} is not a TOML scalar") from None
        return text
    if isinstance(value, list | dict):
        raise ConfigError(f"--sweep {key}: {text!r} is not a scalar; sweep one value at a time")
    return value


def parse_sweep(spec: str) -> tuple[str, list[Any]]:
    """``privacy.noise.sigma=0,0.5,1`` -> ("privacy.noise.sigma", [0, 0.5, 1])."""
    key, sep, values = spec.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(
            f"--sweep {spec!r} must look like KEY=V1,V2,... (e.g. privacy.noise.sigma=0.5,1.0)"
        )
    if not key.startswith(SWEEP_PREFIXES) or key.count(".") != key.startswith("privacy.") + 1:
        raise ConfigError(
            f"--sweep key {key!r} is not sweepable; use privacy.noise.*, "
            "privacy.nopeek.*, privacy.dpsgd.*, privacy.label.* or train.*"
        )
    parsed = [parse_value(key, v) for v in values.split(",")]
    if len(set(map(repr, parsed))) != len(parsed):
        raise ConfigError(f"--sweep {key}: a value is listed twice")
    return key, parsed


def toml_literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return repr(value)


def combinations(specs: Sequence[str]) -> list[Setting]:
    """The cartesian product of the sweeps, in order, as ``{key: value}`` settings."""
    if not specs:
        raise ConfigError("tune needs at least one --sweep KEY=V1,V2,...")
    sweeps = [parse_sweep(s) for s in specs]
    keys = [k for k, _ in sweeps]
    if len(set(keys)) != len(keys):
        raise ConfigError(
            f"--sweep {next(k for k in keys if keys.count(k) > 1)} is given twice; "
            "list all its values in one --sweep"
        )
    total = math.prod(len(v) for _, v in sweeps)
    if total > MAX_COMBINATIONS:
        raise ConfigError(f"the sweeps make {total} combinations; at most {MAX_COMBINATIONS}")
    return [
        dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(v for _, v in sweeps))
    ]


def setting_overrides(setting: Setting) -> list[str]:
    return [f"{key}={toml_literal(value)}" for key, value in setting.items()]


def check_setting(topology: str, sets: Sequence[str]) -> None:
    """Refuse a combination before anything runs: bad privacy or train values, by key."""
    from privacy.config import PrivacyConfig

    client, server = split_overrides(sets, topology)
    for overrides in (client, server):
        data = apply_overrides({}, list(overrides))
        privacy = PrivacyConfig.from_mapping(data.get("privacy", {}))
        privacy.validate_for_topology(topology)
        from_mapping(TrainConfig, data.get("train", {}), "train")


def row_name(setting: Setting) -> str:
    return ",".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in setting.items())


class TuneInterrupted(SLError):
    """A signal stopped the tune; the settings measured before it are saved."""

    code = "incomplete"

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message, hint="rerun the same command to measure the rest")
        self.exit_code = 128 + signum


def run_tune(
    topology: str,
    dataset: str,
    specs: Sequence[str],
    *,
    sets: Sequence[str] = (),
    epochs: int | None = None,
    seed: int = 0,
    progress: bool = True,
    audit: Auditor = run_audit,
    attack_seeds: int = 3,
    out: Path | None = None,
) -> list[dict[str, Any]]:
    """Audit every combination; one row per combination with its settings and figures. With
    ``out``, every row is saved as soon as it is measured and rows saved there by an earlier
    run of the same tune are taken instead of measured again."""
    check_args(topology, dataset, epochs)
    settings = combinations(specs)
    for combo in settings:
        check_setting(topology, [*sets, *setting_overrides(combo)])
    spec = TuneSpec(topology, dataset, tuple(sets), epochs, seed, attack_seeds)
    store = TuneStore.open(out, spec.identity()) if out is not None else None
    plan: list[Setting | None] = [None, *settings]
    saved = [store.find(_name(s), s) if store else None for s in plan]
    if store and any(saved):
        print(
            f"tune: {sum(map(bool, saved))} of {len(plan)} settings (the base run included) "
            f"are already measured in {out}; measuring the other {saved.count(None)}",
            file=sys.stderr,
        )
    rows: list[dict[str, Any]] = []
    measure = _measurer(spec, audit)
    current, kept, between = BASE_ROW, 0, "between two settings"
    try:
        with stopped_by_signals(between), _progress(plan, topology, dataset, progress) as bar:
            for setting, found in zip(plan, saved, strict=True):
                current = _name(setting)
                row = found or measure(setting, rows[0] if rows else None)
                rows.append(row)
                if store:
                    store.save(rows)
                kept = len(rows)
                bar.update()
                bar.set_postfix(acc=f"{row.get('test_accuracy') or 0:.3f}")
    except AuditIncomplete as exc:
        raise _interrupted(exc, current, kept, len(plan), out) from None
    return rows


def _name(setting: Setting | None) -> str:
    return BASE_ROW if setting is None else row_name(setting)


def _progress(plan: Sequence[object], topology: str, dataset: str, shown: bool) -> Any:
    from tqdm import tqdm

    bar = tqdm(
        total=len(plan),
        desc=f"tune {topology}/{dataset}",
        file=sys.stderr,
        disable=not shown,
        dynamic_ncols=True,
    )
    return contextlib.closing(bar)


def _measurer(
    spec: TuneSpec, audit: Auditor
) -> Callable[[Setting | None, dict[str, Any] | None], dict[str, Any]]:
    """Train and audit one setting (``None``: the undefended base) into its row."""
    from privacy.frontier import assess

    undefended = [s for s in spec.sets if not s.startswith("privacy.")]

    def measure(setting: Setting | None, base: dict[str, Any] | None) -> dict[str, Any]:
        chosen = undefended if setting is None else [*spec.sets, *setting_overrides(setting)]
        client, server = split_overrides(chosen, spec.topology)
        result = audit(
            spec.topology,
            spec.dataset,
            client,
            server,
            epochs=spec.epochs,
            seed=spec.seed,
            attack_seeds=spec.attack_seeds,
        )
        row = {
            "name": _name(setting),
            **(setting or {}),
            **{k: result[k] for k in (*METRIC_KEYS, "label_leak_by_party") if k in result},
        }
        if base is not None:  # against the undefended run of the same seed
            row.update(assess(row, base))
        return jsonable(row)  # type: ignore[no-any-return]

    return measure


def _interrupted(
    exc: AuditIncomplete, name: str, done: int, total: int, out: Path | None
) -> TuneInterrupted:
    signum = exc.exit_code - 128
    where = f"; they are in {out / 'results.json'}" if out is not None and done else ""
    return TuneInterrupted(
        f"tune interrupted by {signal.Signals(signum).name} while measuring {name}: "
        f"{done} of {total} settings were measured{where}",
        signum,
    )


def verdict(rows: Sequence[dict[str, Any]]) -> str:
    """One line per target of issue 16 that applies: the settings that meet it, or none."""
    from privacy.frontier import TARGET_LABEL_AUC, TARGET_LOSS_POINTS

    within = f"within {TARGET_LOSS_POINTS:g} points of the undefended run's accuracy"
    targets = {
        "reconstruction_target": f"reconstruction at or below the nearest auxiliary row, {within}",
        "label_target": f"label AUC over the run at most {TARGET_LABEL_AUC:g}, {within}",
    }
    lines = []
    for key, target in targets.items():
        if any(key in r for r in rows):
            met = [r["name"] for r in rows if r.get(key)]
            lines.append(f"target ({target}): " + (", ".join(met) if met else "no setting"))
    return "\n".join(lines) or "target: no setting of this sweep is judged (no leakage figure)"


def plot_results(rows: Sequence[dict[str, Any]], out: Path) -> Path:
    """DIR/frontier.png: accuracy against each leakage measure, the Pareto front marked."""
    from privacy.frontier import plot_frontier

    png = out / "frontier.png"
    plotted = [r for r in rows if isinstance(r.get("test_accuracy"), float)]
    if plotted:
        out.mkdir(parents=True, exist_ok=True)
        try:
            plot_frontier(plotted, png, label_key="name")
        except OSError as exc:  # a full disk: no half picture; the rows are saved already
            png.unlink(missing_ok=True)
            raise ConfigError(
                f"cannot write {png} ({exc.strerror or exc}): free some space and run the same "
                "command again; its rows are saved and not measured again"
            ) from None
    return png


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A fixed-width table: the setting's name, then each figure present in any row."""
    keys = [k for k in METRIC_KEYS if k != "epsilon_mechanism" and any(k in r for r in rows)]
    width = max([len("setting"), *(len(r["name"]) for r in rows)])
    lines = ["  ".join(["setting".ljust(width), *(k.rjust(max(8, len(k))) for k in keys)])]
    for r in rows:
        cells = [_cell(r.get(k)).rjust(max(8, len(k))) for k in keys]
        lines.append("  ".join([r["name"].ljust(width), *cells]))
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


__all__ = [
    "BASE_ROW",
    "check_setting",
    "combinations",
    "format_table",
    "parse_sweep",
    "plot_results",
    "run_tune",
    "verdict",
]
