"""A hostile or broken server: nothing it sends crashes a client, hangs it, or reaches its
weights (docs/security.md, "A hostile server").

Each wrong reply ends the client with one line naming the problem (an ``SLError``, exit 3)
before any of it is applied; its saved state stays that of its last applied step, so the
same command carries on against an honest server. In-process tests hand a runner a crafted
reply (no sockets); the CLI tests run ``sl-pipeline client`` against a real server whose
replies a test tampers with, then against the same server answering honestly.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import zmq
import zmq.asyncio
from torch.nn.utils import parameters_to_vector

from sl_pipeline.errors import PeerError, ProtocolError, TransportError
from sl_pipeline.messages import Kind, Message
from sl_pipeline.transport import DealerConnection
from workers.cli import main
from workers.client import align
from workers.client.microbatch import MAX_DEPTH
from workers.client.replies import MAX_UNDO_POINTS
from workers.client.worker import ClientWorker
from workers.runtime.peers import Peer
from workers.server.worker import ServerWorker
from workers.tools.inprocess import build_deployment, wait_until
from workers.topologies import topology

from .conftest import load_client, load_server
from .threadserver import ThreadServer

# (request, honest reply) -> what is sent instead: a reply, several, or nothing
Tamper = Callable[[Message, Message], Message | list[Message] | None]


def _with(reply: Message, **changes: Any) -> Message:
    """``reply`` with some fields changed (tensors and meta replaced, not merged)."""
    fields = {
        "kind": reply.kind,
        "client": reply.client,
        "epoch": reply.epoch,
        "step": reply.step,
        "meta": reply.meta,
        "tensors": reply.tensors,
        "answers": reply.answers,
    }
    return Message(**{**fields, **changes})


def _grad(reply: Message, make: Callable[[torch.Tensor], torch.Tensor]) -> Message:
    return _with(reply, tensors={"grad": make(reply.tensors["grad"])})


# name -> (the server's reply, made from the honest one; what the client's error says)
WRONG_GRADIENTS: dict[str, tuple[Callable[[Message], Message], str]] = {
    "wrong width": (lambda r: _grad(r, lambda g: torch.zeros(len(g), 3)), r"shape \[32, 3\]"),
    "larger batch": (
        lambda r: _grad(r, lambda g: torch.zeros(len(g) + 5, *g.shape[1:])),
        r"shape \[37, 64\]; this step needs \[32, 64\]",
    ),
    "smaller batch": (lambda r: _grad(r, lambda g: g[:1]), r"shape \[1, 64\]"),
    "no batch dim": (lambda r: _grad(r, lambda g: torch.tensor(1.0)), r"shape \[\]"),
    "NaN": (lambda r: _grad(r, lambda g: torch.full_like(g, float("nan"))), "NaN or infinite"),
    "infinite": (lambda r: _grad(r, lambda g: torch.full_like(g, float("-inf"))), "NaN or inf"),
    "huge": (lambda r: _grad(r, lambda g: torch.full_like(g, 1e30)), "max_abs_value"),
    "int64": (lambda r: _grad(r, lambda g: torch.ones(g.shape, dtype=torch.int64)), "int64"),
    "int8 no scale": (lambda r: _grad(r, lambda g: g.to(torch.int8)), "grad_scale"),
    "no grad": (lambda r: _with(r, tensors={}), "lacks tensor 'grad'"),
    "another kind": (lambda r: _with(r, kind=Kind.RESULT), "is no backward"),
    "loss not a number": (lambda r: _with(r, meta={"loss": "abc"}), "loss of 'abc'"),
    "loss a list": (lambda r: _with(r, meta={"loss": [1.0]}), "not a number"),
}


def _client(deployment: Any, *sets: str, **kwargs: Any) -> ClientWorker:
    files = deployment(clients=1, dataset="breast_cancer", **kwargs)
    return ClientWorker(
        load_client(files["client-1"], *sets), files["client-1"].parent, progress=False
    )


def _weights(worker: ClientWorker) -> torch.Tensor:
    vectors = [parameters_to_vector(m.parameters()) for m in worker.runner.modules.values()]
    return torch.cat(vectors).detach().clone()


@pytest.mark.parametrize("attack", list(WRONG_GRADIENTS))
async def test_a_wrong_gradient_is_refused_before_it_touches_the_weights(
    deployment: Any, attack: str
) -> None:
    # Prepare: a vanilla client whose server answers its step with a wrong reply
    worker = _client(deployment)
    tamper, says = WRONG_GRADIENTS[attack]

    async def request(msg: Message, timeout_s: float | None = None) -> Message:
        act = msg.tensors["act"]
        honest = msg.reply(Kind.BACKWARD, meta={"loss": 0.5}, tensors={"grad": act * 0 + 1e-3})
        return tamper(honest)

    worker.request = request  # type: ignore[method-assign,assignment]
    # Execute / Assert: a ProtocolError naming the problem; the weights untouched
    await _first_step_refused(worker, says)


async def _first_step_refused(worker: ClientWorker, says: str) -> None:
    """The worker's first training step is refused with ``says``, its weights untouched."""
    _, x, y, ids = next(worker.runner.epoch_batches(0))
    before = _weights(worker)
    try:
        with pytest.raises(ProtocolError, match=says):
            await worker.runner.train_step(0, x, y, ids)
        assert torch.equal(_weights(worker), before)
    finally:
        worker.ckpt.release()


