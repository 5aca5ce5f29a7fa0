"""Recovery pieces in one process: the retransmission timer, refusals that keep their cause,
and a relay that checkpoints, resumes and says it is a relay."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest
import torch
import zmq.asyncio

from sl_pipeline.config import ClientConfig, RelayConfig, ServerConfig, load
from sl_pipeline.errors import ConfigError, PeerError
from sl_pipeline.handshake import ClientHandshake
from sl_pipeline.messages import PROTOCOL_VERSION, Kind, Message
from sl_pipeline.retransmit import RetransmitTimer
from sl_pipeline.transport import DealerConnection
from workers.client.worker import ClientWorker
from workers.relay import RelayWorker
from workers.server.engines.middle import MiddleEngine
from workers.server.engines.vertical import VerticalEngine
from workers.server.worker import ServerWorker
from workers.tools.inprocess import run_deployment, wait_until


# ---- the retransmission timer (RFC 6298) ----------------------------------------------------
def test_timer_waits_the_initial_value_until_it_has_measured() -> None:
    timer = RetransmitTimer(max_s=30.0)
    assert timer.timeout("forward") == 1.0
    assert timer.srtt("forward") is None


def test_timer_follows_rfc_6298_smoothing() -> None:
    timer = RetransmitTimer(max_s=30.0, min_s=0.01)
    timer.sample("forward", 0.4)  # SRTT 0.4, RTTVAR 0.2: RTO = 0.4 + 4 * 0.2
    assert timer.timeout("forward") == pytest.approx(1.2)
    timer.sample("forward", 0.2)  # RTTVAR = 0.75*0.2 + 0.25*0.2 = 0.2; SRTT = 0.375
    assert timer.srtt("forward") == pytest.approx(0.375)
    assert timer.timeout("forward") == pytest.approx(0.375 + 0.8)
    for _ in range(200):  # a steady round trip: the variance decays, the wait approaches it
        timer.sample("forward", 0.1)
    assert timer.timeout("forward") == pytest.approx(0.11, abs=0.01)


def test_timer_backs_off_exponentially_up_to_the_bound_and_resets_on_a_sample() -> None:
    timer = RetransmitTimer(max_s=5.0, min_s=0.2)
    timer.sample("forward", 0.01)
    assert timer.timeout("forward") == 0.2  # the floor: no wait below min_s
    waits = []
    for _ in range(8):
        waits.append(timer.timeout("forward"))
        timer.expired("forward")
    assert waits == [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0]  # doubling, capped at max_s
    timer.sample("forward", 0.01)  # a reply to a request sent once: back to the estimate
    assert timer.timeout("forward") == 0.2


def test_timer_keeps_kinds_apart_and_refuses_a_zero_bound() -> None:
    timer = RetransmitTimer(max_s=30.0, min_s=0.01)
    timer.sample("evaluate", 2.0)
    timer.expired("forward")
    assert timer.timeout("forward") == 2.0  # initial 1 s, backed off once
    assert timer.timeout("evaluate") == pytest.approx(6.0)
    with pytest.raises(ConfigError, match="> 0"):
        RetransmitTimer(max_s=0)


# ---- refusals keep their code and reason --------------------------------------------------
async def test_a_tampered_message_is_named_bad_tag_in_the_client_log(
    deployment, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: the client's 5th sealed message has one bit flipped on the way out
    files = deployment(dataset="breast_cancer", epochs=1)
    reference = (await run_deployment(deployment(dataset="breast_cancer", epochs=1))).summaries
    original = DealerConnection.send
    sent: list[int] = []

    async def tampering(self: DealerConnection, message: Message) -> int:
        sent.append(1)
        if len(sent) != 5:
            return await original(self, message)
        assert self.channel is not None
        frames = [bytearray(f) for f in self.channel.pack(message)]
        frames[-1][0] ^= 1
        await self.sock.send_multipart(frames)
        return 0

    monkeypatch.setattr(DealerConnection, "send", tampering)
    # Execute
    with caplog.at_level(logging.WARNING, logger="sl_pipeline.client"):
        run = await run_deployment(files)
    # Assert: the client's log says what the server said, and training recovered
    assert "[bad_tag]" in caplog.text and "failed authentication" in caplog.text
    assert "no longer knows" not in caplog.text
    assert run.summaries[0]["steps"] == reference[0]["steps"] == run.server.steps_applied


# ---- the relay: checkpoint, resume, and its name in the client's messages -----------------
async def test_relay_checkpoints_and_a_new_relay_resumes_from_it(deployment) -> None:  # type: ignore[no-untyped-def]
    files = deployment(topology="multihop", dataset="breast_cancer", epochs=1)
    base = files["server"].parent
    files["relay-1"].write_text(
        files["relay-1"].read_text() + '\n[checkpoint]\ndir = "ckpt/relay"\nfsync = false\n'
    )
    run = await run_deployment(files)
    relay: RelayWorker = run.relay
    # Execute: a new relay on the same directory (as after kill -9 and a restart)
    again = RelayWorker(load(RelayConfig, files["relay-1"]), base)
    # Assert: weights, optimizer state, the applied-step log and the reply cache came back
    assert again.resumed_from == relay.steps_applied == run.summaries[0]["steps"]
    assert again.applied_log == relay.applied_log
    assert len({tuple(e) for e in again.applied_log}) == relay.steps_applied
    for name, value in relay.segment.state_dict().items():
        assert torch.equal(again.segment.state_dict()[name], value)
    last = relay.applied_log.last
    assert last is not None
    assert again.replies.get(last[0], "forward", (last[1], last[2])) is not None
    welcome = again.accept({"model": again.fingerprint, "client": last[0]}, None)
    assert welcome["role"] == "relay" and welcome["applied"] == [last[1], last[2]]


async def test_a_relay_that_lost_steps_is_blamed_not_the_server(
    deployment, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: client -> relay (no checkpoint) -> server, training under way
    files = deployment(topology="multihop", dataset="breast_cancer", epochs=2, insecure=True)
    base = files["server"].parent
    stops = [asyncio.Event() for _ in range(3)]
    tasks: list[asyncio.Task[Any]] = []
    server = ServerWorker(load(ServerConfig, files["server"]), base)
    tasks.append(asyncio.create_task(server.serve(stops[0])))
    relay = RelayWorker(load(RelayConfig, files["relay-1"]), base)
    tasks.append(asyncio.create_task(relay.serve(stops[1])))
    client = ClientWorker(load(ClientConfig, files["client-1"]), base, progress=False)
    training = asyncio.create_task(client.run())
    try:
        for _ in range(300):  # bounded: 30 s
            if client.steps_done >= 3:
                break
            await asyncio.sleep(0.1)
        # Execute: the relay stops and a fresh one, with no memory of the steps, takes over
        with caplog.at_level(logging.INFO, logger="sl_pipeline.client"):
            stops[1].set()
            await asyncio.wait_for(tasks[1], 10)
            fresh = RelayWorker(load(RelayConfig, files["relay-1"]), base)
            tasks.append(asyncio.create_task(fresh.serve(stops[2])))
            await asyncio.wait_for(training, 120)
        # Assert: the client names the relay as what it lost and what lost its steps
        assert "joined relay" in caplog.text
        assert "the relay lost steps" in caplog.text and "server lost" not in caplog.text
    finally:
        for stop in stops:
            stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks, training, return_exceptions=True), 15)


# ---- two exchanges per step: a step open at a restart is redone ---------------------------
TWO_EXCHANGES = {  # topology -> (deployment options, the engine method that opens a step)
    "ushaped": ({"topology": "ushaped"}, MiddleEngine, "_forward"),
    "vertical-label-client": (
        {"topology": "vertical", "clients": 2, "label_client": True},
        VerticalEngine,
        "_to_label_holder",
    ),
}


@pytest.mark.parametrize("case", sorted(TWO_EXCHANGES))
async def test_a_step_open_when_the_server_restarts_is_redone(
    case: str, deployment, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: the uninterrupted run; then the server stops right after it answered the
    # forward of step (0, 3), before that step's gradient can arrive
    options, engine, method = TWO_EXCHANGES[case]
    options = {**options, "dataset": "breast_cancer"}
    reference = (await run_deployment(deployment(**options))).summaries
    files = deployment(**options)
    base = files["server"].parent
    cfg = load(ServerConfig, files["server"], ['checkpoint.dir="ckpt"', "checkpoint.fsync=false"])
    stops = [asyncio.Event(), asyncio.Event()]
    original = getattr(engine, method)

    def open_then_stop(self: Any, *args: Any) -> Any:
        replies = original(self, *args)
        opened = self._open is not None and (self._open.epoch, self._open.step) == (0, 3)
        if opened and not stops[0].is_set():
            stops[0].set()  # this server finishes this message and goes
        return replies

    monkeypatch.setattr(engine, method, open_then_stop)
    tasks = [asyncio.create_task(ServerWorker(cfg, base).serve(stops[0]))]
    names = sorted(n for n in files if n.startswith("client-"))
    clients = [ClientWorker(load(ClientConfig, files[n]), base, progress=False) for n in names]
    training = asyncio.gather(*(c.run() for c in clients))
    try:
        # Execute: a new server resumes from the checkpoint, without the open step
        with caplog.at_level(logging.WARNING, logger="sl_pipeline.client"):
            await asyncio.wait_for(tasks[0], 60)
            second = ServerWorker(cfg, base)
            tasks.append(asyncio.create_task(second.serve(stops[1])))
            summaries = await asyncio.wait_for(training, 120)
        # Assert: the step was redone; every step applied once; the same result
        assert "step_lost" in caplog.text and "redoing it" in caplog.text
        assert [s["steps"] for s in summaries] == [r["steps"] for r in reference]
        applied = [tuple(e) for e in second.applied_log]
        assert len(applied) == len(set(applied)) == sum(r["steps"] for r in reference)
        assert abs(summaries[0]["test_accuracy"] - reference[0]["test_accuracy"]) <= 0.01
    finally:
        for stop in stops:
            stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks, training, return_exceptions=True), 15)


# ---- a stopping server answers what is queued -----------------------------------------------
async def test_a_request_queued_while_the_server_stops_is_told_shutting_down_at_once(
    deployment, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: the server is told to stop while it handles request 1; request 2 is queued
    files = deployment(dataset="breast_cancer", insecure=True)
    server = ServerWorker(load(ServerConfig, files["server"]), files["server"].parent)
    stop = asyncio.Event()
    handling = asyncio.Event()
    original = ServerWorker.dispatch

    async def stop_while_handling(self: ServerWorker, identity: bytes, peer: Any, msg: Any) -> Any:
        if msg.step == 1:
            stop.set()
            handling.set()
            await asyncio.sleep(0.3)  # request 2 arrives meanwhile and waits unread
        return await original(self, identity, peer, msg)

    monkeypatch.setattr(ServerWorker, "dispatch", stop_while_handling)
    task = asyncio.create_task(server.serve(stop))
    ctx = zmq.asyncio.Context()
    conn = DealerConnection(ctx, server.cfg.server.bind)
    try:
        hello = {"v": PROTOCOL_VERSION, "client": "client-1", "model": server.fingerprint}
        await conn.handshake(ClientHandshake({**hello, "role": "trainer"}, None, None), 10)
        # Execute
        await conn.send(Message(kind=Kind.HEARTBEAT, step=1))
        await asyncio.wait_for(handling.wait(), 10)
        await conn.send(Message(kind=Kind.HEARTBEAT, step=2))
        assert (await conn.recv(10)).step == 1
        started = time.monotonic()
        with pytest.raises(PeerError) as refused:
            await conn.recv(30)
        # Assert: told at once that it may retry, not left to wait out its timeout
        assert refused.value.remote_code == "shutting_down" and refused.value.retryable
        assert time.monotonic() - started < 5
    finally:
        stop.set()
        conn.close()
        await asyncio.wait_for(task, 15)
        ctx.destroy(linger=0)


async def test_sigterm_interrupts_a_client_rejoining_a_server_that_has_gone(deployment) -> None:  # type: ignore[no-untyped-def]
    # Prepare: a client whose server is not there, with a long retry window
    files = deployment(clients=1, dataset="breast_cancer")
    cfg = load(ClientConfig, files["client-1"], ["client.retry_for_s=600"])
    worker = ClientWorker(cfg, files["server"].parent, progress=False)
    task = asyncio.create_task(worker.run())
    await wait_until(lambda: worker.retries >= 1)  # in its rejoin loop (backoff, hello wait)
    # Execute: the stop that SIGTERM sets
    retries = worker.retries
    worker.stop.set()
    summary = await asyncio.wait_for(task, 30)  # a hang guard: the window has 600 s left
    # Assert: it stopped in the wait, before another attempt, and says so
    assert summary["stopped_early"] is True and summary["steps"] == 0
    assert worker.retries == retries
