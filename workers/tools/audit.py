"""`sl-pipeline audit`: train a deployment in one process, then attack what it sent.

The harness runs the server (plus a relay for multihop) and every client in one event loop
over real encrypted loopback sockets, keeps the worker objects, records what crossed the wire
(every release by sample id, the gradients each party got, the outputs feature parties got at
evaluation), and measures, each attack with its threat model (:mod:`privacy.threats`):

* ``dcor``: dCor between a client's test inputs and one defended release of them;
* reconstruction: the tuned decoder (:mod:`privacy.reconstruction`) trained on the client's
  *train* split inverts the averaged releases of its *test* rows, beside trivial baselines,
  with intervals over attacker seeds; UnSplit (:mod:`privacy.unsplit`) for images;
* labels: cross-epoch norm/direction attacks (vertical feature parties; the u-shaped server,
  plus clustering), evaluation outputs, model completion (:mod:`privacy.label_attacks`);
* the hijack detector on the honest cut gradients, and optionally FSHA and the canary audit;
* the epsilons, per mechanism (never one reported as another), releases counted on the wire.

A SIGTERM/SIGINT during training ends the audit with :class:`AuditIncomplete` (no figures).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from sl_pipeline.config import TOPOLOGIES, ClientConfig, ServerConfig, load
from sl_pipeline.configfile import parse_override
from sl_pipeline.errors import ConfigError, SLError
from workers.client.worker import ClientWorker
from workers.runtime import eventloop
from workers.server.worker import ServerWorker
from workers.tools.audit_hijack import FSHA_STEPS, attach_scrutinizer
from workers.tools.audit_measures import (
    ATTACK_SEEDS,
    Grads,
    Outputs,
    Trained,
    measure,
    snapshot_encoders,
)
from workers.tools.audit_taps import (
    count_releases,
    record_label_grads,
    record_received_meta,
    record_sent_label_grads,
    seed_workers,
)
from workers.tools.inprocess import build_deployment, train
from workers.tools.localdeploy import DATASETS, init_deployment
from workers.tools.staging import scratch
from workers.topologies import topology as find_topology

SERVER_PREFIXES = ("privacy.label.", "server.")
CLIENT_PREFIXES = ("privacy.", "client.", "data.")
SHARED_PREFIXES = ("train.", "model.")
DEFAULT_TIMEOUT_S = 900.0
# Figures depend on torch's intra-op thread count (reductions are split differently), so an
# audit always runs with this many threads, whoever calls it, and restores the caller's count.
AUDIT_THREADS = 1
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


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


class _Signalled(BaseException):
    """Raised by :func:`stopped_by_signals`' handler: not an Exception, so nothing swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def stopped_by_signals(phase: str) -> Iterator[None]:
    """SIGTERM and SIGINT end the block with :class:`AuditIncomplete` naming ``phase``. Inside
    it, an in-process training's event loop installs its own handlers for its duration
    (:func:`_take_over_signals`; :func:`run_keeping_signals` gives these back)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, _frame: object) -> None:
        raise _Signalled(signum)

    before = {signum: signal.signal(signum, stop) for signum in STOP_SIGNALS}
    try:
        yield
    except _Signalled as exc:
        name = signal.Signals(exc.signum).name
        raise AuditIncomplete(f"audit interrupted by {name} {phase}", exc.signum) from None
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def pinned_threads(threads: int = AUDIT_THREADS) -> Iterator[None]:
    """Run the block with ``threads`` torch threads, then restore the caller's count."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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
    tap: Callable[[Sequence[ClientWorker]], None] | None = None,
) -> Trained:
    """Train the deployment in this event loop (:mod:`workers.tools.inprocess`), its workers
    seeded and tapped (``tap``: a caller's own record, attached after the audit's), until
    every client is done. A worker that crashes, or a run longer than ``timeout_s``, ends it
    with an error; a SIGTERM/SIGINT stops every client and ends it with
    :class:`AuditIncomplete`."""
    run = build_deployment(files, client_overrides, server_overrides, relay_overrides)
    halt = asyncio.Event()  # one stop event: whichever client's handler wins stops them all
    for client in run.clients:
        client.stop = halt
        client.resumable = False  # its state is in a temporary folder: no resume advice
    seed_workers(run.server, run.clients, seed)
    taps = _tap(run.server, run.clients)
    if tap is not None:
        tap(run.clients)
    caught: list[int] = []
    watcher = asyncio.ensure_future(_take_over_signals(run.clients, caught))
    try:
        summaries = await train(run, timeout_s)
    finally:
        watcher.cancel()
    _check_complete(run.clients, summaries, caught)
    return Trained(
        run.server,
        run.clients,
        summaries,
        taps["grads"],
        taps["releases"],
        taps["outputs"],
        taps["sent_grads"],
        taps["detectors"],
        taps["encoders"],
        taps["received"],
        taps["server_outputs"],
    )


