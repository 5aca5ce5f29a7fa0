"""The first batch's release through the initial segment, which the server rebuilds from
``model.seed`` (``python -m workers.tools.audit_initial``)."""

from __future__ import annotations

import json

import pytest

from workers.tools.audit_initial import main


def _run(capsys: pytest.CaptureFixture[str], *sets: str) -> dict[str, float]:
    argv = ["--dataset", "breast_cancer", "--json"]
    for key in sets:
        argv += ["--set", key]
    assert main(argv) == 0
    found: dict[str, float] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    return found


@pytest.mark.filterwarnings("ignore")
def test_the_untrained_segment_gives_the_first_batch_away_and_noise_hides_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    plain = _run(capsys)
    noisy = _run(capsys, "privacy.noise.sigma=1.0")
    # Undefended, the attacker beats the nearest auxiliary row (an oracle) with no query
    assert plain["reconstruction_mse"] < plain["baseline_nearest_aux_mse"]
    assert noisy["reconstruction_mse"] > 2 * plain["reconstruction_mse"]
    assert noisy["baseline_mean_mse"] == plain["baseline_mean_mse"]


def test_a_key_the_initial_release_does_not_read_is_refused_in_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["--set", "train.epochs=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --set 'train.epochs=3'") and "\n" not in err
