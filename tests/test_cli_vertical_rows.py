"""Vertical parties whose files hold different numbers of rows (no ids to align them by),
through the console script: each party's one line says what to fix, not "check data.seed"
(the seeds were the same)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer

from tests.threadserver import ThreadServer


def _csv(path: Path, rows: np.ndarray) -> None:
    header = ",".join(f"f{i}" for i in range(rows.shape[1]))
    body = "\n".join(",".join(f"{v:.6g}" for v in row) for row in rows)
    path.write_text(f"{header}\n{body}\n")


@pytest.mark.slow
def test_vertical_parties_of_different_row_counts_are_told_to_match_them(deployment) -> None:  # type: ignore[no-untyped-def]
    files = deployment(topology="vertical", dataset="breast_cancer", clients=2)
    x = load_breast_cancer().data
    parties = {"client-1": x[:, :15], "client-2": x[:500, 15:]}  # 569 rows, then 500
    for name, rows in parties.items():
        config = files[name]
        _csv(config.parent / f"{name}.csv", rows)
        text = config.read_text()
        text = re.sub(r"\[data\]\n(?:.+\n)*", f'[data]\npath = "{name}.csv"\n', text)
        config.write_text(text)
    with ThreadServer(files["server"]):
        clients = [
            subprocess.Popen(
                [sys.executable, "-m", "workers", "client", "--config", str(files[name])],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for name in parties
        ]
        errors = [proc.communicate(timeout=120)[1] for proc in clients]
    for proc, err in zip(clients, errors, strict=True):
        last = err.strip().splitlines()[-1]
        assert proc.returncode == 4 and "Traceback" not in err, err
        assert "same rows in the same order" in last and "data.id" in last, last
