"""The audit's measures: what each attack learns from what a trained deployment sent.

:mod:`workers.tools.audit` trains and records; this module turns a :class:`Trained` record into
figures, each attack beside its threat model (:mod:`privacy.threats`).
"""

from __future__ import annotations

import math
import os
import threading
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from sl_pipeline.messages import Kind
from sl_pipeline.models import build_segments
from workers.client.worker import ClientWorker
from workers.server.worker import ServerWorker
from workers.tools.audit_hijack import hijack_measures

if TYPE_CHECKING:
    from privacy.reconstruction import DecoderJob, JobRunner

ATTACK_SEEDS = 3  # the reconstruction attacker's seeds: figures come with a 95 % interval
# every cross-epoch label attacker's AUC, the strongest, and its name (privacy.label_attacks)
LABEL_LEAK_KEYS = (
    "label_leak_auc",
    "label_leak_attack",
    "norm_auc",
    "direction_auc",
    "spread_auc",
    "projection_auc",
    "offdir_auc",
    "offdir_projection_auc",
    "batch_spread_auc",
    "row_mean_auc",
)
UNSPLIT_VICTIMS = 64  # UnSplit optimises one input per victim: a sample keeps it to seconds
# party -> one (epoch, sample ids, gradients sent) per training step
Grads = dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]]
# party -> one (sample ids, outputs received) per evaluation batch
Outputs = dict[str, list[tuple[torch.Tensor, torch.Tensor]]]


@dataclass
class Trained:
    """The workers after training, the gradients each feature party received, and how often
    each client released each record's activation (by sample id)."""

    server: ServerWorker
    clients: list[ClientWorker]
    summaries: list[dict[str, Any]]
    grads: Grads = field(default_factory=dict)
    releases: list[Counter[int]] = field(default_factory=list)
    outputs: Outputs = field(default_factory=dict)
    sent_grads: Grads = field(default_factory=dict)  # label gradients a client sent (ushaped)
    detectors: list[Any] = field(default_factory=list)  # each client's hijack detector or None
    # per client: the client segment's weights at each evaluation pass, in order
    encoders: list[list[dict[str, torch.Tensor]]] = field(default_factory=list)
    # party without labels -> "kind.key" of every reply meta it was told (none in vertical now)
    received: dict[str, set[str]] = field(default_factory=dict)
    # u-shaped: the server's output of every training step (epoch, ids, output), per client
    server_outputs: Grads = field(default_factory=dict)


def _clean(client: ClientWorker, x: torch.Tensor) -> torch.Tensor:
    """The trained client segment's output for ``x``, before its cut-layer defense."""
    runner = client.runner
    runner.bottom.eval()
    with torch.no_grad():
        out = runner.bottom(x)
    runner.bottom.train()
    return out


def snapshot_encoders(client: ClientWorker) -> list[dict[str, torch.Tensor]]:
    """Keep a copy of the client segment's weights at the start of every evaluation pass (on
    this instance only): each pass releases every test row once, through that encoder."""
    runner: Any = client.runner
    infer, kept = runner._infer, []

    async def _infer(x: torch.Tensor, step: int, ids: Any, kind: Any) -> Any:
        if kind is Kind.EVALUATE and step == 0:
            kept.append({k: v.detach().clone() for k, v in runner.bottom.state_dict().items()})
        return await infer(x, step, ids, kind)

    runner._infer = _infer
    return kept


def _views(client: ClientWorker, encoders: Sequence[dict[str, Any]], x: torch.Tensor) -> Any:
    """(rows, passes, ...): the clean output of each kept encoder for ``x``."""
    bottom: Any = client.runner.bottom
    final = {k: v.clone() for k, v in bottom.state_dict().items()}
    try:
        views = []
        for state in encoders:
            bottom.load_state_dict(state)
            views.append(_clean(client, x))
    finally:
        bottom.load_state_dict(final)
    return torch.stack(views, dim=1)


