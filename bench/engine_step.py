"""``python -m bench.engine_step``: a digits step's CPU without any messaging.

Prints CPU microseconds per step (``time.process_time``, one torch thread) of (a) the whole
digits CNN trained in one process, (b) the server's engine alone (its segment, the loss,
the backward and the optimizer step, fed ready-made messages in this process, no sockets),
with and without reply-first, (c) the client's segment alone (forward, backward from a
given cut gradient, optimizer step), and (d) the server's segment in a hand-written loop
(forward, loss, backward to the cut and the weights, step; no checks), plain and with
reply-first's two passes. (b) beyond (d) is the engine's own work (the checks on what
arrives and on the gradients, the reply); what a split step costs beyond (b) + (c) is
messaging: encoding, sealing, sockets, the event loop, the worker code around them.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from sl_pipeline.config import ServerConfig, load
from sl_pipeline.messages import Kind, Message
from sl_pipeline.models import cnn
from workers.server.engines import build_engine
from workers.tools.localdeploy import init_deployment

BATCH = 32


def cpu_us(step: Callable[[int], object], steps: int) -> float:
    for i in range(steps // 5):  # warm-up
        step(i)
    start = time.process_time()
    for i in range(steps):
        step(i)
    return (time.process_time() - start) / steps * 1e6


def server_segment(
    top: torch.nn.Module, y: torch.Tensor, reply_first: bool
) -> Callable[[int], None]:
    """The server's segment trained by hand: no checks, no messages. With ``reply_first``
    the cut gradient first and the weight gradients in a second pass, as the engine does."""
    optimizer = torch.optim.SGD(top.parameters(), lr=0.05, momentum=0.9)
    params = list(top.parameters())
    act = torch.randn(BATCH, 16, 4, 4).relu()

    def step(_: int) -> None:
        cut = act.detach().requires_grad_(True)
        loss = F.cross_entropy(top(cut), y)
        optimizer.zero_grad(set_to_none=True)
        if reply_first:
            torch.autograd.grad(loss, [cut], retain_graph=True)
            torch.autograd.backward(loss, inputs=params)
        else:
            loss.backward()
        optimizer.step()

    return step


def main(steps: int) -> dict[str, float]:
    torch.set_num_threads(1)
    model = cnn([1, 8, 8], 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(BATCH, 1, 8, 8), torch.randint(0, 10, (BATCH,))

    def whole(_: int) -> None:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    bottom, top = model[:3], cnn([1, 8, 8], 10)[3:]
    bottom_opt = torch.optim.SGD(bottom.parameters(), lr=0.05, momentum=0.9)
    cut_grad = torch.randn(BATCH, 16, 4, 4) * 1e-3

    def client(_: int) -> None:
        bottom_opt.zero_grad(set_to_none=True)
        bottom(x).backward(cut_grad)
        bottom_opt.step()

    result = {"whole_model": cpu_us(whole, steps), "client_segment": cpu_us(client, steps)}
    for reply_first in (False, True):
        label = "server_segment_reply_first" if reply_first else "server_segment"
        result[label] = cpu_us(server_segment(top, y, reply_first), steps)
    with tempfile.TemporaryDirectory(prefix="sl-bench-engine-") as tmp:
        files = init_deployment(Path(tmp) / "d", clients=1, dataset="digits")["files"]
        server = Path(files["server"])
        engine = build_engine("vanilla", load(ServerConfig, server, []), server.parent)
        act = torch.randn(BATCH, 16, 4, 4).relu()
        for reply_first in (False, True):

            def serve(i: int, defer: bool = reply_first) -> None:
                tensors = {"act": act, "labels": y}
                msg = Message(kind=Kind.FORWARD, client="client-1", step=i, tensors=tensors)
                engine.defer_updates = defer
                engine.handle(b"peer", msg)
                engine.settle()

            label = "server_engine_reply_first" if reply_first else "server_engine"
            result[label] = cpu_us(serve, steps)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.engine_step", description=__doc__)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    for name, value in main(args.steps).items():
        print(f"{name:28s} {value:8.0f} us CPU per step")
