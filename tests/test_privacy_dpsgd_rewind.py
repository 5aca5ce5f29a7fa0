"""A DP-SGD client rewound by a server that lost steps (``checkpoint.every_steps > 1``,
workers/client/rollback.py): it redoes them, and its accountant counts the first ones and
the redone ones (both were released). Before, the redo stopped on Opacus' "Per sample
gradient is not initialized": the abandoned step's forward was still captured. In-process
server and client over loopback; the server's kill is its checkpoints stopping two steps
past its newest one, then its task cancelled."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from workers.client.worker import ClientWorker
from workers.server.worker import ServerWorker

from .conftest import load_client, load_server
from .test_runs import _serve

SERVER = ("checkpoint.every_steps=4", "server.takeover_after_s=0.3")


def _lose_steps_after(monkeypatch: pytest.MonkeyPatch, steps: int) -> asyncio.Event:
    """Set once the server applied ``steps`` and two more than its newest checkpoint; from
    then on it writes none (what a kill -9 there loses)."""
    frozen = asyncio.Event()
    after_replies = ServerWorker.after_replies

    def after(self: ServerWorker) -> None:
        after_replies(self)
        assert self.ckpt is not None
        saved = max((int(p.stem.rsplit("-", 1)[-1]) for p in self.ckpt.list()), default=0)
        if not frozen.is_set() and self.steps_applied >= steps and self.steps_applied - saved >= 2:
            self.ckpt.save = lambda *_a, **_k: None  # type: ignore[method-assign,assignment]
            frozen.set()

    monkeypatch.setattr(ServerWorker, "after_replies", after)
    return frozen


@pytest.mark.parametrize("fixed", [False, True], ids=["poisson", "fixed-batches"])
async def test_a_rewound_dpsgd_client_redoes_its_steps_and_counts_them_again(
    deployment,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
    fixed: bool,
) -> None:
    # Prepare: a server that loses its last steps after 11 (15 steps in the epoch)
    files = deployment(clients=1, dataset="breast_cancer", epochs=1)
    base = files["server"].parent
    sets = ["privacy.dpsgd.noise_multiplier=1.0"]
    if fixed:
        sets += ["privacy.dpsgd.poisson_sampling=false", "train.batch_size=35"]  # 13 batches
    frozen = _lose_steps_after(monkeypatch, 11)
    client = ClientWorker(load_client(files["client-1"], *sets), base, progress=False)
    taken: list[int] = []
    optimizer = client.runner.dp.optimizer  # type: ignore[union-attr]
    step_hook = optimizer.step_hook

    def counted(opt: Any) -> None:  # Poisson: Opacus counts each optimizer step
        taken.append(1)
        step_hook(opt)

    if step_hook is not None:
        optimizer.step_hook = counted
    stop, task = await _serve(ServerWorker(load_server(files["server"], *SERVER), base))
    training = asyncio.ensure_future(client.run())
    # Execute: the server is killed there and started again on its checkpoints
    await asyncio.wait_for(frozen.wait(), 60)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    monkeypatch.undo()
    stop, task = await _serve(ServerWorker(load_server(files["server"], *SERVER), base))
    try:
        summary = await asyncio.wait_for(training, 60)
    finally:
        stop.set()
        await task
    # Assert: rewound once, finished; the redone steps counted on top of the first ones
    history = client.runner.dp.engine.accountant.history  # type: ignore[union-attr]
    assert summary["rewinds"] == 1
    if fixed:
        assert history == [(1.0, 1.0, 2)]  # one pass, and one more for the redone batches
    else:
        assert sum(n for _, _, n in history) == len(taken) > summary["steps"]
