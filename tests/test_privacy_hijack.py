"""The malicious server (FSHA) and the client's hijack detector."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from privacy.hijack import (
    FSHASetup,
    GradientScrutinizer,
    HonestReference,
    fsha_game,
    label_score,
)
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
    # Assert: flagged; one seed repeats, and seeds differ (a builder that seeds the global
    # generator once made every "seeded" run the same run)
    assert all(r["flagged_at_batch"] is not None and r["flagged_at_batch"] <= 8 for r in found)
    assert again == found[0]
    assert len({r["fsha_mse"] for r in found}) == 3
    assert found[0]["fsha_ssim"] is None and found[0]["fsha_mse"] > 0


@pytest.mark.filterwarnings("ignore")
def test_fsha_inverts_digits_better_than_the_mean_image_after_a_short_run() -> None:
    from sklearn.datasets import load_digits

    from privacy.reconstruction import baselines
    from sl_pipeline.config import ModelConfig
    from sl_pipeline.models import build_segments

    # Prepare: digits, the client segment at the default cut (conv, ReLU, pool), 400 steps
    # (SSIM 0.823 here, against the nearest public image's 0.846; the audit runs 2000 steps:
    # mean SSIM 0.843 over 10 runs, docs/privacy.md)
    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target)
    private, public = x[:1400], x[1400:]
    model = ModelConfig(builtin="cnn", in_shape=(1, 8, 8), classes=10)
    setup = FSHASetup(lambda: build_segments(model)[0], private, y[:1400], public, steps=400)
    # Execute
    found = fsha_game(setup, seed=0)
    # Assert: flagged at once, and the inversion beats guessing the mean image
    mean = baselines(public, private, image_shape=(1, 8, 8))["mean"]
    assert found["flagged_at_batch"] == 6
    assert found["fsha_ssim"] > mean["ssim"] + 0.1 and found["fsha_mse"] < mean["mse"]


def test_the_cli_default_fsha_length_is_the_library_one() -> None:
    from privacy.hijack import FSHA_STEPS
    from workers.cli.privacy import FSHA_STEPS as CLI_STEPS

    assert CLI_STEPS == FSHA_STEPS


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
    y, sent = torch.arange(32) % 2, torch.zeros(32, 64)
    # Execute / Assert: label-free gradients, as a hijacking server sends
    for _ in range(5):
        worker.runner.scrutinize(torch.randn(32, 8, generator=g), y, sent)
    assert worker.metrics.hijack_flagged._value.get() == 0
    with pytest.raises(PrivacyError, match="server hijack suspected at batch 6"):
        worker.runner.scrutinize(torch.randn(32, 8, generator=g), y, sent)
    assert worker.metrics.hijack_flagged._value.get() == 1
    assert worker.metrics.hijack_score._value.get() < 0.1


@pytest.mark.filterwarnings("ignore")
def test_live_detector_lets_an_honest_run_finish() -> None:
    from workers.tools.audit import run_audit

    result = run_audit(
        "vanilla", "breast_cancer", ["privacy.hijack.stop=true"], epochs=1, attack_seeds=1
    )
    assert result["test_accuracy"] > 0.8 and result["hijack_flagged"] is False


@pytest.mark.filterwarnings("ignore")
def test_audit_fsha_through_the_cli_counts_first_epoch_flags(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import json

    from workers.cli import main

    # Execute: two short FSHA runs against the audited client (what a user types)
    argv = ["audit", "--topology", "vanilla", "--dataset", "breast_cancer", "--epochs", "1"]
    argv += ["--attack-seeds", "1", "--fsha-runs", "2", "--fsha-steps", "30", "--json"]
    status = main(argv)
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # Assert: both flagged within the first epoch (15 batches), at the first possible batch
    assert status == 0
    assert result["fsha_runs"] == 2 and result["fsha_steps"] == 30
    assert result["fsha_epoch_batches"] == 15
    assert result["fsha_detected"] == 2 and result["fsha_detected_within_batches"] == 6
    assert "fsha" in result["threat_models"]


class FixedReference(HonestReference):
    """An honest replica that always scores ``score`` (the verdict logic alone)."""

    def __init__(self, score: float) -> None:
        self.score, self.seen = score, 0

    def observe(self, sent: torch.Tensor, labels: torch.Tensor) -> float:
        self.seen += 1
        return self.score


def test_label_score_is_same_minus_different_label_cosine() -> None:
    grads = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    y = torch.tensor([0, 0, 1, 1])
    # same: cos(g0, g1) = 1, cos(g2, g3) = 1/sqrt 2; different: 0, 1/sqrt 2, 0, 1/sqrt 2
    half = 2**-0.5
    assert label_score(grads, y) == pytest.approx((1 + half) / 2 - half / 2, abs=1e-12)
    assert label_score(grads, torch.zeros(4, dtype=torch.long)) != label_score(grads, y)


@pytest.mark.parametrize(
    ("honest", "verdict", "flagged_at", "unjudged"),
    [
        (0.0, "cannot_judge", None, 15),  # an honest server would score as low: no alarm
        (0.19, "cannot_judge", None, 15),  # below threshold 0.1 + margin 0.1
        (0.2, "flagged", 6, 0),  # resolvable: the first low window flags, as without one
        (0.8, "flagged", 6, 0),
    ],
)
def test_a_low_window_is_judged_against_the_honest_reference(
    honest: float, verdict: str, flagged_at: int | None, unjudged: int
) -> None:
    # Prepare: label-free gradients (a hijacking server's, or a starved honest one's)
    g = torch.Generator().manual_seed(0)
    reference = FixedReference(honest)
    detector = GradientScrutinizer(reference=reference)
    y = torch.arange(32) % 4
    # Execute
    for _ in range(20):
        detector.observe(torch.randn(32, 4, generator=g), y, torch.zeros(32, 4))
    # Assert: 20 batches, windows judged from batch 6 on (15 of them) until a flag
    assert (detector.run_verdict, detector.flagged_at, detector.unjudged) == (
        verdict,
        flagged_at,
        unjudged,
    )
    assert reference.seen == 20 and detector.reference_score == pytest.approx(honest)
    with pytest.raises(PrivacyError, match="needs the sent activations"):
        detector.observe(torch.randn(32, 4), y)


def test_a_window_that_passes_is_never_cannot_judge() -> None:
    # Prepare: label-dependent gradients, a reference that says nothing could be resolved
    detector = GradientScrutinizer(reference=FixedReference(0.0))
    y = torch.arange(32) % 2
    grads = torch.where(y[:, None] == 1, 1.0, -1.0) * torch.ones(32, 4)
    # Execute
    for _ in range(10):
        detector.observe(grads, y, torch.zeros(32, 4))
    # Assert
    assert detector.run_verdict == "pass" and detector.judged == 5 and detector.unjudged == 0


def test_honest_reference_scores_the_replicas_cut_gradients_and_trains_it() -> None:
    # Prepare: a linear replica at fixed weights; its cut gradient is W^T (softmax - onehot)
    rest = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        rest.weight.copy_(torch.eye(2))
    reference = HonestReference(rest, torch.optim.SGD(rest.parameters(), lr=0.1))
    sent = torch.ones(4, 2)  # equal logits: every softmax is (1/2, 1/2)
    y = torch.tensor([0, 0, 0, 1])
    # Execute
    score = reference.observe(sent, y)
    # Assert: per-class gradients (-1/2, 1/2) and (1/2, -1/2): same cos 1, different -1
    assert score == pytest.approx(2.0, abs=1e-12)
    assert not torch.equal(rest.weight.detach(), torch.eye(2))  # one honest step taken
