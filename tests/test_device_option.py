"""``--device`` for init, demo and bench, on a machine without a GPU (CI's): configs name
the device, and a GPU that is not there is refused in one line before anything starts.
On a GPU machine, tests/test_cuda.py trains there."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sl_pipeline.config import read_toml
from workers.cli import main

from .test_careless_operator import _fails

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible here")


def test_init_writes_the_device_into_every_partys_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute
    code = main(["init", str(tmp_path / "d"), "--topology", "multihop", "--device", "cuda:1"])
    # Assert: server, relay and client train where they were told
    assert code == 0, capsys.readouterr().err
    tomls = sorted((tmp_path / "d").glob("*.toml"))
    assert [p.stem for p in tomls] == ["client-1", "relay-1", "server"]
    assert all(read_toml(p)["train"]["device"] == "cuda:1" for p in tomls)


def test_init_without_a_device_writes_none(tmp_path: Path) -> None:
    assert main(["init", str(tmp_path / "d")]) == 0
    assert "device" not in read_toml(tmp_path / "d" / "server.toml")["train"]


@pytest.mark.parametrize("verb", ["init", "demo"])
def test_a_name_that_is_no_device_is_refused_before_writing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], verb: str
) -> None:
    where = [str(tmp_path / "d")] if verb == "init" else ["--dir", str(tmp_path / "d")]
    code, line = _fails(capsys, verb, *where, "--device", "gpu")
    assert code == 2 and "--device 'gpu' is not a device" in line and "cuda" in line
    assert not (tmp_path / "d").exists()


@no_gpu
def test_a_gpu_demo_without_a_gpu_is_refused_before_any_worker_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, line = _fails(capsys, "demo", "--dir", str(tmp_path / "d"), "--device", "cuda")
    assert code == 2 and "no CUDA GPU is visible here; use --device cpu" in line
    assert not (tmp_path / "d").exists()


@no_gpu
def test_a_gpu_bench_without_a_gpu_is_refused(capfd: pytest.CaptureFixture[str]) -> None:
    code = main(["bench", "--quick", "--only", "overhead", "--device", "cuda"])
    err = capfd.readouterr().err
    assert code == 2 and "no CUDA GPU is visible" in err and "Traceback" not in err
