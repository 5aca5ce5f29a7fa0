"""A DP-SGD client's empty Poisson batches: each is a step of noise alone, counted by the
accountant, as the analysis behind the epsilon it reports assumes. In-process server and
client over real loopback sockets."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from opacus.accountants import create_accountant

from sl_pipeline.messages import Kind
from workers.client.worker import ClientWorker
from workers.tools.inprocess import wait_until

from .conftest import load_client
from .test_run_lifecycle import NONE, _crash, _serving
from .test_topologies import record_inbound

SIGMA = 1.0
# An expected batch of 2 rows: about one batch in seven (e^-2) draws no row at all. At the
# default lr and momentum, noise of that scale at every step made 1 run in 10 diverge (a
# gradient beyond limits.max_abs_value ended the client); these tests count steps, not accuracy
DP = (
    f"privacy.dpsgd.noise_multiplier={SIGMA}",
    "train.batch_size=2",
    "train.lr=0.01",
    "train.momentum=0",
)


def _expected(files: dict[str, Path], epochs: int) -> tuple[int, float]:
    """Every batch the client draws, and the epsilon of that many steps."""
    client = ClientWorker(load_client(files["client-1"], *DP), files["server"].parent)
    private = client.runner.private.dp  # type: ignore[union-attr]
    draws = epochs * len(private.data_loader.batch_sampler)
    accountant = create_accountant(private.engine.accountant.mechanism())
    accountant.history = [(SIGMA, private.data_loader.sample_rate, draws)]
    return draws, accountant.get_epsilon(delta=private.delta)


async def test_every_batch_drawn_counts_the_empty_ones_too_once_across_a_crash(
    deployment,  # type: ignore[no-untyped-def]
) -> None:
    """Before, empty batches were skipped: the client reported the epsilon of its non-empty
    steps only (about 13 % fewer here, up to 37 % at an expected batch of one). A client
    killed mid-epoch and resumed from its checkpoint counts each batch once."""
    files = deployment(clients=1, dataset="breast_cancer", epochs=1)
    ckpt = (*DP, "checkpoint.dir=state/c1")
    draws, epsilon = _expected(files, epochs=1)
    async with _serving(files, "server.takeover_after_s=0.3"):
        await _crash(files, "client-1", 90, *ckpt)  # of about 200 non-empty batches
        client = ClientWorker(load_client(files["client-1"], *ckpt), files["server"].parent)
        client.progress = False
        summary = await client.run()
    history = client.runner.private.dp.engine.accountant.history  # type: ignore[union-attr]
    assert 0 < summary["resumed_from"] < summary["steps"] < draws  # some batches were empty
    assert sum(steps for _, _, steps in history) == draws
    assert summary["dpsgd_epsilon"] == round(epsilon, 4)


async def test_the_epsilon_gauge_is_the_accountants_at_every_scrape(
    deployment,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before, sl_privacy_epsilon{mechanism="dpsgd"} was set at epoch ends only: absent for
    the whole first epoch (a one-epoch run's whole training), and after a resume until that
    epoch ended, while the accountant had counted every step so far. Also: the server gets
    one FORWARD per non-empty batch, none for an empty one."""
    seen = record_inbound(monkeypatch)
    files = deployment(clients=1, dataset="breast_cancer", epochs=1)
    client = ClientWorker(load_client(files["client-1"], *DP), files["server"].parent)
    client.progress = False

    def gauge() -> float | None:
        labels = {"mechanism": "dpsgd"}
        return client.metrics.registry.get_sample_value("sl_privacy_epsilon", labels)

    async with _serving(files):
        task = asyncio.ensure_future(client.run())
        await wait_until(lambda: client.steps_done >= 20 or task.done())
        mid = (gauge(), client.runner.dp.epsilon())  # type: ignore[union-attr]
        summary = await asyncio.wait_for(task, 120)
    assert mid[1] > 0
    assert mid[0] == mid[1]
    assert gauge() == pytest.approx(summary["dpsgd_epsilon"], abs=1e-4)
    forwards = [m for m in seen if m.kind == Kind.FORWARD]  # a resend repeats a step
    assert len({(m.epoch, m.step) for m in forwards}) == summary["steps"]
    assert min(len(m.tensor("act")) for m in forwards) >= 1


async def test_every_batch_drawn_counts_once_across_ctrl_c_stops(
    deployment,  # type: ignore[no-untyped-def]
) -> None:
    """A client without [checkpoint] dir stopped twice by a signal (its stop state,
    workers/client/stopstate.py) and started again: every draw counted once (red team:
    held, kept as a regression test)."""
    files = deployment(clients=1, dataset="breast_cancer", epochs=1)
    sets = (*DP, NONE)
    draws, epsilon = _expected(files, epochs=1)
    async with _serving(files, "server.takeover_after_s=0.3"):
        for at in (60, 120):
            stopped = ClientWorker(load_client(files["client-1"], *sets), files["server"].parent)
            stopped.progress = False
            task = asyncio.ensure_future(stopped.run())
            # (or its end: a client that stopped on an error says so now, not in 30 s)
            await wait_until(lambda c=stopped, n=at, t=task: c.steps_done >= n or t.done())  # type: ignore[misc]
            stopped.stop.set()
            assert (await asyncio.wait_for(task, 60))["stopped_early"]
        client = ClientWorker(load_client(files["client-1"], *sets), files["server"].parent)
        client.progress = False
        summary = await asyncio.wait_for(client.run(), 120)
    history = client.runner.private.dp.engine.accountant.history  # type: ignore[union-attr]
    assert summary["resumed_from"] >= 120
    assert sum(steps for _, _, steps in history) == draws
    assert summary["dpsgd_epsilon"] == round(epsilon, 4)
