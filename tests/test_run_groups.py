"""Run membership on a server shared by several projects (``[server] groups``): an admitted
key of one group can neither join, probe nor step into another group's run, whether it
names the run or takes the server's current ``run-N``; to it, another group's run is one
that does not exist. The group's own members train together as before.

Each test speaks over real loopback sockets with admitted keys to a server bound in this
process (the run API: over its ops port, through ``workers.cli.main``)."""

from __future__ import annotations

import asyncio
import json
import secrets
from pathlib import Path
from typing import Any

import pytest
import torch
import zmq.asyncio

from sl_pipeline.errors import ConfigError, PeerError
from sl_pipeline.handshake import ClientHandshake
from sl_pipeline.keys import load_keypair, load_public_key
from sl_pipeline.messages import Kind, Message
from sl_pipeline.transport import DealerConnection
from workers.client.worker import ClientWorker
from workers.ops.http import redact
from workers.server.worker import ServerWorker
from workers.tools.localdeploy import to_toml

from .conftest import load_client, load_server
from .test_hostile_numeric import serving
from .test_hostile_peers import hello_for
from .test_runs_cli import _cli, _client_in_thread
from .threadserver import ThreadServer

# client-1 is the hospital's, client-2 the bank's (init wrote one group of both); a run
# ends once its clients finished
APART = ('server.groups={hospital=["client-1"], bank=["client-2"]}', "server.run_clients=0")
ONE_LEFT_OUT = 'server.groups={hospital=["client-1"]}'


async def _hello(
    server: ServerWorker, ctx: zmq.asyncio.Context, name: str, run: str = "", **more: Any
) -> tuple[DealerConnection, dict[str, Any]]:
    """``name``'s admitted key joins by hand, naming ``run`` ("": the current run)."""
    keys = server.base / "keys"
    conn = DealerConnection(ctx, server.cfg.server.bind)
    hello = {**hello_for(server.fingerprint, name), "run": run, **more}
    own, server_pub = load_keypair(keys / f"{name}.key"), load_public_key(keys / "server.pub")
    hs = ClientHandshake(hello, own, server_pub)
    return conn, await conn.handshake(hs, 10)


async def _step(server: ServerWorker, conn: DealerConnection, step: int = 0) -> Message:
    """One honest training step (a forward the server applies) on ``conn``."""
    shape = server.engine.act_shape
    assert shape is not None
    tensors = {"act": torch.rand(4, *shape), "labels": torch.zeros(4, dtype=torch.int64)}
    await conn.send(Message(Kind.FORWARD, step=step, tensors=tensors))
    return await conn.recv(10)


def _without_run(welcome: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in welcome.items() if k != "run"}


async def test_another_groups_named_run_is_one_that_does_not_exist(deployment) -> None:  # type: ignore[no-untyped-def]
    # Prepare: the hospital's client-1 trains in its run "trial"
    files = deployment(topology="vanilla", clients=2, dataset="breast_cancer")
    async with serving(files, *APART) as (server, ctx, _):
        c1, _ = await _hello(server, ctx, "client-1", "trial")
        assert (await _step(server, c1)).kind is Kind.BACKWARD
        # Execute: the bank's client-2 names a run that exists nowhere, then "trial"
        probe, nowhere = await _hello(server, ctx, "client-2", "never-used")
        probe.close()
        c2, trial = await _hello(server, ctx, "client-2", "trial")
        reply = await _step(server, c2)
        # Assert: the same welcome for both (nothing applied, no step to resume); its step
        # trained a bank run of that id, and the hospital's run saw nothing of it
        assert _without_run(trial) == _without_run(nowhere) and trial["applied"] is None
        assert (trial["run"], nowhere["run"]) == ("trial", "never-used")
        assert reply.kind is Kind.BACKWARD
        hospital, bank = server.book.runs["hospital:trial"], server.book.runs["bank:trial"]
        assert (hospital.members, hospital.steps) == ({"client-1"}, 1)
        assert (bank.members, bank.steps) == ({"client-2"}, 1)
        c1.close()
        c2.close()


