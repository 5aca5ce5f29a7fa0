"""Smoke tests for the cheap bench sections. They check that figures exist, never speed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from bench import crypto_rt, crypto_wan, fixed_costs, flops, shaper, step_trace
from bench.common import CTX, free_port, machine_load, paired, party_cores
from bench.models import VGG_CUT, vgg16
from bench.overhead import Placement, RpcBlocks
from bench.wan import Rounds, recommended_depth, summarise


@pytest.mark.timeout(60)
def test_flops_table_counts_positive_and_split_below_federated() -> None:
    # Execute
    table = flops.run(quick=True)["flops_table"]["ours_per_epoch"]

    # Assert
    assert set(table) == {"vgg16", "resnet18"}
    for by_clients in table.values():
        assert set(by_clients) == {"100", "500"}
        for row in by_clients.values():
            assert row["split_tflops"] > 0 and row["federated_tflops"] > 0
            assert row["split_tflops"] < row["federated_tflops"]
            assert row["split_gb"] > 0 and row["federated_gb"] > 0


def test_segment_flops_are_a_part_of_the_whole_model() -> None:
    # Execute
    whole, out_shape = flops.train_flops_per_sample(vgg16(), None)
    segment, cut_shape = flops.train_flops_per_sample(vgg16(), VGG_CUT)

    # Assert
    assert 0 < segment < whole
    assert out_shape == (10,) and cut_shape == (64, 32, 32)


@pytest.mark.timeout(60)
def test_tiny_crypto_round_trip_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a few pairs (quick's 400 of 8 take up to 10 s: the figure is not under test)
    monkeypatch.setattr(crypto_rt, "_plan", lambda quick, nbytes=0: (8, 4, 5.0))
    # Execute
    result = crypto_rt.run(quick=True, sizes={"4KiB": 4 * 1024}, wan=False)

    # Assert
    assert set(result["encryption_overhead"]) == {"4KiB"}
    assert result["encryption_overhead"]["4KiB"] > 0
    assert result["rtt_ms"]["4KiB"]["samples"] >= 3
    # CPU time of both processes per round trip, and the ciphers' own speed
    assert result["cpu_ms_per_round_trip"]["4KiB"]["aes128-ocb3"] > 0
    assert result["encryption_cpu_ratio_spread"]["4KiB"]["pairs"] >= 3
    assert result["aead_gb_s"]["aes256gcm"] > 0 and result["aead_gb_s"]["chacha20poly1305"] > 0
    # every suite on its own connection; the headline figure is the default suite's
    assert result["cipher"] == "aes128-ocb3"
    by_cipher = result["encryption_overhead_by_cipher"]
    assert set(by_cipher) == {"aes128-ocb3", "aes256-gcm"}
    assert by_cipher["aes128-ocb3"]["4KiB"] == result["encryption_overhead"]["4KiB"]
    assert by_cipher["aes256-gcm"]["4KiB"] > 0
    assert result["aead_gil"]["seal_ms_alone"] > 0


@pytest.mark.timeout(90)
def test_encryption_overhead_on_a_shaped_link_pairs_plain_encrypted_and_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Execute: one short link; 2 MiB is over one chunk, so it is also sealed whole; blocks of
    # one round trip each (the shape of the figures is under test, not their precision)
    monkeypatch.setattr(crypto_wan, "per_block", lambda *args: 1)
    sizes = {"8KiB": 8 * 1024, "2MiB": 2 * 1024 * 1024}
    result = crypto_wan.run(quick=True, sizes=sizes, links={"2ms_1Gbit": (0.002, 1e9)})

    # Assert: each ratio with its spread, for every size; chunked vs whole only above a chunk
    spread = result["encryption_overhead_wan_spread"]["2ms_1Gbit"]
    assert set(spread) == set(sizes)
    for size, ratio in result["encryption_overhead_wan"]["2ms_1Gbit"].items():
        assert ratio == spread[size]["median"] > 0
        assert spread[size]["q1"] <= ratio <= spread[size]["q3"] and spread[size]["pairs"] >= 4
    chunked = result["chunked_vs_whole_wan_spread"]["2ms_1Gbit"]
    assert set(chunked) == {"2MiB"} and chunked["2MiB"]["pairs"] >= 4
    assert set(result["whole_overhead_wan"]["2ms_1Gbit"]) == {"2MiB"}
    # the round trips went through the shaper: none is shorter than its delay
    rtt = result["wan_rtt_ms"]["2ms_1Gbit"]
    assert set(rtt["2MiB"]) == {"plain", "encrypted", "whole"}
    assert min(ms for modes in rtt.values() for ms in modes.values()) >= 2.0
    assert result["wan_links"]["2ms_1Gbit"]["rate_mbit_s"] == 1000.0


@pytest.mark.timeout(120)
def test_rpc_baseline_runs_blocks_on_request_and_its_processes_stop() -> None:
    # Setup
    blocks = RpcBlocks("digits_cnn")
    peer = blocks.peer
    assert peer is not None
    try:
        # Execute: two blocks, as bench.overhead interleaves them with its own
        first = peer.steps(2)
        blocks.steps(3, record=True)
    finally:
        blocks.close()

    # Assert: step times, and the CPU time of both RPC processes per step
    assert len(first) == 2 and all(seconds > 0 for seconds in first)
    assert len(blocks.samples) == 1 and blocks.samples[0] > 0 and blocks.cpu[0] > 0
    result = blocks.result([0.01], [0.004])
    assert result["rpc_cpu_ratio_spread"]["pairs"] == 1 and result["rpc_cpu_ms_per_step"] > 0
    assert not any(party.is_alive() for party in peer.parties)


def _wait(inbox: Any) -> None:
    inbox.get(timeout=60)


def test_pinned_blocks_put_each_party_on_its_own_core_and_free_ones_give_all_back() -> None:
    # Prepare: a stand-in for the server worker
    every = os.sched_getaffinity(0)
    if party_cores() is None:
        pytest.skip("needs two cores")
    inbox = CTX.Queue()
    server = CTX.Process(target=_wait, args=(inbox,), daemon=True)
    server.start()
    assert server.pid is not None
    placement = Placement(server.pid)
    assert placement.cores is not None
    client_core, server_core = placement.cores
    try:
        # Execute
        placement.pin()
        pinned = os.sched_getaffinity(0), os.sched_getaffinity(server.pid)
        placement.free()
        freed = os.sched_getaffinity(0), os.sched_getaffinity(server.pid)
    finally:
        placement.free()
        inbox.put(None)
        server.join(30)

    # Assert: every thread of both processes moves (zmq's I/O thread with this one's)
    assert client_core != server_core
    assert pinned == ({client_core}, {server_core})
    assert freed == (every, every)


def test_paired_ratio_is_the_median_of_pair_ratios_with_its_quartiles() -> None:
    # Prepare: the third pair was hit by a burst of load on one side only
    a, b = [2.0, 4.0, 30.0, 6.0, 8.0], [1.0, 2.0, 3.0, 3.0, 4.0]

    # Execute
    spread = paired(a, b)

    # Assert: pair ratios 2, 2, 10, 2, 2 -> the burst moves the quartiles, not the median
    assert spread["median"] == 2.0 and spread["pairs"] == 5
    assert spread["q1"] == 2.0 and spread["q3"] == 2.0 and spread["iqr"] == 0.0
    with pytest.raises(ValueError, match="matched"):
        paired([1.0], [])


def test_machine_load_names_the_load_averages_and_cores() -> None:
    # Execute
    load = machine_load()

    # Assert
    assert len(load["loadavg"]) == 3 and all(value >= 0 for value in load["loadavg"])
    assert load["cpus"] >= 1


@contextlib.asynccontextmanager
async def _behind_the_shaper(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    link: shaper.LinkSettings,
) -> AsyncIterator[int]:
    """A loopback server running ``handler`` behind the shaper's proxy thread; yields the
    proxy's port, and stops the proxy and the server afterwards."""
    target = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = target.sockets[0].getsockname()[1]
    ready, stop = CTX.Queue(), CTX.Event()
    proxy_port = free_port()
    proxy = threading.Thread(
        target=shaper.serve, args=(proxy_port, f"127.0.0.1:{port}", link, ready, stop)
    )
    proxy.start()
    try:
        await asyncio.wait_for(asyncio.to_thread(ready.get, timeout=10), 15)
        yield proxy_port
    finally:
        stop.set()
        await asyncio.to_thread(proxy.join, 5)
        target.close()


