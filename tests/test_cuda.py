"""The CUDA path on a GPU (``train.device = "cuda"``): every topology's demo trains there
(``sl-pipeline demo`` through ``workers.cli.main``), split training on the GPU equals the
whole model trained on the GPU in one process, and received tensors reach the GPU through
pinned memory.

Skipped where no GPU is visible, as in CI. ``bench/gpu_check.sh`` runs this file, the demo
and the bench's overhead section on a GPU machine (docs/performance.md, "GPU").
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from sl_pipeline.tensors import as_input
from workers.cli import main
from workers.tools.localdeploy import MULTI_PARTY

from .conftest import load_client, load_server
from .test_exactness import NO_CHECKPOINT, central_training, split_training
from .test_predict_and_demo import (
    DETERMINISTIC,
    OTHER_TOPOLOGIES,
    SCHEDULE_SLACK,
    demo_against_baseline,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ON_GPU = 'train.device="cuda"'
# TF32 convolutions (cuDNN's default) round differently from float32 on the CPU, so the
# central baseline (CPU) and a GPU run drift apart by a point or so in one epoch's accuracy.
GPU_SLACK = 0.05


@pytest.fixture
def exact_kernels() -> Iterator[None]:
    """float32 arithmetic and deterministic kernels: two runs of the same sums agree."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32)
    cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = (
        True,
        False,
        False,
        False,
    )
    try:
        yield
    finally:
        cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = saved


async def test_split_on_the_gpu_equals_central_training_on_the_gpu(  # type: ignore[no-untyped-def]
    deployment, exact_kernels
) -> None:
    # Prepare
    files = deployment(dataset="digits", epochs=2)
    base = files["server"].parent
    server_cfg = load_server(files["server"], NO_CHECKPOINT, ON_GPU)
    client_cfg = load_client(files["client-1"], ON_GPU)
    # Execute
    bottom, top, summary = await split_training(server_cfg, client_cfg, base)
    ref_bottom, ref_top = central_training(client_cfg, base, device="cuda")
    # Assert: both parties trained on the GPU, to the same weights as one process there
    assert summary["steps"] > 0 and summary["device"] == "cuda"
    for split_part, ref_part in ((bottom, ref_bottom), (top, ref_top)):
        for (name, p), (_, q) in zip(
            split_part.state_dict().items(), ref_part.state_dict().items(), strict=True
        ):
            assert p.device.type == "cuda", name
            assert torch.allclose(p, q, atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("requires_grad", [True, False])
def test_a_received_tensor_reaches_the_gpu_as_a_float32_leaf(requires_grad: bool) -> None:
    # Prepare: what the codec hands over, in each wire dtype that is widened
    for wire in (torch.float32, torch.float16, torch.bfloat16):
        received = torch.randn(32, 16, 8, 8).to(wire)
        # Execute
        out = as_input(received, requires_grad, torch.device("cuda"))
        # Assert
        assert out.device.type == "cuda" and out.dtype == torch.float32 and out.is_leaf
        assert out.requires_grad is requires_grad
        assert torch.equal(out.cpu(), received.float())


DEMOS = [
    ("vanilla", ()),
    ("vanilla", ("--pipeline-depth", "4")),
    ("vanilla", ("--wire-dtype", "int2-ef")),
    *OTHER_TOPOLOGIES,
]


@pytest.mark.slow
@pytest.mark.parametrize(("topology", "extra"), DEMOS)
def test_every_topology_trains_on_the_gpu(topology: str, extra: tuple[str, ...]) -> None:
    # Execute: what a user types
    summary = demo_against_baseline(topology, "--device", "cuda", *extra)
    # Assert: the server and every client trained on the GPU, as well as the same
    # architecture trained centrally (on the CPU)
    assert summary["devices"] == ["cuda"]
    assert summary["clients"] == (2 if topology in MULTI_PARTY else 1)
    schedule = 0.0 if topology in DETERMINISTIC else SCHEDULE_SLACK
    slack = GPU_SLACK + schedule
    assert summary["test_accuracy"] >= summary["baseline_accuracy"] - slack


def test_a_gpu_number_beyond_the_machines_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute: a config written for a bigger machine
    beyond = f"cuda:{torch.cuda.device_count()}"
    code = main(["demo", "--dir", str(tmp_path / "d"), "--device", beyond])
    # Assert: refused in one line naming the count, before anything is written or started
    err = capsys.readouterr().err.strip()
    assert code == 2 and not (tmp_path / "d").exists()
    assert "numbered from 0" in err and len(err.splitlines()) == 1
