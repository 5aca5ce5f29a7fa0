"""The malicious server (FSHA) and the client's hijack detector."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from privacy.hijack import FSHASetup, GradientScrutinizer, fsha_game
from sl_pipeline.errors import PrivacyError


def blobs(n: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, 6, generator=g) + 0.5 * y[:, None].float()
    return x, y


def test_detector_stays_quiet_on_label_dependent_gradients_and_flags_label_free_ones() -> None:
    # Prepare: honest gradients point one way per class; hijacked ones ignore the label.
    g = torch.Generator().manual_seed(0)
    honest, hijacked = GradientScrutinizer(), GradientScrutinizer()
    for _ in range(20):
        y = torch.randint(0, 2, (32,), generator=g)
        direction = torch.where(y[:, None] == 1, 1.0, -1.0) * torch.ones(32, 4)
        noise = 0.5 * torch.randn(32, 4, generator=g)
        # Execute
        honest.observe(direction + noise, y)
        hijacked.observe(torch.randn(32, 4, generator=g), y)
    # Assert
    assert not honest.flagged and honest.last_score > 0.5
    assert hijacked.flagged and hijacked.flagged_at == 6  # warm-up 5, then the first window
    with pytest.raises(PrivacyError):
        GradientScrutinizer(window=0)


def test_one_label_batches_are_skipped() -> None:
    detector = GradientScrutinizer(warmup=0, window=1)
    assert detector.observe(torch.randn(4, 3), torch.zeros(4, dtype=torch.long)) != 0.0
    assert not detector.flagged and detector.batches == 1


@pytest.mark.filterwarnings("ignore")
def test_fsha_is_flagged_within_the_first_epoch() -> None:
    # Prepare: one epoch of 8 batches against a small segment.
    x, y = blobs()

    def segment() -> nn.Module:
        return nn.Sequential(nn.Linear(6, 8), nn.ReLU())

    setup = FSHASetup(segment, x, y, blobs(seed=1)[0], steps=8)
    # Execute
    found = [fsha_game(setup, seed=s) for s in range(3)]
    again = fsha_game(setup, seed=0)
    # Assert
    assert all(r["flagged_at_batch"] is not None and r["flagged_at_batch"] <= 8 for r in found)
    assert again == found[0]
    assert found[0]["fsha_ssim"] is None and found[0]["fsha_mse"] > 0


def test_live_detector_sets_its_metrics_and_stops_training_on_a_flag(tmp_path: Path) -> None:
    from sl_pipeline.config import ClientConfig, load
    from workers.client.worker import ClientWorker
    from workers.tools.localdeploy import init_deployment

    # Prepare: a client whose [privacy.hijack] stops training on a flag.
    files = init_deployment(tmp_path / "d", dataset="breast_cancer", epochs=1)["files"]
    path = Path(files["client-1"])
    cfg = load(ClientConfig, path, ["privacy.hijack.stop=true"])
    worker = ClientWorker(cfg, path.parent, progress=False)
    g = torch.Generator().manual_seed(0)
    y = torch.arange(32) % 2
    # Execute / Assert: label-free gradients, as a hijacking server sends
    for _ in range(5):
        worker.runner.scrutinize(torch.randn(32, 8, generator=g), y)
    assert worker.metrics.hijack_flagged._value.get() == 0
    with pytest.raises(PrivacyError, match="server hijack suspected at batch 6"):
        worker.runner.scrutinize(torch.randn(32, 8, generator=g), y)
    assert worker.metrics.hijack_flagged._value.get() == 1
    assert worker.metrics.hijack_score._value.get() < 0.1


@pytest.mark.filterwarnings("ignore")
def test_live_detector_lets_an_honest_run_finish() -> None:
    from workers.tools.audit import run_audit

    result = run_audit(
        "vanilla", "breast_cancer", ["privacy.hijack.stop=true"], epochs=1, attack_seeds=1
    )
    assert result["test_accuracy"] > 0.8 and result["hijack_flagged"] is False
