"""A disk that fills while a command writes, through the console script: one line naming the
file, and what was there before kept whole. The full disk is a file-size limit
(``RLIMIT_FSIZE``) on the command's process, with ``SIGXFSZ`` ignored so that a write past
it fails with EFBIG, as one on a full disk fails with ENOSPC."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import resource
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np
import pytest
import torch

from sl_pipeline.config import ClientConfig, ServerConfig, load
from sl_pipeline.data import load_party_data
from tests.threadserver import ThreadServer
from workers.cli import main
from workers.tools.inprocess import run_deployment
from workers.tools.localdeploy import Table, to_toml

LIMIT_BYTES = 4096  # far less than a trained segment


def _console(
    *argv: str, limit: int | None = LIMIT_BYTES, stdout: IO[str] | None = None
) -> subprocess.CompletedProcess[str]:
    def small_disk() -> None:
        if limit is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run(
        [sys.executable, "-m", "workers", *argv],
        preexec_fn=small_disk,
        stdout=stdout or subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.slow
def test_a_full_disk_while_a_client_saves_keeps_its_previous_model(deployment) -> None:  # type: ignore[no-untyped-def]
    files = deployment(dataset="breast_cancer")
    saved = files["client-1"].parent / "state" / "client-1.pt"
    saved.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"previous": torch.arange(4 * LIMIT_BYTES)}, saved)  # last week's model
    before = saved.read_bytes()
    with ThreadServer(files["server"]):
        done = _console("client", "--config", str(files["client-1"]), "--set", 'checkpoint.dir=""')
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 6 and "Traceback" not in done.stderr, done.stderr
    assert "cannot save the trained segment (client.save)" in lines[-1], lines[-1]
    assert saved.read_bytes() == before  # was cut to 4 KiB: last week's model lost
    assert not list(saved.parent.glob(".client-1.pt*"))  # no temp file left


class _ModelServer(http.server.BaseHTTPRequestHandler):
    """A server's run API, as far as ``runs download`` goes: one run's model, 64 KiB."""

    def do_GET(self) -> None:
        body = b"PK\x03\x04" + bytes(16 * LIMIT_BYTES - 4)  # a torch.save archive's magic
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_a_full_disk_while_runs_download_writes_leaves_no_half_model(tmp_path: Path) -> None:
    api = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ModelServer)
    threading.Thread(target=api.serve_forever, daemon=True).start()
    try:
        (tmp_path / "admin.token").write_text("a-long-random-admin-token\n")
        cfg = tmp_path / "admin.toml"
        port = api.server_address[1]
        cfg.write_text(f'[ops]\nlisten = "127.0.0.1:{port}"\nadmin_token = "admin.token"\n')
        out = tmp_path / "run-1.pt"
        done = _console("runs", "download", "run-1", "--config", str(cfg), "--out", str(out))
    finally:
        api.shutdown()
        api.server_close()
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "cannot write --out" in done.stderr and "run-1.pt" in done.stderr, done.stderr
    assert not out.exists()  # a 4 KiB stub that the next download refused to replace
    assert not list(tmp_path.glob(".run-1.pt*"))


def test_a_full_disk_during_init_keeps_nothing_and_init_runs_again(tmp_path: Path) -> None:
    site = tmp_path / "site"
    done = _console("init", str(site), "--clients", "2", "--ops", limit=300)  # keys fit
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "cannot write the deployment in" in done.stderr and "nothing was kept" in done.stderr
    assert list(site.iterdir()) == []  # was keys and half a server.toml: the rerun refused
    assert main(["init", str(site), "--clients", "2", "--ops"]) == 0
    assert load(ServerConfig, site / "server.toml").server.key == "keys/server.key"


def test_a_full_disk_for_decoded_images_is_one_line(tmp_path: Path) -> None:
    from PIL import Image

    for label in ("a", "b"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(20):  # 40 images of 8x8 floats: 10 KiB, over the limit
            Image.new("L", (8, 8), i).save(tmp_path / "images" / label / f"{i}.png")
    (tmp_path / "client.toml").write_text(
        '[client]\nserver = "tcp://127.0.0.1:1"\ninsecure = true\n'
        '[data]\npath = "images"\nmax_memory_mb = 0\n'  # every image set on disk
        '[model]\nbuiltin = "cnn"\nin_shape = [1, 8, 8]\nclasses = 2\n'
    )
    done = _console("client", "--config", str(tmp_path / "client.toml"))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr  # was one
    lines = done.stderr.strip().splitlines()
    assert "temporary space" in lines[-1] and "data.max_memory_mb" in lines[-1], lines


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real disk of 32 KiB (a tmpfs, where this user may mount one): it fills with ENOSPC."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=32k", "tmpfs", str(disk)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def _project(where: Path) -> Path:
    project = where / "project.toml"
    assert main(["provision", "--example", str(project)]) == 0
    return project


def _provisioned_again(project: Path, kits: Path) -> None:
    """Nothing of the failed provision is left, and the same command now succeeds."""
    assert not kits.exists()  # was half a kits folder: the rerun said it was not empty
    assert not list(kits.parent.glob(".provision-*"))  # nor its staging folder
    assert main(["provision", str(project), "--out", str(kits)]) == 0
    assert load(ServerConfig, kits / "server" / "server.toml").server.key == "keys/server.key"


def test_a_full_disk_while_provision_writes_keeps_no_half_kit(tmp_path: Path) -> None:
    project, kits = _project(tmp_path), tmp_path / "kits"
    done = _console("provision", str(project), "--out", str(kits), limit=300)  # keys fit
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "cannot write the kits in" in done.stderr and "nothing was kept" in done.stderr
    _provisioned_again(project, kits)


def test_provision_onto_a_disk_that_fills_keeps_no_half_kit(tmp_path: Path, tmpfs: Path) -> None:
    project, kits = _project(tmp_path), tmpfs / "kits"
    done = _console("provision", str(project), "--out", str(kits), limit=None)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "No space left on device" in done.stderr and "nothing was kept" in done.stderr
    assert list(tmpfs.iterdir()) == []  # the disk as it was: the space given back
    subprocess.run(["mount", "-o", "remount,size=1m", str(tmpfs)], check=True)  # space freed
    _provisioned_again(project, kits)


def test_a_ctrl_c_while_provision_writes_keeps_no_half_kit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    project, kits = _project(tmp_path), tmp_path / "kits"
    configs: list[object] = []

    def interrupted(cfg: Table) -> str:  # the keys and the admin kit written, a config not
        configs.append(cfg)
        if len(configs) == 2:
            raise KeyboardInterrupt
        return to_toml(cfg)

    monkeypatch.setattr("workers.tools.provision.to_toml", interrupted)
    assert main(["provision", str(project), "--out", str(kits)]) == 130
    monkeypatch.undo()
    assert "interrupted (Ctrl-C)" in capsys.readouterr().err
    _provisioned_again(project, kits)


TUNE = ("tune", "--topology", "vanilla", "--dataset", "breast_cancer", "--epochs", "1")
TUNE_FLAGS = ("--no-progress", "--attack-seeds", "1", "--set", "privacy.noise.clip=5.0")


@pytest.mark.parametrize(
    "argv",
    [
        (*TUNE, "--sweep", "privacy.noise.sigma=0.5", "--out", "OUT", *TUNE_FLAGS),
        ("audit", "--topology", "vanilla", "--dataset", "breast_cancer", "--epochs", "1"),
    ],
    ids=["tune", "audit"],
)
def test_a_full_disk_while_tune_or_audit_trains_is_one_line(
    tmp_path: Path, argv: tuple[str, ...]
) -> None:
    out = tmp_path / "tune"
    done = _console(*(str(out) if a == "OUT" else a for a in argv))
    # was the in-process server's log line with a traceback, then "peer error [internal]:
    # the message could not be handled; see the log", status 4
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "temporary folder (File too large)" in done.stderr and "TMPDIR" in done.stderr
    assert not out.exists() or not list(out.glob("*.partial"))


@pytest.mark.slow
def test_a_full_disk_while_tune_saves_keeps_the_rows_saved_before(
    tmp_path: Path, tmpfs: Path
) -> None:
    subprocess.run(["mount", "-o", "remount,size=4m", str(tmpfs)], check=True)  # the picture
    out = tmpfs / "tune"
    assert main([*TUNE, "--sweep", "privacy.noise.sigma=0", "--out", str(out), *TUNE_FLAGS]) == 0
    saved = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix != ".png"}
    filler = tmpfs / "filler"
    with contextlib.suppress(OSError), filler.open("wb", buffering=0) as fh:  # the disk full
        while True:
            fh.write(bytes(4096))
    # a rerun with one setting more measures it, then cannot save its rows
    sweep = "privacy.noise.sigma=0,0.5"
    done = _console(*TUNE, "--sweep", sweep, "--out", str(out), *TUNE_FLAGS, limit=None)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    lines = [ln for ln in done.stderr.strip().splitlines() if not ln.startswith("tune: ")]
    assert len(lines) == 1 and "cannot save the tune's rows" in lines[0], done.stderr
    assert "No space left on device" in lines[0] and "kept" in lines[0], lines
    # was a results.json.partial cut short, and the raw error naming it
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.suffix != ".png"} == saved


@pytest.mark.slow
def test_predictions_onto_a_full_disk_are_one_line_and_the_model_is_kept(deployment) -> None:  # type: ignore[no-untyped-def]
    files = deployment(dataset="breast_cancer")
    asyncio.run(run_deployment(files))
    base = files["server"].parent
    x = load_party_data(load(ClientConfig, files["client-1"]).data, base, 2).test.x[:100]
    header = ",".join(f"f{i}" for i in range(x.shape[1]))
    np.savetxt(base / "inputs.csv", x.numpy(), delimiter=",", header=header, comments="")
    model = base / "state" / "client-1.pt"
    before = model.read_bytes()
    predict = ["predict", "--config", str(files["client-1"]), "--input", str(base / "inputs.csv")]
    with ThreadServer(files["server"]):
        for flags in (["--json"], []):  # `> predictions.csv` on a disk that fills
            with (base / "predictions.csv").open("w") as out:
                done = _console(*predict, *flags, limit=100, stdout=out)
            # was a traceback: OSError: [Errno 27] File too large, from print
            assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
            assert len(done.stderr.strip().splitlines()) == 1, done.stderr
            assert "cannot write the output (File too large)" in done.stderr, done.stderr
    assert model.read_bytes() == before
