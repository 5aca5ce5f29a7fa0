"""Vertical parties holding different, overlapping people in different orders, keyed by id.

They align by private set intersection through the server: each trains on exactly the
intersection, as well as on the same rows pre-aligned, and no id outside the intersection
shows up in anything a party or the server prints or saves.
"""

from __future__ import annotations

import asyncio
import json
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sl_pipeline.config import ClientConfig, ServerConfig, load
from sl_pipeline.messages import Message
from workers.cli import main
from workers.client import align
from workers.client.predict import run_predict
from workers.client.worker import ClientWorker
from workers.server.worker import ServerWorker
from workers.tools.inprocess import run_deployment
from workers.tools.localdeploy import to_toml

from .conftest import Procs
from .datafiles import party_csv, wisconsin_rows
from .test_topologies import record_inbound
from .workerproc import WorkerProcess

EPOCHS = 6
A_COLUMNS, B_COLUMNS = range(0, 15), range(15, 30)


def _use_data(config: Path, checkpoint: bool = False, **data: Any) -> None:
    """Point a generated client config at the user's own file (and keep its state)."""
    cfg = tomllib.loads(config.read_text())
    cfg["data"] = {"seed": 0, **data}
    if checkpoint:  # every 10 steps, the last two kept: one of them before the run's end
        cfg["checkpoint"] = {"dir": "ckpt", "every_steps": 10, "keep": 2, "fsync": False}
    config.write_text(to_toml(cfg))


