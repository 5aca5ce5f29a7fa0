"""The chaos matrix: real worker processes killed with ``kill -9`` and restarted, per topology.

Each faulty run must end with every client's uninterrupted step count, the applied-step
logs (server, relay) must hold every step once, and where the run is deterministic (one
client, or parties the server always combines in the same order) the final accuracy must be
within 0.01 of the uninterrupted run. Kills happen at a step count read from the victim's
checkpoint files, never after a sleep; a server or relay that must lose steps its client has
seen (it checkpoints every 4 steps) stops itself at that exact point and is killed while
stopped (:class:`tests.workerproc.StopBehind`). A lossy link (5% of messages dropped each way)
at the default ``client.timeout_s`` must cost round trips, not reply timeouts.

By default three short runs kill each kind of worker once, and a relay that checkpoints
every 4 steps between its checkpoints, alone and then together with its client (the suite's
time budget); set ``SL_CHAOS_FULL=1`` for
the full matrix: three epochs and three server kills per topology, client and relay kills
(see docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.lossy_proxy import LossyProxy
from workers.runtime.appliedlog import decode_log
from workers.runtime.checkpoint import CheckpointStore
from workers.tools.inprocess import run_deployment

from .conftest import Procs
from .workerproc import StopBehind, WorkerProcess

REPLAYED = re.compile(r"relay lost (\d+) applied steps: it runs them again")
WAITED = re.compile(r"within ([0-9.e+-]+)s while waiting for a reply")

FULL = os.environ.get("SL_CHAOS_FULL") == "1"
CKPT = ("--set", "checkpoint.fsync=false")
EVERY4 = ("checkpoint.every_steps=4",)
CLIENT_SETS = ("--json", "--no-progress", "--set", "client.retry_for_s=90", *CKPT)


@dataclass(frozen=True)
class Case:
    topology: str
    faults: tuple[tuple[str, int], ...] = (("server", 3),)  # (victim, kills), in this order
    clients: int = 1
    deterministic: bool = True  # same accuracy expected (no interleaving of clients)
    dataset: str = "breast_cancer"
    epochs: int = 3
    client_sets: tuple[str, ...] = ()  # overrides for every client (reference run included)
    server_sets: tuple[str, ...] = ()  # overrides for the faulty run's server
    relay_sets: tuple[str, ...] = ()  # overrides for the faulty run's relay
    label: str = ""
    label_client: bool = False  # vertical: client-1 holds the labels and the loss
    client_lag: int = 0  # killed with the relay: the client's checkpoint may lag it this much

    def __str__(self) -> str:
        faults = [f"{v}x{n}" for v, n in self.faults]
        return "-".join([self.topology, *([self.label] if self.label else []), *faults])


# The full matrix (SL_CHAOS_FULL=1): three server kills per topology, a client kill where
# clients hold state the others wait for, a relay kill in the multi-hop chain.
FULL_CASES = [
    Case("vanilla"),
    Case("ushaped"),
    Case("vertical", clients=2),
    Case("vertical", clients=2, label_client=True, label="labelclient"),
    Case("multitask", clients=2, deterministic=False, dataset="digits", epochs=1),
    Case("multihop"),
    Case("splitfed", clients=2, deterministic=False),
    Case("roundrobin", clients=2),  # one client trains at a time: deterministic
    Case("vanilla", faults=(("client", 1),)),
    Case("roundrobin", faults=(("client", 1),), clients=2),
    Case("splitfed", faults=(("client", 1),), clients=2, deterministic=False),
    Case("multihop", faults=(("relay", 1),)),
    # a server checkpointing every 4 steps: its clients rewind to the step it resumed from
    Case("vanilla", server_sets=("checkpoint.every_steps=4",), label="every4"),
    # a relay checkpointing every 4 steps: its client resends the steps it lost, the same
    # requests (nothing new released, so a DP-SGD client's epsilon is the uninterrupted one)
    Case("multihop", faults=(("relay", 3),), relay_sets=EVERY4, label="relayevery4"),
    Case(
        "multihop",
        faults=(("relay", 2),),
        relay_sets=EVERY4,
        client_sets=("train.pipeline_depth=4",),
        label="relayevery4-depth4",
    ),
    Case(
        "multihop",
        faults=(("relay", 2),),
        relay_sets=EVERY4,
        client_sets=("privacy.dpsgd.noise_multiplier=0.5",),
        deterministic=False,
        label="relayevery4-dpsgd",
    ),
    # the relay and its client killed together (one machine rebooted): the client's
    # checkpoint kept the requests it resends (pipelined: those in flight too)
    Case("multihop", faults=(("relay+client", 2),), relay_sets=EVERY4, label="relayevery4"),
    Case(
        "multihop",
        faults=(("relay+client", 2),),
        relay_sets=EVERY4,
        client_sets=("train.pipeline_depth=4",),
        label="relayevery4-depth4",
    ),
    Case(
        "multihop",
        faults=(("relay+client", 1),),
        relay_sets=EVERY4,
        client_sets=("privacy.dpsgd.noise_multiplier=0.5",),
        deterministic=False,
        label="relayevery4-dpsgd",
    ),
    # a client checkpointing every 8 steps, pipelined: restarted with the relay from an
    # older checkpoint, it recomputes steps the relay ran with other weights (other bytes),
    # which the relay answers from the steps it ran again itself (before: refused, `redo`)
    Case(
        "multihop",
        faults=(("relay+client", 2),),
        relay_sets=EVERY4,
        client_sets=("train.pipeline_depth=4", "checkpoint.every_steps=8"),
        client_lag=7,
        label="relayevery4-clientevery8",
    ),
    # two clients behind the relay: it runs their lost steps again in their first order
    Case(
        "multihop",
        faults=(("relay", 2),),
        clients=2,
        deterministic=False,  # the two clients' steps interleave by timing
        relay_sets=EVERY4,
        label="relayevery4-two",
    ),
    # a cut-layer noise defense: the step in flight at the kill is recomputed after the
    # restart, and released as before (the noise key is in the client's checkpoint)
    Case(
        "multihop",
        faults=(("relay+client", 2),),
        relay_sets=EVERY4,
        client_sets=("privacy.noise.sigma=0.3", "privacy.noise.clip=5.0"),
        deterministic=False,  # each run's noise key is its own: accuracy differs
        label="relayevery4-noise",
    ),
    # DP-SGD: Poisson-sampled batches and the accountant's history resume mid-epoch
    Case(
        "vanilla",
        faults=(("client", 1),),
        client_sets=("privacy.dpsgd.noise_multiplier=0.5",),
        deterministic=False,  # noise and Poisson mask from the OS: runs differ in accuracy
        label="dpsgd",
    ),
]
# The default (the suite's time budget): one short epoch, two runs that between them kill
# every kind of worker once, each kill in a topology where it matters most.
SHORT_CASES = [
    Case("multihop", faults=(("relay", 1), ("server", 1)), epochs=1),
    Case(
        "multihop",
        faults=(("relay", 1), ("relay+client", 1)),  # the relay alone, then both together
        relay_sets=EVERY4,
        label="relayevery4",
        epochs=1,
    ),
    Case(
        "splitfed", faults=(("client", 1), ("server", 1)), clients=2, deterministic=False, epochs=1
    ),
]
CASES = FULL_CASES if FULL else SHORT_CASES
NAMES = {"server": "server", "relay": "relay-1", "client": "client-1"}


def _ckpt_sets(role: str) -> tuple[str, ...]:
    return ("--set", f'checkpoint.dir="ckpt/{role}"')


def _step_of(base: Path, role: str) -> int:
    """The newest checkpointed step count of a worker (0 before its first checkpoint).
    Read-only: a CheckpointStore here would remove the worker's temp files mid-save."""
    steps = [
        int(p.stem.rsplit("-", 1)[-1]) for p in (base / "ckpt" / role).glob(f"{NAMES[role]}-*.ckpt")
    ]
    return max(steps, default=0)


