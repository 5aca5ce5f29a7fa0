"""A client killed where its own state does not cover every step the server applied for
it: between two checkpoints (``[checkpoint] every_steps > 1``), or without a checkpoint
dir inside the 16 steps the server caches replies for. The same command carries on, each
step applied once, or it is refused in one line saying what to do. In-process, over real
loopback sockets; a kill is a cancelled client (no bye, no checkpoint at the end)."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from sl_pipeline.errors import ConfigError, PeerError
from workers.server.worker import ServerWorker
from workers.tools.inprocess import wait_until

from .test_run_lifecycle import DATA, NONE, _client, _crash, _serving

EPOCHS = {**DATA, "epochs": 4}  # 32 steps of client-1
SETS = ("server.run_clients=0", "server.takeover_after_s=0.3")  # the killed session's name


def _forwards(registry: CollectorRegistry, direction: str) -> float:
    labels = {"direction": direction, "kind": "forward"}
    return registry.get_sample_value("sl_messages_total", labels) or 0.0


async def _killed(server: ServerWorker, files: dict[str, Path], steps: int, *sets: str) -> int:
    """client-1 killed ``steps`` steps in (``_crash``), once the server has every step it
    sent: its last may still be on the way when it dies, and land after a count taken at
    once (22 applied, not 21, 1 run in 6 here). The steps run-1 applied by then."""
    before = _forwards(server.metrics.registry, "received")
    client = await _crash(files, "client-1", steps, *sets)
    sent = _forwards(client.metrics.registry, "sent")
    await wait_until(lambda: _forwards(server.metrics.registry, "received") - before >= sent)
    return server.book.runs["run-1"].steps


async def test_a_client_killed_between_checkpoints_carries_on_exactly_once(
    deployment,  # type: ignore[no-untyped-def]
) -> None:
    # Prepare: an uninterrupted run (run-1) to compare with; then run-2, with checkpoints
    # every 10 steps, killed a few steps past its checkpoint of step 10
    files = deployment(**{**DATA, "epochs": 3})  # 24 steps
    every = "checkpoint.every_steps=10"
    async with _serving(files, *SETS) as server:
        clean = await _client(files, "client-1", every)
        await _crash(files, "client-1", 13, every)
        cached = server.from_cache
        # Execute: the same command
        again = await _client(files, "client-1", every)
    # Assert: it resumed from step 10 and resent the steps after it, answered from the
    # server's cache; each applied once, and it ended as the uninterrupted run did
    run = server.book.runs["run-2"]
    assert again["run"] == "run-2" and again["resumed_from"] == 10
    assert again["steps"] == run.steps == clean["steps"] == 24 and run.state == "finished"
    assert server.from_cache > cached
    assert (again["test_accuracy"], again["train_loss"]) == (
        clean["test_accuracy"],
        clean["train_loss"],
    )


async def test_a_client_killed_further_past_its_checkpoint_than_the_cache_is_told_why(
    deployment,  # type: ignore[no-untyped-def]
) -> None:
    # Prepare: checkpoints every 50 steps (none yet), killed 20 steps in: more than the 16
    # steps the server answers again from its cache
    files = deployment(**EPOCHS)
    every = "checkpoint.every_steps=50"
    async with _serving(files, *SETS) as server:
        applied = await _killed(server, files, 20, every)
        # Execute: the same command
        with pytest.raises(PeerError) as refused:
            await _client(files, "client-1", every)
    # Assert: one line that names the setting and what to do; nothing applied again
    line = str(refused.value)
    assert "\n" not in line and "stale_step" in line
    assert "checkpoint.every_steps = 50" in line and "sl-pipeline runs stop run-1" in line
    assert server.book.runs["run-1"].steps == applied


async def test_a_dpsgd_client_whose_newest_checkpoints_were_lost_is_refused_not_fed_other_rows(
    deployment,  # type: ignore[no-untyped-def]
) -> None:
    # Prepare: DP-SGD draws its batches from the OS, so it checkpoints every step; killed
    # 13 steps in, and its checkpoints after step 5 lost (a power cut with fsync = false)
    files = deployment(**EPOCHS)
    dp = ("privacy.dpsgd.noise_multiplier=1.0", "checkpoint.keep=40")
    async with _serving(files, *SETS) as server:
        applied = await _killed(server, files, 13, *dp)
        folder = files["client-1"].parent / "state" / "client-checkpoints"
        for path in folder.glob("*.ckpt"):
            if int(path.stem.rsplit("-", 1)[-1]) > 5:
                path.unlink()
        # Execute: the same command
        with pytest.raises(ConfigError) as refused:
            await _client(files, "client-1", *dp)
    # Assert: one line naming what to do; no step answered with the gradients of other
    # rows (before: a `Mismatch in shape` traceback, or, where sizes agreed, wrong gradients)
    line = refused.value.message
    assert "\n" not in line and "DP-SGD batches cannot be drawn again past" in line
    assert "`sl-pipeline runs stop run-1`" in line
    assert server.book.runs["run-1"].steps == applied


async def test_a_client_without_a_checkpoint_dir_killed_within_the_cache_carries_on_once(
    deployment,  # type: ignore[no-untyped-def]
) -> None:
    # Prepare: an uninterrupted run (run-1) to compare with; then run-2 of a client
    # without [checkpoint] dir, killed 9 steps in: within the 16 steps the server caches
    files = deployment(**{**DATA, "epochs": 3})  # 24 steps
    async with _serving(files, *SETS) as server:
        clean = await _client(files, "client-1", NONE)
        await _crash(files, "client-1", 9, NONE)
        cached = server.from_cache
        # Execute: the same command, which starts from step 0 again
        again = await _client(files, "client-1", NONE)
    # Assert: its first steps answered from the cache, each applied once; it ended as the
    # uninterrupted run did
    run = server.book.runs["run-2"]
    assert again["run"] == "run-2" and again["resumed_from"] == 0
    assert again["steps"] == run.steps == clean["steps"] == 24 and run.state == "finished"
    assert server.from_cache - cached >= 9
    assert (again["test_accuracy"], again["train_loss"]) == (
        clean["test_accuracy"],
        clean["train_loss"],
    )
