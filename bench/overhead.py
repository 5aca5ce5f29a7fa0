"""Split-training overhead: our encrypted two-process pipeline vs one plain torch loop.

(a) one process, no split: the whole model, the same optimizer and batches, a plain loop.
(b) the real server worker (``python -m workers server``) in its own process, and the real
:class:`ClientWorker` in this one, driven step by step through ``train_step`` (so start-up
and evaluation are not timed). Blocks of (a) and (b) steps run in pairs (the order
alternates); ``overhead_ratio`` is the median over pairs of (b)'s / (a)'s block median.
``overhead_cpu_ratio`` is the same pairing of CPU time per step: (b)'s client process plus
the server process (every thread, ZeroMQ's included) over (a)'s process, which waiting for
a core held by other work does not inflate.

With ``--device cuda`` (``SL_BENCH_DEVICE``) both sides train on the GPU: the one-process
loop, and the server and client workers (``train.device``); the RPC blocks are left out
(they run on the CPU only).

With ``--pin`` (``SL_BENCH_PIN=1``) and two cores or more, every round also runs a pair with
each party on its own core (this process, the client, on one; the server worker on another),
as on two hosts, the one-process loop then on the client's core alone: ``ratio_pinned`` /
``cpu_ratio_pinned``. The pinned and the free pairs alternate in each round, so both see the
same load. Off by default: on a machine that other work shares, a pinned party cannot leave
a busy core (see docs/performance.md, "fourth session").
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import zmq.asyncio

from sl_pipeline.config import ClientConfig, from_mapping
from sl_pipeline.data import batch_order
from sl_pipeline.messages import Kind, Message
from sl_pipeline.models import full_model, make_optimizer, resolve_device
from workers.client.microbatch import train_pipelined
from workers.client.worker import ClientWorker
from workers.runtime import eventloop

from .common import (
    cpu_seconds,
    endpoint,
    free_port,
    listening_worker,
    median,
    paired,
    party_cores,
    pin_process,
    stop_process,
    to_toml,
    write_keys,
)
from .models import BATCH, MODELS, TRAIN
from .rpc import RpcPeer

CIFAR_SAMPLES = 2048


def write_cifar_npz(path: Path, samples: int = CIFAR_SAMPLES) -> None:
    """Synthetic CIFAR-shaped data: 3x32x32 float32 images, 10 classes."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((samples, 3, 32, 32), dtype=np.float32)
    np.savez(path, x=x, y=rng.integers(0, 10, samples).astype(np.int64))


def bench_device() -> str:
    """Where the overhead section trains: ``bench --device`` (cpu by default)."""
    return os.environ.get("SL_BENCH_DEVICE", "cpu")


def configs(folder: Path, name: str) -> tuple[Path, dict[str, Any]]:
    """Write server.toml for ``name``; return it and the client's config mapping."""
    keys = write_keys(folder, ["bench-client"])
    train = TRAIN | {"device": bench_device()}
    url = endpoint(free_port())
    model = MODELS[name]
    data: dict[str, Any] = {"dataset": "digits"}
    if name == "cifar_cnn":
        write_cifar_npz(folder / "cifar.npz")
        data = {"path": "cifar.npz", "features": "x", "label": "y"}
    server = {
        "server": {"bind": url, "key": keys["server_key"], "admitted": keys["admitted"]},
        "model": model,
        "train": train,
        "ops": {"log_level": "WARNING"},
    }
    (folder / "server.toml").write_text(to_toml(server))
    client = {
        "client": {
            "server": url,
            "name": "bench-client",
            "key": "keys/bench-client.key",
            "server_key": keys["server_pub"],
            "retry_for_s": 60.0,
        },
        "data": data,
        "model": model,
        "train": train,
    }
    return folder / "server.toml", client


