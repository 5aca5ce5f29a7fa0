"""Activation noise against a server that rewinds its client (``checkpoint.every_steps > 1``,
workers/client/rollback.py): the client redoes the steps the server says it lost, through
the same weights on the same rows. With noise drawn afresh every release, each redo gave the
server another independent draw of those rows, and a malicious server, which can claim a loss
at will, averaged the noise away (K redos: variance / (K + 1)). The noise is now keyed by the
row's exact activation (privacy/randomness.py): a redo sends the same bytes. In-process server
and client over loopback; the server's kill is its checkpoints stopping, then its task
cancelled (as in tests/test_privacy_dpsgd_rewind.py)."""

from __future__ import annotations

from typing import Any

import torch

from workers.client.worker import ClientWorker

from .conftest import load_client
from .test_privacy_dpsgd_rewind import _lose_steps_after, rewound_run


async def test_a_rewound_client_sends_its_redone_steps_noise_unchanged(
    deployment,  # type: ignore[no-untyped-def]
    monkeypatch: Any,
) -> None:
    # Prepare: a server that loses its last steps after 11 (15 steps in the epoch)
    files = deployment(clients=1, dataset="breast_cancer", epochs=1)
    base = files["server"].parent
    frozen = _lose_steps_after(monkeypatch, 11)
    sets = ("privacy.noise.sigma=0.5", "privacy.noise.clip=1.0")
    client = ClientWorker(load_client(files["client-1"], *sets), base, progress=False)
    sent: dict[tuple[int, int], list[torch.Tensor]] = {}  # each try of a step: its release
    train_step, defense = client.runner.train_step, client.runner.defense
    apply = defense.apply
    current: list[tuple[int, int] | None] = [None]  # the step being trained, if any

    def released(act: torch.Tensor) -> torch.Tensor:
        out = apply(act)
        if current[0] is not None:  # a training step's, not an evaluation's
            sent.setdefault(current[0], []).append(out.detach().clone())
        return out

    async def recorded(step: int, x: Any, y: Any, ids: Any) -> float:
        current[0] = (client.epoch, step)
        try:
            return await train_step(step, x, y, ids)
        finally:
            current[0] = None

    defense.apply = released  # type: ignore[method-assign]
    client.runner.train_step = recorded  # type: ignore[method-assign]
    # Execute: the server is killed there and started again on its checkpoints
    summary, _ = await rewound_run(files, client, frozen, monkeypatch)
    # Assert: rewound once; every redone step released exactly what its first try did
    assert summary["rewinds"] == 1
    redone = [tries for tries in sent.values() if len(tries) > 1]
    assert redone
    assert all(torch.equal(first, again) for first, *rest in redone for again in rest)


def test_a_client_restarted_from_its_checkpoint_releases_a_row_as_before(
    deployment,  # type: ignore[no-untyped-def]
) -> None:
    # Prepare: a client with activation noise and label-free breast_cancer; one release
    files = deployment(clients=1, dataset="breast_cancer", epochs=1)
    base = files["server"].parent
    sets = ("privacy.noise.sigma=0.5", "privacy.noise.clip=1.0", "checkpoint.every_steps=1")

    def start() -> ClientWorker:
        return ClientWorker(load_client(files["client-1"], *sets), base, progress=False)

    first, unrestored = start(), start()  # the second: a client started without it
    row = torch.randn(4, 16)
    released = first.runner.defense.apply(row)
    first.ckpt.save(first._state(3), 3)
    # Execute: a restart from that checkpoint (a kill, e.g. with its relay)
    restarted = start()
    assert restarted.resumed_from == first.steps_done
    # Assert: the restarted client releases the same row bit for bit (a relay that lost the
    # step takes its recomputed request; an observer of both releases averages nothing); a
    # key drawn afresh would have released it with other noise
    assert torch.equal(restarted.runner.defense.apply(row), released)
    assert not torch.equal(unrestored.runner.defense.apply(row), released)
