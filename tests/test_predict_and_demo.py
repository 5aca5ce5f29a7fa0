"""Inference after training, and every topology's demo against its central baseline."""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sl_pipeline.config import ClientConfig
from sl_pipeline.data import load_party_data
from sl_pipeline.models import build_segments
from sl_pipeline.sources import load_source
from workers.cli import main
from workers.tools import demo
from workers.tools.inprocess import run_deployment
from workers.tools.localdeploy import MULTI_PARTY

from .conftest import Procs, load_client, wait_listening
from .workerproc import forked_subprocess


def _write_csv(path: Path, x: np.ndarray) -> None:
    header = ",".join(f"f{i}" for i in range(x.shape[1]))
    np.savetxt(path, x, delimiter=",", header=header, comments="")


def _raw_rows(cfg: ClientConfig, base: Path, ids: torch.Tensor) -> np.ndarray:
    """Rows as the data set holds them, unscaled (predict scales them as training did:
    these tests wrote the scaled rows, and passed while predict did not scale)."""
    raw = load_source(cfg.data, base).x
    assert raw is not None
    return raw[ids.numpy()]


@pytest.mark.parametrize("topology", ["vanilla", "ushaped"])
async def test_predict_matches_the_in_process_model(
    deployment, procs: Procs, topology: str
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: train, so each party saves its own segment
    files = deployment(topology=topology, dataset="breast_cancer", epochs=2)
    await run_deployment(files)
    base = files["server"].parent
    cfg = load_client(files["client-1"])
    test = load_party_data(cfg.data, base, 2).test
    x = test.x[:40]  # scaled with the training rows' statistics, as the segments saw them
    _write_csv(base / "inputs.csv", _raw_rows(cfg, base, test.ids[:40]))  # as a user has them
    # Execute: the server restarts from its saved segment; predict sends only activations
    server = procs.fork("server", files["server"])
    wait_listening(files["server"], server)
    # `sl-pipeline predict` in a process of its own, forked (a torch import less)
    run = procs.fork("predict", files["client-1"], "--input", str(base / "inputs.csv"), "--json")
    out, err = run.communicate(timeout=120)
    assert run.returncode == 0, err
    predicted = json.loads(out.strip().splitlines()[-1])
    # Assert: the same as running the saved segments in one process
    segments = build_segments(cfg.model, topology)
    mine = torch.load(base / "state" / "client-1.pt", weights_only=True)
    segments[0].load_state_dict(mine["bottom"])
    segments[1].load_state_dict(torch.load(base / "state" / "server.pt", weights_only=True))
    if "head" in mine:  # u-shaped: the client keeps the last layers too
        segments[2].load_state_dict(mine["head"])
    with torch.no_grad():
        expected = x
        for segment in segments:
            segment.eval()
            expected = segment(expected)
    assert predicted["count"] == 40
    assert predicted["predictions"] == expected.argmax(1).tolist()
    assert torch.allclose(torch.tensor(predicted["logits"]), expected, atol=1e-4)


async def test_vertical_predict_fuses_every_party(deployment, procs: Procs) -> None:  # type: ignore[no-untyped-def]
    files = deployment(topology="vertical", clients=2, dataset="breast_cancer", epochs=2)
    await run_deployment(files)
    base = files["server"].parent
    cfgs = [load_client(files[f"client-{i}"]) for i in (1, 2)]
    test = load_party_data(replace(cfgs[0].data, feature_slice=[]), base, 2).test
    full = test.x[:30]
    _write_csv(base / "rows.csv", _raw_rows(cfgs[0], base, test.ids[:30]))
    server = procs.fork("server", files["server"])
    wait_listening(files["server"], server)
    runs = [  # each party's `sl-pipeline predict` at once, in forked processes
        procs.fork("predict", files[f"client-{i}"], "--input", str(base / "rows.csv"), "--json")
        for i in (1, 2)
    ]
    outs = [r.communicate(timeout=120) for r in runs]
    assert [r.returncode for r in runs] == [0, 0], outs[0][1][-1500:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    # the same rows through the saved segments in one process
    from sl_pipeline.models import vertical_bottom, vertical_top

    parts = []
    for i, cfg in enumerate(cfgs):
        bottom = vertical_bottom(cfg.model, i)
        bottom.load_state_dict(
            torch.load(base / "state" / f"client-{i + 1}.pt", weights_only=True)["bottom"]
        )
        a, z = cfg.data.feature_slice
        parts.append(bottom(full[:, a:z]))
    top = vertical_top(cfgs[0].model, 2, "concat")
    top.load_state_dict(torch.load(base / "state" / "server.pt", weights_only=True))
    with torch.no_grad():
        expected = top(torch.cat(parts, dim=1))
    for result in results:
        assert result["predictions"] == expected.argmax(1).tolist()
        assert torch.allclose(torch.tensor(result["logits"]), expected, atol=1e-4)


DETERMINISTIC = ("vanilla", "ushaped", "multihop", "vertical", "multitask")
SCHEDULE_SLACK = 0.08  # accuracy slack where turns or the OS order the clients' updates
SUMMARY_KEYS = {
    "topology", "dataset", "clients", "epochs", "steps", "test_accuracy", "train_loss",
    "bytes_sent", "bytes_received", "wall_seconds", "baseline_accuracy",
}  # fmt: skip


# Epochs where one is not enough (DETERMINISTIC topologies train one): round-robin's turns
# reorder the updates, and two epochs pass the segment's weights from client-1 to client-2 and
# back (it reads 0.8579 against 0.8245, every run); SplitFed's parallel clients reorder them
# by scheduling (after one epoch of 46 steps it reads 0.33 against 0.47). SplitFed at 3
# epochs read 0.891-0.953 against 0.9415 in 12 runs two at a time, and 0.8389 once in a fresh
# clone's CI; at 5 epochs 0.9387-0.9582 against 0.9443 in 12 runs two at a time
EPOCHS = {"roundrobin": "2", "splitfed": "5"}


def demo_against_baseline(topology: str, *extra: str) -> dict[str, Any]:
    """``sl-pipeline demo --topology T --baseline --json ...`` through ``workers.cli.main``,
    ``EPOCHS`` epochs (one where split == central step for step). In this process: the demo
    starts its workers as processes all the same, and the console script's own start (a torch
    import, seconds of CPU) is tested by tests/test_readme.py's demo block."""
    epochs = EPOCHS.get(topology, "1")
    argv = ["demo", "--topology", topology, "--baseline", "--json", "--epochs", epochs, *extra]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(argv)
    assert status == 0, err.getvalue()[-2000:]
    return dict(json.loads(out.getvalue().strip().splitlines()[-1]))


# vanilla, the default topology, is README's `sl-pipeline demo` block (tests/test_readme.py)
OTHER_TOPOLOGIES: list[tuple[str, tuple[str, ...]]] = [
    ("ushaped", ()),
    ("vertical", ()),
    ("vertical", ("--label-client",)),
    ("multitask", ()),
    ("multihop", ()),
    ("roundrobin", ()),
    ("splitfed", ()),
]


@pytest.fixture
def forked_demo(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The demo's workers forked from the forkserver, not started as ``python -m workers``
    (3-4 torch imports less per demo, seconds of CPU each): what is tested here is what the
    demo does; tests/test_readme.py's demo block starts it as a user does."""
    monkeypatch.setattr(demo, "subprocess", forked_subprocess(tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize(("topology", "extra"), OTHER_TOPOLOGIES)
@pytest.mark.usefixtures("forked_demo")
def test_demo_runs_every_topology_with_no_other_flag(topology: str, extra: tuple[str, ...]) -> None:
    # Execute: what a user types
    summary = demo_against_baseline(topology, *extra)
    # Assert: the topology picked its own number of parties, trained, and matches the same
    # architecture trained centrally (to the sample where the schedule is deterministic;
    # SplitFed interleaves parallel clients and round-robin takes turns, which reorders updates)
    assert set(summary) >= SUMMARY_KEYS
    assert summary["topology"] == topology and summary["steps"] > 0
    assert summary["devices"] == ["cpu"]  # the server and every client
    assert summary["clients"] == (2 if topology in MULTI_PARTY else 1)
    # SplitFed's parallel clients meet the shared server segment in whatever order the OS
    # schedules them; its 5 epochs (``EPOCHS``) keep that within 0.006 of central
    slack = 0.02 if topology in DETERMINISTIC else SCHEDULE_SLACK
    assert summary["test_accuracy"] >= summary["baseline_accuracy"] - slack


# The README's figure for vanilla digits at the default 8 epochs (split == central), by the
# kernels torch picks for the CPU: their sums round differently (an AVX-512 host read 0.9749
# where ATEN_CPU_CAPABILITY=avx2 on the same host read the table's 0.9694)
DOCUMENTED_VANILLA = {"AVX2": 0.9694, "AVX512": 0.9749}


async def test_vanilla_reaches_its_documented_accuracy_at_default_epochs(deployment) -> None:  # type: ignore[no-untyped-def]
    import torch

    run = await run_deployment(deployment(dataset="digits", epochs=8))
    accuracy = run.summaries[0]["test_accuracy"]
    documented = DOCUMENTED_VANILLA.get(torch.backends.cpu.get_cpu_capability())
    if documented is None:  # a kernel set no session measured: within the table's range
        assert 0.96 <= accuracy <= 0.99
    else:
        assert accuracy == pytest.approx(documented, abs=0.002)