class PlainLoop:
    """(a): the whole model in this process, trained with a plain torch loop."""

    def __init__(self, cfg: ClientConfig) -> None:
        self.device = resolve_device(cfg.train.device)
        self.model = full_model(cfg.model).to(self.device)
        t = cfg.train
        params = list(self.model.parameters())
        self.optimizer = make_optimizer(params, t.optimizer, t.lr, t.momentum)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        x, y = x.to(self.device), y.to(self.device)  # as the split client does each step
        loss = F.cross_entropy(self.model(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())


async def train_step(client: ClientWorker, step: int, idx: torch.Tensor) -> float:
    """One real client step; follows the worker's API whether or not it has a step runner."""
    train = client.data.train
    assert train.y is not None  # the bench's data sets are labelled
    runner = getattr(client, "runner", None)
    if runner is not None:
        return float(await runner.train_step(step, train.x[idx], train.y[idx], train.ids[idx]))
    return float(await client.train_step(0, step, train.x[idx], train.y[idx]))  # type: ignore[attr-defined]


def _plan(quick: bool, name: str) -> tuple[int, int, int, float]:
    """(warm-up steps, blocks, steps per block, time budget in seconds) for one model.

    The budget stops the CIFAR-shaped model after about a dozen pairs. The digits CNN's
    3 ms steps take all their blocks: a round of them costs about 0.1 s, and 40 pairs
    left its median moving 10 % between runs (the pairs' interquartile range is a fifth
    of the ratio), so it takes three times as many, after a longer warm-up (the first
    steps of a fresh connection and optimizer are slower)."""
    if name == "digits_cnn":
        return (20, 120, 6, 25.0) if quick else (20, 200, 8, 50.0)
    return (3, 40, 6, 15.0) if quick else (5, 60, 8, 40.0)


class Placement:
    """Where the two parties run: free (the scheduler's choice, every core) or pinned (the
    client, this process, on one core; the server worker on another), switched per block."""

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid
        self.every = os.sched_getaffinity(0)
        self.cores = party_cores()

    def pin(self) -> None:
        assert self.cores is not None
        pin_process(os.getpid(), {self.cores[0]})
        pin_process(self.server_pid, {self.cores[1]})

    def free(self) -> None:
        pin_process(os.getpid(), self.every)
        pin_process(self.server_pid, self.every)


async def measure(
    cfg: ClientConfig, base: Path, quick: bool, name: str, server_pid: int
) -> dict[str, Any]:
    warmup, blocks, per_block, budget_s = _plan(quick, name)
    rpc = RpcBlocks(name, on_cpu=cfg.train.device == "cpu")
    client = ClientWorker(cfg, base, progress=False)
    plain = PlainLoop(cfg)
    train = client.data.train
    assert train.y is not None
    labels = train.y
    batches = batches_all = batch_order(len(train), BATCH, 0, 0)
    client.ctx = zmq.asyncio.Context()
    step = 0
    placement = Placement(server_pid)
    pin = os.environ.get("SL_BENCH_PIN") == "1" and placement.cores is not None
    modes = ["", "_pinned"] if pin else [""]
    sides = [f"{side}{mode}" for side in ("single_process", "split_encrypted") for mode in modes]
    times: dict[str, list[float]] = {k: [] for k in [*sides, "split_pipelined"]}  # block medians
    cpu: dict[str, list[float]] = {k: [] for k in sides}
    piped_cfg = replace(cfg, train=replace(cfg.train, pipeline_depth=2))

    async def pipelined_steps(n: int, record: bool) -> None:
        """The same steps with pipelining (depth 2): per-step time = block time / n."""
        nonlocal step
        first = step

        def batches():  # type: ignore[no-untyped-def]
            for s in range(first, first + n):
                idx = batches_all[s % len(batches_all)]
                yield s, train.x[idx], labels[idx], train.ids[idx]

        client.cfg = piped_cfg
        start = time.perf_counter()
        await train_pipelined(client, 0, batches(), lambda s, loss, t0: None)
        if record:
            times["split_pipelined"].append((time.perf_counter() - start) / n)
        client.cfg = cfg
        step += n

    async def split_steps(n: int, record: bool, mode: str = "") -> None:
        nonlocal step
        samples = []
        cpu_before = time.process_time() + cpu_seconds(server_pid)
        for _ in range(n):
            idx = batches[step % len(batches)]
            start = time.perf_counter()
            await train_step(client, step, idx)
            samples.append(time.perf_counter() - start)
            step += 1
        if record:
            times[f"split_encrypted{mode}"].append(median(samples))
            used = time.process_time() + cpu_seconds(server_pid) - cpu_before
            cpu[f"split_encrypted{mode}"].append(used / n)

    def plain_steps(n: int, record: bool, mode: str = "") -> None:
        samples = []
        cpu_before = time.process_time()
        for i in range(n):
            idx = batches[(step + i) % len(batches)]
            assert train.y is not None
            start = time.perf_counter()
            plain.step(train.x[idx], train.y[idx])
            samples.append(time.perf_counter() - start)
        if record:
            times[f"single_process{mode}"].append(median(samples))
            cpu[f"single_process{mode}"].append((time.process_time() - cpu_before) / n)

    async def pair(mode: str, plain_first: bool) -> None:
        """One block of each side, in the given order, free or pinned."""
        if mode:
            placement.pin()
        try:
            if plain_first:
                plain_steps(per_block, True, mode)
                await split_steps(per_block, True, mode)
            else:
                await split_steps(per_block, True, mode)
                plain_steps(per_block, True, mode)
        finally:
            if mode:
                placement.free()

    try:
        await client.connect()
        await split_steps(warmup, record=False)
        plain_steps(warmup, record=False)
        rpc.steps(warmup, record=False)
        deadline = time.monotonic() + budget_s
        await pipelined_steps(warmup, record=False)
        for i in range(blocks):  # one pair per mode per round; the orders alternate
            for mode in modes if i % 2 == 0 else modes[::-1]:
                await pair(mode, plain_first=i % 2 == 0)
            await pipelined_steps(per_block, record=True)
            rpc.steps(per_block, record=True)
            if i >= 3 and time.monotonic() > deadline:
                break
        assert client.conn is not None
        await client.conn.send(Message(kind=Kind.BYE, client=cfg.client.name))
    finally:
        rpc.close()
        if client.conn is not None:
            client.conn.close()
        client.ctx.term()
    step_ms = {k: median(v) * 1e3 for k, v in times.items()}
    ratio = paired(times["split_encrypted"], times["single_process"])
    piped = paired(times["split_pipelined"], times["single_process"])
    cpu_ratio = paired(cpu["split_encrypted"], cpu["single_process"])
    pinned: dict[str, Any] = {}
    if "_pinned" in modes:
        ratio_pinned = paired(times["split_encrypted_pinned"], times["single_process_pinned"])
        cpu_pinned = paired(cpu["split_encrypted_pinned"], cpu["single_process_pinned"])
        pinned = {
            "ratio_pinned": ratio_pinned["median"],
            "ratio_pinned_spread": ratio_pinned,
            "cpu_ratio_pinned": cpu_pinned["median"],
            "cpu_ratio_pinned_spread": cpu_pinned,
        }
    return {
        "cpu_ratio": cpu_ratio["median"],
        "cpu_ratio_spread": cpu_ratio,
        "cpu_ms_per_step": {k: median(v) * 1e3 for k, v in cpu.items()},
        "step_ms": step_ms | {"blocks": ratio["pairs"], "steps_per_block": per_block},
        "ratio": ratio["median"],
        "ratio_spread": ratio,
        "ratio_pipelined": piped["median"],
        "ratio_pipelined_spread": piped,
        **pinned,
        **rpc.result(times["split_encrypted"], cpu["split_encrypted"]),
    }


class RpcBlocks:
    """Blocks of the same split step over ``torch.distributed.rpc`` (see ``bench.rpc``),
    run between our blocks so that ``rpc_ratio`` compares the two under the same load.
    If RPC cannot run here, the reason is kept and the other figures still come."""

    def __init__(self, name: str, on_cpu: bool = True) -> None:
        self.peer: RpcPeer | None = RpcPeer(name) if on_cpu else None
        self.samples: list[float] = []
        self.cpu: list[float] = []  # CPU seconds per step, both RPC processes
        self.error = "" if on_cpu else "not run: the RPC comparison runs on the CPU only"

    def steps(self, count: int, record: bool) -> None:
        if self.peer is None:
            return
        pids = [p.pid for p in self.peer.parties if p.pid is not None]
        before = sum(cpu_seconds(pid) for pid in pids)
        try:
            samples = self.peer.steps(count)
        except RuntimeError as exc:
            self.error = str(exc)
            self.close()
            return
        if record:
            self.samples.append(median(samples))
            self.cpu.append((sum(cpu_seconds(pid) for pid in pids) - before) / count)

    def close(self) -> None:
        if self.peer is not None:
            self.peer.close()
            self.peer = None

    def result(self, ours: list[float], ours_cpu: list[float]) -> dict[str, Any]:
        """RPC's median step, and our step / RPC's step as the median of per-round ratios
        (wall time, and CPU time of both processes on each side)."""
        if self.error:
            return {"rpc_error": self.error}
        if not self.samples:
            return {}
        spread = paired(ours[: len(self.samples)], self.samples)
        cpu = paired(ours_cpu[: len(self.cpu)], self.cpu)
        return {
            "rpc_step_ms": median(self.samples) * 1e3,
            "rpc_ratio_spread": spread,
            "rpc_cpu_ms_per_step": median(self.cpu) * 1e3,
            "rpc_cpu_ratio_spread": cpu,
        }


def run_model(name: str, quick: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="sl-bench-") as tmp:
        folder = Path(tmp)
        server_toml, client_map = configs(folder, name)
        url = client_map["client"]["server"]
        server = listening_worker("server", server_toml, folder / "server.log", url)
        try:
            cfg = from_mapping(ClientConfig, client_map)
            return eventloop.run(measure(cfg, folder, quick, name, server.pid))
        except Exception as exc:
            stop_process(server)
            tail = (folder / "server.log").read_text(errors="replace")[-1500:]
            status = server.returncode
            raise RuntimeError(f"{name}: {exc}; server exit {status}, log: {tail}") from exc
        finally:
            stop_process(server)


def run(quick: bool = False) -> dict[str, Any]:
    per_model = {name: run_model(name, quick) for name in MODELS}
    return {
        "overhead": per_model,
        "overhead_ratio": {name: r["ratio"] for name, r in per_model.items()},
        "overhead_ratio_pipelined": {name: r["ratio_pipelined"] for name, r in per_model.items()},
        "overhead_ratio_spread": {name: r["ratio_spread"] for name, r in per_model.items()},
        "overhead_cpu_ratio": {name: r["cpu_ratio"] for name, r in per_model.items()},
        # Each party on its own core, as on two hosts (None without --pin or with one core).
        "overhead_ratio_pinned": {n: r.get("ratio_pinned") for n, r in per_model.items()},
        "overhead_cpu_ratio_pinned": {n: r.get("cpu_ratio_pinned") for n, r in per_model.items()},
        "batch_size": BATCH,
        "overhead_device": bench_device(),
    }
