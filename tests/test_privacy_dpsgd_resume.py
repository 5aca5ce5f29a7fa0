"""A DP-SGD client resumed from its checkpoint with another mechanism is refused in one line
naming the key (red team of the DP-SGD accounting claim). Before, each resumed and reported
an epsilon below the true one: over fixed batches (455 rows) the pass under way had been
counted at its first step, so a noise multiplier lowered from 4 to 0.5 mid-pass reported
1.01 for rows that went through noise 0.5 (10.7), and a batch size of 13 instead of 35, or
other rows (``data.seed``), sent rows 65-174 twice in one pass, counted once (4.73 for 7.08);
a Poisson batch drawn ahead at rate 1/15 was counted at the new rate 1/57 (``train.batch_size``
32 to 8); and another accountant stopped on Opacus' traceback. The crash is in-process over
loopback; the refused resume goes through ``workers.cli.main``, as a user's command."""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path

import pytest

from workers.cli import main
from workers.client.worker import ClientWorker
from workers.ops.logs import configure_logging
from workers.server.worker import ServerWorker

from .conftest import load_client
from .test_run_lifecycle import _crash, _serving
from .threadserver import ThreadServer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
COMMON = ("checkpoint.dir=state/c1", "train.lr=0.01", "train.momentum=0")
FIXED = ("privacy.dpsgd.poisson_sampling=false", "train.batch_size=35")  # 13 batches a pass
POISSON = ("privacy.dpsgd.noise_multiplier=1", "train.batch_size=32")
TARGET = ("privacy.dpsgd.target_epsilon=3", "train.batch_size=32")
CASES = [
    (
        (*FIXED, "privacy.dpsgd.noise_multiplier=4"),
        [
            ("privacy.dpsgd.noise_multiplier=0.5", "privacy.dpsgd.noise_multiplier changed"),
            ("train.batch_size=13", "train.batch_size changed"),
            ("data.seed=1", "data changed"),
            ("privacy.dpsgd.poisson_sampling=true", "privacy.dpsgd.poisson_sampling changed"),
        ],
    ),
    (
        POISSON,
        [
            ("train.batch_size=8", "train.batch_size changed"),
            ("privacy.dpsgd.accountant=prv", "privacy.dpsgd.accountant changed"),
        ],
    ),
    (
        TARGET,
        [("train.epochs=3", "privacy.dpsgd.target_epsilon (with train.epochs) changed")],
    ),
]


def _sessions_ended(server: ServerWorker) -> None:
    """Wait (bounded) until the server has ended every session whose connection closed."""
    deadline = time.monotonic() + 10
    while server.peers:
        assert time.monotonic() < deadline, f"sessions still open: {len(server.peers)}"
        time.sleep(0.02)


def _resume(files: dict[str, Path], sets: tuple[str, ...]) -> int:
    args = ["client", "--config", str(files["client-1"]), "--json"]
    return main([*args, *(f for s in sets for f in ("--set", s))])


@pytest.mark.parametrize(("before", "changes"), CASES, ids=["fixed", "poisson", "target"])
def test_a_resume_with_another_dpsgd_mechanism_is_refused_naming_the_key(
    deployment,  # type: ignore[no-untyped-def]
    capsys: pytest.CaptureFixture[str],
    before: tuple[str, ...],
    changes: list[tuple[str, str]],
) -> None:
    # Prepare: a DP-SGD client killed after 5 steps of its first epoch, its checkpoint left
    # (a server beside it: before the fix, the resumed clients trained, 0 for 2)
    files = deployment(clients=1, dataset="breast_cancer", epochs=1)
    with ThreadServer(files["server"], "server.takeover_after_s=0.3") as server:
        asyncio.run(_crash(files, "client-1", 5, *COMMON, *before))
        _sessions_ended(server)  # the server logs each closed one: not the client's words
        capsys.readouterr()
        for change, says in changes:
            # Execute: the same command with one setting changed
            code = _resume(files, (*COMMON, *before, change))
            _sessions_ended(server)
            configure_logging("text", "INFO", stream=io.StringIO())
            # Assert: refused before any step, in one line naming the key
            err = capsys.readouterr().err.strip()
            assert code == 2, err
            assert says in err
            assert len(err.splitlines()) == 1, err


async def test_a_client_killed_after_a_new_epochs_first_step_resumes_and_resends_it(
    deployment,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Killed after the server applied the first step of epoch 2, before the client's
    checkpoint of it: its newest checkpoint, the first epoch's last step's, holds that batch
    (drawn with it), so the resumed client sends those rows again and is answered from the
    cache; every draw counts once (30 at rate 1/15: 3.4483). Before, that batch was drawn
    afresh at the epoch's start, and the resume was refused ("DP-SGD batches cannot be drawn
    again"), telling a client with checkpoint.every_steps = 1 to set it to 1 (red team: a
    splitfed client killed -9 after its epoch's round)."""
    # Prepare: the client dies where its checkpoint of step (1, 0) would be written
    files = deployment(clients=1, dataset="breast_cancer", epochs=2)
    sets = (*COMMON, *POISSON)
    save = ClientWorker._save

    def die_before_saving(self: ClientWorker, next_step: int) -> None:
        if (self.epoch, next_step) == (1, 1):
            raise asyncio.CancelledError  # nothing more is saved: a kill -9 here
        save(self, next_step)

    monkeypatch.setattr(ClientWorker, "_save", die_before_saving)
    async with _serving(files, "server.takeover_after_s=0.3"):
        first = ClientWorker(load_client(files["client-1"], *sets), files["server"].parent)
        first.progress = False
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(first.run(), 120)
        monkeypatch.undo()
        # Execute: the same command again
        client = ClientWorker(load_client(files["client-1"], *sets), files["server"].parent)
        client.progress = False
        summary = await asyncio.wait_for(client.run(), 120)
    # Assert: resumed from the epoch's end, finished, every draw once
    history = client.runner.private.dp.engine.accountant.history  # type: ignore[union-attr]
    assert summary["resumed_from"] == 15
    assert summary["steps"] == 30
    assert history == [(1.0, 1 / 15, 30)]
    assert summary["dpsgd_epsilon"] == 3.4483


@pytest.mark.parametrize(
    ("before", "after", "says"),
    [
        ((), POISSON, "privacy.dpsgd is set, but this client's checkpoint trained without it"),
        (POISSON, (), "privacy.dpsgd is not set, but this client's checkpoint trained with it"),
    ],
    ids=["added", "removed"],
)
def test_a_resume_that_adds_or_removes_dpsgd_is_refused_in_one_line(
    deployment,  # type: ignore[no-untyped-def]
    capsys: pytest.CaptureFixture[str],
    before: tuple[str, ...],
    after: tuple[str, ...],
    says: str,
) -> None:
    """Before, a state_dict traceback (Opacus' wrapped segment against the plain one); had
    it loaded, a client adding DP-SGD would have reported the epsilon of its own steps for
    weights trained without it."""
    # Prepare
    files = deployment(clients=1, dataset="breast_cancer", epochs=1)
    with ThreadServer(files["server"], "server.takeover_after_s=0.3"):
        asyncio.run(_crash(files, "client-1", 5, *COMMON, *before))
        capsys.readouterr()
        # Execute
        code = _resume(files, (*COMMON, *after))
        configure_logging("text", "INFO", stream=io.StringIO())
        err = capsys.readouterr().err.strip()
    # Assert
    assert code == 2, err
    assert says in err
    assert len(err.splitlines()) == 1, err
