"""The same split training step written with ``torch.distributed.rpc`` (TensorPipe).

Two spawned processes on 127.0.0.1, unencrypted: the client runs its segment, calls
``rpc_sync`` to the server, which runs its segment, the loss and backward and returns the
gradient at the cut; the client finishes backward and steps. Same models, cuts, optimizer
and batch size as ``bench.overhead``. ``rpc_ratio`` = our step time / RPC step time.
"""

from __future__ import annotations

import os
import queue
import time
import warnings
from multiprocessing.queues import Queue
from typing import Any

import torch
import torch.nn.functional as F

from sl_pipeline.config import ModelConfig, from_mapping
from sl_pipeline.models import build_segments, make_optimizer

from .common import CTX, LOOPBACK, free_port, median, start_child, stop_child
from .overhead import BATCH, MODELS, TRAIN

RESULT_TIMEOUT_S = 180.0
_server: dict[str, Any] = {}  # the server process's segment and optimizer


def _segments(name: str) -> tuple[torch.nn.Module, torch.nn.Module, list[int]]:
    cfg = from_mapping(ModelConfig, MODELS[name])
    bottom, top = build_segments(cfg, "vanilla")
    return bottom, top, list(cfg.in_shape)


def _optimizer(module: torch.nn.Module) -> torch.optim.Optimizer:
    return make_optimizer(list(module.parameters()), "sgd", TRAIN["lr"], TRAIN["momentum"])


def server_step(act: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Runs in the server process: its segment, the loss, backward; returns d loss / d act."""
    top, optimizer = _server["top"], _server["optimizer"]
    act = act.detach().requires_grad_(True)
    loss = F.cross_entropy(top(act), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    assert act.grad is not None
    return act.grad


def _client_loop(name: str, steps: tuple[int, int]) -> list[float]:
    from torch.distributed import rpc

    bottom, _, in_shape = _segments(name)
    optimizer = _optimizer(bottom)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((BATCH, *in_shape), generator=gen)
    y = torch.randint(0, 10, (BATCH,), generator=gen)
    warmup, timed = steps
    samples = []
    for i in range(warmup + timed):
        start = time.perf_counter()
        act = bottom(x)
        grad = rpc.rpc_sync("server", server_step, args=(act.detach(), y))
        optimizer.zero_grad(set_to_none=True)
        act.backward(grad)
        optimizer.step()
        if i >= warmup:
            samples.append(time.perf_counter() - start)
    return samples


def rpc_party(rank: int, port: int, name: str, steps: tuple[int, int], out: Queue) -> None:
    """One RPC party (0 = client, 1 = server); the client puts its step times on ``out``."""
    os.environ.update(
        MASTER_ADDR=LOOPBACK, MASTER_PORT=str(port), TP_SOCKET_IFNAME="lo", GLOO_SOCKET_IFNAME="lo"
    )
    warnings.filterwarnings("ignore", category=UserWarning, module="torch.distributed")
    try:
        from torch.distributed import rpc

        options = rpc.TensorPipeRpcBackendOptions(
            init_method=f"tcp://{LOOPBACK}:{port}", rpc_timeout=60, num_worker_threads=4
        )
        if rank == 1:
            _, top, _ = _segments(name)
            _server.update(top=top, optimizer=_optimizer(top))
        rpc.init_rpc(
            "client" if rank == 0 else "server",
            rank=rank,
            world_size=2,
            rpc_backend_options=options,
        )
        if rank == 0:
            out.put(("ok", _client_loop(name, steps)))
        rpc.shutdown()
    except Exception as exc:  # reported, not raised: the parent prints why RPC cannot run
        out.put(("error", f"{type(exc).__name__}: {exc}"))


def run_model(name: str, quick: bool) -> dict[str, Any]:
    steps = (3, 15) if quick else (5, 80)
    port, out = free_port(), CTX.Queue()
    parties = [start_child(rpc_party, rank, port, name, steps, out) for rank in (0, 1)]
    try:
        status, value = out.get(timeout=RESULT_TIMEOUT_S)
    except queue.Empty:
        status, value = "error", f"no result within {RESULT_TIMEOUT_S:.0f}s"
    finally:
        for party in parties:
            stop_child(party, timeout_s=15)
    if status != "ok":
        return {"error": f"TensorPipe RPC could not run here: {value}"}
    return {"step_ms": median(value) * 1e3, "steps": len(value)}


def run(quick: bool = False, ours_step_ms: dict[str, float] | None = None) -> dict[str, Any]:
    """RPC step times per model; ``rpc_ratio`` where our step time (bench.overhead) is given."""
    per_model = {name: run_model(name, quick) for name in MODELS}
    ratio: dict[str, Any] = {}
    for name, result in per_model.items():
        if "error" in result:
            ratio[name] = result["error"]
        elif ours_step_ms and name in ours_step_ms:
            ratio[name] = ours_step_ms[name] / result["step_ms"]
    return {"rpc": per_model, "rpc_ratio": ratio or None}
