"""The accountant a DP-SGD client is configured with (``privacy.dpsgd.accountant``), in real
worker runs: the epsilon it reports is that accountant's for the steps it took at its sample
rate, fixed values from Opacus' own accountants (breast_cancer, 455 training rows, batches of
32: 15 draws a pass at rate 1/15; fixed batches of 35: one pass, rate 1; noise 1, delta 1e-5).
``gdp`` is refused: Opacus' central-limit approximation reported 1.29 where PRV proves at
least 2.31 (red team)."""

from __future__ import annotations

import io

import pytest

from privacy.config import PrivacyConfig
from sl_pipeline.errors import PrivacyError
from workers.cli import main
from workers.ops.logs import configure_logging
from workers.tools.inprocess import run_deployment

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),  # PRV at rate 1: log(0), harmless
]
DP = ("privacy.dpsgd.noise_multiplier=1", "train.lr=0.01", "train.momentum=0")
FIXED = ("privacy.dpsgd.poisson_sampling=false", "train.batch_size=35")


@pytest.mark.parametrize(
    ("accountant", "sets", "history", "epsilon"),
    [
        ("rdp", ("train.batch_size=32",), [(1.0, 1 / 15, 15)], 2.8504),
        ("prv", ("train.batch_size=32",), [(1.0, 1 / 15, 15)], 2.3311),
        ("rdp", FIXED, [(1.0, 1.0, 1)], 4.7285),
        ("prv", FIXED, [(1.0, 1.0, 1)], 4.3874),
    ],
    ids=["rdp-poisson", "prv-poisson", "rdp-fixed", "prv-fixed"],
)
async def test_the_reported_epsilon_is_the_configured_accountants_for_the_steps_taken(
    deployment,  # type: ignore[no-untyped-def]
    accountant: str,
    sets: tuple[str, ...],
    history: list[tuple[float, float, int]],
    epsilon: float,
) -> None:
    # Prepare
    files = deployment(clients=1, dataset="breast_cancer", epochs=1)
    # Execute
    run = await run_deployment(files, *DP, f"privacy.dpsgd.accountant={accountant}", *sets)
    # Assert: that accountant, every draw once, and its figure in the summary and the gauge
    private = run.clients[0].runner.private
    assert private is not None
    assert private.dp.engine.accountant.mechanism() == accountant
    assert private.dp.engine.accountant.history == history
    assert run.summaries[0]["dpsgd_epsilon"] == epsilon
    gauge = run.clients[0].metrics.registry.get_sample_value(
        "sl_privacy_epsilon", {"mechanism": "dpsgd"}
    )
    assert gauge == pytest.approx(epsilon, abs=1e-4)


def test_the_gdp_accountant_is_refused_for_dpsgd_in_one_line(
    deployment,  # type: ignore[no-untyped-def]
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Prepare
    files = deployment(clients=1, dataset="breast_cancer")
    sets = ["--set", "privacy.dpsgd.noise_multiplier=1", "--set", "privacy.dpsgd.accountant=gdp"]
    # Execute
    code = main(["client", "--config", str(files["client-1"]), *sets])
    configure_logging("text", "INFO", stream=io.StringIO())
    err = capsys.readouterr().err.strip()
    # Assert
    assert code == 2
    assert "privacy.dpsgd.accountant = 'gdp' underestimates" in err
    assert len(err.splitlines()) == 1
    with pytest.raises(PrivacyError, match="use 'prv' or 'rdp'"):
        PrivacyConfig.from_mapping({"dpsgd": {"target_epsilon": 3.0, "accountant": "gdp"}})


def test_an_unknown_dpsgd_accountant_is_refused_naming_only_those_dpsgd_accepts() -> None:
    """The refusal lists what DP-SGD takes: before, it offered 'gdp', which it then refused."""
    # Execute
    with pytest.raises(PrivacyError) as refused:
        PrivacyConfig.from_mapping({"dpsgd": {"noise_multiplier": 1.0, "accountant": "moments"}})
    # Assert
    assert "allowed: rdp, prv" in str(refused.value)
    assert "gdp" not in str(refused.value)
