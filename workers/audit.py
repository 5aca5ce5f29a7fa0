"""`sl-pipeline audit`: train a deployment in one process, then attack what it sent.

The harness runs the server (plus a relay for multihop) and every client in one event loop
over real encrypted loopback sockets, keeps the worker objects, and measures on held-out
data what an honest-but-curious server could learn:

* ``dcor``: dCor between a client's test inputs and what it sends for them (after its
  cut-layer defense);
* ``reconstruction_mse`` (+ ``ssim`` for images): a decoder trained on the client's *train*
  split (inputs, defended activations) inverts the defended activations of its *test* split;
* ``label_leak_auc`` (vertical): norm and direction attacks on the gradients each feature
  party received during the last epoch;
* the epsilons the accountants prove, per mechanism (never one reported as another).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import signal
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sl_pipeline.config import (
    TOPOLOGIES,
    ClientConfig,
    RelayConfig,
    ServerConfig,
    load,
    parse_override,
)
from sl_pipeline.errors import ConfigError, SLError, TransportError
from sl_pipeline.messages import Kind
from sl_pipeline.models import build_segments
from workers.audit_hijack import attach_scrutinizer
from workers.client import ClientWorker
from workers.engine import read_tensor
from workers.localdeploy import DATASETS, init_deployment
from workers.relay import RelayWorker
from workers.server import ServerWorker

SERVER_PREFIXES = ("privacy.label.", "server.")
CLIENT_PREFIXES = ("privacy.", "client.", "data.")
SHARED_PREFIXES = ("train.", "model.")
STOP_TIMEOUT_S = 15.0
DEFAULT_TIMEOUT_S = 900.0
# Figures depend on torch's intra-op thread count (reductions are split differently), so an
# audit always runs with this many threads, whoever calls it, and restores the caller's count.
AUDIT_THREADS = 1
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
ATTACK_SEEDS = 3  # the reconstruction attacker's seeds: figures come with a 95 % interval
UNSPLIT_VICTIMS = 64  # UnSplit optimises one input per victim: a sample keeps it to seconds
# party -> one (epoch, sample ids, gradients sent) per training step
Grads = dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]]
# party -> one (sample ids, outputs received) per evaluation batch
Outputs = dict[str, list[tuple[torch.Tensor, torch.Tensor]]]


def split_overrides(sets: Sequence[str], topology: str = "vertical") -> tuple[list[str], list[str]]:
    """Route ``KEY=VALUE`` overrides: label protection to the label holder (the server in
    vertical, the clients in ushaped), ``server.*`` to the server, other
    ``privacy.*``/``client.*``/``data.*`` to the clients, ``train.*`` and ``model.*`` to both.
    Anything else is refused by name."""
    from privacy.config import LABEL_HOLDERS

    client: list[str] = []
    server: list[str] = []
    for text in sets:
        path, _ = parse_override(text)
        key = ".".join(path) + "."
        if key.startswith("privacy.label.") and LABEL_HOLDERS.get(topology) == "client":
            client.append(text)
        elif key.startswith(SHARED_PREFIXES):
            client.append(text)
            server.append(text)
        elif key.startswith(SERVER_PREFIXES):
            server.append(text)
        elif key.startswith(CLIENT_PREFIXES):
            client.append(text)
        else:
            raise ConfigError(
                f"--set {text!r}: key {'.'.join(path)!r} cannot be routed; use privacy.*, "
                "train.*, model.*, client.*, data.* or server.*"
            )
    return client, server


class AuditIncomplete(SLError):
    """Training was stopped by a signal: the figures would describe a truncated run."""

    code = "incomplete"
    exit_code = 128 + signal.SIGTERM

    def __init__(self, message: str, signum: int | None = None) -> None:
        super().__init__(message, hint="rerun the audit to completion for figures")
        if signum is not None:
            self.exit_code = 128 + signum


@contextlib.contextmanager
def pinned_threads(threads: int = AUDIT_THREADS) -> Iterator[None]:
    """Run the block with ``threads`` torch threads, then restore the caller's count."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _seed_workers(server: ServerWorker, clients: Sequence[ClientWorker], seed: int) -> None:
    """Give every noise source its own seeded generator: several workers share this process,
    and the order in which they draw from the global RNG depends on socket timing."""
    for index, client in enumerate(clients, start=1):
        runner: Any = client.runner
        defense = runner.defense
        for part in getattr(defense, "defenses", (defense,)):
            if hasattr(part, "generator"):
                part.generator = torch.Generator().manual_seed(seed * 1000 + index)
        if runner.dp is not None:  # Opacus' noise and Poisson sampler
            runner.dp.optimizer.generator = torch.Generator().manual_seed(seed * 1000 + 100 + index)
            sampler: Any = getattr(runner.dp.data_loader, "batch_sampler", None)
            if hasattr(sampler, "generator"):
                sampler.generator = torch.Generator().manual_seed(seed * 1000 + 200 + index)
    if hasattr(server.engine, "label_generator"):  # vertical: each party's protection
        server.engine.label_generator = torch.Generator().manual_seed(seed * 1000)


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