def _attacks(
    client: ClientWorker, encoders: Sequence[dict[str, Any]], releases: int
) -> dict[str, tuple[Any, Any, Any]]:
    """Each attacker variant: (aux observations' clean source, victims', how it observes).

    ``final`` averages ``releases`` releases through the final encoder; the multi-pass
    variants see one release per evaluation pass, each through that pass's encoder (what the
    server really receives), and concatenate the views."""
    from privacy.reconstruction import pass_subsets, release_of, views_release_of

    noise = client.runner.privacy.noise
    train, test = client.data.train, client.data.test
    found = {
        "final": (_clean(client, train.x), _clean(client, test.x), release_of(noise, releases))
    }
    if len(encoders) > 1:
        aux, victim = _views(client, encoders, train.x), _views(client, encoders, test.x)
        for name, passes in pass_subsets(len(encoders)).items():
            found[name] = (aux[:, passes], victim[:, passes], views_release_of(noise))
    return found


def side_by_side(pool: Executor) -> JobRunner:
    """Decoder jobs in ``pool``'s threads (torch ops release the GIL; each runs on one torch
    thread, so the figures are those of one after another). A failure or a signal in the
    caller cancels the others at their next epoch."""

    def run(jobs: Sequence[DecoderJob]) -> list[torch.nn.Module]:
        cancelled = threading.Event()
        futures = [pool.submit(job, cancelled.is_set) for job in jobs]
        try:
            return [future.result() for future in futures]
        except BaseException:
            cancelled.set()
            raise

    return run


