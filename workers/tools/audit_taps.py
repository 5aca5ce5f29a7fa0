"""The audit's taps on a deployment trained in one process: seeded noise sources, and
records of what each party released, was told and sent, on these worker instances only
(the classes are untouched)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch

from sl_pipeline.messages import Kind
from sl_pipeline.tensors import read_tensor
from workers.client.worker import ClientWorker
from workers.server.worker import ServerWorker
from workers.tools.audit_measures import Grads, Outputs


def seed_workers(server: ServerWorker, clients: Sequence[ClientWorker], seed: int) -> None:
    """Give every noise source its own seeded generator: several workers share this process,
    and the order in which they draw from the global RNG depends on socket timing."""
    for index, client in enumerate(clients, start=1):
        runner: Any = client.runner
        defense = runner.defense
        for part in getattr(defense, "defenses", (defense,)):
            if hasattr(part, "generator"):
                part.generator = torch.Generator().manual_seed(seed * 1000 + index)
        if hasattr(runner.label_protection, "generator"):  # u-shaped: the client's own
            runner.label_protection.generator = torch.Generator().manual_seed(
                seed * 1000 + 300 + index
            )
        if runner.dp is not None:  # Opacus' noise and Poisson sampler
            runner.dp.optimizer.generator = torch.Generator().manual_seed(seed * 1000 + 100 + index)
            sampler: Any = getattr(runner.dp.data_loader, "batch_sampler", None)
            if hasattr(sampler, "generator"):
                sampler.generator = torch.Generator().manual_seed(seed * 1000 + 200 + index)
    if hasattr(server.engine, "label_generator"):  # vertical: each party's protection
        server.engine.label_generator = torch.Generator().manual_seed(seed * 1000)


def count_releases(client: ClientWorker, outputs: Outputs) -> Counter[int]:
    """Count, per sample id, every activation this client puts on the wire: training forwards
    (``forward_message``) and evaluation passes (``_infer``), on this instance only. A party
    without labels also keeps the outputs it receives at evaluation in ``outputs``."""
    released: Counter[int] = Counter()
    unlabelled = client.data.train.y is None
    runner: Any = client.runner
    forward, infer = runner.forward_message, runner._infer

    def forward_message(step: int, sent: Any, y: Any, ids: torch.Tensor) -> Any:
        released.update(int(i) for i in ids.reshape(-1))
        return forward(step, sent, y, ids)

    async def _infer(x: torch.Tensor, step: int, ids: Any, kind: Any) -> Any:
        if ids is not None:
            released.update(int(i) for i in ids.reshape(-1))
        out, reply = await infer(x, step, ids, kind)
        if unlabelled and ids is not None and kind is Kind.EVALUATE:
            outputs.setdefault(client.cfg.client.name, []).append((ids.clone(), out.clone()))
        return out, reply

    runner.forward_message, runner._infer = forward_message, _infer
    return released


def record_received_meta(client: ClientWorker, received: dict[str, set[str]]) -> None:
    """Keep the names of the figures a party without labels is told beside its tensors
    (such as a loss or a count of correct answers): each is a function of the labels."""
    if client.data.train.y is not None:
        return
    request, seen = client.request, received.setdefault(client.cfg.client.name, set())

    async def send(message: Any, timeout_s: float | None = None) -> Any:
        reply = await request(message, timeout_s)
        seen.update(f"{reply.kind.value}.{key}" for key in reply.meta)
        return reply

    client.request = send  # type: ignore[method-assign]


def record_sent_label_grads(client: ClientWorker, grads: Grads, outputs: Grads) -> None:
    """A client that protects labels (u-shaped) sends the server the gradient of the server's
    output: keep each one, with the ids of the batch whose forward went before it; and keep
    the server's output of each training step (what the server computed from the client's
    release: its own representation of the batch, which no label protection touches)."""
    runner: Any = client.runner
    if not runner.protects_labels:
        return
    forward, request = runner.forward_message, client.request
    last: dict[str, torch.Tensor] = {}
    name = client.cfg.client.name

    def forward_message(step: int, sent: Any, y: Any, ids: torch.Tensor) -> Any:
        last["ids"] = ids
        return forward(step, sent, y, ids)

    async def send(message: Any, timeout_s: float | None = None) -> Any:
        if message.kind is Kind.BACKWARD and "grad" in message.tensors and "ids" in last:
            grad = read_tensor(message, "grad").detach().clone()
            grads.setdefault(name, []).append((message.epoch, last["ids"].clone(), grad))
        reply = await request(message, timeout_s)
        if message.kind is Kind.FORWARD and "ids" in last and "out" in reply.tensors:
            out = read_tensor(reply, "out").detach().clone()
            outputs.setdefault(name, []).append((message.epoch, last["ids"].clone(), out))
        return reply

    runner.forward_message = forward_message
    client.request = send  # type: ignore[method-assign]


def record_label_grads(server: ServerWorker) -> Grads:
    """Wrap the vertical engine's step (on this instance only) to keep, for every training
    step of every epoch, the gradient each feature party was sent, with the batch's ids."""
    grads: Grads = {}
    engine: Any = server.engine  # a VerticalEngine when it has _step and last_grads
    original: Callable[..., Any] | None = getattr(engine, "_step", None)
    if original is None or not hasattr(engine, "last_grads") or engine.label_holder:
        return grads

    def step(parts: list[Any], ids: torch.Tensor) -> Any:
        replies = original(parts, ids)
        for part in parts:
            sent = engine.last_grads[part.msg.client]
            grads.setdefault(part.msg.client, []).append(
                (part.msg.epoch, ids.clone(), sent.clone())
            )
        return replies

    engine._step = step  # this instance only; the class is untouched
    return grads