async def test_a_finished_run_of_another_group_is_no_oracle(deployment) -> None:  # type: ignore[no-untyped-def]
    # Prepare: the hospital's run "trial" applied a step and finished
    files = deployment(topology="vanilla", clients=2, dataset="breast_cancer")
    async with serving(files, *APART) as (server, ctx, _):
        c1, _ = await _hello(server, ctx, "client-1", "trial")
        await _step(server, c1)
        await c1.send(Message(Kind.BYE, meta={"finished": True}))
        await asyncio.wait_for(_until(lambda: not server.book.runs["hospital:trial"].active), 10)
        # Execute: the bank's client-2 asks for it; the hospital's client-1 asks again
        c2, bank = await _hello(server, ctx, "client-2", "trial")
        with pytest.raises(Exception) as own:
            await _hello(server, ctx, "client-1", "trial")
        # Assert: to the bank, a run that does not exist (before: "run 'trial' has
        # finished"); the hospital's own member is still told its run finished
        assert bank["run"] == "trial" and bank["applied"] is None
        assert "has finished" in str(own.value)
        c2.close()


async def test_the_current_run_n_is_the_groups_own(deployment) -> None:  # type: ignore[no-untyped-def]
    # Prepare: the hospital's client-1 trains in the server's current run (run-1)
    files = deployment(topology="vanilla", clients=2, dataset="breast_cancer")
    async with serving(files, *APART) as (server, ctx, _):
        c1, first = await _hello(server, ctx, "client-1")
        await _step(server, c1)
        # Execute: client-2 joins the current run, and then names run-1 outright
        c2, current = await _hello(server, ctx, "client-2")
        await _step(server, c2)
        await _step(server, c2, step=1)
        c2.close()
        named, by_name = await _hello(server, ctx, "client-2", "run-1", takeover=True)
        # Assert: each group has its own run-1; the hospital's kept its one step
        assert first["run"] == current["run"] == by_name["run"] == "run-1"
        assert server.book.runs["hospital:run-1"].members == {"client-1"}
        assert server.book.runs["hospital:run-1"].steps == 1
        assert server.book.runs["bank:run-1"].steps == 2
        assert by_name["applied"] == [0, 1]  # its own steps, in its own run
        c1.close()
        named.close()


async def test_another_groups_run_serves_no_evaluation_nor_prediction(deployment) -> None:  # type: ignore[no-untyped-def]
    # Prepare: the hospital's run "trial" applied a step
    files = deployment(topology="vanilla", clients=2, dataset="breast_cancer")
    async with serving(files, *APART) as (server, ctx, _):
        c1, _ = await _hello(server, ctx, "client-1", "trial")
        await _step(server, c1)
        refusals = []
        # Execute: the bank's key joins to infer, naming "trial", an unknown id, and none
        for run in ("trial", "nope", ""):
            conn, _ = await _hello(server, ctx, "client-2", run, intent="infer", takeover=True)
            act = torch.rand(4, *(server.engine.act_shape or ()))
            await conn.send(Message(Kind.EVALUATE, tensors={"act": act}))
            with pytest.raises(PeerError) as refused:
                await conn.recv(10)
            refusals.append(str(refused.value))
            conn.close()
        # Assert: the hospital's model answers none of them (before: "trial" was evaluated
        # on it); its id gets the words of an unknown one
        named, unknown, none = refusals
        assert named.replace("trial", "ID") == unknown.replace("nope", "ID")
        assert "no run of client-2's group on this server yet" in none
        c1.close()


async def _until(condition: Any) -> None:
    while not condition():
        await asyncio.sleep(0.02)


async def test_a_groups_members_still_train_together(deployment) -> None:  # type: ignore[no-untyped-def]
    # Prepare: client-1 and client-2 are the hospital's, client-3 the bank's
    files = deployment(topology="vanilla", clients=3, dataset="breast_cancer")
    sets = (
        'server.groups={hospital=["client-1", "client-2"], bank=["client-3"]}',
        "server.run_clients=0",
    )
    base = files["server"].parent
    async with serving(files, *sets) as (server, _, _):
        workers = [
            ClientWorker(load_client(files[f"client-{i}"]), base, progress=False) for i in (1, 2, 3)
        ]
        # Execute: all three train at once, none naming a run
        summaries = await asyncio.wait_for(asyncio.gather(*(w.run() for w in workers)), 120)
        # Assert: the hospital's two trained one run together, the bank's client alone
        assert {s["run"] for s in summaries} == {"run-1"}
        assert server.book.runs["hospital:run-1"].members == {"client-1", "client-2"}
        assert server.book.runs["bank:run-1"].members == {"client-3"}
        assert all(s["steps"] > 0 for s in summaries)


