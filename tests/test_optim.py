"""Our SGD and Adam (sl_pipeline.optim) are torch's, minus the torch._dynamo import."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from sl_pipeline import optim
from sl_pipeline.models import make_optimizer


def _trajectory(opt_cls: type[torch.optim.Optimizer], **kwargs: float) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    opt = opt_cls(model.parameters(), **kwargs)
    data = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    for step in range(5):
        opt.zero_grad()
        model(data * (step + 1)).pow(2).mean().backward()
        opt.step()
        if step == 2:  # a state dict round trip mid-run changes nothing
            opt.load_state_dict(opt.state_dict())
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize(
    ("ours", "theirs", "kwargs"),
    [
        (optim.SGD, torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}),
        (optim.SGD, torch.optim.SGD, {"lr": 0.05, "momentum": 0.0}),
        (optim.Adam, torch.optim.Adam, {"lr": 0.01}),
    ],
)
def test_same_parameters_bit_for_bit_as_torch(ours, theirs, kwargs) -> None:
    for mine, reference in zip(
        _trajectory(ours, **kwargs), _trajectory(theirs, **kwargs), strict=True
    ):
        assert torch.equal(mine, reference)


def test_state_dicts_load_across_ours_and_torchs() -> None:
    model = torch.nn.Linear(3, 2)
    mine = make_optimizer(list(model.parameters()), "sgd", 0.1, 0.9)
    model(torch.ones(1, 3)).sum().backward()
    mine.step()
    theirs = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    theirs.load_state_dict(mine.state_dict())
    assert torch.equal(
        theirs.state_dict()["state"][0]["momentum_buffer"],
        mine.state_dict()["state"][0]["momentum_buffer"],
    )


def test_a_training_step_imports_no_dynamo() -> None:
    """The point of the module: a worker's start-up is spared torch._dynamo (~1 s CPU). In the
    same interpreter (one torch import): the workers' modules import neither scipy nor
    sklearn (~2 s CPU of each worker's start-up); the audit imports them when it needs them."""
    script = (
        "import sys, torch\n"
        "import workers.cli.commands, workers.client.worker, workers.server.worker, workers.relay\n"
        "from sl_pipeline.models import make_optimizer\n"
        "m = torch.nn.Linear(3, 2)\n"
        "for name in ('sgd', 'adam'):\n"
        "    o = make_optimizer(list(m.parameters()), name, 0.1, 0.9)\n"
        "    o.zero_grad(); m(torch.ones(1, 3)).sum().backward(); o.step()\n"
        "    o.load_state_dict(o.state_dict())\n"
        "print('torch._dynamo' in sys.modules)\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'scipy', 'sklearn'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == ["False", "[]"], out.stdout
