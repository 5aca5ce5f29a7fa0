"""A DP-SGD client, as an operator starts one, says nothing of Opacus' hooks. Before, its first
step's backward logged torch's "Full backward hook is firing when gradients are computed
with respect to module outputs since no inputs require gradients" UserWarning: the first
segment's input never needs a gradient, and Opacus' hooks never use one."""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privacy.config import DPSGDConfig
from privacy.dpsgd import make_private_client

from .conftest import Procs, wait_listening

HOOKS = "Full backward hook"


def test_a_dpsgd_client_says_nothing_of_opacus_hooks(deployment, procs: Procs) -> None:  # type: ignore[no-untyped-def]
    # Prepare
    files = deployment(clients=1, dataset="breast_cancer", epochs=1)
    server = procs.fork("server", files["server"])
    wait_listening(files["server"], server)
    # Execute: the console's own process (a fresh interpreter: no warning shown before)
    dp = ("--set", "privacy.dpsgd.noise_multiplier=1", "--no-progress")
    client = procs.start("client", files["client-1"], *dp)
    _, err = client.communicate(timeout=240)
    # Assert
    assert client.returncode == 0, err[-3000:]
    assert HOOKS not in err and "UserWarning" not in err, err[-3000:]


def test_only_that_warning_is_ignored() -> None:
    """The filter names torch's one message: another UserWarning still shows."""
    # Prepare
    data = TensorDataset(torch.randn(8, 3), torch.zeros(8, dtype=torch.int64))
    module = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    cfg = DPSGDConfig(noise_multiplier=1.0)
    make_private_client(module, optimizer, DataLoader(data, batch_size=4), cfg, epochs=1)
    # Execute
    with warnings.catch_warnings(record=True) as shown:
        warnings.warn(
            f"{HOOKS} is firing when gradients are computed with respect to module "
            "outputs since no inputs require gradients",
            UserWarning,
            stacklevel=1,
        )
        warnings.warn(f"{HOOKS}: something else", UserWarning, stacklevel=1)
        warnings.warn("another warning", UserWarning, stacklevel=1)
    # Assert
    assert [str(w.message) for w in shown] == [f"{HOOKS}: something else", "another warning"]