def _cores() -> int:
    """The cores this process may run on: one decoder per core at most."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _reconstruction(
    client: ClientWorker,
    encoders: Sequence[dict[str, Any]],
    releases: int,
    attack_seeds: int,
) -> dict[str, Any]:
    """Every attacker variant over ``attack_seeds`` seeds; the headline figures are the
    strongest variant's (highest SSIM for images, lowest MSE otherwise), each variant's too."""
    from privacy.reconstruction import reconstruction_audit

    runner: Any = client.runner
    train, test = client.data.train, client.data.test
    labels = None
    if runner.sends_labels and train.y is not None and test.y is not None:
        labels = (train.y, test.y)  # the labels travel with the activations
    image = tuple(test.x.shape[1:]) if test.x.dim() == 4 else None
    runs = {}
    with ThreadPoolExecutor(min(attack_seeds, _cores()), thread_name_prefix="decoder") as pool:
        for name, (aux_act, victim_act, observe) in _attacks(client, encoders, releases).items():
            runs[name] = reconstruction_audit(
                (train.x, aux_act),
                (test.x, victim_act),
                observe,
                seeds=attack_seeds,
                labels=labels,
                image_shape=image,
                run_jobs=side_by_side(pool),
            )
    key = "ssim" if image is not None else "reconstruction_mse"
    sign = 1.0 if image is not None else -1.0
    best = max(runs, key=lambda name: sign * runs[name][key])
    out = {**runs[best], "attack_variant": best, "attack_passes": len(encoders)}
    for name, run in runs.items():
        out[f"reconstruction_mse_{name}"] = run["reconstruction_mse"]
        if image is not None:
            out[f"ssim_{name}"] = run["ssim"]
    return out


def measure_client(
    client: ClientWorker,
    released: Counter[int],
    seed: int,
    attack_seeds: int = ATTACK_SEEDS,
    encoders: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """dCor of one release, and the calibrated reconstruction audit, on the client's test split.

    The attacker's auxiliary data is the client's training split (disjoint from the test rows it
    attacks); it aggregates every release of each test row the run made (:func:`_attacks`)."""
    from privacy.audit import dcor_leakage
    from privacy.reconstruction import release_of

    runner: Any = client.runner
    test = client.data.test
    victim_act = _clean(client, test.x)
    releases = max([released[int(i)] for i in test.ids] + [1])
    noise = runner.privacy.noise
    gen = torch.Generator().manual_seed(seed)
    one_release = release_of(noise)(victim_act, gen)
    image = tuple(test.x.shape[1:]) if test.x.dim() == 4 else None
    attack = _reconstruction(client, encoders, releases, attack_seeds)
    result = {"dcor": dcor_leakage(test.x, one_release), "attack_releases": releases, **attack}
    if image is not None:
        result.update(_unsplit(client, test.x, release_of(noise, releases)(victim_act, gen), seed))
    return result


def _unsplit(client: ClientWorker, x: torch.Tensor, seen: torch.Tensor, seed: int) -> Any:
    """UnSplit on the first ``UNSPLIT_VICTIMS`` test images: architecture only, no data."""
    from privacy.unsplit import unsplit_audit

    cfg = client.cfg

    def segment() -> torch.nn.Module:
        return build_segments(cfg.model, client.topology)[0]

    n = UNSPLIT_VICTIMS
    return unsplit_audit(segment, x[:n], seen[:n], seed=seed, rounds=10, inner_steps=20)


def measure_labels(trained: Trained) -> dict[str, Any]:
    """The cross-epoch label attacks on each feature party's gradients, and the label AUC of
    the outputs each received at evaluation; the worst party is reported."""
    from privacy.label_attacks import label_leak_whole_run, model_completion, output_leak_auc

    labels: Any = getattr(trained.server.engine, "labels", None)
    if labels is None or not (trained.grads or trained.outputs):
        return {}
    per_party = {
        party: label_leak_whole_run(steps, labels) for party, steps in sorted(trained.grads.items())
    }
    out: dict[str, Any] = {}
    if per_party:
        worst = max(per_party.values(), key=lambda r: r["label_leak_auc"])
        out.update({k: worst[k] for k in LABEL_LEAK_KEYS})
        out["label_leak_last_epoch_auc"] = worst["last_epoch_auc"]
        out["label_leak_by_party"] = per_party
    completion: list[dict[str, Any]] = [
        model_completion(_clean(c, c.data.train.x), labels[c.data.train.ids])
        for c in trained.clients
        if c.data.train.y is None
    ]
    if completion:  # the feature party that completes the model best
        best = max(completion, key=lambda r: float(r.get("completion_auc", 0.0)))
        out.update(best)
    if trained.outputs:
        out["eval_output_auc"] = max(
            output_leak_auc(torch.cat([o for _, o in got]), labels[torch.cat([i for i, _ in got])])
            for got in trained.outputs.values()
        )
    return out


def measure_sent_labels(trained: Trained) -> dict[str, Any]:
    """U-shaped: what the server learns about a client's labels from the gradients the client
    sends it (clustering; and the cross-epoch attacks where labels are binary), and from its
    own outputs (:func:`privacy.label_attacks.representation_leak`)."""
    from privacy.label_attacks import (
        cluster_label_attack,
        label_leak_whole_run,
        representation_leak,
        rounds_of,
    )

    out: dict[str, Any] = {}
    for client in trained.clients:
        steps = trained.sent_grads.get(client.cfg.client.name)
        train = client.data.train
        if not steps or train.y is None:
            continue
        labels = torch.zeros(int(train.ids.max()) + 1, dtype=torch.int64)
        labels[train.ids] = train.y
        found = cluster_label_attack(rounds_of(steps), labels, client.data.classes)
        if client.data.classes == 2:
            run = label_leak_whole_run(steps, labels)
            found.update({k: run[k] for k in LABEL_LEAK_KEYS if k != "label_leak_attack"})
            found["label_leak_last_epoch_auc"] = run["last_epoch_auc"]
        outputs = trained.server_outputs.get(client.cfg.client.name)
        if outputs:
            found.update(representation_leak(outputs, labels, client.data.classes))
            raw = representation_leak([(0, train.ids, train.x)], labels, client.data.classes)
            for key in ("representation_auc", "representation_cluster_accuracy"):
                if key in raw:  # the baseline: the same label-free attack on the raw inputs
                    found[key.replace("representation", "representation_input")] = raw[key]
        for key, value in found.items():
            if isinstance(value, int | float) and value >= out.get(key, -1.0):
                out[key] = value  # the worst client
    return out


def _mean(values: Sequence[float | None]) -> float | None:
    known = [float(v) for v in values if v is not None]
    return sum(known) / len(known) if known else None


def _epsilons(trained: Trained) -> dict[str, Any]:
    """Each mechanism's epsilon (the worst client's), never one reported as the other.

    Activation noise: per release for a fixed encoder, and composed over the most releases of
    any one record counted on the wire (training epochs and evaluation passes alike). DP-SGD:
    what Opacus' accountant reports. ``epsilon`` is the activation one when that noise is on,
    else DP-SGD's, and ``epsilon_mechanism`` says which."""
    out: dict[str, Any] = {}
    for client, released in zip(trained.clients, trained.releases, strict=True):
        noise = client.runner.privacy.noise
        if noise is not None and noise.sigma > 0 and released:
            # imported here: Opacus' accountants import scipy (~2 s of CPU an audit without
            # activation noise never needs)
            from privacy.accounting import activation_release_statement

            statement = activation_release_statement(noise, max(released.values()))
            if statement["activation_epsilon"] >= out.get("activation_epsilon", -1.0):
                out.update(statement)
    values = [float(s["dpsgd_epsilon"]) for s in trained.summaries if s.get("dpsgd_epsilon")]
    if values:
        out["dpsgd_epsilon"] = max(values)
    for key, mechanism in (("activation_epsilon", "activation_noise"), ("dpsgd_epsilon", "dpsgd")):
        if key in out:
            out["epsilon"], out["epsilon_mechanism"] = out[key], mechanism
            break
    return out


