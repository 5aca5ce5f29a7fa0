"""Tables that grow with training are bounded: the reply cache in bytes as well as names,
and the applied-step log compacted to ranges (still proving each step applied once)."""

from __future__ import annotations

import asyncio

import torch
import zmq.asyncio

from sl_pipeline.messages import Kind, Message
from workers.runtime.appliedlog import AppliedLog, decode_log
from workers.server.replycache import HEADER_BYTES, ReplyCache
from workers.server.worker import ServerWorker

from .conftest import load_server
from .test_hostile_peers import _until, join

MB = 1024 * 1024


def _reply(client: str, step: int, nbytes: int) -> Message:
    grad = torch.zeros(nbytes // 4, dtype=torch.float32)
    return Message(kind=Kind.BACKWARD, client=client, step=step, tensors={"grad": grad})


def test_the_reply_cache_is_bounded_in_bytes_newest_steps_last() -> None:
    # Prepare: room for 10 MB; 8 names send 4 steps of 1 MB replies (32 MB unbounded)
    hits: list[int] = []
    cache = ReplyCache(max_bytes=10 * MB, on_bytes_hit=lambda: hits.append(1))
    # Execute
    for step in range(4):
        for i in range(8):
            cache.put(f"c{i}", "forward", (0, step), _reply(f"c{i}", step, MB))
    # Assert: under the bound; older steps went before any name's newest step
    assert cache.bytes <= 10 * MB
    assert len(hits) == 32 - cache.bytes // (MB + HEADER_BYTES)
    for i in range(8):
        assert cache.newest(f"c{i}", "forward") == (0, 3)
        assert cache.get(f"c{i}", "forward", (0, 3)) is not None
    assert cache.get("c0", "forward", (0, 0)) is None


def test_at_the_byte_bound_whole_names_go_least_recent_first_never_the_current() -> None:
    cache = ReplyCache(max_bytes=3 * MB)
    for i in range(5):  # newest replies alone: 5 MB
        cache.put(f"c{i}", "forward", (0, 0), _reply(f"c{i}", 0, MB))
    assert cache.names() == 2 and cache.newest("c4", "forward") == (0, 0)
    cache.put("big", "forward", (0, 0), _reply("big", 0, 8 * MB))  # larger than the bound
    assert cache.names() == 1 and cache.get("big", "forward", (0, 0)) is not None


def test_compacting_keeps_each_names_newest_step() -> None:
    cache = ReplyCache()
    for step in range(5):
        cache.put("c", "forward", (0, step), _reply("c", step, 1024))
    cache.compact()
    assert [entry["step"] for entry in cache.entries()] == [[0, 4]]  # the newest, alone
    assert cache.bytes == 1024 + HEADER_BYTES


async def _fill_reply_cache(deployment, steps: int, *sets: str) -> ServerWorker:  # type: ignore[no-untyped-def]
    """A server where client-1 may speak for sub-names (a relay) and batches of 1024 samples
    are allowed; 8 sub-names send ``steps`` steps whose replies are 256 KiB each."""
    files = deployment(clients=1, dataset="breast_cancer")
    base = files["server"].parent
    sets = ('server.relays=["client-1"]', "server.max_batch=1024", *sets)
    server = ServerWorker(load_server(files["server"], *sets), base)
    stop = asyncio.Event()
    task = asyncio.create_task(server.serve(stop))
    ctx = zmq.asyncio.Context()
    try:
        await _until(lambda: server.bound)
        conn = await join(server.cfg.server.bind, server.fingerprint, base / "keys", ctx)
        for step in range(steps):
            for i in range(8):
                tensors = {"act": torch.randn(1024, 64), "labels": torch.zeros(1024).long()}
                msg = Message(kind=Kind.FORWARD, client=f"s{i}", step=step, tensors=tensors)
                await conn.send(msg)
                assert (await conn.recv(10)).kind is Kind.BACKWARD
        conn.close()
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 10)
        ctx.destroy(linger=0)
    return server


