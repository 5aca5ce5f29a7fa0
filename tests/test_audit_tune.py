"""`sl-pipeline audit` and `sl-pipeline tune`: end to end on built-in data, and bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sl_pipeline.errors import ConfigError, PrivacyError
from workers.cli import main
from workers.cli.privacy import audit_deployment
from workers.tools.audit import run_audit, split_overrides
from workers.tools.localdeploy import init_deployment
from workers.tools.tune import combinations, parse_sweep, run_tune

ROW_KEYS = {"name", "test_accuracy", "dcor", "reconstruction_mse"}


def cli(*argv: str) -> int:
    """The real command line, as the console script runs it (never a parser of our own)."""
    return main(list(argv))


def test_tune_writes_results_frontier_and_json_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    out = tmp_path / "tune"
    # Execute
    status = cli(
        "tune",
        "--topology",
        "vanilla",
        "--dataset",
        "breast_cancer",
        "--epochs",
        "1",
        "--sweep",
        "privacy.noise.sigma=0,0.5",
        "--set",
        "privacy.noise.clip=5.0",
        "--out",
        str(out),
        "--json",
        "--no-progress",
        "--attack-seeds",
        "1",
    )
    # Assert
    assert status == 0
    assert {p.name for p in out.iterdir()} == {
        "results.csv",
        "results.json",
        "frontier.png",
        "tune.json",
    }
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out.strip().splitlines()
    rows = json.loads(printed[-1])
    base, rows = rows[0], rows[1:]  # the undefended run comes first: the reference
    assert base["name"] == "base" and "privacy.noise.sigma" not in base
    assert [r["privacy.noise.sigma"] for r in rows] == [0, 0.5]
    assert all(set(r) >= ROW_KEYS for r in [base, *rows])
    assert "epsilon" not in rows[0]  # clip only: nothing to account
    assert rows[1]["epsilon"] > 0 and rows[1]["epsilon_mechanism"] == "activation_noise"
    assert all("label_leak_auc" not in r for r in rows)  # no label party to attack
    for row in rows:  # each setting against the base, and the verdict line
        change = 100 * (row["test_accuracy"] - base["test_accuracy"])
        assert row["accuracy_change_points"] == pytest.approx(change, abs=1e-6)
        held = row["reconstruction_mse"] >= row["baseline_nearest_aux_mse"]
        assert row["reconstruction_held"] is held
        assert row["reconstruction_target"] is (held and change >= -3)
    assert any(line.startswith("target (reconstruction at or below") for line in printed)
    assert json.loads((out / "results.json").read_text()) == [base, *rows]
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert {"privacy.noise.sigma", "test_accuracy", "epsilon"} <= set(header)


def test_tune_routes_label_keys_to_the_server() -> None:
    # Prepare
    calls: list[tuple[list[str], list[str]]] = []

    def fake_audit(
        topology: str, dataset: str, client: list[str], server: list[str], **_: Any
    ) -> dict[str, Any]:
        calls.append((client, server))
        return {"test_accuracy": 0.9, "dcor": 0.5, "reconstruction_mse": 0.1, "label_leak_auc": 0.6}

    # Execute
    rows = run_tune(
        "vertical",
        "breast_cancer",
        ["privacy.label.scale=1,2", "privacy.noise.sigma=0.5"],
        sets=['privacy.label.mechanism="marvell"'],
        progress=False,
        audit=fake_audit,
    )
    # Assert: the undefended base first (no privacy.* set), then each combination
    assert [r["name"] for r in rows] == ["base", "scale=1,sigma=0.5", "scale=2,sigma=0.5"]
    assert calls[0] == ([], [])
    client, server = calls[2]
    assert client == ["privacy.noise.sigma=0.5"]
    assert server == ['privacy.label.mechanism="marvell"', "privacy.label.scale=2"]
    assert rows[1]["label_held"] is True and rows[1]["accuracy_change_points"] == 0.0
    assert rows[1]["label_target"] is True and "reconstruction_target" not in rows[1]


def test_audit_of_an_existing_deployment_leaves_it_untouched(tmp_path: Path) -> None:
    # Prepare
    topology = "vanilla"
    files = init_deployment(tmp_path / "d", topology=topology, dataset="breast_cancer", epochs=3)[
        "files"
    ]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    # Execute
    result = audit_deployment(
        Path(files["client-1"]), ["privacy.noise.sigma=0.2"], epochs=1, attack_seeds=1
    )
    # Assert: the audit reports the deployment's own topology
    assert result["topology"] == topology and result["activation_epsilon"] > 0
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ("privacy.noise.sigma", "KEY=V1,V2"),
        ("privacy.noise.sigma=", "privacy.noise.sigma"),
        ("privacy.noise.sigma=0.5,,1", "privacy.noise.sigma"),
        ("privacy.noise.sigma=[1]", "privacy.noise.sigma"),
        ("privacy.noise.sigma=1,1", "privacy.noise.sigma"),
        ("server.bind=1", "server.bind"),
        ("privacy.sigma=1", "privacy.sigma"),
        ("privacy.noise.sigma=1 2", "privacy.noise.sigma"),
    ],
)
def test_bad_sweep_specs_are_refused_by_key(spec: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.").replace("[", r"\[")):
        parse_sweep(spec)


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--sweep", "privacy.noise.sigmaa=1"], "privacy.noise.sigmaa"),
        (["--sweep", "privacy.noise.sigma=-1"], "privacy.noise.sigma"),
        (["--sweep", "privacy.noise.mechanism=uniform"], "privacy.noise.mechanism"),
        (["--sweep", "privacy.label.scale=1"], "privacy.label.scale"),
        (
            [
                "--sweep",
                "privacy.noise.sigma=1",
                "--set",
                'privacy.label.mechanism="marvell"',
                "--set",
                "privacy.label.scale=1",
            ],
            "privacy.label",
        ),
        (["--sweep", "train.lr=fast"], "train.lr"),
        (["--sweep", "privacy.noise.sigma=1", "--epochs", "0"], "--epochs"),
        (
            ["--sweep", "privacy.noise.sigma=1", "--sweep", "privacy.noise.sigma=2"],
            "privacy.noise.sigma",
        ),
        (["--sweep", "privacy.noise.sigma=1", "--set", "nonsense.key=1"], "nonsense.key"),
    ],
)
def test_bad_tune_input_is_one_line_naming_the_key(
    argv: list[str], named: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute: everything is refused before any training starts
    status = cli(
        "tune", "--topology", "vanilla", "--out", str(tmp_path / "o"), "--no-progress", *argv
    )
    # Assert
    out = capsys.readouterr().err.strip()
    assert status == 2
    assert out.startswith("sl-pipeline tune: error:") and named in out
    assert "\n" not in out and not (tmp_path / "o").exists()


def test_bad_audit_input_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lonely = tmp_path / "client-1.toml"
    assert cli("audit", "--config", str(lonely)) == 2
    assert "is not a file" in capsys.readouterr().err
    lonely.write_text("")
    assert cli("audit", "--config", str(lonely)) == 2
    assert "no server.toml" in capsys.readouterr().err
    with pytest.raises(PrivacyError, match=r"privacy\.label"):
        run_audit(
            "vanilla",
            "breast_cancer",
            [],
            ['privacy.label.mechanism="marvell"', "privacy.label.scale=1"],
            epochs=1,
        )
    with pytest.raises(ConfigError, match="--dataset"):
        run_audit("vanilla", "mnist")


def test_overrides_are_routed_by_key() -> None:
    client, server = split_overrides(
        [
            "privacy.noise.sigma=1",
            "privacy.label.scale=2",
            "train.epochs=3",
            'server.fuse="sum"',
            "data.seed=1",
        ]
    )
    assert client == ["privacy.noise.sigma=1", "train.epochs=3", "data.seed=1"]
    assert server == ["privacy.label.scale=2", "train.epochs=3", 'server.fuse="sum"']
    assert len(combinations(["privacy.noise.sigma=0,1", "privacy.noise.clip=1,2,3"])) == 6


def test_audit_counts_every_release_of_a_record() -> None:
    # 3 epochs: each training row is sent 3 times, each test row once per evaluation (3).
    result = run_audit(
        "vanilla", "breast_cancer", ["privacy.noise.sigma=2.0"], epochs=3, attack_seeds=1
    )
    assert result["activation_releases"] == 3
    assert result["epsilon_mechanism"] == "activation_noise"
    assert result["activation_epsilon"] > result["activation_epsilon_per_release"] > 0
    # The epsilon names its attacker, and that it treats the encoder as fixed
    assert "encoder as fixed" in result["threat_models"]["activation_epsilon"]["sees"]
    assert "dpsgd_epsilon" not in result["threat_models"]
    # The reconstruction attacker also sees each pass through that pass's encoder (3 passes),
    # and the headline figure is its strongest variant's (tabular data: the lowest MSE).
    assert result["attack_passes"] == 3
    variants = {"final", "all_passes", "geometric_passes"}
    assert {result[f"reconstruction_mse_{v}"] for v in variants} >= {result["reconstruction_mse"]}
    assert result["reconstruction_mse"] == min(result[f"reconstruction_mse_{v}"] for v in variants)
    assert result["attack_variant"] in variants


def test_the_text_audit_prints_the_u_shaped_servers_own_label_channel(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The u-shaped server reads the labels from its own outputs (docs/privacy.md); --json
    # carried the figures, the text report left them out
    argv = ["audit", "--topology", "ushaped", "--dataset", "breast_cancer", "--epochs", "1"]
    assert cli(*argv, "--attack-seeds", "1") == 0
    out = capsys.readouterr().out
    for key in ("representation_auc", "representation_input_auc"):
        assert f"{key}: " in out, out