def _average(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Each numeric figure averaged over the clients that report it."""
    keys = [k for k in dict.fromkeys(k for r in rows for k in r)]
    out: dict[str, Any] = {}
    for key in keys:
        names = sorted({r[key] for r in rows if isinstance(r.get(key), str)})
        if names:  # a label such as the strongest attack variant: each client's, once
            out[key] = ",".join(names)
            continue
        mean = _mean([r.get(key) for r in rows])
        if mean is not None:
            out[key] = mean
    return out


def measure(trained: Trained, seed: int, attack_seeds: int = ATTACK_SEEDS) -> dict[str, Any]:
    """All audit figures for a trained deployment (client measures averaged over clients),
    with the threat model of each attack that ran."""
    from privacy.threats import THREAT_MODELS

    encoders = trained.encoders or [[] for _ in trained.clients]
    per_client = [
        measure_client(c, released, seed, attack_seeds, kept)
        for c, released, kept in zip(trained.clients, trained.releases, encoders, strict=True)
    ]
    scored = _mean([s.get("test_accuracy") for s in trained.summaries])
    result: dict[str, Any] = {
        # vertical: the feature parties are told no score; the label holder's own figure
        "test_accuracy": scored if scored is not None else trained.server.engine.test_accuracy,
        **_average(per_client),
    }
    result.update(measure_labels(trained))
    if trained.received:
        result["feature_party_told"] = sorted(set().union(*trained.received.values()))
    result.update(measure_sent_labels(trained))
    result.update(hijack_measures(trained.detectors))  # the honest run: a flag is false
    result.update(_epsilons(trained))
    attacks = ["dcor", "reconstruction"] + (["label_leakage"] if trained.grads else [])
    attacks += ["model_completion"] if "completion_known" in result else []
    attacks += ["unsplit"] if "unsplit_ssim" in result else []
    attacks += ["label_clustering"] if trained.sent_grads else []
    if "representation_cluster_accuracy" in result:  # u-shaped: the server's completion
        attacks = [a for a in attacks if a != "model_completion"] + ["representation"]
    attacks += [key for key in ("activation_epsilon", "dpsgd_epsilon") if key in result]
    result["threat_models"] = {name: THREAT_MODELS[name] for name in attacks}
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in result.items()
    }


__all__ = ["ATTACK_SEEDS", "Grads", "Outputs", "Trained", "measure", "snapshot_encoders"]