def _tap(server: ServerWorker, clients: Sequence[ClientWorker]) -> dict[str, Any]:
    """Every record the audit's measures read, attached in this order (taps wrap each
    other: the release count sees a forward before the label-gradient record does)."""
    outputs: Outputs = {}
    releases = [count_releases(c, outputs) for c in clients]
    encoders = [snapshot_encoders(c) for c in clients]
    received: dict[str, set[str]] = {}
    for client in clients:
        record_received_meta(client, received)
    sent_grads: Grads = {}
    server_outputs: Grads = {}
    for client in clients:
        record_sent_label_grads(client, sent_grads, server_outputs)
    detectors = [attach_scrutinizer(c) for c in clients]
    grads = record_label_grads(server)
    return {
        "outputs": outputs,
        "releases": releases,
        "encoders": encoders,
        "received": received,
        "sent_grads": sent_grads,
        "server_outputs": server_outputs,
        "detectors": detectors,
        "grads": grads,
    }


# ------------------------------------------------------------------------ entry points


def check_args(topology: str, dataset: str, epochs: int | None) -> None:
    if topology not in TOPOLOGIES:
        raise ConfigError(f"--topology {topology!r} is unknown; choose one of {list(TOPOLOGIES)}")
    if dataset not in DATASETS:
        raise ConfigError(f"--dataset {dataset!r} is unknown; choose one of {sorted(DATASETS)}")
    if epochs is not None and epochs < 1:
        raise ConfigError(f"--epochs {epochs} must be at least 1")


def run_keeping_signals(training: Coroutine[Any, Any, Trained]) -> Trained:
    """``eventloop.run`` that gives SIGINT and SIGTERM back their handlers afterwards: closing
    the loop resets them to the defaults, which would take away a caller's (tune's)."""
    if threading.current_thread() is not threading.main_thread():
        return eventloop.run(training)
    before = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    try:
        return eventloop.run(training)
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)


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
    fsha_steps: int = FSHA_STEPS,
) -> dict[str, Any]:
    """Train the deployment ``files`` (name -> TOML path) in-process and audit it; with
    ``canary_runs`` also bound DP-SGD's epsilon from below (:mod:`workers.tools.audit_canary`)."""
    from privacy.config import PrivacyConfig
    from workers.tools.audit_canary import canary_audit, check_canary
    from workers.tools.audit_hijack import check_fsha, fsha_audit

    first = min(name for name in files if name.startswith("client-"))
    cfg = load(ClientConfig, files[first], list(client_overrides))
    privacy = PrivacyConfig.from_mapping(cfg.privacy)
    privacy.validate_for_topology(cfg.client.topology)
    check_canary(cfg.client.topology, privacy, canary_runs)
    check_fsha(cfg.client.topology, fsha_runs, fsha_steps)
    if attack_seeds < 1:
        raise ConfigError(f"--attack-seeds {attack_seeds} must be at least 1 (3 for intervals)")
    scfg = load(ServerConfig, files["server"], list(server_overrides))
    PrivacyConfig.from_mapping(scfg.privacy).validate_for_topology(scfg.server.topology)
    attacking = "while attacking the trained model: no figures are reported"
    with pinned_threads(), torch.random.fork_rng(devices=[]), stopped_by_signals(attacking):
        torch.manual_seed(seed)
        trained = run_keeping_signals(
            train_in_process(
                files, client_overrides, server_overrides, relay_overrides, timeout_s, seed
            )
        )
        from privacy.threats import THREAT_MODELS

        print("audit: attacking the trained model; SIGTERM or SIGINT stops it", file=sys.stderr)
        result, data = measure(trained, seed, attack_seeds), trained.clients[0].data
        if canary_runs:
            result.update(canary_audit(cfg, data, privacy, canary_runs, seed))
        if fsha_runs:
            result.update(fsha_audit(cfg, data, fsha_runs, seed, fsha_steps))
            result["threat_models"]["fsha"] = THREAT_MODELS["fsha"]
        if canary_runs:
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
    fsha_steps: int = FSHA_STEPS,
) -> dict[str, Any]:
    """Build a fresh local deployment in a temporary folder, train it in-process, audit it.

    Returns ``test_accuracy``, ``dcor``, ``reconstruction_mse`` (+ ``ssim`` for digits),
    ``label_leak_auc`` (+ ``norm_auc``, ``direction_auc``) for vertical, and the epsilons
    that apply. Blocking: call it outside a running event loop.
    """
    check_args(topology, dataset, epochs)
    n = find_topology(topology).min_clients if clients is None else clients  # 0: refused
    with scratch("audit") as tmp:
        made = init_deployment(
            tmp / "deploy",
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
            [*client_overrides, 'checkpoint.dir=""'],  # trained once here: nothing to resume
            server_overrides,
            seed,
            timeout_s,
            shared,
            canary_runs=canary_runs,
            attack_seeds=attack_seeds,
            fsha_runs=fsha_runs,
            fsha_steps=fsha_steps,
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