@pytest.mark.timeout(30)
async def test_shaper_adds_the_round_trip_and_limits_the_rate() -> None:
    # Prepare: an echo server behind the shaper, 60 ms round trip, 8 Mbit/s
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    link = shaper.LinkSettings()
    link.set(0.060, 8e6)
    async with _behind_the_shaper(echo, link) as proxy_port:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port)

        # Execute: one byte there and back, then 100 kB there and back
        start = time.monotonic()
        writer.write(b"x")
        await asyncio.wait_for(reader.readexactly(1), 10)
        small_s = time.monotonic() - start
        start = time.monotonic()
        writer.write(bytes(100_000))
        await asyncio.wait_for(reader.readexactly(100_000), 10)
        large_s = time.monotonic() - start
        writer.close()

    # Assert: the round trip is added; 100 kB at 8 Mbit/s takes 0.1 s on the link
    assert 0.060 <= small_s < 1.0
    assert large_s >= 0.060 + 0.1
    assert link.carried() == (100_001, 100_001)


def test_wan_ratios_pair_each_round_with_its_own_compute_bound() -> None:
    out = Rounds()
    rates = {1: [10.0, 12.0], 2: [20.0, 22.0], 4: [40.0, 40.0], 8: [60.0, 60.0], 16: [60.0, 90.0]}
    out.steps_s["40ms"] = {**{d: list(r) for d, r in rates.items()}, 0: [30.0, 30.0]}
    out.latency_s["40ms"] = {d: [0.05, 0.05] for d in rates}
    out.compute["40ms"] = [70.0, 100.0]  # the second round ran on a quieter machine
    out.per_step = [(1000.0, 1000.0)]
    summary = summarise(out)["wan"]["by_rtt"]["40ms"]
    assert summary["compute_bound_steps_s"] == 85.0
    assert summary["pipelined_bound_steps_s"] == {1: 11.0, 2: 22.0, 4: 44.0, 8: 85.0, 16: 85.0}
    assert summary["bound_steps_s"][8] == 85.0 and summary["bound_steps_s"][1] == 25.0
    # 16: 60/70 and 90/100 in their own rounds, not 75/85 of the medians
    assert summary["of_bound"][16] == pytest.approx((60 / 70 + 90 / 100) / 2)
    # 85 steps/s x 50 ms + 1 = 5.25 in flight: depth 8
    assert summary["recommended_depth"] == 8
    assert summary["recommended_speedup_over_depth_1"] == pytest.approx((6.0 + 5.0) / 2)