def _people(seed: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(shared 80%, only at A 10%, only at B 10%) of the Wisconsin rows."""
    n = len(wisconsin_rows()[0])
    order = np.random.default_rng(seed).permutation(n)
    tenth = n // 10
    return order[2 * tenth :], order[:tenth], order[tenth : 2 * tenth]


def _shuffled(rows: np.ndarray, seed: int) -> list[int]:
    return [int(r) for r in np.random.default_rng(seed).permutation(rows)]


async def _finish(proc: WorkerProcess, timeout_s: float = 240) -> tuple[str, str]:
    out, err = await asyncio.to_thread(proc.communicate, timeout=timeout_s)
    assert proc.returncode == 0, err[-2000:]
    return out, err


def _strict(constant: str) -> None:
    raise AssertionError(f"--json printed {constant}, which is not JSON (jq, JSON.parse refuse it)")


def _last_json(out: str) -> dict[str, Any]:
    return json.loads(out.strip().splitlines()[-1], parse_constant=_strict)


def _bytes_seen(messages: list[Message]) -> bytes:
    """Everything the server was given: meta and tensor bytes of every accepted message."""
    parts = [repr(dict(m.meta)).encode() for m in messages]
    parts += [t.contiguous().numpy().tobytes() for m in messages for t in m.tensors.values()]
    return b"\n".join(parts)


class _Server:
    """The server in this test's loop, so the test sees every message it accepts."""

    def __init__(self, config: Path, *overrides: str) -> None:
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(
            ServerWorker(load(ServerConfig, config, list(overrides)), config.parent).serve(
                self.stop
            )
        )

    async def close(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 15)


async def test_psi_aligned_parties_train_on_the_intersection_and_leak_no_other_id(
    deployment, procs: Procs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: A (labels + 15 columns) and B (15 other columns), 80% shared, own orders
    ids = wisconsin_rows()[0]
    shared, only_a, only_b = _people()
    files = deployment(
        topology="vertical", clients=2, dataset="breast_cancer", epochs=EPOCHS, label_client=True
    )
    base = files["server"].parent
    a = party_csv(tmp_path / "a.csv", _shuffled(np.r_[shared, only_a], 2), A_COLUMNS, True)
    b = party_csv(tmp_path / "b.csv", _shuffled(np.r_[shared, only_b], 3), B_COLUMNS)
    _use_data(files["client-1"], True, path=str(a), id="id", label="diagnosis")
    _use_data(files["client-2"], True, path=str(b), id="id")
    seen = record_inbound(monkeypatch)
    # Execute: each party through the CLI in its own (forked) process
    server = _Server(files["server"])
    runs = [
        procs.fork("client", files[n], "--json", "--no-progress") for n in ("client-1", "client-2")
    ]
    try:
        outputs = [await _finish(run) for run in runs]
    finally:
        await server.close()  # it saves its segment; predict runs on a fresh start
    label_party, feature_party = (_last_json(out) for out, _ in outputs)
    # ... then predict on new files with other overlapping ids, in other orders
    new_a = party_csv(tmp_path / "new_a.csv", _shuffled(np.r_[shared[:50], only_a], 4), A_COLUMNS)
    new_b = party_csv(tmp_path / "new_b.csv", _shuffled(np.r_[shared[:50], only_b], 5), B_COLUMNS)
    server = _Server(files["server"])
    try:
        # both at once, each in a thread of its own, through what `sl-pipeline predict` runs
        results = await asyncio.wait_for(
            asyncio.gather(
                *(
                    asyncio.to_thread(run_predict, load(ClientConfig, files[n]), base, path)
                    for n, path in (("client-1", new_a), ("client-2", new_b))
                )
            ),
            120,
        )
    finally:
        await server.close()
    # Assert: exactly the intersection, on both sides
    assert label_party["aligned_rows"] == feature_party["aligned_rows"] == len(shared)
    assert label_party["steps"] == feature_party["steps"] > 0
    assert feature_party["train_loss"] is None and label_party["train_loss"] > 0  # no labels
    expected_ids = sorted(ids[i] for i in shared[:50])
    assert results[0]["ids"] == results[1]["ids"] == expected_ids
    assert results[0]["predictions"] == results[1]["predictions"]
    labels = dict(zip(ids, wisconsin_rows()[2], strict=True))
    right = sum(labels[i] == p for i, p in zip(expected_ids, results[0]["labels"], strict=True))
    # ... no id outside it anywhere a party prints or saves; the server is given no id at all
    outside = [ids[i] for i in np.r_[only_a, only_b]]
    party_text = "".join(out + err for out, err in outputs) + json.dumps(results)
    party_state = b"".join(p.read_bytes() for p in (base / "state").glob("client-*.pt"))
    assert not [i for i in outside if i in party_text or i.encode() in party_state]
    server_state = (base / "state" / "server.pt").read_bytes()
    given = _bytes_seen(seen)
    assert any(m.meta.get("op") == "psi" for m in seen)
    assert not [i for i in ids if i.encode() in given or i.encode() in server_state]
    assert f"aligned by PSI: {len(shared)} of" in outputs[0][1]
    # ... a party resuming alone from its checkpoint reuses the agreed rows (no PSI, no server)
    saved = base / "ckpt" / "client-2.aligned.json"
    assert not [i for i in ids if i in saved.read_text()]
    # (from the checkpoint before the last: the last says the run finished, and a start after
    # a finished run trains a new run afresh, whatever epochs it asks for)
    checkpoints = sorted((base / "ckpt").glob("client-2-*.ckpt"))
    assert len(checkpoints) == 2, checkpoints
    checkpoints[-1].unlink()
    resumed = ClientWorker(load(ClientConfig, files["client-2"]), base, progress=False)
    assert resumed.resumed_from > 0 and resumed.conn is None
    await resumed.align()
    assert resumed.aligned_rows == len(shared)
    assert len(resumed.data.train) + len(resumed.data.test) == len(shared)
    # ... and the same accuracy as the same rows pre-aligned (by position, same split)
    pre = deployment(
        topology="vertical", clients=2, dataset="breast_cancer", epochs=EPOCHS, label_client=True
    )
    by_id = sorted(shared.tolist(), key=lambda i: ids[i])
    pa = party_csv(tmp_path / "pa.csv", by_id, A_COLUMNS, True)
    pb = party_csv(tmp_path / "pb.csv", by_id, B_COLUMNS)
    _use_data(pre["client-1"], path=str(pa), id="id", label="diagnosis", align="position")
    _use_data(pre["client-2"], path=str(pb), id="id", align="position")
    baseline = (await run_deployment(pre)).summaries[0]
    assert baseline["test_samples"] == label_party["test_samples"]
    print(
        "accuracy after PSI", label_party["test_accuracy"], "pre-aligned", baseline["test_accuracy"]
    )
    assert abs(label_party["test_accuracy"] - baseline["test_accuracy"]) <= 0.02
    assert label_party["test_accuracy"] >= 0.9
    # ... with the trained model: predicting (its PSI first) starts no run of its own on the
    # restarted server, which would answer with an untrained top (at chance, 23/50)
    print("right after a server restart", right, "of 50")
    assert right / 50 >= 0.9
    runs = json.loads((base / "state" / "runs" / "runs.json").read_text())
    assert [r["id"] for r in runs] == ["run-1"] and runs[0]["state"] == "finished"


def test_psi_settings_and_widths_are_checked_before_joining(
    deployment, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    files = deployment(topology="vertical", clients=2, dataset="breast_cancer", label_client=True)
    shared, only_a, _ = _people()
    a = party_csv(tmp_path / "a.csv", _shuffled(np.r_[shared, only_a], 2), A_COLUMNS, True)
    _use_data(files["client-1"], path=str(a), id="id", label="diagnosis")
    status = main(["client", "--config", str(files["client-1"]), "--set", "client.group_key="])
    assert status == 2 and "client.group_key" in capsys.readouterr().err
    status = main(["client", "--config", str(files["client-1"]), "--set", "client.group=[]"])
    assert status == 2 and "client.group" in capsys.readouterr().err
    # a width that cannot fit is refused before the PSI, too (no server runs here)
    status = main(["client", "--config", str(files["client-1"]), "--set", "model.in_shape=[14]"])
    assert status == 2 and "gives [15] features" in capsys.readouterr().err


async def test_a_party_that_starts_late_is_waited_for(
    deployment, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: short PSI waits, so the first party reposts while the second is not there yet;
    # and the session a party left on a PSI wait gives its name up to the party's rejoin
    # after 0.5 s, not the default 5 s (each party rejoins after each wait)
    monkeypatch.setattr(align, "PSI_WAIT_S", 0.5)
    shared, only_a, only_b = _people()
    files = deployment(topology="vertical", clients=2, dataset="breast_cancer", label_client=True)
    base = files["server"].parent
    a = party_csv(tmp_path / "a.csv", _shuffled(np.r_[shared, only_a], 2), A_COLUMNS, True)
    b = party_csv(tmp_path / "b.csv", _shuffled(np.r_[shared, only_b], 3), B_COLUMNS)
    _use_data(files["client-1"], path=str(a), id="id", label="diagnosis")
    _use_data(files["client-2"], path=str(b), id="id")
    server = _Server(files["server"], "server.takeover_after_s=0.5")
    first = ClientWorker(load(ClientConfig, files["client-1"]), base, progress=False)
    early = asyncio.create_task(first.run())
    try:
        # Execute: the second party joins after the first has posted again twice
        for _ in range(300):  # bounded: 30 s
            if first.link.retries >= 2 or early.done():
                break
            await asyncio.sleep(0.1)
        second = ClientWorker(load(ClientConfig, files["client-2"]), base, progress=False)
        summaries = await asyncio.wait_for(asyncio.gather(early, second.run()), 120)
    finally:
        await server.close()
    # Assert: both aligned on the intersection and trained
    assert first.link.retries >= 2
    assert [s["aligned_rows"] for s in summaries] == [len(shared), len(shared)]
    assert summaries[0]["steps"] == summaries[1]["steps"] > 0