# ---- the same through the CLI, against a real server -------------------------------------
class TamperingServer(ServerWorker):
    """A real server whose replies to ``kinds`` of request from ``from_step`` on pass through
    ``tamper`` (None: honest). What it applies and caches is its honest work."""

    tamper: Tamper | None = None
    welcome: dict[str, Any] = {}  # fields that replace the honest welcome's
    kinds = (Kind.FORWARD,)  # the requests whose replies are tampered with
    from_step = 2

    def accept(self, hello: dict[str, Any], key: bytes | None) -> dict[str, Any]:
        return {**super().accept(hello, key), **self.welcome}

    async def dispatch(self, identity: bytes, peer: Peer, msg: Message) -> Any:
        replies = await super().dispatch(identity, peer, msg)
        tamper = self.tamper
        if tamper is None or msg.kind not in self.kinds or msg.step < self.from_step:
            return replies
        out = []
        for target, reply in replies:
            sent = tamper(msg, reply)
            out += [(target, m) for m in (sent if isinstance(sent, list) else [sent]) if m]
        return out


@pytest.fixture
def hostile(deployment: Any) -> Iterator[tuple[dict[str, Path], TamperingServer]]:
    files = deployment(clients=1, dataset="breast_cancer")
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level  # the CLI sends logs to this test's stderr
    try:
        with ThreadServer(files["server"], worker=TamperingServer) as server:
            assert isinstance(server, TamperingServer)
            yield files, server
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def _client_cli(files: dict[str, Path], *sets: str) -> list[str]:
    config = str(files["client-1"])
    extra = [arg for s in sets for arg in ("--set", s)]
    return ["client", "--config", config, "--no-progress", "--json", *extra]


def _one_line_error(
    capsys: pytest.CaptureFixture[str], files: dict[str, Path], *sets: str, exit_code: int = 3
) -> str:
    """Run ``sl-pipeline client``; assert it ended with ``exit_code`` and one printable line
    of error, no traceback; that line."""
    status = main(_client_cli(files, *sets))
    err = capsys.readouterr().err
    assert status == exit_code, err[-300:]
    assert "Traceback" not in err and "\x1b" not in err
    last = err.rstrip("\n").splitlines()[-1]
    assert last.startswith("sl-pipeline client: error: "), last[:300]
    return last


def _carries_on(capsys: pytest.CaptureFixture[str], files: dict[str, Path], *sets: str) -> None:
    """The same command, the server honest again, finishes the run (15 steps in all)."""
    assert main(_client_cli(files, *sets)) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 15


