"""Ended runs' files on a long-lived server (``server.keep_ended_runs``,
``server.keep_ended_for_s``): removed once the runs list lets a run go, at a run's end and at
start, never half a folder, a failure logged and not fatal; the run API and ``sl-pipeline
runs`` answer a removed run with when and why. Real servers and clients over loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from workers.cli import main
from workers.client.worker import ClientWorker
from workers.server import retention, retiring
from workers.server.replycache import ReplyCache
from workers.server.retention import Retention, RunFolders
from workers.server.runs import RunBook
from workers.server.worker import ServerWorker
from workers.tools.inprocess import wait_until

from .conftest import load_client
from .test_run_lifecycle import _client, _crash, _serving
from .threadserver import ThreadServer

DATA = dict(clients=1, dataset="breast_cancer", epochs=1, ops=True)  # 15 steps a run


def _folders(files: dict[str, Path]) -> list[str]:
    runs = files["server"].parent / "state" / "runs"
    return sorted(p.name for p in runs.iterdir() if p.is_dir())


def _listed(files: dict[str, Path]) -> list[str]:
    index = files["server"].parent / "state" / "runs" / "runs.json"
    return [r["id"] for r in json.loads(index.read_text())]


@contextlib.contextmanager
def _after_runs(
    files: dict[str, Path], count: int, *sets: str
) -> Iterator[tuple[str, ServerWorker]]:
    """A server (with ``sets``) in a thread of its own, once client-1 trained ``count`` runs
    to their ends on it, one after the other: its config file, and the worker."""
    with ThreadServer(files["server"], *sets) as worker:
        for _ in range(count):
            client = ClientWorker(load_client(files["client-1"]), files["server"].parent)
            client.progress = False
            asyncio.run(asyncio.wait_for(client.run(), 120))
        yield str(files["server"]), worker


def test_runs_past_keep_ended_runs_are_removed_and_the_cli_says_so(
    deployment,  # type: ignore[no-untyped-def]
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    # Prepare / Execute: a server that keeps 2 ended runs; three runs, one after another
    files = deployment(**DATA)
    with _after_runs(files, 3, "server.keep_ended_runs=2") as (server, worker):
        status = main(["runs", "status", "run-1", "--config", server])
        _, said = capsys.readouterr()
        out = tmp_path / "run-1.pt"
        download = main(["runs", "download", "run-1", "--config", server, "--out", str(out)])
        _, download_said = capsys.readouterr()
        assert main(["runs", "list", "--config", server, "--json"]) == 0
        listed = [r["id"] for r in json.loads(capsys.readouterr()[0])["runs"]]
        removed = worker.metrics.registry.get_sample_value(
            "sl_bound_hits_total", {"table": "ended_runs"}
        )
    # Assert: run-1's folder went when run-3 ended; the CLI names the key, not a bare 404
    assert _folders(files) == ["run-2", "run-3"] and listed == ["run-2", "run-3"]
    assert status == download == 2 and removed == 1
    assert "answered 410: run 'run-1' ended and its files were removed on" in said
    assert "a group keeps its newest 2 ended runs (server.keep_ended_runs = 2)" in said
    assert "Traceback" not in said + download_said and "removed" in download_said
    assert not out.exists()


def test_without_a_runs_folder_old_ended_runs_models_leave_memory_and_are_refused(
    deployment,  # type: ignore[no-untyped-def]
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    # Prepare / Execute: a server with neither server.save nor server.runs_dir; four runs;
    # the first's model is asked for
    files = deployment(**DATA)
    with _after_runs(files, 4, 'server.save=""') as (server, worker):
        first = worker.book.runs["run-1"].engine
        out = tmp_path / "run-1.pt"
        refused = main(["runs", "download", "run-1", "--config", server, "--out", str(out)])
        _, said = capsys.readouterr()
        newest = main(["runs", "download", "run-4", "--config", server, "--out", str(out)])
    # Assert: the newest 3 ended runs keep their models in memory, the oldest's went (before:
    # each of a group's 500 ended runs kept its model in memory); it is refused, not
    # answered with freshly initialised weights
    assert worker.book.dir is None and first is None and refused == 2 and newest == 0
    assert "run-1's model was kept in memory only and has left it" in said
    assert "set server.runs_dir (or server.save)" in said


async def _three_runs(files: dict[str, Path], *sets: str) -> None:
    async with _serving(files, *sets):
        for _ in range(3):
            await _client(files, "client-1")


async def test_a_restart_applies_the_policy_and_sweeps_forgotten_folders(deployment) -> None:  # type: ignore[no-untyped-def]
    # Prepare: three runs kept; a folder of a run the list forgot (run-0, before this policy
    # existed), an operator's folder, and the trash of a removal a crash cut short
    files = deployment(**DATA)
    await _three_runs(files)
    runs = files["server"].parent / "state" / "runs"
    (runs / "run-0").mkdir()
    (runs / "run-0" / "server.pt").write_bytes((runs / "run-1" / "server.pt").read_bytes())
    year_ago = time.time() - 365 * 86400  # saved before the runs listed now
    os.utime(runs / "run-0" / "server.pt", (year_ago, year_ago))
    (runs / "notes").mkdir()
    (runs / "notes" / "server.pt").write_text("mine")
    (runs / "notes" / "readme.txt").write_text("mine too")
    (runs / ".trash-0123456789ab").mkdir()
    (runs / ".trash-0123456789ab" / "server.pt").write_text("half")
    (runs / ".trash-mine").mkdir()  # an operator's, named like the trash: not the server's
    (runs / ".trash-mine" / "notes.txt").write_text("keep")
    # Execute: the server starts again, keeping 1 ended run; then again with the default
    async with _serving(files, "server.keep_ended_runs=1") as server:
        kept = sorted(server.book.runs)
        removed_0 = server.folders.gone("run-0", None)
    async with _serving(files) as again:  # its checkpoint predates the removal
        restored = sorted(again.book.runs)
        said = again.folders.gone("run-1", None)
    # Assert: run-3 alone is kept, listed and on disk; the operator's folder stays
    assert kept == restored == ["run-3"] and _listed(files) == ["run-3"]
    assert sorted(p.name for p in runs.iterdir()) == [
        ".removed.json",
        ".trash-mine",
        "notes",
        "run-3",
        "runs.json",
    ]
    assert removed_0 is not None and "the runs list had forgotten it" in removed_0
    assert said is not None and "(server.keep_ended_runs = 1)" in said


async def test_a_failed_removal_is_logged_not_fatal_and_the_next_start_finishes_it(
    deployment,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: deleting a folder fails (an I/O error midway)
    files = deployment(**DATA)

    def broken(path: Path) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(retention, "rmtree", broken)
    caplog.set_level(logging.WARNING, "sl_pipeline.server")
    # Execute: three runs with one kept; then a start without the fault
    async with _serving(files, "server.keep_ended_runs=1") as server:
        for _ in range(3):
            last = await _client(files, "client-1")
        assert server.book.runs["run-3"].steps == last["steps"] > 0  # it trained on
    left = _folders(files)
    monkeypatch.undo()
    async with _serving(files, "server.keep_ended_runs=1"):
        pass
    # Assert: the runs left their places whole (to the trash); the next start emptied it
    assert [n for n in left if not n.startswith(".trash-")] == ["run-3"]
    assert len(left) == 3
    assert "Input/output error); the next start tries again" in caplog.text
    assert _folders(files) == ["run-3"]


async def test_runs_past_keep_ended_for_s_go_on_a_server_where_none_ends(
    deployment,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: runs are kept 0.5 s after they end; the server looks at every tick
    files = deployment(**DATA)
    monkeypatch.setattr(retiring, "RETIRE_EVERY_S", 0.0)
    async with _serving(files, "server.keep_ended_for_s=0.5") as server:
        # Execute: one run, then nothing
        first = await _client(files, "client-1")
        await wait_until(lambda: "run-1" not in server.book.runs, timeout_s=30)
        # Assert: gone from the list and the disk; the next run is not a new run-1
        assert _folders(files) == [] and _listed(files) == []
        said = server.folders.gone("run-1", None)
        second = await _client(files, "client-1")
    assert (first["run"], second["run"]) == ("run-1", "run-2")
    assert said is not None and "kept 5.79e-06 days (server.keep_ended_for_s = 0.5)" in said


async def test_a_stopped_run_whose_client_left_is_removed_in_its_turn(deployment) -> None:  # type: ignore[no-untyped-def]
    # Prepare: client-2 trains in run-1 and vanishes; an operator stops run-1
    files = deployment(**{**DATA, "clients": 2})
    sets = ("server.keep_ended_runs=1", "server.run_clients=1")
    async with _serving(files, *sets) as server:
        await _crash(files, "client-2", 2, 'checkpoint.dir=""')
        await wait_until(lambda: not server.peers, timeout_s=30)
        server.stop_run("run-1")
        # Execute: client-1 trains run-2 to its end
        second = await _client(files, "client-1")
        kept = sorted(server.book.runs)
    # Assert: run-1 went at run-2's end (before: client-2's binding kept it, and its
    # folder, for as long as the server ran)
    assert second["run"] == "run-2" and kept == ["run-2"] and _folders(files) == ["run-2"]


def _ended(book: RunBook, run_id: str, group: str, ended: float) -> None:
    run = book.start(run_id, None, ReplyCache(), group=group)  # type: ignore[arg-type]
    book.end(run, "finished")
    run.ended, run.ended_mono = ended, None  # as if it ended before the server started


def test_the_policy_keeps_the_newest_ended_by_end_and_each_group_sees_its_own(
    tmp_path: Path,
) -> None:
    # Prepare: a long run that ended last, two short ones; a bank run
    book = RunBook(tmp_path, max_runs=4, run_clients=0)
    book.retention = Retention(keep_runs=2, keep_for_s=3600)
    book.run_places = {"hospital": 2, "bank": 2}
    long = book.start("long", None, ReplyCache(), group="hospital")  # type: ignore[arg-type]
    now = time.time()
    _ended(book, "a", "hospital", now - 30)
    _ended(book, "b", "hospital", now - 20)
    _ended(book, "trial", "bank", now - 7200)
    folders = RunFolders(tmp_path, book.retention)
    # Execute: the long run ends
    gone = book.end(long, "finished")
    folders.forgotten(gone)
    # Assert: the oldest ended hospital run goes (not the run that started first and ended
    # last), and the bank's by age; a group's token learns nothing of another's removals
    assert sorted((r.key, why) for r, why in gone) == [
        ("bank:trial", "age"),
        ("hospital:a", "count"),
    ]
    assert sorted(book.runs) == ["hospital:b", "hospital:long"]
    assert folders.gone("hospital:a", "hospital") is not None
    assert folders.gone("hospital:a", "bank") is None
    assert folders.gone("hospital:b", None) is None


def test_a_removed_run_n_is_never_numbered_again(tmp_path: Path) -> None:
    # Prepare: run-1 and run-2 ended and removed by age; the list is empty
    book = RunBook(tmp_path, max_runs=1, run_clients=0)
    book.retention = Retention(keep_for_s=60)
    for i in (1, 2):
        _ended(book, f"run-{i}", "", time.time() - 120)
    RunFolders(tmp_path, book.retention).forgotten(book.retire(set()))
    # Execute: a server starts on that folder
    again = RunBook(tmp_path, max_runs=1, run_clients=0)
    again.floor = RunFolders(tmp_path, book.retention).numbers
    # Assert: its next run is run-3
    assert not book.runs and again.next_id() == "run-3"
