"""A party that never comes cannot hang the others (docs/security.md, "A hostile server").

Where the server holds a client's reply until other parties have sent theirs (a vertical
batch, a PSI post, a round-robin turn, a SplitFed round), the client's wait was bounded by a
count only: 100 resends of ``client.timeout_s`` (50 minutes by default), of 60 s for a PSI
post, of 900 s for a turn or a round (25 hours; SplitFed: 20 attempts of that). Now each
such wait ends within ``client.wait_for_parties_s`` with one line naming that key (exit 5),
the client's state saved, and the same command carries on once the others run. Each test
runs a real server on loopback whose other party never arrives, with small timeouts: before
the change each would have waited out its ``asyncio.wait_for`` bound (30 s) and failed.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from sl_pipeline.config import ClientSection
from sl_pipeline.errors import TransportError
from workers.cli import main
from workers.client import align
from workers.client.parties import window_s
from workers.client.worker import ClientWorker
from workers.tools.inprocess import wait_until

from .conftest import load_client
from .test_run_lifecycle import _serving
from .test_vertical_late import _parties
from .threadserver import ThreadServer

FAST = ("client.timeout_s=0.3", "client.wait_for_parties_s=1.5")
BOUND_S = 30  # what a test waits for a client at most: it fails, not hangs, before the change
JOINS: list[float] = []  # when a client of this process joined its next hop, this test


@pytest.fixture(autouse=True)
def _note_joins(joins: list[float]) -> None:
    """The bounds below count from the first join (tests/conftest.py's ``joins``)."""
    global JOINS
    JOINS = joins


def _client(files: dict[str, Path], name: str, *sets: str) -> ClientWorker:
    cfg = load_client(files[name], *FAST, *sets)
    return ClientWorker(cfg, files["server"].parent, progress=False)


async def _gives_up(client: ClientWorker, says: str) -> str:
    """Run ``client``; assert it ends within the bound with a TransportError saying
    ``says`` and naming client.wait_for_parties_s; its message."""
    with pytest.raises(TransportError) as caught:
        await asyncio.wait_for(client.run(), BOUND_S)
    took = time.monotonic() - JOINS[0]
    text = str(caught.value)
    assert "\n" not in text
    assert re.search(r"within 1\.5s \(client\.wait_for_parties_s = 1\.5\)", text), text
    assert says in text, text
    assert took < 15, took  # 1.5 s of waiting and the rejoins
    return text


async def test_a_vertical_party_whose_partner_never_comes_gives_up(deployment: Any) -> None:
    # Prepare: a vertical run of two feature parties; only client-1 starts
    files = deployment(topology="vertical", clients=2)
    async with _serving(files):
        # Execute / Assert: its first step waits for client-2's part, then gives up
        text = await _gives_up(_client(files, "client-1"), "the other parties' parts of this")
    assert "its forward of step (0, 0)" in text


async def test_a_vertical_party_whose_psi_partner_never_posts_gives_up(
    deployment: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: two parties that align their rows by PSI (each post waits 0.3 s at a time,
    # then is posted again); only client-1 starts
    monkeypatch.setattr(align, "PSI_WAIT_S", 0.3)
    files = _parties(deployment, tmp_path)
    async with _serving(files):
        # Execute / Assert
        text = await _gives_up(_client(files, "client-1"), "the other party's PSI post")
    # it said "no answer to its weights of step (0, 1529586041324)": a nonce, no step
    assert text.startswith("no answer to its PSI post within"), text


async def test_a_roundrobin_client_whose_predecessor_never_comes_gives_up(
    deployment: Any,
) -> None:
    # Prepare: client-2's turn comes after client-1's, which never starts (before: 100
    # waits of 900 s for the grant, 25 hours)
    files = deployment(topology="roundrobin", clients=2)
    async with _serving(files):
        # Execute / Assert
        await _gives_up(_client(files, "client-2"), "the turns of the members before this")


async def test_a_splitfed_client_whose_round_never_completes_gives_up_with_its_state(
    deployment: Any,
) -> None:
    # Prepare: client-1 trains its epoch, then joins the round, which client-2 never joins
    files = deployment(topology="splitfed", clients=2)
    async with _serving(files):
        client = _client(files, "client-1")
        # Execute / Assert: one line after the window, the epoch's steps saved
        await _gives_up(client, "every member of this round")
    assert client.steps_done > 0
    restored = _client(files, "client-1")  # the same command resumes from that state
    try:
        assert restored.resumed_from == client.steps_done
    finally:
        restored.ckpt.release()


# ---- through the command line: one line, exit 5, and the same command carries on --------
def _cli(files: dict[str, Path], name: str, *sets: str) -> list[str]:
    extra = [arg for s in (*FAST, *sets) for arg in ("--set", s)]
    return ["client", "--config", str(files[name]), "--no-progress", "--json", *extra]


def _in_thread(files: dict[str, Path], name: str) -> tuple[threading.Thread, list[Any]]:
    """``name`` running in a thread of its own (its own event loop), returned once it has
    joined the server; its summary or error."""
    out: list[Any] = []
    worker = ClientWorker(load_client(files[name]), files["server"].parent, progress=False)

    def run() -> None:
        try:
            out.append(asyncio.run(asyncio.wait_for(worker.run(), 120)))
        except Exception as exc:  # the test's assertion shows it
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + BOUND_S
    while not worker.link.connected and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)  # polls an event (joined), bounded; the other thread does the work
    return thread, out


@pytest.mark.timeout(180)
def test_the_cli_ends_a_lonely_vertical_party_in_one_line_and_the_same_command_carries_on(
    capsys: pytest.CaptureFixture[str], deployment: Any
) -> None:
    # Prepare: a real server in a thread; only client-1 starts
    files = deployment(topology="vertical", clients=2)
    with ThreadServer(files["server"], "server.takeover_after_s=0.3"):
        # Execute: client-1 alone
        status = main(_cli(files, "client-1"))
        took = time.monotonic() - JOINS[0]
        err = capsys.readouterr().err
        # Assert: exit 5 within seconds, its last line the one error, naming the key
        assert status == TransportError.exit_code, err[-400:]
        assert "Traceback" not in err
        last = err.rstrip("\n").splitlines()[-1]
        assert last.startswith("sl-pipeline client: error: no answer to its forward"), last
        assert "--set client.wait_for_parties_s=SECONDS" in last
        assert took < 20, took
        # Execute: the same command, client-2 running (joined, waiting) beside it this time
        thread, other = _in_thread(files, "client-2")
        status = main(_cli(files, "client-1"))
        thread.join(150)
        out = capsys.readouterr()
    # Assert: both trained the whole epoch (digits: 45 steps of 32)
    assert status == 0, out.err[-400:]
    summary = json.loads(out.out.strip().splitlines()[-1])
    assert not isinstance(other[0], Exception), other
    assert summary["steps"] == other[0]["steps"] > 0


async def test_a_vertical_party_whose_partner_dies_mid_run_keeps_its_state(
    deployment: Any,
) -> None:
    # Prepare: both parties train; client-2 dies (no goodbye) after 3 steps
    files = deployment(topology="vertical", clients=2)
    async with _serving(files, "server.takeover_after_s=0.3") as server:
        first, second = _client(files, "client-1"), _client(files, "client-2")
        lonely = asyncio.ensure_future(first.run())
        dying = asyncio.ensure_future(second.run())
        await wait_until(lambda: second.steps_done >= 3 or dying.done())
        assert not dying.done(), dying.result()
        dying.cancel()
        await asyncio.gather(dying, return_exceptions=True)
        # Execute / Assert: client-1 waits for the next batch's other part, then gives up
        started = time.monotonic()
        with pytest.raises(TransportError, match=r"client\.wait_for_parties_s"):
            await asyncio.wait_for(lonely, BOUND_S)
        assert time.monotonic() - started < 15
        applied = first.steps_done
        assert applied >= 3
        # Execute: both parties again, client-1 with the same command once client-2 runs
        partner = _client(files, "client-2", "client.wait_for_parties_s=60")
        partner_run = asyncio.ensure_future(partner.run())
        await wait_until(lambda: partner.link.connected or partner_run.done())
        # (its wait now as long as its partner's: under load a partner's part can take
        # longer than FAST's window, and the window's end is checked above)
        again = _client(files, "client-1", "client.wait_for_parties_s=60")
        assert again.resumed_from == applied  # its state was saved on giving up
        summaries = await asyncio.wait_for(asyncio.gather(again.run(), partner_run), 120)
        await wait_until(lambda: all(not r.active for r in server.book.runs.values()))
    # Assert: both finished the epoch, client-1 resuming where it stopped
    assert summaries[0]["steps"] == summaries[1]["steps"] > applied


@pytest.mark.parametrize(
    ("topology", "setting", "window"),
    [
        ("vertical", 0.0, 900.0),  # partners that run beside it
        ("roundrobin", 0.0, 86400.0),  # members wait through the others' epochs
        ("splitfed", 0.0, 86400.0),
        ("roundrobin", 1.5, 1.5),  # a value set is the window, whatever the topology
    ],
)
def test_the_default_window_for_other_parties_follows_the_topology(
    topology: str, setting: float, window: float
) -> None:
    client = ClientSection(topology=topology, wait_for_parties_s=setting)  # type: ignore[arg-type]

    assert window_s(client, topology) == window