CLI_ATTACKS: dict[str, tuple[Tamper, str, tuple[str, ...]]] = {
    # the known break: a traceback (RuntimeError: Mismatch in shape) before
    "wrong-shaped gradient": (
        lambda m, r: _grad(r, lambda g: torch.zeros(len(g), 3)),
        r"the server's grad has shape \[32, 3\]; this step needs \[32, 64\]",
        (),
    ),
    "wrong-shaped gradient, pipelined": (
        lambda m, r: _grad(r, lambda g: torch.zeros(len(g), 3)),
        r"the server's grad has shape \[32, 3\]; this step needs \[32, 64\]",
        ("train.pipeline_depth=2",),
    ),
    "loss not a number": (
        lambda m, r: _with(r, meta={"loss": "abc"}),
        "the server's reply reports a loss of 'abc', not a number",
        (),
    ),
    "duplicate reply": (
        lambda m, r: [r, r],
        r"a backward reply to forward at step \(0, 2\) came while waiting for the reply to "
        r"forward at step \(0, 3\)",
        (),
    ),
    "reply to another step": (
        lambda m, r: _with(r, step=r.step + 1),
        r"a backward reply to forward at step \(0, 3\) came while waiting for the reply to "
        r"forward at step \(0, 2\)",
        (),
    ),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("attack", list(CLI_ATTACKS))
def test_a_wrong_reply_ends_the_client_in_one_line_and_the_same_command_carries_on(
    capsys: pytest.CaptureFixture[str],  # first: the server stops (and logs) before it goes
    hostile: tuple[dict[str, Path], TamperingServer],
    attack: str,
) -> None:
    # Prepare
    files, server = hostile
    server.tamper, says, sets = CLI_ATTACKS[attack]
    # Execute / Assert: exit 3, one line naming the problem, no traceback
    last = _one_line_error(capsys, files, *sets)
    assert re.search(says, last), last
    # Execute / Assert: the same command, the server honest again, carries on from its state
    server.tamper = None
    _carries_on(capsys, files, *sets)


# ---- u-shaped and evaluation replies: an honest engine's answer, tampered ----------------
def _served(worker: ClientWorker, files: dict[str, Path], tamper: Tamper) -> None:
    """``worker``'s requests answered by its topology's server engine, through ``tamper``."""
    cfg = load_server(files["server"])
    engine = topology(cfg.server.topology).engine(cfg, files["server"].parent)

    async def request(msg: Message, timeout_s: float | None = None) -> Message:
        answer = engine.evaluate if msg.kind is Kind.EVALUATE else engine.handle
        ((_, reply),) = answer(b"client-1", msg)
        changed = tamper(msg, reply)
        assert isinstance(changed, Message)
        return changed

    worker.request = request  # type: ignore[method-assign,assignment]


def _out(reply: Message, make: Callable[[torch.Tensor], torch.Tensor]) -> Message:
    return _with(reply, tensors={"out": make(reply.tensors["out"])})


def _on(kind: Kind, change: Callable[[Message], Message]) -> Tamper:
    return lambda msg, reply: change(reply) if msg.kind is kind else reply


USHAPED: dict[str, tuple[Tamper, str]] = {
    "out too wide": (
        _on(Kind.FORWARD, lambda r: _out(r, lambda o: torch.zeros(len(o), o.shape[1] + 1))),
        r"the server's out has shape \[32, 65\]; this step needs \[32, 64\]",
    ),
    "out for a larger batch": (
        _on(Kind.FORWARD, lambda r: _out(r, lambda o: torch.zeros(len(o) + 1, *o.shape[1:]))),
        r"out has shape \[33, 64\]",
    ),
    "out NaN": (
        _on(Kind.FORWARD, lambda r: _out(r, lambda o: torch.full_like(o, float("nan")))),
        "NaN",
    ),
    "out as a backward": (_on(Kind.FORWARD, lambda r: _with(r, kind=Kind.BACKWARD)), "no result"),
    "cut gradient of the wrong shape": (
        _on(Kind.BACKWARD, lambda r: _grad(r, lambda g: g[:, :3])),
        r"grad has shape \[32, 3, 4, 4\]; this step needs \[32, 16, 4, 4\]",
    ),
    "cut gradient huge": (
        _on(Kind.BACKWARD, lambda r: _grad(r, lambda g: g * 0 + 1e9)),
        "max_abs_value",
    ),
}


@pytest.mark.parametrize("attack", list(USHAPED))
async def test_a_wrong_ushaped_reply_is_refused_before_the_weights_move(
    deployment: Any, attack: str
) -> None:
    # Prepare: a u-shaped client (its head and labels here) and its server's engine
    files = deployment(topology="ushaped", clients=1)
    worker = ClientWorker(load_client(files["client-1"]), files["client-1"].parent, progress=False)
    tamper, says = USHAPED[attack]
    _served(worker, files, tamper)
    # Execute / Assert: refused, neither the bottom nor the head stepped
    await _first_step_refused(worker, says)


EVALUATION: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], str]] = {
    # one row for the batch: compared with the labels it broadcast into an accuracy
    "one row for the batch": (lambda o: o[:1], r"out has shape \[1, 2\]; this step needs \[114"),
    "no class dimension": (lambda o: o[:, 0], r"out has shape \[114\]"),
    "NaN": (lambda o: torch.full_like(o, float("nan")), "NaN"),
}