def _count_releases(client: ClientWorker, outputs: Outputs) -> Counter[int]:
    """Count, per sample id, every activation this client puts on the wire: training forwards
    (``forward_message``) and evaluation passes (``_infer``), on this instance only. A party
    without labels also keeps the outputs it receives at evaluation in ``outputs``."""
    released: Counter[int] = Counter()
    unlabelled = client.data.train.y is None
    runner: Any = client.runner
    forward, infer = runner.forward_message, runner._infer

    def forward_message(step: int, sent: Any, y: Any, ids: torch.Tensor) -> Any:
        released.update(int(i) for i in ids.reshape(-1))
        return forward(step, sent, y, ids)

    async def _infer(x: torch.Tensor, step: int, ids: Any, kind: Any) -> Any:
        if ids is not None:
            released.update(int(i) for i in ids.reshape(-1))
        out, reply = await infer(x, step, ids, kind)
        if unlabelled and ids is not None and kind is Kind.EVALUATE:
            outputs.setdefault(client.cfg.client.name, []).append((ids.clone(), out.clone()))
        return out, reply

    runner.forward_message, runner._infer = forward_message, _infer
    return released


def _record_sent_label_grads(client: ClientWorker, grads: Grads) -> None:
    """A client that protects labels (u-shaped) sends the server the gradient of the server's
    output: keep each one, with the ids of the batch whose forward went before it."""
    runner: Any = client.runner
    if not runner.protects_labels:
        return
    forward, request = runner.forward_message, client.request
    last: dict[str, torch.Tensor] = {}

    def forward_message(step: int, sent: Any, y: Any, ids: torch.Tensor) -> Any:
        last["ids"] = ids
        return forward(step, sent, y, ids)

    async def send(message: Any, timeout_s: float | None = None) -> Any:
        if message.kind is Kind.BACKWARD and "grad" in message.tensors and "ids" in last:
            grad = read_tensor(message, "grad").detach().clone()
            grads.setdefault(client.cfg.client.name, []).append(
                (message.epoch, last["ids"].clone(), grad)
            )
        return await request(message, timeout_s)

    runner.forward_message = forward_message
    client.request = send  # type: ignore[method-assign]


def _record_label_grads(server: ServerWorker) -> Grads:
    """Wrap the vertical engine's step (on this instance only) to keep, for every training
    step of every epoch, the gradient each feature party was sent, with the batch's ids."""
    grads: Grads = {}
    engine: Any = server.engine  # a VerticalEngine when it has _step and last_grads
    original: Callable[..., Any] | None = getattr(engine, "_step", None)
    if original is None or not hasattr(engine, "last_grads") or engine.label_holder:
        return grads

    def step(parts: list[Any], ids: torch.Tensor) -> Any:
        replies = original(parts, ids)
        for part in parts:
            sent = engine.last_grads[part.msg.client]
            grads.setdefault(part.msg.client, []).append(
                (part.msg.epoch, ids.clone(), sent.clone())
            )
        return replies

    engine._step = step  # this instance only; the class is untouched
    return grads


def _raise_crash(services: Sequence[asyncio.Future[Any]]) -> None:
    """Re-raise the error of a server or relay that stopped early, as one SLError line."""
    for service in services:
        error = service.exception() if service.done() else None
        if isinstance(error, SLError):
            raise error
        if error is not None:
            raise SLError(
                f"a worker crashed during training: {type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''}"
            ) from error


async def _take_over_signals(clients: Sequence[ClientWorker], caught: list[int]) -> None:
    """Once every client is training (each has installed its own handlers), make SIGTERM and
    SIGINT stop them all and remember which signal came. Before that, a signal still reaches
    the shared stop event through the clients' own handlers."""
    loop = asyncio.get_running_loop()
    while not all(c.steps_done or c.stop.is_set() for c in clients):
        await asyncio.sleep(0.01)

    def on_signal(signum: int) -> None:
        caught.append(signum)
        for client in clients:
            client.stop.set()

    for signum in STOP_SIGNALS:
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread
            loop.add_signal_handler(signum, on_signal, signum)
    print("audit: training; SIGTERM or SIGINT stops it (no figures then)", file=sys.stderr)


