"""DP-SGD where its mechanism cannot run is refused at start, in one line naming the key and
what to do (red team of the DP-SGD accounting claim). Before: a u-shaped client stopped on
Opacus' traceback, vertical parties on a misleading "check data.seed" after joining, and a
client checkpointing every N > 1 steps, killed between checkpoints, on a shape-mismatch
traceback at resume (its epsilon had also lost the steps released before the kill)."""

from __future__ import annotations

import io

import pytest
from torch import nn

from privacy.config import PrivacyConfig
from workers.cli import main
from workers.ops.logs import configure_logging
from workers.tools.inprocess import run_deployment

DP = ("--set", "privacy.dpsgd.noise_multiplier=1.0")


@pytest.mark.parametrize(
    ("topology", "sets", "says"),
    [
        ("ushaped", (), "privacy.dpsgd is not supported for topology ushaped"),
        ("vertical", (), "privacy.dpsgd in a vertical party needs poisson_sampling = false"),
        (
            "vanilla",
            ("--set", "checkpoint.every_steps=5"),
            "checkpoint.every_steps = 5 with privacy.dpsgd",
        ),
        # Before: "not available for topology 'vanilla' or with DP-SGD" (vanilla pipelines),
        # after Opacus' "Secure RNG turned off ... turn it on" warning, though the noise and
        # the batches come from the OS's generator (docs/privacy.md): two lines and a trace
        (
            "vanilla",
            ("--set", "train.pipeline_depth=2"),
            "train.pipeline_depth = 2 with privacy.dpsgd",
        ),
    ],
)
def test_dpsgd_is_refused_in_one_line_where_it_cannot_run(
    deployment,  # type: ignore[no-untyped-def]
    capsys: pytest.CaptureFixture[str],
    recwarn: pytest.WarningsRecorder,
    topology: str,
    sets: tuple[str, ...],
    says: str,
) -> None:
    # Prepare
    clients = 2 if topology == "vertical" else 1
    files = deployment(topology=topology, clients=clients, dataset="breast_cancer")
    # Execute
    code = main(["client", "--config", str(files["client-1"]), *DP, *sets])
    configure_logging("text", "INFO", stream=io.StringIO())
    err = capsys.readouterr().err
    # Assert
    assert code == 2
    assert "Traceback" not in err
    assert says in err
    assert len(err.strip().splitlines()) == 1
    assert not [w for w in recwarn if "Secure RNG" in str(w.message)]


def test_a_vertical_party_with_fixed_batches_is_accepted(
    deployment,  # type: ignore[no-untyped-def]
) -> None:
    """The refusal names what works: fixed batches, the same rows in every party."""
    cfg = PrivacyConfig.from_mapping(
        {"dpsgd": {"noise_multiplier": 1.0, "poisson_sampling": False}}
    )
    cfg.check_placement("vertical", server=False, holds_labels=False)
    cfg.validate_for_topology("vertical")


@pytest.mark.parametrize(
    ("topology", "sets"),
    [("vanilla", ("privacy.dpsgd.noise_multiplier=1.0",)), ("ushaped", ())],
)
async def test_auto_pipeline_depth_where_no_pipelining_is_one_step_at_a_time(
    deployment,  # type: ignore[no-untyped-def]
    topology: str,
    sets: tuple[str, ...],
) -> None:
    """Before, train.pipeline_depth = 0 (auto) ran the pipeline at depth 1 where the client
    cannot pipeline: a DP-SGD client stopped on "'Tensor' object has no attribute
    '_forward_counter'" (the stashed weights bypass Opacus), a u-shaped one on a reply
    mismatch (two exchanges a step)."""
    files = deployment(topology=topology, dataset="breast_cancer")
    run = await run_deployment(files, "train.pipeline_depth=0", *sets)
    assert run.summaries[0]["pipeline_depth"] == 1
    assert run.summaries[0]["steps"] > 0


def batchnorm_mlp() -> nn.Sequential:
    """``model.sequential`` of the test below: a BatchNorm layer in the client's segment."""
    return nn.Sequential(nn.Linear(30, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))


def test_a_segment_opacus_cannot_train_privately_is_refused_in_one_line(
    deployment,  # type: ignore[no-untyped-def]
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Before, Opacus' UnsupportedModuleError ended the client on a traceback."""
    # Prepare
    files = deployment(dataset="breast_cancer")
    model = [
        "--set",
        "model.builtin=",
        "--set",
        f"model.sequential={__name__}:batchnorm_mlp",
        "--set",
        "model.cuts=[3]",
    ]
    # Execute
    code = main(["client", "--config", str(files["client-1"]), *DP, *model])
    configure_logging("text", "INFO", stream=io.StringIO())
    err = capsys.readouterr().err
    # Assert
    assert code == 2
    assert "privacy.dpsgd cannot train this client segment: BatchNorm" in err
    assert len(err.strip().splitlines()) == 1
