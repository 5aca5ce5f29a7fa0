"""A long-lived server's runs list (``runs.json``) is the operator's file to move, restore
or edit: whatever it holds, the server's start is one line naming the problem and exit 2,
or a server whose every listed run has values of the right types."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from workers.cli import main


@pytest.mark.timeout(120)  # without the check some of these start a server that serves on
@pytest.mark.parametrize(
    ("content", "says"),
    [
        ("null", "holds NoneType, not a list of runs"),
        ('{"id": "run-1"}', "holds dict, not a list of runs"),
        ('[{"id": "run-1", "ended": "yesterday"}]', "run 'run-1' in "),
        ('[{"id": "run-1", "steps": [3]}]', "run 'run-1' in "),
        ('[{"id": "run-1", "state": "paused"}]', "state 'paused' is none of active"),
        ('[{"id": "run-1", "accuracies": [0.9]}]', "run 'run-1' in "),
    ],
)
def test_a_runs_list_of_wrong_shape_stops_the_start_in_one_line(
    deployment,  # type: ignore[no-untyped-def]
    capsys: pytest.CaptureFixture[str],
    content: str,
    says: str,
) -> None:
    # Prepare: a runs list as an operator's edit or a torn restore leaves it
    files = deployment(clients=1, dataset="breast_cancer")
    runs = Path(files["server"]).parent / "state" / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    (runs / "runs.json").write_text(content)
    # Execute
    code = main(["server", "--config", str(files["server"]), "--set", 'ops.listen=""'])
    # Assert: exit 2, one line naming the file and what to do (before: a TypeError
    # traceback for null; a text "ended" started the server and failed its first retention)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("sl-pipeline server: error: ") and says in err[0], err[0]
    assert "runs.json" in err[0] and "move it away" in err[0]
    assert json.loads(content) == json.loads((runs / "runs.json").read_text())  # kept as it was
