"""Red team on ended runs' retention: an operator's ordinary mistakes (a runs list moved
away, an older checkpoint) and run numbers; real servers and clients over loopback."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import pytest

from sl_pipeline.errors import PeerError
from workers.server import retention
from workers.server.replycache import ReplyCache
from workers.server.retention import Retention, RunFolders
from workers.server.runs import RunBook

from .test_run_lifecycle import _client, _crash, _serving
from .test_run_retention import _three_runs

DATA = dict(clients=1, dataset="breast_cancer", epochs=1, ops=True)  # 15 steps a run
NO_CHECKPOINT = ('checkpoint.dir=""',)  # a server without checkpoints (the default)


def _runs(files: dict[str, Path]) -> Path:
    return files["server"].parent / "state" / "runs"


async def test_a_runs_list_moved_away_removes_no_earlier_run_at_the_next_start(
    deployment,  # type: ignore[no-untyped-def]
) -> None:
    # Prepare: three runs; runs.json moved away (what its read error tells an operator)
    files = deployment(**DATA)
    await _three_runs(files, *NO_CHECKPOINT)
    runs = _runs(files)
    models = {n: (runs / n / "server.pt").read_bytes() for n in ("run-1", "run-2", "run-3")}
    (runs / "runs.json").rename(runs.parent / "runs.json.old")
    # Execute: one run on the fresh list, then a restart
    async with _serving(files, *NO_CHECKPOINT):
        fresh = await _client(files, "client-1")
    async with _serving(files, *NO_CHECKPOINT):
        pass
    # Assert: every earlier run's model is still there, unchanged; the new run is run-4
    kept = {n: (runs / n / "server.pt").read_bytes() for n in models if (runs / n).exists()}
    assert kept == models and fresh["run"] == "run-4"


async def test_a_restart_from_an_older_checkpoint_keeps_the_runs_the_list_holds(
    deployment,  # type: ignore[no-untyped-def]
) -> None:
    # Prepare: run-1, a copy of the checkpoints (a backup), run-2 and run-3; the backup put
    # back (an operator's restore, or checkpoint.dir pointed elsewhere and back)
    files = deployment(**DATA)
    state = files["server"].parent / "state"
    ckpts, backup = state / "server-checkpoints", state.parent / "backup"
    async with _serving(files):
        await _client(files, "client-1")
        shutil.copytree(ckpts, backup)
        for _ in range(2):
            await _client(files, "client-1")
    shutil.rmtree(ckpts)
    backup.rename(ckpts)
    # Execute: the server starts again from the older checkpoint; client-1 trains
    async with _serving(files) as server:
        listed = sorted(server.book.runs)
        again = await _client(files, "client-1")
    # Assert: run-2 and run-3 (ended after that checkpoint) stay listed and on disk
    assert listed == ["run-1", "run-2", "run-3"] and again["run"] == "run-4"
    assert all((_runs(files) / n / "server.pt").exists() for n in listed)


def test_a_run_n_removed_above_the_listed_ones_is_not_numbered_again(tmp_path: Path) -> None:
    # Prepare: keep 1 ended run; run-5 trains long while run-6 and run-7 end
    book = RunBook(tmp_path, max_runs=3, run_clients=0)
    book.retention = Retention(keep_runs=1)
    folders = RunFolders(tmp_path, book.retention)
    book.floor = folders.numbers
    long = book.start("run-5", None, ReplyCache())  # type: ignore[arg-type]
    for run_id in ("run-6", "run-7"):
        folders.forgotten(book.end(book.start(run_id, None, ReplyCache()), "finished"))  # type: ignore[arg-type]
    # Execute: run-5 ends last (run-7, which ended before it, goes)
    folders.forgotten(book.end(long, "finished"))
    # Assert: run-5 alone is listed; the next run is run-8, not run-6 again
    assert sorted(book.runs) == ["run-5"] and book.next_id() == "run-8"


def test_removing_a_run_takes_no_other_group_folder_inside_its_own(tmp_path: Path) -> None:
    # Prepare: run "hospital" of a server without groups; then groups, and the hospital
    # group's run-1 in runs/hospital/run-1 (the same folder as that run's)
    (tmp_path / "hospital" / "run-1").mkdir(parents=True)
    (tmp_path / "hospital" / "server.pt").write_text("the old run's")
    (tmp_path / "hospital" / "run-1" / "server.pt").write_text("the hospital's run-1")
    book = RunBook(tmp_path, max_runs=3, run_clients=0)
    book.retention = Retention(keep_runs=1)
    folders = RunFolders(tmp_path, book.retention)
    old = book.start("hospital", None, ReplyCache())  # type: ignore[arg-type]
    book.end(old, "finished")
    # Execute: a newer ungrouped run ends; run "hospital" goes
    gone = book.end(book.start("later", None, ReplyCache()), "finished")  # type: ignore[arg-type]
    folders.forgotten(gone)
    # Assert: its model went; the hospital group's run-1 is still there
    assert [r.key for r, _ in gone] == ["hospital"]
    assert not (tmp_path / "hospital" / "server.pt").exists()
    assert (tmp_path / "hospital" / "run-1" / "server.pt").read_text() == "the hospital's run-1"


async def test_a_folder_the_server_may_not_read_leaves_its_start_alone(
    deployment,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: one run; an operator's folder under the runs folder the server's user may
    # not read (another user's, mode 0700: simulated, as the tests run as root)
    files = deployment(**DATA)
    async with _serving(files):
        await _client(files, "client-1")
    private = _runs(files) / "archive"
    private.mkdir()
    listing = Path.iterdir

    def iterdir(path: Path):  # type: ignore[no-untyped-def]
        if path == private:
            raise PermissionError(13, "Permission denied", str(path))
        return listing(path)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    caplog.set_level(logging.WARNING, "sl_pipeline.server")
    # Execute: the server starts again, and client-1 trains
    async with _serving(files) as server:
        again = await _client(files, "client-1")
        listed = sorted(server.book.runs)
    # Assert: it started and served; the folder is named in a warning and left
    assert again["run"] == "run-2" and listed == ["run-1", "run-2"]
    assert private.is_dir() and f"cannot read {private}" in caplog.text


def test_one_group_s_churn_keeps_another_group_s_removed_runs_answered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: 3 removed runs remembered (10,000 on a server); the bank's trial removed
    monkeypatch.setattr(retention, "KEEP_REMOVED", 3)
    book = RunBook(tmp_path, max_runs=4, run_clients=0)
    book.retention = Retention(keep_runs=1)
    book.run_places = {"hospital": 2, "bank": 2}
    folders = RunFolders(tmp_path, book.retention)
    for run_id in ("trial", "second"):
        run = book.start(run_id, None, ReplyCache(), group="bank")  # type: ignore[arg-type]
        folders.forgotten(book.end(run, "finished"))
    # Execute: a hospital client churns through 6 short runs
    for i in range(6):
        run = book.start(f"h{i}", None, ReplyCache(), group="hospital")  # type: ignore[arg-type]
        folders.forgotten(book.end(run, "finished"))
    # Assert: the bank's token still learns why its trial is gone (also after a restart)
    again = RunFolders(tmp_path, book.retention)
    assert folders.gone("bank:trial", "bank") is not None
    assert again.gone("bank:trial", "bank") is not None
    assert len([k for k in again.removed if k.startswith("hospital:")]) == 3


async def test_runs_removed_at_start_stay_removed_when_their_record_could_not_be_written(
    deployment,  # type: ignore[no-untyped-def]
) -> None:
    # Prepare: three runs; a restart keeping 1 ended run, while .removed.json cannot be
    # written (a full disk: simulated by a folder where its temp file goes)
    files = deployment(**DATA)
    await _three_runs(files)
    blocker = _runs(files) / ".removed.json.tmp"
    blocker.mkdir()
    async with _serving(files, "server.keep_ended_runs=1"):
        pass
    blocker.rmdir()
    # Execute: the operator goes back to the default keep
    async with _serving(files) as server:
        listed = sorted(server.book.runs)
    # Assert: run-1 and run-2, whose models are gone, are not listed again
    assert listed == ["run-3"]
    assert not (_runs(files) / "run-1").exists()


def test_a_group_folder_on_another_disk_has_its_runs_removed(tmp_path: Path) -> None:
    # Prepare: the bank's runs on another disk (its folder a link to /dev/shm), two ended
    disk = Path("/dev/shm")
    if not disk.is_dir() or disk.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no second filesystem at /dev/shm")
    elsewhere = Path(tempfile.mkdtemp(dir=disk))
    try:
        (tmp_path / "bank").symlink_to(elsewhere)
        book = RunBook(tmp_path, max_runs=2, run_clients=0)
        book.retention = Retention(keep_runs=1)
        folders = RunFolders(tmp_path, book.retention)
        for run_id in ("trial", "second"):
            (elsewhere / run_id).mkdir()
            (elsewhere / run_id / "server.pt").write_text(run_id)
            run = book.start(run_id, None, ReplyCache(), group="bank")  # type: ignore[arg-type]
            # Execute: each ends; the second's end lets the trial go
            folders.forgotten(book.end(run, "finished"))
        left = sorted(p.name for p in elsewhere.iterdir())
    finally:
        shutil.rmtree(elsewhere)
    # Assert: the trial's folder went (a rename across disks failed: kept forever)
    assert sorted(book.runs) == ["bank:second"] and left == ["second"]


async def test_a_client_resuming_into_its_removed_run_is_refused_not_moved_into_a_new_one(
    deployment,  # type: ignore[no-untyped-def]
) -> None:
    # Prepare: client-1 trains run "mine" and dies; the operator stops "mine"; client-2's
    # run ends after it, so a server keeping 1 ended run removes "mine" (at its next start)
    files = deployment(**{**DATA, "clients": 2, "epochs": 30})
    sets = ("server.keep_ended_runs=1", "server.run_clients=0")
    async with _serving(files, *sets) as server:
        await _crash(files, "client-1", 3, "client.run=mine")
        server.stop_run("mine")
        await _client(files, "client-2", "train.epochs=1")
    async with _serving(files, *sets) as server:
        listed = sorted(server.book.runs)
        # Execute: client-1 starts again (from its checkpoint) for run "mine"
        with pytest.raises(PeerError) as refused:
            await _client(files, "client-1", "client.run=mine")
        after = sorted(server.book.runs)
    # Assert: refused in one line saying the run was removed; no fresh "mine" trained
    assert listed == after == ["run-1"]
    assert refused.value.remote_code == "run_ended" and "removed" in str(refused.value)


async def test_an_unreadable_removed_runs_record_is_kept_aside_not_overwritten(
    deployment,  # type: ignore[no-untyped-def]
) -> None:
    # Prepare: three runs; .removed.json torn (a disk fault, a careless edit)
    files = deployment(**DATA)
    await _three_runs(files)
    record = _runs(files) / ".removed.json"
    record.write_text('{"removed": [{"id": "run-0"')
    # Execute: a start that removes run-1 and run-2 (keeping 1)
    async with _serving(files, "server.keep_ended_runs=1"):
        pass
    # Assert: the torn record is kept for its operator beside the new one
    assert (_runs(files) / ".removed.json.bad").read_text() == '{"removed": [{"id": "run-0"'
    assert sorted(json.loads(record.read_text())["numbers"].items()) == [("", 3)]