def _check_complete(
    clients: Sequence[ClientWorker], summaries: Sequence[dict[str, Any]], caught: list[int]
) -> None:
    """Refuse to measure a run that a signal cut short."""
    stopped = [s for s in summaries if s.get("stopped_early")]
    if not stopped and not caught and not any(c.stop.is_set() for c in clients):
        return
    name = signal.Signals(caught[0]).name if caught else "a signal"
    epoch = min((c.epoch for c in clients), default=0)
    epochs = clients[0].cfg.train.epochs if clients else 0
    raise AuditIncomplete(
        f"audit interrupted by {name} during epoch {epoch + 1} of {epochs}: the run is "
        "incomplete and no figures are reported",
        caught[0] if caught else None,
    )


async def train_in_process(
    files: dict[str, Path],
    client_overrides: Sequence[str] = (),
    server_overrides: Sequence[str] = (),
    relay_overrides: Sequence[str] = (),
    timeout_s: float = DEFAULT_TIMEOUT_S,
    seed: int = 0,
) -> Trained:
    """Run server (+ relay) and clients in this event loop until every client is done.
    A worker that crashes, or a run longer than ``timeout_s``, ends it with an error; a
    SIGTERM/SIGINT stops every client and ends it with :class:`AuditIncomplete`."""
    base = files["server"].parent
    server = ServerWorker(load(ServerConfig, files["server"], list(server_overrides)), base)
    clients = [
        ClientWorker(load(ClientConfig, path, list(client_overrides)), base, progress=False)
        for name, path in sorted(files.items())
        if name.startswith("client-")
    ]
    halt = asyncio.Event()  # one stop event: whichever client's handler wins stops them all
    for client in clients:
        client.stop = halt
    _seed_workers(server, clients, seed)
    outputs: Outputs = {}
    releases = [_count_releases(c, outputs) for c in clients]
    sent_grads: Grads = {}
    for client in clients:
        _record_sent_label_grads(client, sent_grads)
    detectors = [attach_scrutinizer(c) for c in clients]
    grads = _record_label_grads(server)
    stop = asyncio.Event()
    services = [asyncio.ensure_future(server.serve(stop))]
    if "relay-1" in files:
        relay = RelayWorker(load(RelayConfig, files["relay-1"], list(relay_overrides)), base)
        services.append(asyncio.ensure_future(relay.serve(stop)))
    caught: list[int] = []
    watcher = asyncio.ensure_future(_take_over_signals(clients, caught))
    runs = asyncio.ensure_future(asyncio.gather(*(c.run() for c in clients)))
    try:
        await asyncio.wait(
            [runs, *services], timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
        if not runs.done():
            runs.cancel()
            await asyncio.gather(runs, return_exceptions=True)
            _raise_crash(services)
            raise TransportError(f"training did not finish within {timeout_s:.0f}s")
        summaries = runs.result()
        _check_complete(clients, summaries, caught)
    finally:
        watcher.cancel()
        stop.set()
        await asyncio.wait_for(asyncio.gather(*services, return_exceptions=True), STOP_TIMEOUT_S)
    return Trained(
        server, clients, list(summaries), grads, releases, outputs, sent_grads, detectors
    )


# ------------------------------------------------------------------------ measures


def _clean(client: ClientWorker, x: torch.Tensor) -> torch.Tensor:
    """The trained client segment's output for ``x``, before its cut-layer defense."""
    runner = client.runner
    runner.bottom.eval()
    with torch.no_grad():
        out = runner.bottom(x)
    runner.bottom.train()
    return out


def measure_client(
    client: ClientWorker, released: Counter[int], seed: int, attack_seeds: int = ATTACK_SEEDS
) -> dict[str, Any]:
    """dCor of one release, and the calibrated reconstruction audit, on the client's test split.

    The attacker's auxiliary data is the client's training split (disjoint from the test rows it
    attacks); it averages as many releases of each test row as the run made."""
    from privacy.audit import dcor_leakage
    from privacy.reconstruction import reconstruction_audit, release_of

    runner: Any = client.runner
    train, test = client.data.train, client.data.test
    aux_act, victim_act = _clean(client, train.x), _clean(client, test.x)
    releases = max([released[int(i)] for i in test.ids] + [1])
    noise = runner.privacy.noise
    gen = torch.Generator().manual_seed(seed)
    one_release = release_of(noise)(victim_act, gen)
    labels = None
    if runner.sends_labels and train.y is not None and test.y is not None:
        labels = (train.y, test.y)  # the labels travel with the activations
    image = tuple(test.x.shape[1:]) if test.x.dim() == 4 else None
    attack = reconstruction_audit(
        (train.x, aux_act),
        (test.x, victim_act),
        release_of(noise, releases),
        seeds=attack_seeds,
        labels=labels,
        image_shape=image,
    )
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
    from privacy.label_attacks import label_leak_over_run, model_completion, output_leak_auc

    labels: Any = getattr(trained.server.engine, "labels", None)
    if labels is None or not (trained.grads or trained.outputs):
        return {}
    per_party = {}
    for party, steps in sorted(trained.grads.items()):
        per_party[party] = label_leak_over_run(_rounds(steps), labels)
    out: dict[str, Any] = {}
    if per_party:
        worst = max(per_party.values(), key=lambda r: r["label_leak_auc"])
        out.update({k: worst[k] for k in ("label_leak_auc", "norm_auc", "direction_auc")})
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


def _rounds(steps: Sequence[tuple[int, torch.Tensor, torch.Tensor]]) -> list[Any]:
    """One (ids, gradients) round per epoch from per-step records."""
    return [
        (
            torch.cat([i for e, i, _ in steps if e == epoch]),
            torch.cat([g.reshape(g.shape[0], -1) for e, _, g in steps if e == epoch]),
        )
        for epoch in sorted({e for e, _, _ in steps})
    ]


def measure_sent_labels(trained: Trained) -> dict[str, Any]:
    """U-shaped: what the server learns about a client's labels from the gradients the client
    sends it (clustering; and the cross-epoch attacks where labels are binary)."""
    from privacy.label_attacks import cluster_label_attack, label_leak_over_run

    out: dict[str, Any] = {}
    for client in trained.clients:
        steps = trained.sent_grads.get(client.cfg.client.name)
        train = client.data.train
        if not steps or train.y is None:
            continue
        labels = torch.zeros(int(train.ids.max()) + 1, dtype=torch.int64)
        labels[train.ids] = train.y
        rounds = _rounds(steps)
        found = cluster_label_attack(rounds, labels, client.data.classes)
        if client.data.classes == 2:
            run = label_leak_over_run(rounds, labels)
            found.update({k: run[k] for k in ("label_leak_auc", "norm_auc", "direction_auc")})
            found["label_leak_last_epoch_auc"] = run["last_epoch_auc"]
        for key, value in found.items():
            if isinstance(value, float) and value >= out.get(key, -1.0):
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
    from privacy.accounting import activation_release_statement

    out: dict[str, Any] = {}
    for client, released in zip(trained.clients, trained.releases, strict=True):
        noise = client.runner.privacy.noise
        if noise is not None and noise.sigma > 0 and released:
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
    out = {}
    for key in keys:
        mean = _mean([r.get(key) for r in rows])
        if mean is not None:
            out[key] = mean
    return out


def measure(trained: Trained, seed: int, attack_seeds: int = ATTACK_SEEDS) -> dict[str, Any]:
    """All audit figures for a trained deployment (client measures averaged over clients),
    with the threat model of each attack that ran."""
    from privacy.threats import THREAT_MODELS

    per_client = [
        measure_client(c, released, seed, attack_seeds)
        for c, released in zip(trained.clients, trained.releases, strict=True)
    ]
    result: dict[str, Any] = {
        "test_accuracy": _mean([s.get("test_accuracy") for s in trained.summaries]),
        **_average(per_client),
    }
    result.update(measure_labels(trained))
    result.update(measure_sent_labels(trained))
    watching = [d for d in trained.detectors if d is not None]
    if watching:  # the honest run: any flag here is a false positive
        result["hijack_flagged"] = any(d.flagged for d in watching)
        result["hijack_min_score"] = min(min(d.scores, default=math.inf) for d in watching)
    result.update(_epsilons(trained))
    attacks = ["dcor", "reconstruction"] + (["label_leakage"] if trained.grads else [])
    attacks += ["model_completion"] if "completion_known" in result else []
    attacks += ["unsplit"] if "unsplit_ssim" in result else []
    attacks += ["label_clustering"] if trained.sent_grads else []
    result["threat_models"] = {name: THREAT_MODELS[name] for name in attacks}
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in result.items()
    }