def test_recommended_depth_covers_one_step_in_flight_plus_the_one_computed() -> None:
    assert recommended_depth(0.050, 20.0) == 2  # 1.0 + 1 steps in flight
    assert recommended_depth(0.025, 80.0) == 4  # 2.0 + 1
    assert recommended_depth(0.053, 150.0) == 16  # 7.95 + 1 is more than 8
    assert recommended_depth(0.050, 400.0) == 16  # the most there is
    assert recommended_depth(0.0, 1000.0) == 1  # no latency to hide


def test_fixed_costs_measures_every_piece_of_a_step(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a few calls per piece (the real tool takes 4,000)
    monkeypatch.setattr(fixed_costs, "CALLS", 20)
    monkeypatch.setattr(fixed_costs, "WARM", 2)
    # Execute
    costs = fixed_costs.main()
    # Assert: every piece took some time (the request machinery is a difference of two
    # medians, which a few noisy calls can tip either way), and the total is their sum
    pieces = {k: v for k, v in costs.items() if k != "total"}
    timed = [v for k, v in pieces.items() if k != "client: request machinery"]
    assert len(pieces) == 12 and all(v > 0 for v in timed)
    assert costs["total"] == pytest.approx(sum(pieces.values()), abs=0.5)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.timeout(60)
async def test_the_shaper_closes_the_sockets_of_each_finished_connection() -> None:
    # Prepare: a server that closes every connection at once, behind the shaper (in-process)
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.close()

    async with _behind_the_shaper(hang_up, shaper.LinkSettings()) as proxy_port:
        before = _open_fds()
        # Execute: ten connections through it, each ended by both sides
        for _ in range(10):
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
            writer.write(b"x")
            assert await asyncio.wait_for(reader.read(1), 10) == b""
            writer.close()
            await writer.wait_closed()
        # Assert: the proxy holds no socket of them (they stayed open until a garbage collection)
        deadline = time.monotonic() + 10
        while _open_fds() > before:
            assert time.monotonic() < deadline, f"{_open_fds() - before} descriptors left open"
            await asyncio.sleep(0.02)


def test_step_trace_orders_both_processes_stamps_into_pieces_of_a_step() -> None:
    # Prepare: two steps; the server's deferred update ends after the client's next start
    edges = [edge for a, b, _ in step_trace.PIECES for edge in (a, b)]
    order = list(dict.fromkeys(edges))  # the edges of one step, in order
    stamps: list[tuple[str, int]] = []
    for first in (0, 100_000):
        stamps += [(edge, first + 1000 * i) for i, edge in enumerate(order)]
    stamps += [("Srecv0", 4_000), ("Ssettle0", 10_000), ("Ssettle1", 14_000)]
    stamps += [("Srecv0", 104_000), ("Ssettle0", 110_000), ("Ssettle1", 116_000)]

    # Execute: in any order, as the two processes' lists arrive
    result = step_trace.timeline(list(reversed(stamps)))

    # Assert: every piece 1 us, the step the sum, the server's own spans per occurrence
    assert result["steps"] == 2
    assert set(result["pieces_us"].values()) == {1.0}
    assert result["step_us"] == len(step_trace.PIECES)
    assert result["settle_us"] == 5.0  # medians of 4 and 6 us
    assert result["idle_us"] == 1.0  # each Srecv0 to the Sread0 after it
    assert step_trace.timeline([])["steps"] == 0


def test_a_step_whose_reply_was_queued_before_the_client_looked_still_counts() -> None:
    # Prepare: the client's send returns after the server answered, so it never waits
    order = list(dict.fromkeys(edge for a, b, _ in step_trace.PIECES for edge in (a, b)))
    at = {edge: 1000 * i for i, edge in enumerate(order)}
    at["Csend1"] = at["Ssend1"] + 3000  # preempted by the I/O thread and the server
    del at["Cwait1"]
    at["Capply0"] = at["Csend1"] + 2000
    at["Capply1"], at["Cstep1"] = at["Capply0"] + 1000, at["Capply0"] + 2000

    # Execute
    result = step_trace.timeline(list(at.items()))

    # Assert: the step counts; the client got to the reply when its send returned
    assert result["steps"] == 1
    assert result["pieces_us"]["client: receive, open, decode, check"] == 2.0


@pytest.mark.timeout(120)
def test_step_trace_runs_the_real_step_in_both_processes() -> None:
    # Execute: a few traced steps of the real client and server worker
    result = step_trace.trace("digits_cnn", 8, pin=True)

    # Assert: every piece was seen (the wrapped methods still exist and run), in most steps:
    # a clean run has all 8 whole, but under load (a CI run at load 9) one step lacked an
    # edge, and a tool's timeline missing one of eight steps is not the product's failure
    assert 4 <= result["steps"] <= 8
    assert all(value is not None for value in result["pieces_us"].values())
    assert result["step_us"] > 0 and result["settle_us"] > 0
    assert result["pinned"] == (party_cores() is not None)


def test_the_bench_verb_passes_every_flag_on(monkeypatch: pytest.MonkeyPatch) -> None:
    # Arrange: catch the `python -m bench` command the console verb starts
    import subprocess

    from workers import cli

    started: list[list[str]] = []

    def fake_run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
        started.append(argv)
        return subprocess.CompletedProcess(argv, 0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    # Act
    argv = ["--quick", "--json", "--pin", "--only", "overhead", "--device", "cuda:1"]
    code = cli.main(["bench", *argv])
    # Assert
    assert code == 0
    assert started[0][1:] == ["-m", "bench", *argv]


def test_a_bench_server_is_handed_over_once_it_listens(tmp_path: Path) -> None:
    # a client started beside a server still importing torch timed its hello out once a run
    from bench.common import listening_worker, stop_process
    from bench.overhead import configs

    server_toml, client_map = configs(tmp_path, "digits_cnn")
    url = client_map["client"]["server"]
    server = listening_worker("server", server_toml, tmp_path / "server.log", url)
    try:
        host, port = url.removeprefix("tcp://").rsplit(":", 1)
        socket.create_connection((host, int(port)), timeout=5).close()  # at once, no retry
    finally:
        stop_process(server)
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nbogus = 1\n")
    with pytest.raises(RuntimeError, match=r"exited \(2\) before listening: .*bogus"):
        listening_worker("server", bad, tmp_path / "bad.log", url)