def test_an_admitted_key_in_no_group_stops_the_server_at_start(deployment) -> None:  # type: ignore[no-untyped-def]
    files = deployment(topology="vanilla", clients=2, dataset="breast_cancer")
    with pytest.raises(ConfigError, match="no group around 'client-2'"):
        ServerWorker(load_server(files["server"], ONE_LEFT_OUT), files["server"].parent)
    with pytest.raises(ConfigError, match=r"lists 'client-1', which server\.groups\.hospital"):
        twice = 'server.groups={hospital=["client-1"], bank=["client-1", "client-2"]}'
        ServerWorker(load_server(files["server"], twice), files["server"].parent)
    splitfed = deployment(topology="splitfed", clients=2, dataset="breast_cancer")
    with pytest.raises(ConfigError, match=r"server\.group names clients of the groups bank, hosp"):
        ServerWorker(load_server(splitfed["server"], APART[0]), splitfed["server"].parent)


def test_the_cli_refuses_a_server_whose_groups_leave_a_client_out(
    deployment, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    files = deployment(topology="vanilla", clients=2, dataset="breast_cancer")
    code, _, err = _cli(capsys, "server", "--config", str(files["server"]), "--set", ONE_LEFT_OUT)
    assert code == 2 and "no group around 'client-2'" in err and err.count("\n") == 1


GROUPS = ((1, "hospital"), (2, "bank"))


async def test_an_insecure_name_in_no_group_is_refused_at_its_hello(deployment) -> None:  # type: ignore[no-untyped-def]
    # Prepare: --insecure, where names are claimed: client-9 is in no group
    files = deployment(topology="vanilla", clients=2, dataset="breast_cancer", insecure=True)
    async with serving(files, APART[0]) as (server, ctx, _):
        conn = DealerConnection(ctx, server.cfg.server.bind)
        hello = hello_for(server.fingerprint, "client-9")
        # Execute / Assert: refused, one line naming what to do; a member is welcome
        with pytest.raises(PeerError, match=r"client-9 is in no group of \[server\] groups"):
            await conn.handshake(ClientHandshake(hello, None, None), 10)
        conn.close()
        member = DealerConnection(ctx, server.cfg.server.bind)
        hello = hello_for(server.fingerprint, "client-1")
        assert (await member.handshake(ClientHandshake(hello, None, None), 10))["run"] == "run-1"
        member.close()


def _kit(folder: Path, listen: str, group: str) -> Path:
    """A tenant's run-API kit: the server's ops address and its group's token."""
    token = folder / f"{group}.token"
    token.write_text(secrets.token_urlsafe(32) + "\n")
    token.chmod(0o600)  # its group's alone (one others may read is warned about)
    kit = folder / f"{group}.toml"
    kit.write_text(to_toml({"ops": {"listen": listen, "admin_token": token.name}}))
    return kit


def test_a_groups_token_opens_the_run_api_for_its_runs_only(
    deployment, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: each group's token; client-1 (hospital) and client-2 (bank) each train "trial"
    files = deployment(topology="vanilla", clients=2, dataset="breast_cancer", ops=True)
    keys, server = files["server"].parent / "keys", str(files["server"])
    listen = load_server(files["server"]).ops.listen
    kits = {g: _kit(keys, listen, g) for g in ("hospital", "bank")}
    tables = [f'{g}={{members=["client-{i}"], token="keys/{g}.token"}}' for i, g in GROUPS]
    groups = "server.groups={" + ", ".join(tables) + "}"
    with ThreadServer(files["server"], groups, "server.run_clients=0") as worker:
        for name in ("client-1", "client-2"):
            thread, errors = _client_in_thread(files[name], 'client.run="trial"')
            thread.join(120)
            assert not errors, errors
        bank = str(kits["bank"])
        # Execute: the bank's token lists, reads, downloads and stops runs
        listed = json.loads(_cli(capsys, "runs", "list", "--config", bank, "--json")[1])
        theirs = _cli(capsys, "runs", "status", "hospital:trial", "--config", bank)
        nowhere = _cli(capsys, "runs", "status", "hospital:nope", "--config", bank)
        out = ("--out", str(keys.parent / "stolen.pt"))
        download = _cli(capsys, "runs", "download", "hospital:trial", "--config", bank, *out)
        stop = _cli(capsys, "runs", "stop", "hospital:trial", "--config", bank)
        own = _cli(capsys, "runs", "download", "bank:trial", "--config", bank, *out)
        everything = json.loads(_cli(capsys, "runs", "list", "--config", server, "--json")[1])
    # Assert: the bank sees its run alone; the hospital's is answered as one that does not
    # exist (the same words, the id aside), never downloaded; the operator sees both
    assert [r["id"] for r in listed["runs"]] == ["bank:trial"]
    assert theirs[0] == nowhere[0] == download[0] == stop[0] == 2
    assert theirs[2].replace("hospital:trial", "ID") == nowhere[2].replace("hospital:nope", "ID")
    assert own[0] == 0 and worker.book.runs["hospital:trial"].state == "finished"
    assert {r["id"] for r in everything["runs"]} == {"hospital:trial", "bank:trial"}


def test_redacted_status_names_no_group_nor_chosen_id_as_the_current_run() -> None:
    # Prepare: /status of a server whose newest run is a group's (or a client-chosen id)
    runs = [{"id": "run-3"}, {"id": "hospital:trial"}]
    # Execute
    grouped = json.dumps(redact({"current_run": "hospital:trial", "runs": runs}))
    chosen = redact({"current_run": "hospital-a-trial", "runs": []})
    plain = redact({"current_run": "run-3", "runs": runs})
    # Assert: its place in the list (before: the id itself, which the runs list hid)
    assert json.loads(grouped)["current_run"] == "#2" and "hospital" not in grouped
    assert chosen["current_run"] == "#" and plain["current_run"] == "run-3"


async def test_redacted_status_of_a_live_server_names_no_group_nor_chosen_id(deployment) -> None:  # type: ignore[no-untyped-def]
    # Prepare: the hospital's run "trial" applied a step and finished, its model saved
    # in the runs folder (state/runs/hospital/trial/server.pt)
    files = deployment(topology="vanilla", clients=2, dataset="breast_cancer")
    async with serving(files, *APART, 'server.runs_dir="state/runs"') as (server, ctx, _):
        c1, _ = await _hello(server, ctx, "client-1", "trial")
        await _step(server, c1)
        await c1.send(Message(Kind.BYE, meta={"finished": True}))
        await asyncio.wait_for(_until(lambda: not server.book.runs["hospital:trial"].active), 10)
        # Execute: /status as anyone who reaches the ops port sees it
        seen = json.dumps(redact(server.status()))
    # Assert: neither the group nor the id its client chose (before: the run's "group"
    # field and its model's path named both, though its id showed as "#1")
    assert server.book.runs["hospital:trial"].model
    assert "hospital" not in seen and "trial" not in seen


def test_a_token_that_opens_more_than_its_groups_runs_stops_the_server(deployment) -> None:  # type: ignore[no-untyped-def]
    # Prepare: the hospital's and the bank's token files hold one token; then the bank's is
    # the operator's admin token (a tenant's kit given the file the server's config names)
    files = deployment(topology="vanilla", clients=2, dataset="breast_cancer", ops=True)
    keys, base = files["server"].parent / "keys", files["server"].parent
    (keys / "shared.token").write_text(secrets.token_urlsafe(32) + "\n")
    (keys / "copy.token").write_text((keys / "shared.token").read_text())
    admin = load_server(files["server"]).ops.admin_token
    shared = (
        "server.groups={"
        + ", ".join(
            f'{g}={{members=["client-{i}"], token="keys/{t}"}}'
            for (i, g), t in zip(GROUPS, ("shared.token", "copy.token"), strict=True)
        )
        + "}"
    )
    as_admin = (
        f'server.groups={{hospital=["client-1"], bank={{members=["client-2"], token="{admin}"}}}}'
    )
    # Execute / Assert: one line naming both; before, the server started, and the hospital's
    # token listed the bank's runs only (the last group named won), the bank's listed every run
    with pytest.raises(ConfigError, match=r"server\.groups\.bank\.token .* server\.groups\.hosp"):
        ServerWorker(load_server(files["server"], shared), base)
    with pytest.raises(ConfigError, match=r"server\.groups\.bank\.token .* ops\.admin_token"):
        ServerWorker(load_server(files["server"], as_admin), base)
