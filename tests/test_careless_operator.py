"""What a careless operator types: each mistake is one line naming it and what to do, with
the documented exit status, never a traceback, and nothing already saved is lost."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import time
from pathlib import Path

import pytest
import torch

from workers.cli import main
from workers.client.worker import ClientWorker
from workers.server.worker import ServerWorker
from workers.tools.demo import stop_process
from workers.tools.inprocess import build_deployment, wait_until
from workers.tools.localdeploy import free_port

from .conftest import load_client, wait_listening
from .threadserver import ThreadServer
from .workerproc import WorkerProcess


def _fails(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return code, lines[0]


@pytest.mark.parametrize("verb", [["init"], ["keygen", "site-a", "--out"]])
def test_an_output_folder_that_cannot_be_made_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], verb: list[str]
) -> None:
    taken = tmp_path / "a-file"
    taken.write_text("not a folder\n")
    code, line = _fails(capsys, *verb, str(taken / "sub"))
    assert code == 2
    assert f"sl-pipeline {verb[0]}: error:" in line and str(taken) in line
    assert taken.read_text() == "not a folder\n"


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--epochs", "0"], "--epochs must be at least 1"),
        (["--epochs", "-3"], "--epochs must be at least 1"),
        (["--seed", "-5"], "--seed must not be negative"),
        (["--topology", "splitfed", "--clients", "1"], "--clients must be at least 2"),
        (
            ["--topology", "vertical", "--dataset", "breast_cancer", "--clients", "31"],
            "--clients must be at most 30",
        ),
    ],
)
def test_init_and_demo_refuse_impossible_options_before_writing_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], named: str
) -> None:
    for verb in (["init", str(tmp_path / "d")], ["demo", "--dir", str(tmp_path / "d")]):
        code, line = _fails(capsys, *verb, *flags)
        assert code == 2 and named in line, line
        assert not (tmp_path / "d").exists()


async def test_a_long_lived_relay_serves_each_run_afresh(deployment) -> None:  # type: ignore[no-untyped-def]
    """Two runs one after the other through one server and one relay: the second is the
    first again (same seeds, fresh segments), not answered from the relay's memory of the
    first (a run of fewer steps than its reply cache holds was never sent on) nor trained
    on the first run's relay segment."""
    files = deployment(topology="multihop", dataset="breast_cancer", clients=1)
    run = build_deployment(files)
    assert run.relay is not None
    base = files["server"].parent
    stop = asyncio.Event()
    services = [asyncio.ensure_future(run.server.serve(stop))]
    summaries = []
    try:
        await wait_until(run.server.ready)
        services.append(asyncio.ensure_future(run.relay.serve(stop)))
        await wait_until(run.relay.ready)
        for count in (1, 2):
            client = ClientWorker(load_client(files["client-1"]), base, progress=False)
            summaries.append(await asyncio.wait_for(client.run(), 120))
            await wait_until(lambda n=count: _finished(run.server) == n)  # type: ignore[misc]
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*services, return_exceptions=True), 30)
    first, second = run.server.book.runs.values()
    assert first.steps == second.steps == summaries[0]["steps"] > 0
    assert summaries[1]["test_accuracy"] == summaries[0]["test_accuracy"]
    assert run.relay.steps_applied == 2 * summaries[0]["steps"]
    one, two = (torch.load(r.model, weights_only=True) for r in (first, second))
    assert all(torch.equal(one[k], two[k]) for k in one)


def _finished(server: ServerWorker) -> int:
    return sum(r.state == "finished" for r in server.book.runs.values())


@pytest.mark.parametrize("content", [b"x", b"PK\x03\x04 truncated"])
def test_a_corrupt_saved_model_is_one_line(
    deployment, capsys: pytest.CaptureFixture[str], content: bytes
) -> None:  # type: ignore[no-untyped-def]
    files = deployment(dataset="breast_cancer")
    state = files["server"].parent / "state"
    state.mkdir()
    for name in ("server.pt", "client-1.pt"):
        (state / name).write_bytes(content)
    rows = files["server"].parent / "rows.csv"
    rows.write_text(",".join(["1.0"] * 30) + "\n")
    predict = ["predict", "--config", str(files["client-1"]), "--input", str(rows)]
    for argv in (["server", "--config", str(files["server"])], predict):
        code, line = _fails(capsys, *argv)
        assert code == 2 and "is not a readable saved model" in line, line
        assert "move it away" in line


