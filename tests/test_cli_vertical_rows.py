"""Vertical parties whose files hold different numbers of rows (no ids to align them by),
through `sl-pipeline client` (each party a process of its own): each party's one line says
what to fix, not "check data.seed" (the seeds were the same)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer

from tests.threadserver import ThreadServer
from tests.workerproc import WorkerProcess
from workers.tools.demo import stop_process


def _csv(path: Path, rows: np.ndarray) -> None:
    header = ",".join(f"f{i}" for i in range(rows.shape[1]))
    body = "\n".join(",".join(f"{v:.6g}" for v in row) for row in rows)
    path.write_text(f"{header}\n{body}\n")


@pytest.mark.slow
def test_vertical_parties_of_different_row_counts_are_told_to_match_them(  # type: ignore[no-untyped-def]
    deployment, tmp_path: Path
) -> None:
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
        # each party a process of its own, forked from one that imported torch once (the two
        # `python -m workers` starts were ~5 s of CPU of this test)
        clients = [
            WorkerProcess(
                ["client", "--config", str(files[name])],
                tmp_path / f"{name}.out",
                tmp_path / f"{name}.log",
            )
            for name in parties
        ]
        try:
            errors = [proc.communicate(timeout=120)[1] for proc in clients]
        finally:
            for proc in clients:
                stop_process(proc, timeout_s=10)  # type: ignore[arg-type]
    for proc, err in zip(clients, errors, strict=True):
        last = err.strip().splitlines()[-1]
        assert proc.returncode == 4 and "Traceback" not in err, err
        assert "same rows in the same order" in last and "data.id" in last, last