async def test_a_servers_reply_cache_keeps_to_its_byte_bound_and_counts_evictions(
    deployment,
) -> None:  # type: ignore[no-untyped-def]
    # Prepare / Execute: the cache holds 1 MiB; 8 names x 2 steps of 256 KiB replies (4 MiB)
    server = await _fill_reply_cache(deployment, 2, "server.reply_cache_mib=1")
    # Assert: within the bound, every eviction counted
    (run,) = server.book.runs.values()
    assert run.replies.bytes <= MB
    hits = server.metrics.registry.get_sample_value(
        "sl_bound_hits_total", {"table": "reply_cache_bytes"}
    )
    assert hits is not None and hits >= 12  # 16 replies of 256 KiB, at most 4 kept


def test_the_applied_log_keeps_ranges_not_steps() -> None:
    # Prepare: two clients interleaved, 10 epochs of 1,000 steps each (20,000 steps)
    log = AppliedLog()
    for epoch in range(10):
        for step in range(1000):
            log.append("client-1", epoch, step)
            log.append("client-2", epoch, step)
    # Assert: one range per client and epoch; every step still listed once
    assert len(log) == 20_000 and log.ranges == 20
    state = log.state()
    assert tuple(state["ranges"].shape) == (20, 4)
    again = AppliedLog.from_state(state)
    assert again == log and len(again) == 20_000
    assert sorted(map(tuple, again)) == sorted(map(tuple, log))
    assert log.last == ["client-2", 9, 999]


def test_a_step_applied_twice_still_shows_twice() -> None:
    log = AppliedLog()
    for step in (0, 1, 2, 1, 2, 3):  # a redo after a lost checkpoint, done wrong
        log.append("client-1", 0, step)
    entries = [tuple(e) for e in decode_log(log.state())]
    assert len(entries) == 6 and len(set(entries)) == 4


def test_checkpoints_written_before_the_ranges_still_load() -> None:
    steps = [["client-1", 0, 0], ["client-1", 0, 1], ["client-2", 0, 0]]
    assert decode_log(steps) == steps  # a list of steps (relays, old servers)
    rows = {"clients": ["client-1", "client-2"], "rows": torch.tensor([[0, 0, 0], [0, 0, 1]])}
    assert decode_log(rows) == steps[:2]  # names and a tensor of steps


def test_a_checkpoint_keeps_each_names_newest_reply_and_older_ones_within_its_bound() -> None:
    # Prepare: 8 names x 4 steps of 1 MB replies held (32 MB); a checkpoint may add 3 MB of
    # older replies to the newest ones
    cache = ReplyCache(max_bytes=64 * MB, checkpoint_bytes=3 * MB)
    for step in range(4):
        for i in range(8):
            cache.put(f"c{i}", "forward", (0, step), _reply(f"c{i}", step, MB))
    # Execute
    entries = cache.entries()
    restored = ReplyCache()
    restored.load(entries)
    # Assert: the 8 newest, and two older replies of the newest older step; nothing more
    steps = sorted((e["client"], e["step"][1]) for e in entries)
    assert len(entries) == 10 and [s for s in steps if s[1] < 3] == [("c6", 2), ("c7", 2)]
    assert cache.checkpoint_size() == 10 * (MB + HEADER_BYTES)
    assert all(restored.newest(f"c{i}", "forward") == (0, 3) for i in range(8))


async def test_a_servers_checkpoint_holds_replies_within_its_bound(deployment) -> None:  # type: ignore[no-untyped-def]
    # Prepare / Execute: a big cache, 1 MiB of older replies allowed in a checkpoint;
    # 8 names x 3 steps of 256 KiB replies (6 MiB in the cache)
    sets = ("server.reply_cache_mib=64", "server.checkpoint_replies_mib=1")
    server = await _fill_reply_cache(deployment, 3, *sets)
    state = server._state()
    # Assert: the cache holds all 24, the checkpoint the 8 newest and 1 MiB of older ones
    (run,) = server.book.runs.values()
    assert run.replies.bytes > 5 * MB
    (record,) = [r for r in state["runs"] if r["id"] == run.id]
    newest = [e for e in record["replies"] if e["step"][1] == 2]
    assert len(newest) == 8 and len(record["replies"]) == 8 + 3  # 3 older of 256 KiB fit
    assert run.replies.checkpoint_size() <= 8 * 300 * 1024 + MB
