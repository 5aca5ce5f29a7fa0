"""Each defense changes what actually goes on the wire, seen at the transport's send/recv."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch.nn.utils import parameters_to_vector

from privacy.defenses import clip_per_sample
from sl_pipeline.messages import Kind, Message
from sl_pipeline.transport import DealerConnection
from workers.client.steps import StepRunner
from workers.tools.inprocess import run_deployment

Pair = tuple[torch.Tensor, torch.Tensor]


def spy_forward_acts(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """The ``act`` tensor of every FORWARD message any client sends."""
    sent: list[torch.Tensor] = []
    original = DealerConnection.send

    async def spy(self: DealerConnection, message: Message) -> int:
        if message.kind is Kind.FORWARD:
            sent.append(message.tensor("act").detach().clone())
        return await original(self, message)

    monkeypatch.setattr(DealerConnection, "send", spy)
    return sent


def spy_cut(monkeypatch: pytest.MonkeyPatch) -> list[Pair]:
    """(x, runner.bottom(x)) for every training batch, computed just before the defense."""
    seen: list[Pair] = []
    original = StepRunner.cut

    def spy(self: StepRunner, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            seen.append((x.clone(), self.bottom(x).detach().clone()))
        return original(self, x)

    monkeypatch.setattr(StepRunner, "cut", spy)
    return seen


def spy_received_grads(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[torch.Tensor]]:
    """The ``grad`` of every BACKWARD message each client receives, in order."""
    grads: dict[str, list[torch.Tensor]] = {}
    original = DealerConnection.recv

    async def spy(self: DealerConnection, timeout_s: float) -> Message:
        msg = await original(self, timeout_s)
        if msg.kind is Kind.BACKWARD:
            grads.setdefault(msg.client, []).append(msg.tensor("grad").detach().clone())
        return msg

    monkeypatch.setattr(DealerConnection, "recv", spy)
    return grads


@pytest.mark.parametrize("sigma", [0.0, 0.5])
async def test_activation_noise_changes_the_sent_activations(
    deployment: Any, monkeypatch: pytest.MonkeyPatch, sigma: float
) -> None:
    # Prepare
    clip = 1.0
    sent = spy_forward_acts(monkeypatch)
    cuts = spy_cut(monkeypatch)
    files = deployment(topology="vanilla", dataset="breast_cancer", epochs=1)
    # Execute
    await run_deployment(files, f"privacy.noise.sigma={sigma}", f"privacy.noise.clip={clip}")
    # Assert
    assert sent and len(sent) == len(cuts)
    for act, (_, raw) in zip(sent, cuts, strict=True):
        assert act.shape == raw.shape
        assert not torch.allclose(act, raw)  # the raw cut output never leaves the client
        clipped = clip_per_sample(raw, clip)
        assert bool((clipped.flatten(1).norm(dim=1) <= clip * (1 + 1e-5)).all())
        if sigma == 0.0:  # clip only: exactly the clipped activations, norms within the bound
            assert torch.allclose(act, clipped, atol=1e-6)
            assert bool((act.flatten(1).norm(dim=1) <= clip * (1 + 1e-5)).all())
    if sigma > 0:  # what was added on top of the clipped activations is N(0, (sigma*clip)^2)
        noise = torch.cat(
            [(a - clip_per_sample(r, clip)).flatten() for a, (_, r) in zip(sent, cuts, strict=True)]
        )
        assert abs(float(noise.mean())) < 0.02
        assert float(noise.std()) == pytest.approx(sigma * clip, rel=0.05)


async def _weights_after_first_step(
    files: dict[str, Path], monkeypatch: pytest.MonkeyPatch, *overrides: str
) -> torch.Tensor:
    """The client segment's weights right after its first training step."""
    snapshots: list[torch.Tensor] = []
    original = StepRunner.train_step

    async def spy(self: StepRunner, step: int, x: Any, y: Any, ids: Any) -> float:
        loss = await original(self, step, x, y, ids)
        if not snapshots:
            snapshots.append(parameters_to_vector(self.bottom.parameters()).detach().clone())
        return loss

    monkeypatch.setattr(StepRunner, "train_step", spy)
    await run_deployment(files, *overrides)
    monkeypatch.setattr(StepRunner, "train_step", original)
    return snapshots[0]


async def test_nopeek_changes_the_client_update(
    deployment: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: three identical deployments (same seed, so same weights and first batch)
    files = [deployment(topology="vanilla", dataset="digits", epochs=1) for _ in range(3)]
    # Execute
    plain = await _weights_after_first_step(files[0], monkeypatch)
    again = await _weights_after_first_step(files[1], monkeypatch)
    nopeek = await _weights_after_first_step(files[2], monkeypatch, "privacy.nopeek.alpha=2.0")
    # Assert: the runs are deterministic, and only the NoPeek term moves the weights apart
    assert torch.equal(plain, again)
    assert not torch.allclose(plain, nopeek)


@pytest.mark.parametrize("mechanism", ["marvell", "gaussian"])
async def test_label_protection_changes_the_received_gradients(
    deployment: Any, monkeypatch: pytest.MonkeyPatch, mechanism: str
) -> None:
    # Prepare
    grads = spy_received_grads(monkeypatch)
    files = [
        deployment(topology="vertical", clients=2, dataset="breast_cancer", epochs=1)
        for _ in range(2)
    ]
    # Execute
    await run_deployment(files[0])
    plain = {name: list(g) for name, g in grads.items()}
    grads.clear()
    protection = (f'privacy.label.mechanism="{mechanism}"', "privacy.label.scale=2.0")
    await run_deployment(files[1], server_overrides=protection)
    # Assert: same first batch and weights, so the first gradients differ only by protection
    assert set(grads) == set(plain) == {"client-1", "client-2"}
    for name in plain:
        first, protected = plain[name][0], grads[name][0]
        assert first.shape == protected.shape
        assert not torch.allclose(first, protected, atol=1e-6)
        extra = (protected - first).flatten(1).norm(dim=1)
        assert float(extra.median()) > 0.1 * float(first.flatten(1).norm(dim=1).median())