def _wait_step(base: Path, victim: str, at_least: int, proc: WorkerProcess) -> None:
    """Until the victim checkpointed ``at_least`` steps."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if _step_of(base, victim) >= at_least:
            return
        assert proc.poll() is None, f"the {victim} exited before step {at_least}"
        time.sleep(0.02)
    raise AssertionError(f"the {victim} never reached step {at_least}")


def _wait_stopped(victim: str, point: StopBehind, proc: WorkerProcess) -> None:
    """Until the victim stopped itself at ``point`` (applied steps its checkpoints lack)."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.stopped():
            return
        assert proc.poll() is None, f"the {victim} exited before it stopped at {point}"
        time.sleep(0.02)
    raise AssertionError(f"the {victim} never stopped at {point}")


def _summary(proc: WorkerProcess) -> dict[str, Any]:
    assert proc.wait(300) == 0, proc.log.read_text()[-3000:]
    return dict(json.loads(proc.out.read_text().strip().splitlines()[-1]))


def _applied_log(base: Path, role: str) -> list[tuple[str, int, int]]:
    found = CheckpointStore(base / "ckpt" / role, prefix=NAMES[role]).load_latest()
    assert found is not None, f"no {role} checkpoint"
    state = found[0]
    if "runs" in state:  # the server: the log of its run (one run per case)
        (run,) = state["runs"]
        return [(str(c), int(e), int(s)) for c, e, s in decode_log(run["applied_log"])]
    return [(str(c), int(e), int(s)) for c, e, s in decode_log(state["applied_log"])]