@pytest.mark.parametrize("attack", list(EVALUATION))
async def test_a_wrong_evaluation_output_is_refused(deployment: Any, attack: str) -> None:
    # Prepare: a vanilla client evaluating against its server's engine, outputs tampered
    files = deployment(clients=1, dataset="breast_cancer")
    worker = ClientWorker(load_client(files["client-1"]), files["client-1"].parent, progress=False)
    change, says = EVALUATION[attack]
    _served(worker, files, _on(Kind.EVALUATE, lambda r: _out(r, change)))
    # Execute / Assert
    try:
        with pytest.raises(ProtocolError, match=says):
            await worker.runner.evaluate(worker.data.test)
    finally:
        worker.ckpt.release()


# ---- the welcome -------------------------------------------------------------------------
BAD_WELCOMES: dict[str, tuple[dict[str, Any], str]] = {
    # each crashed the client (ValueError, TypeError) or was taken as a run id
    "checkpoint_every a word": ({"checkpoint_every": "abc"}, "checkpoint_every = 'abc'"),
    "checkpoint_every a list": ({"checkpoint_every": [1]}, r"checkpoint_every = \[1\]"),
    "checkpoint_every zero": ({"checkpoint_every": 0}, "checkpoint_every = 0"),
    "run a number": ({"run": 5}, "run = 5"),
    "run a path": ({"run": "../../x"}, "run = '../../x'"),
    "run of 5000 chars": ({"run": "r" * 5000}, r"run = 'rrr.*\.\.\., which"),
    "applied a word": ({"applied": "xy"}, "applied = 'xy'"),
    "applied one number": ({"applied": [1]}, r"applied = \[1\]"),
}


@pytest.mark.parametrize("attack", list(BAD_WELCOMES))
def test_a_wrong_welcome_is_refused_in_one_line(
    capsys: pytest.CaptureFixture[str],
    hostile: tuple[dict[str, Path], TamperingServer],
    attack: str,
) -> None:
    # Prepare
    files, server = hostile
    server.welcome, says = BAD_WELCOMES[attack]
    # Execute / Assert: exit 3, one line naming the field
    last = _one_line_error(capsys, files)
    assert re.search(f"error: the server's welcome has {says}", last), last


def test_a_welcome_asking_for_an_undo_point_per_step_gets_a_bounded_ring(
    hostile: tuple[dict[str, Path], TamperingServer],
) -> None:
    # Prepare: a server claiming to checkpoint every 10**15 steps (a full copy of the client's
    # state per step for the whole run, before)
    files, server = hostile
    server.welcome = {"checkpoint_every": 10**15}
    worker = ClientWorker(load_client(files["client-1"]), files["client-1"].parent, progress=False)
    # Execute
    summary = asyncio.run(worker.run())
    # Assert: trained, with at most MAX_UNDO_POINTS (+ the pipeline's depth + 1) undo points
    assert summary["steps"] == 15
    assert worker.undo.ring is not None
    assert worker.undo.ring.capacity <= MAX_UNDO_POINTS + MAX_DEPTH + 1


