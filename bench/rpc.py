"""The same split training step written with ``torch.distributed.rpc`` (TensorPipe).

Two spawned processes on 127.0.0.1, unencrypted: the client runs its segment, calls
``rpc_sync`` to the server, which runs its segment, the loss and backward and returns the
gradient at the cut; the client finishes backward and steps. Same models, cuts, optimizer
and batch size as ``bench.overhead``, which runs blocks of these steps between its own
blocks, so that ``rpc_ratio`` = our step time / RPC step time compares the two under the
same machine load.
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
from .models import BATCH, MODELS, TRAIN

RESULT_TIMEOUT_S = 180.0
IDLE_TIMEOUT_S = 900.0  # a client party whose parent vanished exits after this
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


def _client_loop(name: str, inbox: Queue, out: Queue) -> None:
    """Run blocks of steps on request: ``n`` from ``inbox`` -> step times on ``out``;
    ``None`` ends the loop. Between blocks the parties sit idle, so the split pipeline can
    run its own blocks in between on the same, otherwise quiet, cores."""
    from torch.distributed import rpc

    bottom, _, in_shape = _segments(name)
    optimizer = _optimizer(bottom)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((BATCH, *in_shape), generator=gen)
    y = torch.randint(0, 10, (BATCH,), generator=gen)
    while (count := inbox.get(timeout=IDLE_TIMEOUT_S)) is not None:
        samples = []
        for _ in range(count):
            start = time.perf_counter()
            act = bottom(x)
            grad = rpc.rpc_sync("server", server_step, args=(act.detach(), y))
            optimizer.zero_grad(set_to_none=True)
            act.backward(grad)
            optimizer.step()
            samples.append(time.perf_counter() - start)
        out.put(("ok", samples))


def rpc_party(rank: int, port: int, name: str, tcp: bool, inbox: Queue, out: Queue) -> None:
    """One RPC party (0 = client, 1 = server); the client answers requests for blocks.

    ``tcp``: TensorPipe's TCP transport and basic channel only, what two machines use (and
    idle without spinning). Otherwise TensorPipe picks its same-host shared-memory
    transport, whose reactor busy-polls a core per process even between calls."""
    os.environ.update(
        MASTER_ADDR=LOOPBACK, MASTER_PORT=str(port), TP_SOCKET_IFNAME="lo", GLOO_SOCKET_IFNAME="lo"
    )
    warnings.filterwarnings("ignore", category=UserWarning, module="torch.distributed")
    try:
        from torch.distributed import rpc

        tcp_only: dict[str, Any] = {"_transports": ["uv"], "_channels": ["basic"]} if tcp else {}
        options = rpc.TensorPipeRpcBackendOptions(
            init_method=f"tcp://{LOOPBACK}:{port}",
            rpc_timeout=60,
            num_worker_threads=4,
            **tcp_only,
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
            _client_loop(name, inbox, out)
        rpc.shutdown()
    except Exception as exc:  # reported, not raised: the parent prints why RPC cannot run
        out.put(("error", f"{type(exc).__name__}: {exc}"))


class RpcPeer:
    """The two RPC parties for one model, kept alive so that blocks of RPC steps can be
    interleaved with other measurements (``bench.overhead`` does that)."""

    def __init__(self, name: str, tcp: bool = True) -> None:
        port = free_port()
        self.inbox, self.out = CTX.Queue(), CTX.Queue()
        self.parties = [
            start_child(rpc_party, rank, port, name, tcp, self.inbox, self.out) for rank in (0, 1)
        ]

    def steps(self, count: int) -> list[float]:
        """Seconds per step for ``count`` steps; RuntimeError saying why RPC cannot run."""
        self.inbox.put(count)
        try:
            status, value = self.out.get(timeout=RESULT_TIMEOUT_S)
        except queue.Empty:
            status, value = "error", f"no result within {RESULT_TIMEOUT_S:.0f}s"
        if status != "ok":
            raise RuntimeError(f"TensorPipe RPC could not run here: {value}")
        return list(value)

    def close(self) -> None:
        self.inbox.put(None)
        for party in self.parties:
            stop_child(party, timeout_s=15)


def run_model(name: str, quick: bool, tcp: bool = True) -> dict[str, Any]:
    """RPC alone: warm-up steps, then one timed block."""
    warmup, timed = (3, 15) if quick else (5, 80)
    peer = RpcPeer(name, tcp)
    try:
        peer.steps(warmup)
        samples = peer.steps(timed)
    except RuntimeError as exc:
        return {"error": str(exc)}
    finally:
        peer.close()
    return {"step_ms": median(samples) * 1e3, "steps": len(samples)}


def run(quick: bool = False, overhead: dict[str, Any] | None = None) -> dict[str, Any]:
    """RPC step times per model and ``rpc_ratio``.

    The ratio uses the RPC blocks ``bench.overhead`` ran between its own (TCP, same load).
    Without them (``--only rpc``) RPC runs alone and no ratio is given. Either way RPC also
    runs alone over its same-host shared-memory transport, for reference:
    ``rpc_ratio_same_host_shm`` compares our TCP step with that, measured at another time.
    """
    per_model: dict[str, Any] = {}
    ratio: dict[str, Any] = {}
    cpu_ratio: dict[str, Any] = {}
    shm_ratio: dict[str, Any] = {}
    for name in MODELS:
        measured = (overhead or {}).get(name, {})
        if "rpc_step_ms" in measured:
            per_model[name] = {"step_ms": measured["rpc_step_ms"], "interleaved": True}
            ratio[name] = measured["rpc_ratio_spread"]["median"]
            per_model[name]["ratio_spread"] = measured["rpc_ratio_spread"]
            cpu_ratio[name] = measured["rpc_cpu_ratio_spread"]["median"]
            per_model[name]["cpu_ms_per_step"] = measured["rpc_cpu_ms_per_step"]
            per_model[name]["cpu_ratio_spread"] = measured["rpc_cpu_ratio_spread"]
        elif "rpc_error" in measured:
            per_model[name] = {"error": measured["rpc_error"]}
            ratio[name] = measured["rpc_error"]
        else:
            per_model[name] = run_model(name, quick) | {"interleaved": False}
        shm = run_model(name, quick, tcp=False)
        per_model[name]["same_host_shm_step_ms"] = shm.get("step_ms", shm.get("error"))
        if "step_ms" in shm and "step_ms" in measured:
            shm_ratio[name] = measured["step_ms"]["split_encrypted"] / shm["step_ms"]
    return {
        "rpc": per_model,
        "rpc_ratio": ratio or None,
        "rpc_cpu_ratio": cpu_ratio or None,
        "rpc_ratio_same_host_shm": shm_ratio or None,
    }