class Run:
    """One deployment's worker processes, each restartable with the same arguments."""

    def __init__(self, procs: Procs, files: dict[str, Path], case: Case) -> None:
        self.procs, self.files = procs, files
        self.sets = {
            "client": [arg for value in case.client_sets for arg in ("--set", value)],
            "server": [arg for value in case.server_sets for arg in ("--set", value)],
            "relay": [arg for value in case.relay_sets for arg in ("--set", value)],
        }
        self.base = files["server"].parent
        self.live: dict[str, WorkerProcess] = {}
        self.starts: dict[str, int] = {}

    def start(self, name: str, stop: StopBehind | None = None) -> WorkerProcess:
        role = name.split("-")[0]
        extra = (*(CLIENT_SETS if role == "client" else ("--json", *CKPT)), *self.sets[role])
        argv = [role, "--config", str(self.files[name]), *extra, *_ckpt_sets(role)]
        self.starts[name] = self.starts.get(name, 0) + 1
        stem = self.base / f"{name}-{self.starts[name]}"
        self.live[name] = WorkerProcess(
            argv, stem.with_suffix(".out"), stem.with_suffix(".log"), stop
        )
        self.procs.procs.append(self.live[name])  # type: ignore[arg-type]  # stopped like a Popen
        return self.live[name]

    def kill(self, name: str) -> None:
        self.live[name].send_signal(signal.SIGKILL)
        self.live[name].wait(10)

    def stop(self, name: str) -> None:
        self.live[name].send_signal(signal.SIGTERM)
        assert self.live[name].wait(30) == 0, self.live[name].log.read_text()[-3000:]


def _deploy(deployment, case: Case) -> dict[str, Path]:  # type: ignore[no-untyped-def]
    return dict(
        deployment(
            topology=case.topology,
            clients=case.clients,
            dataset=case.dataset,
            epochs=case.epochs,
            label_client=case.label_client,
        )
    )


@dataclass(frozen=True)
class Kill:
    victim: str
    at: int  # the victim's own step count (checkpointed, or applied where it stops itself)
    stop: StopBehind | None  # where the victim stops itself to be killed, if it does


def _plan(case: Case, reference: list[dict[str, Any]], server_steps: int) -> list[Kill]:
    """Each kill at evenly spaced step counts of its victim's own. A server checkpointing
    every 4 steps stops itself 2 steps past its newest checkpoint, so that the kill loses
    steps its client applied (the point lasts milliseconds: a poll from here can miss it)."""
    planned = [victim for victim, kills in case.faults for _ in range(kills)]
    kills = []
    for i, victims in enumerate(planned):
        victim = victims.split("+")[0]  # "relay+client": the relay stops, both are killed
        own = server_steps if victim == "server" else reference[0]["steps"]
        at = own * (i + 1) // (len(planned) + 1)
        lost = bool({"server": case.server_sets, "relay": case.relay_sets}.get(victim))
        kills.append(Kill(victims, at, StopBehind(at, lead=2, role=victim) if lost else None))
    return kills


def _stop_point(kills: list[Kill], victim: str, after: int) -> StopBehind | None:
    """Where the victim's next kill (from kill ``after`` on) wants it stopped, if anywhere."""
    return next((k.stop for k in kills[after:] if k.victim.split("+")[0] == victim), None)


def _reference(deployment, case: Case) -> tuple[list[dict[str, Any]], int]:  # type: ignore[no-untyped-def]
    """The uninterrupted run: each client's summary, and the server's applied steps (a
    vertical step is one update for all parties)."""
    files = _deploy(deployment, case)
    run = asyncio.run(run_deployment(files, *case.client_sets))
    return list(run.summaries), int(run.server.steps_applied)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=str)
