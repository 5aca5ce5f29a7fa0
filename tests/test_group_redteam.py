"""What one group's enrolled key can still do to another group's runs (red team of
``[server] groups``): each attack over real loopback sockets, or sans-IO with a clock."""

from __future__ import annotations

import pytest
import torch

from sl_pipeline.errors import PeerError
from sl_pipeline.messages import Kind, Message

from .test_group_quotas import TWO
from .test_hostile_numeric import serving
from .test_run_groups import _hello, _step


async def test_a_relays_names_in_one_run_stop_at_max_names(deployment) -> None:  # type: ignore[no-untyped-def]
    # Prepare: the hospital's client-1 is a relay (it speaks for clients behind it); the
    # server remembers 3 names; the bank's client-3 trains
    files = deployment(topology="vanilla", clients=3, dataset="breast_cancer")
    sets = (TWO, 'server.relays=["client-1"]', "server.max_names=3", "server.run_clients=0")
    async with serving(files, *sets) as (server, ctx, _):
        c3, _ = await _hello(server, ctx, "client-3")
        assert (await _step(server, c3)).kind is Kind.BACKWARD
        relay, _ = await _hello(server, ctx, "client-1")
        # Execute: the relay names 10 clients behind it, one forward each, in its one run
        codes, shape = [], server.engine.act_shape or ()
        for i in range(10):
            act = {"act": torch.rand(4, *shape), "labels": torch.zeros(4, dtype=torch.int64)}
            await relay.send(Message(Kind.FORWARD, client=f"x{i}", tensors=act))
            try:
                codes.append((await relay.recv(10)).kind.value)
            except PeerError as exc:
                codes.append(exc.remote_code)
                assert "server.max_names = 3" in str(exc)
        # Assert: its run holds 3 names, what every checkpoint and runs.json write of it
        # (before: all 10, without bound: each step's checkpoint, every group's, grew with
        # the names a relay made up); the bank's client still steps
        (run,) = [r for r in server.book.runs.values() if r.group == "hospital"]
        assert len(run.members) == 3 and len(run.epochs) == 3
        assert codes[:3] == ["backward"] * 3 and set(codes[3:]) == {"limit"}
        assert (await _step(server, c3, 1)).kind is Kind.BACKWARD
        relay.close()
        c3.close()


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__])