# ------------------------------------------------------------------------ entry points


def check_args(topology: str, dataset: str, epochs: int | None) -> None:
    if topology not in TOPOLOGIES:
        raise ConfigError(f"--topology {topology!r} is unknown; choose one of {list(TOPOLOGIES)}")
    if dataset not in DATASETS:
        raise ConfigError(f"--dataset {dataset!r} is unknown; choose one of {sorted(DATASETS)}")
    if epochs is not None and epochs < 1:
        raise ConfigError(f"--epochs {epochs} must be at least 1")


def audit_files(
    files: dict[str, Path],
    client_overrides: Sequence[str],
    server_overrides: Sequence[str],
    seed: int = 0,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    relay_overrides: Sequence[str] = (),
    *,
    canary_runs: int = 0,
    attack_seeds: int = ATTACK_SEEDS,
    fsha_runs: int = 0,
) -> dict[str, Any]:
    """Train the deployment ``files`` (name -> TOML path) in-process and audit it; with
    ``canary_runs`` also bound DP-SGD's epsilon from below (:mod:`workers.audit_canary`)."""
    from privacy.config import PrivacyConfig

    from .audit_canary import canary_audit, check_canary
    from .audit_hijack import check_fsha, fsha_audit

    first = min(name for name in files if name.startswith("client-"))
    cfg = load(ClientConfig, files[first], list(client_overrides))
    privacy = PrivacyConfig.from_mapping(cfg.privacy)
    privacy.validate_for_topology(cfg.client.topology)
    check_canary(cfg.client.topology, privacy, canary_runs)
    check_fsha(cfg.client.topology, fsha_runs)
    if attack_seeds < 1:
        raise ConfigError(f"--attack-seeds {attack_seeds} must be at least 1 (3 for intervals)")
    scfg = load(ServerConfig, files["server"], list(server_overrides))
    PrivacyConfig.from_mapping(scfg.privacy).validate_for_topology(scfg.server.topology)
    with pinned_threads(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        trained = asyncio.run(
            train_in_process(
                files, client_overrides, server_overrides, relay_overrides, timeout_s, seed
            )
        )
        result = measure(trained, seed, attack_seeds)
        if canary_runs:
            data = trained.clients[0].data
            result.update(canary_audit(cfg, data, privacy, canary_runs, seed))
        if fsha_runs:
            from privacy.threats import THREAT_MODELS

            result.update(fsha_audit(cfg, trained.clients[0].data, fsha_runs, seed))
            result["threat_models"]["fsha"] = THREAT_MODELS["fsha"]
        if canary_runs:
            from privacy.threats import THREAT_MODELS

            result["threat_models"]["canary"] = THREAT_MODELS["canary"]
        return result


def run_audit(
    topology: str,
    dataset: str = "digits",
    client_overrides: Sequence[str] = (),
    server_overrides: Sequence[str] = (),
    epochs: int | None = None,
    seed: int = 0,
    *,
    clients: int | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    canary_runs: int = 0,
    attack_seeds: int = ATTACK_SEEDS,
    fsha_runs: int = 0,
) -> dict[str, Any]:
    """Build a fresh local deployment in a temporary folder, train it in-process, audit it.

    Returns ``test_accuracy``, ``dcor``, ``reconstruction_mse`` (+ ``ssim`` for digits),
    ``label_leak_auc`` (+ ``norm_auc``, ``direction_auc``) for vertical, and the epsilons
    that apply. Blocking: call it outside a running event loop.
    """
    check_args(topology, dataset, epochs)
    n = clients or (2 if topology in ("vertical", "multitask") else 1)
    with tempfile.TemporaryDirectory(prefix="sl-audit-") as tmp:
        made = init_deployment(
            Path(tmp) / "deploy",
            topology=topology,
            clients=n,
            dataset=dataset,
            epochs=epochs,
            seed=seed,
        )
        files = {k: Path(v) for k, v in made["files"].items()}
        shared = [s for s in client_overrides if s.startswith(SHARED_PREFIXES)]
        result = audit_files(
            files,
            client_overrides,
            server_overrides,
            seed,
            timeout_s,
            shared,
            canary_runs=canary_runs,
            attack_seeds=attack_seeds,
            fsha_runs=fsha_runs,
        )
    return {"topology": topology, "dataset": dataset, **result}


__all__ = [
    "AUDIT_THREADS",
    "SHARED_PREFIXES",
    "AuditIncomplete",
    "Trained",
    "audit_files",
    "check_args",
    "measure",
    "run_audit",
    "split_overrides",
    "train_in_process",
]