def test_kill_9_and_restart(case: Case, deployment, procs: Procs) -> None:  # type: ignore[no-untyped-def]
    # Prepare: the uninterrupted run, then the same deployment as processes
    reference, server_steps = _reference(deployment, case)
    files = _deploy(deployment, case)
    run = Run(procs, files, case)
    kills = _plan(case, reference, server_steps)
    run.start("server", _stop_point(kills, "server", 0))
    if "relay-1" in files:
        run.start("relay-1", _stop_point(kills, "relay", 0))
    clients = sorted(name for name in files if name.startswith("client-"))
    for name in clients:
        run.start(name)
    # Execute: kill each victim at its step count, restart it each time
    for i, kill in enumerate(kills):
        victims = kill.victim.split("+")
        name = NAMES[victims[0]]
        if kill.stop is not None:
            _wait_stopped(victims[0], kill.stop, run.live[name])
        else:
            _wait_step(run.base, victims[0], kill.at, run.live[name])
        for other in victims[1:]:  # its checkpoint holds the steps the relay lost
            _wait_step(run.base, other, kill.at - case.client_lag, run.live[NAMES[other]])
        for victim in victims:
            run.kill(NAMES[victim])
        for victim in victims:
            run.start(NAMES[victim], _stop_point(kills, victim, i + 1))
    summaries = [_summary(run.live[name]) for name in clients]
    run.stop("server")
    if "relay-1" in files:
        run.stop("relay-1")
    # Assert: same steps, every step applied once, same accuracy where deterministic
    assert [s["steps"] for s in summaries] == [r["steps"] for r in reference]
    applied = _applied_log(run.base, "server")
    assert len(applied) == len(set(applied)) == sum(r["steps"] for r in reference)
    if "relay-1" in files:
        relayed = _applied_log(run.base, "relay")
        assert len(relayed) == len(set(relayed)) == sum(r["steps"] for r in reference)
    victims = {victim for victims, _ in case.faults for victim in victims.split("+")}
    if "client" in victims:
        assert summaries[0]["resumed_from"] > 0
    if case.server_sets:  # each kill lost steps the client had applied: it rewound each time
        assert sum(s["rewinds"] for s in summaries) == sum(k.stop is not None for k in kills)
    if case.relay_sets:  # each kill lost 2 or more steps: the relay ran them again, no rewind
        assert sum(s["rewinds"] for s in summaries) == 0
        logs = "".join(p.read_text() for p in run.base.glob("relay-1-*.log"))
        assert sum(int(n) for n in REPLAYED.findall(logs)) >= 2 * len(kills)
    for got, want in zip(summaries, reference, strict=True):
        if case.deterministic and want["test_accuracy"] is not None:
            assert abs(got["test_accuracy"] - want["test_accuracy"]) <= 0.01
        if "dpsgd_epsilon" in want:  # every step released before the crash still counts
            assert got["dpsgd_epsilon"] == pytest.approx(want["dpsgd_epsilon"], rel=1e-6)
    if "relay" in victims:  # the client names what it lost: the relay, never the server
        logs = [p.read_text() for p in run.base.glob("client-1-*.log")]
        assert not any("lost the server" in text for text in logs)
        if "client" not in victims:  # killed with the relay, it may not have seen it go
            assert any("lost the relay" in text for text in logs)


async def test_lossy_link_at_the_default_timeout_costs_round_trips(
    deployment, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: a clean run, and a proxy dropping 5% of messages each way
    epochs = 3 if FULL else 2
    clean = await run_deployment(deployment(dataset="breast_cancer", epochs=epochs))
    files = deployment(dataset="breast_cancer", epochs=epochs)
    port = int(files["client-1"].read_text().split("tcp://127.0.0.1:")[1].split('"')[0])
    proxy = LossyProxy(
        f"tcp://127.0.0.1:{port}",
        drop_rate=0.05,
        delay_s=(0.0, 0.003),
        seed=3,
        keyed=True,
        max_links=3,  # the two clients' links and one more: old ones, unused, are evicted
    )  # (it cannot see a client's connection close; the server admits 4 per key at once)
    await proxy.start()
    proxy.drop_next("downstream")  # at least one lost reply, whatever the dice say
    # Execute: client.timeout_s left at its default (30 s)
    try:
        with caplog.at_level(logging.WARNING, logger="sl_pipeline"):
            run = await run_deployment(files, f'client.server="{proxy.endpoint}"')
    finally:
        await proxy.stop()
    waits = [float(w) for w in WAITED.findall(caplog.text)]  # each lost reply's wait
    # Assert: exactly once, and no loss waited anywhere near the 30 s default
    summary, want = run.summaries[0], clean.summaries[0]
    assert proxy.dropped > 0 and summary["retries"] > 0
    assert summary["steps"] == want["steps"] == run.server.steps_applied
    assert abs(summary["test_accuracy"] - want["test_accuracy"]) <= 0.01
    # each loss was noticed after the adaptive wait (the measured step time's multiple), not
    # the configured 30 s: the wait each time out names is the evidence, not the wall time
    assert waits and max(waits) < 10, waits
