"""``python -m bench.fixed_costs``: the fixed per-message costs of a digits step, hot.

Each line is the median time (microseconds, one thread, 4,000 calls after 400 warm-up
calls) of one piece of work that every split step pays besides the two segments' compute
and the sockets: building, encoding, sealing, opening and decoding the two messages of a
step (a 32x16x4x4 float32 activation with 32 labels, and its gradient back), the checks a
received tensor passes, the server's per-step metrics and the client's request machinery
(``Upstream.request`` around a peer that answers after one event-loop turn, that turn
subtracted). Hot loops: the same work inside a real step runs slower (cold caches, other
processes), so compare these lines between builds, not with a step's wall time.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sl_pipeline.config import ClientConfig, load
from sl_pipeline.messages import Kind, Message, check_answers
from sl_pipeline.session import Session
from sl_pipeline.tensors import all_finite, read_tensor, wire_tensors
from sl_pipeline.transport import Channel
from workers.client.link import Upstream, make_handshake
from workers.ops.metrics import WorkerMetrics
from workers.runtime import eventloop
from workers.server.engines.base import check_labels
from workers.tools.localdeploy import init_deployment

CALLS, WARM = 4000, 400


def median_us(call: Callable[[], object]) -> float:
    for _ in range(WARM):
        call()
    samples = []
    for _ in range(CALLS):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return sorted(samples)[CALLS // 2] * 1e6


def channels() -> tuple[Channel, Channel]:
    k1, k2 = os.urandom(32), os.urandom(32)
    client = Session(send_key=k1, recv_key=k2, remote_static=b"s", handshake_hash=b"h")
    server = Session(send_key=k2, recv_key=k1, remote_static=b"c", handshake_hash=b"h")
    return Channel(client), Channel(server)


def message_costs() -> dict[str, float]:
    client, server = channels()
    act, grad = torch.randn(32, 16, 4, 4).relu(), torch.randn(32, 16, 4, 4) * 1e-3
    labels = torch.randint(0, 10, (32,))

    def forward() -> Message:
        tensors = {**wire_tensors("act", act, "float32"), "labels": labels}
        return Message(kind=Kind.FORWARD, client="client-1", step=5, tensors=tensors)

    sent = forward()

    def opened(sender: Channel, receiver: Channel, msg: Message) -> Callable[[], Message]:
        frames = [bytes(f) for f in sender.pack(msg)]
        counter = sender.session._send_counter - 1  # the counter it was sealed under

        def again() -> Message:
            receiver.session._recv_counter = counter  # the same sealed message, reopened
            return receiver.feed(frames)  # type: ignore[return-value]

        return again

    received = opened(client, server, sent)()
    reply = received.reply(Kind.BACKWARD, meta={"loss": 2.3}, tensors={"grad": grad})
    answer = opened(server, client, reply)()
    return {
        "client: build the forward message": median_us(forward),
        "client: encode + seal it": median_us(lambda: list(client.parts(sent))),
        "server: open + decode it": median_us(opened(client, server, sent)),
        "server: spoken_by (same name)": median_us(lambda: received.spoken_by("client-1")),
        "server: read_tensor(act) with every limit": median_us(
            lambda: read_tensor(received, "act", 256, 1e6, (16, 4, 4))
        ),
        "server: check_labels": median_us(lambda: check_labels(labels, 32, 10)),
        "server: cut gradient finite check": median_us(lambda: all_finite([grad])),
        "server: build + encode + seal the reply": median_us(
            lambda: list(server.parts(received.reply(Kind.BACKWARD, tensors={"grad": grad})))
        ),
        "client: open + decode the reply": median_us(opened(server, client, reply)),
        "client: check_answers + read_tensor(grad)": median_us(
            lambda: (check_answers(sent, answer), read_tensor(answer, "grad"))
        ),
    }


def metrics_cost() -> float:
    m = WorkerMetrics("server")
    assert m.clients is not None
    clients = m.clients

    def step() -> None:
        m.record_run("run-1", 5, True, 2.3, None)
        clients.stepped("client-1", 5, 0)
        m.record_step(5)
        m.server_compute_seconds.observe(0.001)
        m.queue_depth.set(0)
        m.epoch.set(1)
        m.train_loss.set(2.3)
        m.record_message("received", "forward", 33_000)
        m.record_message("sent", "backward", 33_000)

    return median_us(step)


class _Instant:
    """A peer that answers every request after one event-loop turn."""

    def __init__(self) -> None:
        self.replies: list[Message] = []

    async def send(self, msg: Message) -> None:
        self.replies.append(msg.reply(Kind.BACKWARD, meta={"loss": 0.5}))

    async def recv(self, timeout_s: float) -> Message:
        await asyncio.sleep(0)
        return self.replies.pop(0)


async def _async_median_us(call: Callable[[], Any]) -> float:
    for _ in range(WARM):
        await call()
    samples = []
    for _ in range(CALLS):
        start = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - start)
    return sorted(samples)[CALLS // 2] * 1e6


async def request_cost(folder: Path) -> float:
    files = init_deployment(folder / "d", clients=1, dataset="digits")["files"]
    cfg = load(ClientConfig, Path(files["client-1"]))
    handshake = make_handshake(cfg, Path(files["client-1"]).parent, "vanilla")
    link = Upstream(cfg, WorkerMetrics("client"), handshake)
    link.conn = _Instant()  # type: ignore[assignment]
    msg = Message(kind=Kind.FORWARD, client="client-1", step=3)

    async def rejoin() -> None:
        raise AssertionError("the instant peer never drops")

    whole = await _async_median_us(lambda: link.request(msg, rejoin))
    return whole - await _async_median_us(lambda: asyncio.sleep(0))


def main() -> dict[str, float]:
    torch.set_num_threads(1)
    costs = message_costs()
    costs["server: per-step metrics"] = metrics_cost()
    with tempfile.TemporaryDirectory(prefix="sl-bench-fixed-") as tmp:
        costs["client: request machinery"] = eventloop.run(request_cost(Path(tmp)))
    costs["total"] = sum(costs.values())
    return {k: round(v, 1) for k, v in costs.items()}


if __name__ == "__main__":
    result = main()
    for name, value in result.items():
        print(f"{name:44s} {value:8.1f} us")
    print(json.dumps(result | {"load_1min": os.getloadavg()[0]}))