# ---- error replies -----------------------------------------------------------------------
def _error(meta: dict[str, Any]) -> Tamper:
    return lambda msg, reply: msg.reply(Kind.ERROR, meta=meta)


ESCAPES = "first line\nsl-pipeline client: finished\x1b[2J\x1b[31m"
ERRORS: dict[str, tuple[Tamper, int, str]] = {
    # a reason of several lines and terminal escapes: printed as they came, before
    "escapes in the reason": (
        _error({"code": "zzz", "reason": ESCAPES}),
        4,
        r"peer error \[zzz\]: first line\\nsl-pipeline client: finished\\x1b\[2J",
    ),
    "30,000 characters": (_error({"code": "zzz", "reason": "x" * 30_000}), 4, r"x{1997}\.\.\.$"),
    "no reason": (_error({"code": "zzz"}), 4, r"peer error \[zzz\]: no reason given$"),
    # "yes" is no JSON true: 100 rejoins and "gave up after 100 retries of one step", before
    "retryable a word": (
        _error({"code": "zzz", "reason": "r", "retryable": "yes"}),
        4,
        r"peer error \[zzz\]: r$",
    ),
    # retryable without end: still 100 tries, now saying what the server answered
    "retryable forever": (
        _error({"code": "zzz", "reason": "later", "retryable": True}),
        5,
        r"gave up after 100 retries of one forward \(the last: peer error \[zzz\]: later\)",
    ),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("attack", list(ERRORS))
def test_an_error_reply_ends_the_client_in_one_printable_line(
    capsys: pytest.CaptureFixture[str],
    hostile: tuple[dict[str, Path], TamperingServer],
    attack: str,
) -> None:
    # Prepare
    files, server = hostile
    server.tamper, exit_code, says = ERRORS[attack]
    # Execute / Assert: the exit code, one printable line naming the server's words
    last = _one_line_error(capsys, files, exit_code=exit_code)
    assert re.search(says, last), last[:300]
    # Execute / Assert: the same command carries on against the honest server
    server.tamper = None
    _carries_on(capsys, files)


# ---- a server that stops answering --------------------------------------------------------
@pytest.mark.timeout(120)
@pytest.mark.parametrize("depth", [1, 2], ids=["one step", "pipelined"])
def test_a_server_that_answers_no_step_is_given_up_within_retry_for_s(
    capsys: pytest.CaptureFixture[str],
    hostile: tuple[dict[str, Path], TamperingServer],
    depth: int,
) -> None:
    # Prepare: a server that joins the client again and again but answers no step from
    # step 2 on (before: 100 resends, each waiting up to client.timeout_s, 50 min by default)
    files, server = hostile
    dropped: list[float] = []  # when each reply was dropped
    server.tamper = lambda msg, reply: dropped.append(time.monotonic())  # None: no reply
    sets = ("client.timeout_s=0.3", "client.retry_for_s=1", f"train.pipeline_depth={depth}")
    # Execute
    last = _one_line_error(capsys, files, *sets, exit_code=TransportError.exit_code)
    took = time.monotonic() - dropped[0]  # not the client's start: 9 s of it at load 8
    # Assert: exit 5 after 8 unanswered sends (about 8 x 0.3 s and the rejoins), not 100
    assert re.search(r"no answer to .* after 8 tries in \d+s \(client\.retry_for_s = 1\)", last)
    assert took < 20, took
    # Execute / Assert: the same command carries on against the honest server
    server.tamper = None
    _carries_on(capsys, files, *sets)


@pytest.mark.parametrize("run", ["bad\nrun", 5, "../up"])
def test_a_relays_reply_naming_no_run_id_is_refused(
    capsys: pytest.CaptureFixture[str],
    hostile: tuple[dict[str, Path], TamperingServer],
    run: object,
) -> None:
    # Prepare: a next hop saying it is a relay, whose answers name a run no server has (a
    # newline in it was logged as a second line, and the client's checkpoint kept it)
    files, server = hostile
    server.welcome = {"role": "relay"}
    server.tamper = lambda msg, reply: _with(reply, meta={**reply.meta, "run": run})
    # Execute / Assert
    last = _one_line_error(capsys, files)
    assert last.endswith(f"the relay's reply names run {run!r}, which is no run id"), last


# ---- a relay is a client of the server too ------------------------------------------------
RELAYED: dict[str, tuple[Tamper, str]] = {
    # a result carrying a gradient was applied by the relay, before
    "another kind": (lambda m, r: _with(r, kind=Kind.RESULT), "is no backward"),
    "wrong shape": (lambda m, r: _grad(r, lambda g: g[:, :1]), "shape [32, 1]; this step needs"),
    "int64": (lambda m, r: _grad(r, lambda g: g.to(torch.int64)), "dtype int64"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("attack", list(RELAYED))
async def test_a_relay_refuses_a_wrong_reply_from_its_server(deployment: Any, attack: str) -> None:
    # Prepare: client -> relay -> a server whose answers to the relay's steps from step 2 on
    # are tampered with
    files = deployment(topology="multihop", clients=1, dataset="breast_cancer")
    run = build_deployment(files)
    relay = run.relay
    assert relay is not None
    tamper, says = RELAYED[attack]
    honest = run.server.dispatch

    async def dispatch(identity: bytes, peer: Peer, msg: Message) -> Any:
        replies = await honest(identity, peer, msg)
        if msg.kind is not Kind.FORWARD or msg.step < 2:
            return replies
        return [(target, tamper(msg, reply)) for target, reply in replies]

    run.server.dispatch = dispatch  # type: ignore[method-assign]
    stop = asyncio.Event()
    services = [asyncio.ensure_future(run.server.serve(stop))]
    client = ClientWorker(load_client(files["client-1"]), files["client-1"].parent, progress=False)
    try:
        await wait_until(run.server.ready)
        services.append(asyncio.ensure_future(relay.serve(stop)))
        await wait_until(relay.ready)
        # Execute
        with pytest.raises(PeerError) as refused:
            await asyncio.wait_for(client.run(), 30)
        # Assert: the relay refused it (the client hears why) before its optimizer stepped
        # (steps 0 and 1 applied, not 2), and serves on
        assert refused.value.remote_code in ("protocol", "reply_mismatch")
        assert says in refused.value.reason
        assert relay.steps_applied == 2 and not any(s.done() for s in services)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*services, return_exceptions=True), 30)


PREDICTIONS: dict[str, tuple[Tamper, str]] = {
    # argmax over no scores, and batches of scores of two widths: tracebacks, before
    "no scores": (lambda m, r: _out(r, lambda o: o[:, :0]), "batch 0 have 0 scores a row, not 1"),
    "widths differ": (
        lambda m, r: _out(r, lambda o: torch.zeros(len(o), 3)) if m.step else r,
        "batch 1 have 3 scores a row, not 2",
    ),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("attack", list(PREDICTIONS))
def test_wrong_predictions_end_predict_in_one_line(
    capsys: pytest.CaptureFixture[str],
    hostile: tuple[dict[str, Path], TamperingServer],
    attack: str,
) -> None:
    # Prepare: client-1 trained (honest server); 300 rows to predict (two batches)
    files, server = hostile
    assert main(_client_cli(files)) == 0
    rows = files["client-1"].parent / "rows.csv"
    rows.write_text("".join(",".join(["0.5"] * 30) + "\n" for _ in range(300)))
    server.tamper, says = PREDICTIONS[attack]
    server.kinds, server.from_step = (Kind.PREDICT,), 0
    # Execute
    status = main(["predict", "--config", str(files["client-1"]), "--input", str(rows)])
    # Assert
    err = capsys.readouterr().err
    assert status == ProtocolError.exit_code and "Traceback" not in err, err[-300:]
    assert says in err.rstrip("\n").splitlines()[-1]


@pytest.mark.parametrize(
    "sealed",
    [torch.zeros(40, dtype=torch.bfloat16), torch.zeros(4, 10, dtype=torch.uint8)],
    ids=["bfloat16", "2-d"],
)
async def test_a_psi_post_that_is_no_byte_string_is_refused(sealed: torch.Tensor) -> None:
    # Prepare: the server hands over the other party's PSI post as a bfloat16 tensor (a
    # TypeError traceback from .numpy(), before) or as a 2-d one
    async def request(msg: Message, timeout_s: float | None = None) -> Message:
        return msg.reply(Kind.WEIGHTS, meta={"round": 0}, tensors={"sealed": sealed})

    def make(kind: Kind, step: int = 0, **kwargs: Any) -> Message:
        return Message(kind=kind, client="a", step=step, **kwargs)

    # Execute / Assert
    with pytest.raises(ProtocolError, match="PSI round 0: the other party's post is no byte"):
        await align._exchange(request, make, 1, 0, b"payload")


# ---- what a server can push unasked -------------------------------------------------------
def _term_bounded(context: zmq.Context[Any], timeout_s: float = 10.0) -> None:
    """Terminate ``context`` without letting libzmq hang the test: once in a CI run its
    term blocked past the test's 60 s, after a ROUTER holding queued 1 MiB messages to a
    peer whose connection was being torn down was closed with linger 0. The test checks the
    client's queue, not libzmq's teardown; a term still blocked is left to its thread."""
    ender = threading.Thread(target=context.term, daemon=True)
    ender.start()
    ender.join(timeout_s)


@pytest.mark.timeout(60)
async def test_a_server_pushing_unasked_messages_fills_a_bounded_queue() -> None:
    # Prepare: a hostile server's socket (ROUTER_MANDATORY: a send it cannot hand on fails)
    # and a client's link, connected, that reads nothing (it computes a step)
    ctx, plain = zmq.asyncio.Context(), zmq.Context()
    router = plain.socket(zmq.ROUTER)  # not asyncio: a send that cannot go raises at once
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    router.setsockopt(zmq.SNDHWM, 1)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    conn = DealerConnection(ctx, f"tcp://127.0.0.1:{port}")
    conn.sock.connect(f"tcp://127.0.0.1:{port}")
    chunk, taken, cap = b"x" * (1 << 20), 0, 300
    try:
        await conn.sock.send_multipart([b"hello"])
        deadline = time.monotonic() + 10
        while not router.poll(0) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        identity, _ = router.recv_multipart(flags=zmq.NOBLOCK)
        # Execute: push 1 MiB messages until the link takes no more for 0.5 s (or 300 MiB)
        idle_since = time.monotonic()
        while taken < cap and time.monotonic() - idle_since < 0.5:
            try:
                router.send_multipart([identity, chunk], flags=zmq.NOBLOCK)
                taken, idle_since = taken + 1, time.monotonic()
            except zmq.Again:
                await asyncio.sleep(0.01)
    finally:
        router.close(0)
        conn.close()
        ctx.term()
        _term_bounded(plain)
    # Assert: the link's queue (16) and the kernel's buffers, not 1000 MiB (before: all 300)
    assert taken < 100, taken


@pytest.mark.timeout(120)
def test_a_rejoin_into_another_run_is_refused(
    capsys: pytest.CaptureFixture[str],
    hostile: tuple[dict[str, Path], TamperingServer],
) -> None:
    # Prepare: after 2 steps in run-1 the server drops a reply (the client rejoins) and its
    # welcome now names another run (the client carried on there with run-1's state, before)
    files, server = hostile

    def switch(msg: Message, reply: Message) -> None:
        server.welcome, server.tamper = {"run": "other-run"}, None

    server.tamper = switch
    # Execute / Assert
    last = _one_line_error(capsys, files, "client.timeout_s=0.3")
    assert "put this client in run 'other-run', but it trains in run 'run-1'" in last, last
    # Execute / Assert: the server training it in run-1 again, the same command carries on
    server.welcome = {}
    _carries_on(capsys, files, "client.timeout_s=0.3")
