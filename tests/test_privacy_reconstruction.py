"""Calibrated reconstruction: baselines, aggregated releases, the tuned decoder, intervals."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from privacy.config import NoiseConfig
from privacy.reconstruction import (
    DecoderSettings,
    baselines,
    interval,
    pass_subsets,
    reconstruction_audit,
    release_of,
    views_release_of,
)
from sl_pipeline.errors import PrivacyError
from workers.tools.audit_measures import side_by_side

FAST = DecoderSettings(hidden=64, batch_size=32, max_epochs=40, patience=5)
SHAPE = (1, 8, 8)


def smooth_images(n: int, seed: int) -> torch.Tensor:
    """8x8 images driven by 6 latent factors: aux and victims are data of one kind."""
    basis = torch.randn(6, 64, generator=torch.Generator().manual_seed(0))
    latent = torch.randn(n, 6, generator=torch.Generator().manual_seed(seed))
    return torch.sigmoid(latent @ basis).reshape(n, *SHAPE)


def encode(x: torch.Tensor) -> torch.Tensor:
    segment = torch.nn.Linear(64, 32)
    torch.nn.init.normal_(segment.weight, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return segment(x.flatten(1))


def test_baselines_know_their_closed_forms() -> None:
    # Prepare: the victims are auxiliary rows, two classes.
    aux = smooth_images(40, seed=1)
    labels = torch.arange(40) % 2
    victims, victim_labels = aux[:10], labels[:10]
    # Execute
    found = baselines(aux, victims, aux_y=labels, victim_y=victim_labels, image_shape=SHAPE)
    unlabelled = baselines(aux, victims, image_shape=SHAPE)
    # Assert
    assert found["nearest_aux"]["mse"] == 0.0
    assert found["nearest_aux"]["ssim"] == pytest.approx(1.0)
    mean = aux.flatten(1).mean(0)
    assert found["mean"]["mse"] == pytest.approx(float(((victims.flatten(1) - mean) ** 2).mean()))
    assert "class_mean" in found and "class_mean" not in unlabelled


def test_averaging_releases_divides_the_noise_variance() -> None:
    act = torch.zeros(2000, 4)  # inside the clip: only noise remains
    noise = NoiseConfig(sigma=0.5, clip=1.0)
    one = release_of(noise, 1)(act, torch.Generator().manual_seed(0))
    four = release_of(noise, 4)(act, torch.Generator().manual_seed(0))
    assert float(one.var()) == pytest.approx(0.25, rel=0.05)
    assert float(four.var()) == pytest.approx(0.25 / 4, rel=0.05)
    assert torch.equal(release_of(None, 3)(act, torch.Generator()), act)
    with pytest.raises(PrivacyError, match="releases"):
        release_of(noise, 0)


def test_interval_is_the_student_t_interval() -> None:
    mean, half = interval([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert half == pytest.approx(4.302653 * 1.0 / 3**0.5, rel=1e-5)  # t(0.975, 2) * sd / sqrt n


def test_tuned_attacker_beats_baselines_and_gains_from_every_release() -> None:
    # Prepare: an informative linear segment; noise that one release only partly hides.
    aux, victims = smooth_images(300, seed=1), smooth_images(60, seed=2)
    noise = NoiseConfig(sigma=0.15, clip=1.0)
    aux_act, victim_act = encode(aux), encode(victims)
    aux_act, victim_act = aux_act / 40, victim_act / 40  # norms below the clip
    common = {"seeds": 2, "image_shape": SHAPE, "settings": FAST}
    # Execute
    clean = reconstruction_audit((aux, aux_act), (victims, victim_act), release_of(None), **common)
    once = reconstruction_audit(
        (aux, aux_act), (victims, victim_act), release_of(noise, 1), **common
    )
    many = reconstruction_audit(
        (aux, aux_act), (victims, victim_act), release_of(noise, 16), **common
    )
    # Assert
    assert clean["ssim"] > clean["baseline_nearest_aux_ssim"] > clean["baseline_mean_ssim"]
    assert many["ssim"] > once["ssim"] + 0.2  # 0.90 against 0.50 here
    assert once["reconstruction_mse"] > clean["reconstruction_mse"]
    assert clean["attack_seeds"] == 2 and clean["reconstruction_mse_ci"] >= 0
    # the ensemble: both decoders on one observation (never a second draw of the release)
    assert many["ssim_ensemble"] > many["baseline_nearest_aux_ssim"]
    assert 0 < once["reconstruction_mse_ensemble"] < once["baseline_mean_mse"]


def test_each_view_is_clipped_and_noised_on_its_own() -> None:
    # Prepare: two views per row; the second far outside the clip.
    acts = torch.zeros(3000, 2, 4)
    acts[:, 1, 0] = 10.0
    noise = NoiseConfig(sigma=0.5, clip=1.0)
    # Execute
    seen = views_release_of(noise)(acts, torch.Generator().manual_seed(0))
    # Assert: concatenated (rows, 2 * 4); view 1 clipped to norm 1, each view one fresh draw
    assert seen.shape == (3000, 8)
    assert float(seen[:, 4].mean()) == pytest.approx(1.0, abs=0.05)
    assert float(seen[:, :4].var()) == pytest.approx(0.25, rel=0.05)
    assert not torch.equal(seen[:, 1:4], seen[:, 5:8])
    assert torch.equal(views_release_of(None)(acts, torch.Generator()), acts.flatten(1))


def test_pass_subsets_keep_the_first_and_last_pass() -> None:
    assert pass_subsets(20) == {
        "all_passes": list(range(20)),
        "geometric_passes": [0, 1, 2, 4, 8, 16, 19],
    }
    assert pass_subsets(1) == {"all_passes": [0], "geometric_passes": [0]}
    with pytest.raises(PrivacyError, match="passes"):
        pass_subsets(0)


def test_an_early_encoder_view_leaks_what_the_final_one_discards() -> None:
    # Prepare: the "early" encoder keeps the input, the "final" one keeps only 4 directions of
    # it (training made it task-specific), as happens between the first and the last pass.
    aux, victims = smooth_images(300, seed=1), smooth_images(60, seed=2)

    def early(x: torch.Tensor) -> torch.Tensor:
        return encode(x) / 40

    def final(x: torch.Tensor) -> torch.Tensor:
        return early(x)[:, :4]

    def views(x: torch.Tensor) -> torch.Tensor:  # (rows, passes, features): final, then early
        return torch.stack([torch.nn.functional.pad(final(x), (0, 28)), early(x)], 1)

    common = {"seeds": 2, "image_shape": SHAPE, "settings": FAST}
    # Execute
    last_only = reconstruction_audit(
        (aux, final(aux)), (victims, final(victims)), release_of(None), **common
    )
    every_pass = reconstruction_audit(
        (aux, views(aux)), (victims, views(victims)), views_release_of(None), **common
    )
    # Assert
    assert every_pass["ssim"] > last_only["ssim"] + 0.1


def test_decoders_trained_side_by_side_give_the_same_figures() -> None:
    # Prepare: noisy releases (the noise draws must follow each seed, not thread timing)
    aux, victims = smooth_images(200, seed=1), smooth_images(40, seed=2)
    aux_act, victim_act = encode(aux) / 40, encode(victims) / 40
    observe = release_of(NoiseConfig(sigma=0.15, clip=1.0), 2)
    common = {"seeds": 3, "image_shape": SHAPE, "settings": FAST}
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the audit runs it: one torch thread per decoder
    try:
        # Execute
        alone = reconstruction_audit((aux, aux_act), (victims, victim_act), observe, **common)
        with ThreadPoolExecutor(3) as pool:
            together = reconstruction_audit(
                (aux, aux_act),
                (victims, victim_act),
                observe,
                run_jobs=side_by_side(pool),
                **common,
            )
    finally:
        torch.set_num_threads(before)
    # Assert: figure for figure
    assert together == alone


def test_a_failing_decoder_cancels_the_others() -> None:
    # Prepare: an observation that fails on its third call (the first decoder's second epoch)
    aux = smooth_images(100, seed=1)
    calls: list[int] = []

    def observe(act: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 3:
            raise PrivacyError("boom")
        return act

    # Execute / Assert: the error surfaces, and the pool is left with nothing running
    with ThreadPoolExecutor(1) as pool, pytest.raises(PrivacyError, match="boom"):
        reconstruction_audit(
            (aux, encode(aux)),
            (aux, encode(aux)),
            observe,
            seeds=3,
            settings=FAST,
            run_jobs=side_by_side(pool),
        )
    # the two queued decoders stopped at once: uncancelled, each would observe at least
    # 1 + patience + 1 times (validation, then epochs until patience runs out)
    assert len(calls) < 3 + 2 * (FAST.patience + 2)