@pytest.mark.parametrize(("role", "key"), [("server", "server.save"), ("client-1", "client.save")])
def test_an_unwritable_model_folder_is_refused_before_training(
    deployment, capsys: pytest.CaptureFixture[str], role: str, key: str
) -> None:  # type: ignore[no-untyped-def]
    files = deployment(dataset="breast_cancer")
    blocker = files["server"].parent / "a-file"
    blocker.write_text("")
    sets = ["--set", f'{key}="{blocker}/sub/model.pt"', "--set", "client.retry_for_s=1"]
    with socket.socket() as taken:  # were the folder not checked, a server would stop here
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        bind = f'server.bind="tcp://127.0.0.1:{taken.getsockname()[1]}"'
        sets = sets if role.startswith("client") else [*sets[:2], "--set", bind]
        code, line = _fails(capsys, role.split("-")[0], "--config", str(files[role]), *sets)
    assert code == 2 and f"{key} = " in line and "cannot write in" in line, line


def test_a_second_server_on_the_same_state_is_refused(
    deployment, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    """The port was taken, so the operator starts the same config on another port: both
    would write one checkpoint set and runs.json. The second is refused; the first runs on."""
    files = deployment(dataset="breast_cancer")
    config = str(files["server"])
    first = WorkerProcess(["server", "--config", config], tmp_path / "s.out", tmp_path / "s.log")
    try:
        wait_listening(files["server"], first)
        other = ["--set", f'server.bind="tcp://127.0.0.1:{free_port()}"']
        with socket.socket() as taken:  # were it not refused, it would stop here, not serve
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            other += ["--set", f'ops.listen="127.0.0.1:{taken.getsockname()[1]}"']
            code, line = _fails(capsys, "server", "--config", config, *other)
        assert code == 2 and "is in use by another running worker named 'server'" in line, line
        assert f"(pid {first.pid})" in line
        assert first.poll() is None
    finally:
        assert stop_process(first) == 0  # type: ignore[arg-type]


def test_a_client_stopped_before_its_first_step_keeps_the_saved_model(deployment) -> None:  # type: ignore[no-untyped-def]
    """Ctrl-C while the client still waits for its server: the model trained before is
    not overwritten with untrained weights, and the report says it stopped (not that it
    trained, nor that the party holds no labels)."""
    files = deployment(dataset="breast_cancer")
    saved = files["server"].parent / "state" / "client-1.pt"
    saved.parent.mkdir()
    saved.write_bytes(b"the model of last week's run")
    err, stdout = files["server"].parent / "client.err", files["server"].parent / "client.out"
    argv = ["client", "--config", str(files["client-1"]), "--set", "client.retry_for_s=60"]
    err.touch()  # read below before the worker opens it
    proc = WorkerProcess(argv, stdout, err)  # nothing listens: it retries until stopped
    try:
        deadline = time.monotonic() + 60
        while "retrying" not in err.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, err.read_text()
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert saved.read_bytes() == b"the model of last week's run"
    report = r"stopped by signal after 0 steps in run - in [0-9.]+s; test accuracy n/a \(not "
    assert re.fullmatch(report + r"evaluated yet\); model: none trained", out.strip()), out
    assert "before any step was applied: a restart starts afresh" in err.read_text()
    assert not list(saved.parent.glob("client-1.stopped-*"))  # nothing to resume from


@pytest.mark.parametrize(
    ("verb", "given", "role"),
    [
        ("server", "client-1", "client"),
        ("client", "server", "server"),
        ("client", "relay-1", "relay"),
        ("relay", "client-1", "client"),
        ("predict", "relay-1", "relay"),
    ],
)
def test_another_workers_config_names_the_command_it_is_for(
    deployment, capsys: pytest.CaptureFixture[str], verb: str, given: str, role: str
) -> None:  # type: ignore[no-untyped-def]
    files = deployment(topology="multihop")
    extra = ["--input", "rows.csv"] if verb == "predict" else []
    code, line = _fails(capsys, verb, "--config", str(files[given]), *extra)
    assert code == 2
    assert f"is a {role}'s config" in line
    assert f"`sl-pipeline {role} --config {files[given]}`" in line


def test_text_labels_missing_a_class_are_refused(
    deployment, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    """A hospital whose rows hold only 'M' (a filter gone wrong, or skewed data) would
    number M as class 0, which is 'B' at every other party: refused, not trained."""
    files = deployment(dataset="breast_cancer")
    rows = tmp_path / "only-m.csv"
    rows.write_text("id,diagnosis,x\n" + "".join(f"{i},M,{i / 10}\n" for i in range(40)))
    data = ["--set", "data.dataset=", "--set", f"data.path={rows}", "--set", "data.label=diagnosis"]
    code, line = _fails(capsys, "client", "--config", str(files["client-1"]), *data)
    assert code == 2, line
    assert "1 distinct label(s) ['M'] but model.classes = 2" in line
    assert "every party must hold every class" in line


def test_a_relay_started_before_its_server_is_a_config_error(
    deployment, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    """README's table: no server at the address is exit status 2 (5 is a network that
    failed after training had started), and the line says what to do."""
    files = deployment(topology="multihop")
    upstream = f"tcp://127.0.0.1:{free_port()}"
    sets = ["--set", f'relay.upstream="{upstream}"', "--set", "relay.timeout_s=1"]
    code, line = _fails(capsys, "relay", "--config", str(files["relay-1"]), *sets)
    assert code == 2, line
    assert f"relay.upstream = {upstream!r}: no sl-pipeline server answered" in line
    assert "start the server first" in line


@pytest.mark.parametrize(
    ("setting", "named"),
    [
        ("train.batch_size=0", "train.batch_size must be at least 1, got 0"),
        ("model.classes=0", "model.classes must be at least 2, got 0"),
        ("model.classes=1", "model.classes must be at least 2, got 1"),
        ("client.retry_for_s=inf", "client.retry_for_s must be a finite number, got inf"),
        ("train.lr=nan", "train.lr must be a finite number, got nan"),
    ],
)
def test_a_value_that_means_nothing_is_named(
    deployment, capsys: pytest.CaptureFixture[str], setting: str, named: str
) -> None:  # type: ignore[no-untyped-def]
    """A batch of 0 samples ended in a ZeroDivisionError traceback after joining; 0 classes
    built an empty model that the server refused as another model."""
    files = deployment(dataset="breast_cancer")
    code, line = _fails(capsys, "client", "--config", str(files["client-1"]), "--set", setting)
    assert code == 2 and named in line, line


def test_a_client_with_no_epochs_left_does_not_claim_to_hold_no_labels(
    deployment, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    files = deployment(dataset="breast_cancer")
    with ThreadServer(files["server"]):
        assert main(["client", "--config", str(files["client-1"]), "--epochs", "0"]) == 0
    out = capsys.readouterr().out
    assert "trained 0 steps" in out and "test accuracy n/a (not evaluated yet)" in out, out


def test_tune_into_an_unwritable_folder_is_refused_before_any_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    sweep = ["--topology", "vanilla", "--sweep", "privacy.noise.sigma=1", "--epochs", "1"]
    code, line = _fails(capsys, "tune", "--out", str(blocker / "tuned"), *sweep)
    assert code == 2 and "--out = " in line and "cannot write in" in line, line


def test_audit_refuses_zero_clients(capsys: pytest.CaptureFixture[str]) -> None:
    code, line = _fails(capsys, "audit", "--topology", "vanilla", "--clients", "0")
    assert code == 2 and "--clients must be at least 1" in line, line


def _killed_by_default(signum: int, frame: object) -> None:
    raise AssertionError("SIGTERM took its default action: the process would end with 143")


@pytest.mark.parametrize("role", ["server", "relay-1"])
def test_a_listening_worker_stopped_while_it_starts_exits_0(
    deployment, monkeypatch: pytest.MonkeyPatch, role: str
) -> None:  # type: ignore[no-untyped-def]
    """systemd stops a server or relay while it still imports and reads its config (before
    its event loop handles signals): README's table says exit status 0, as for a client; it
    was 143, killed by the signal."""
    files = deployment(topology="multihop")
    from workers.cli import roles

    def interrupted(threads: int) -> None:  # called between the config and the event loop
        signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(roles, "_set_threads", interrupted)
    previous = signal.signal(signal.SIGTERM, _killed_by_default)
    try:
        with pytest.raises(SystemExit) as stopped:
            main([role.split("-")[0], "--config", str(files[role])])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stopped.value.code == 0


def test_a_client_started_twice_without_a_checkpoint_dir_names_its_stop_states_folder(
    deployment, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    """The same command run twice, after a stop, with checkpoint.dir = "": the stop state
    beside client.save is locked. The refusal said `checkpoint.dir state/ is in use ...:
    give this one its own [checkpoint] dir`, a key set to nothing."""
    # Prepare: another process holds the stop state's lock, as a running client does
    import subprocess
    import sys

    files = deployment(dataset="breast_cancer")
    state = files["client-1"].parent / "state"
    state.mkdir(exist_ok=True)
    (state / "client-1.stopped-000000000005.ckpt").write_bytes(b"")
    hold = (
        "import sys; from pathlib import Path; from workers.runtime.checkpoint import "
        f"CheckpointStore; s = CheckpointStore(Path({str(state)!r}), 1, 'client-1.stopped'); "
        "print('held', flush=True); sys.stdin.read()"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", hold], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        # Execute
        config = str(files["client-1"])
        code, line = _fails(capsys, "client", "--config", config, "--set", 'checkpoint.dir=""')
    finally:
        holder.communicate("", timeout=30)
    # Assert
    assert code == 2 and f"client.save's folder {state} is in use" in line, line
    assert "checkpoint.dir" not in line and f"(pid {holder.pid})" in line
    assert "worker named 'client-1' (pid" in line, line  # not its file's 'client-1.stopped'
