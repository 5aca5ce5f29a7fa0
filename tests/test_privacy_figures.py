"""The entry points that reproduce docs/privacy.md's figures the audit does not print."""

from __future__ import annotations

import json

import pytest


@pytest.mark.filterwarnings("ignore")
def test_fsha_curve_reports_each_length_and_the_detectors_first_flag(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from workers.tools.fsha_curve import main

    # Execute: two short games on the digits split of tests/test_privacy_hijack.py
    assert main(["--steps", "3", "6", "--json"]) == 0
    short, flagged = json.loads(capsys.readouterr().out)
    # Assert: the detector fires at batch 6 (warm-up 5, then the first window), not before;
    # both games invert the same private rows against the same public baseline
    assert (short["steps"], short["batches"], short["flagged_at_batch"]) == (3, 3, None)
    assert (flagged["steps"], flagged["batches"], flagged["flagged_at_batch"]) == (6, 6, 6)
    assert short["fsha_nearest_public_ssim"] == flagged["fsha_nearest_public_ssim"] > 0.5
    assert 0.0 < short["fsha_ssim"] < 0.5 and short["fsha_ssim"] != flagged["fsha_ssim"]


def test_fsha_curve_refuses_a_bad_split_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from workers.tools.fsha_curve import main

    assert main(["--private", "0", "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --private 0 must be in") and "\n" not in err


@pytest.mark.filterwarnings("ignore")
def test_canary_seeds_gives_the_audits_figures_at_its_seed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from workers.tools.audit import run_audit
    from workers.tools.canary_seeds import main

    # Prepare: what `sl-pipeline audit --canary-runs 4` reports (one epoch, game seed 0)
    dp = "privacy.dpsgd.noise_multiplier=10"
    audited = run_audit("vanilla", "breast_cancer", [dp], epochs=1, canary_runs=4, attack_seeds=1)
    # Execute: the same game at seeds 0 and 1 without training the deployment
    argv = ["--set", dp, "--runs", "4", "--game-seeds", "0", "1", "--epochs", "1", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    # Assert: seed 0 is the audit's game; one row per seed, the same mechanism in each
    assert [row["seed"] for row in out["seeds"]] == [0, 1]
    first = out["seeds"][0]
    for key in ("canary_epsilon_lower_bound", "canary_epsilon_lower_bound_frozen_server"):
        assert first[key] == audited[key]
    for key in ("canary_accountant_epsilon", "canary_accountant_steps"):
        assert first[key] == audited[key] == out["seeds"][1][key]
    assert first["canary_accountant_steps"] == 15  # 455 rows at 1/15 for one epoch
    assert out["trained_min"] <= out["trained_median"] <= out["trained_max"]


def test_canary_seeds_refuses_keys_the_game_does_not_read(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from workers.tools.canary_seeds import main

    assert main(["--set", "ops.listen=x", "--runs", "4", "--game-seeds", "0"]) == 2
    assert "the game reads only privacy., train., model., data. keys" in capsys.readouterr().err
    assert main(["--runs", "4", "--game-seeds", "0"]) == 2  # no DP-SGD: nothing to audit
    assert "privacy.dpsgd.noise_multiplier" in capsys.readouterr().err


def test_dcor_bias_grows_with_width_and_shrinks_with_rows(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from workers.tools.dcor_bias import main

    # Execute: independent samples, few and many rows, narrow and wide
    argv = ["--rows", "30", "300", "--dims", "1", "32", "--repeats", "2", "--json"]
    assert main(argv) == 0
    found = {(r["rows"], r["dims"]): r["dcor"] for r in json.loads(capsys.readouterr().out)}
    assert main(argv) == 0  # seeded: the same figures again
    again = {(r["rows"], r["dims"]): r["dcor"] for r in json.loads(capsys.readouterr().out)}
    # Assert: the V-statistic's floor, above 0 although the sides are independent
    assert found == again
    assert found[(30, 32)] > found[(30, 1)] > found[(300, 1)] > 0.0
    assert found[(30, 32)] > found[(300, 32)]
    assert main(["--rows", "1"]) == 2
    assert capsys.readouterr().err.startswith("error: --rows need at least 2")


@pytest.mark.filterwarnings("ignore")
def test_hijack_noise_reports_false_alarms_and_detections_per_sigma(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from workers.tools.hijack_noise import main

    # Execute: 8 steps of each game at sigma 0 and 1.0 (clip 5), one seed
    assert main(["--sigmas", "0", "1.0", "--seeds", "0", "--steps", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    # Assert: FSHA flagged at batch 6 at both (early on an honest server would still answer
    # with label structure, so the reference resolves); the honest server is not flagged;
    # no reference without noise
    plain, heavy = out["rows"]
    for row in (plain, heavy):
        assert (row["fsha_flagged_at_batch"], row["fsha_verdict"]) == (6, "flagged")
        assert row["honest_flagged"] is False and row["honest_verdict"] == "pass"
    assert plain["honest_reference_score"] != plain["honest_reference_score"]  # NaN
    assert heavy["fsha_reference_score"] > 0.2
    assert [r["fsha_flagged_rate"] for r in out["summary"]] == [1.0, 1.0]
    assert main(["--games", "patient", "--steps", "1"]) == 2
    assert "--patient-steps" in capsys.readouterr().err
