"""Authenticated fuzzing (issue 15): an admitted client sends hypothesis-generated sealed
messages (valid encryption, arbitrary header and tensors) while honest clients train.

Zero worker deaths, every honest run finishes with the same step count. The default run is
short; ``SL_FUZZ_SECONDS=600`` runs the full ten minutes (docs/security.md).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import zmq.asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sl_pipeline.codec import DTYPES
from sl_pipeline.errors import PeerError, TransportError
from sl_pipeline.keys import write_keypair
from sl_pipeline.messages import PROTOCOL_VERSION, Kind
from sl_pipeline.transport import DealerConnection
from workers.client.worker import ClientWorker
from workers.server.worker import ServerWorker
from workers.tools.localdeploy import to_toml

from .conftest import load_client, load_server, load_toml
from .test_hostile_peers import join

FUZZ_SECONDS = float(os.environ.get("SL_FUZZ_SECONDS", "15"))
HONEST_KEYS = 4 + int(FUZZ_SECONDS)  # one admitted key per honest run (a run takes > 1 s)

# ---- what the attacker sends ----------------------------------------------------------------
_INTS = st.one_of(
    st.integers(-3, 40),
    st.integers(-(2**70), 2**70),
    st.sampled_from([2**31, 2**53, 2**63, 2**64, -(2**63)]),
)
_SCALARS = st.one_of(
    st.none(), st.booleans(), _INTS, st.floats(allow_nan=False), st.text(max_size=12)
)
_JSON = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_NAMES = st.one_of(
    st.sampled_from(["act", "labels", "grad", "act_scale", "sealed", "masked", "ids"]),
    st.text(max_size=10),
)
_DTYPE_NAMES = st.one_of(st.sampled_from(sorted(DTYPES)), st.text(max_size=6))
_SHAPES = st.one_of(
    st.lists(st.integers(0, 70), max_size=4),
    st.lists(_INTS, max_size=3),
    st.lists(st.sampled_from([0, 1, 4, 64, 2**64]), max_size=9),
    _JSON,
)


@st.composite
def _spec_and_buffer(draw: Any) -> tuple[dict[str, Any], bytes]:
    spec = {"name": draw(_NAMES), "dtype": draw(_DTYPE_NAMES), "shape": draw(_SHAPES)}
    size = _declared_size(spec)
    if size is not None and size <= 1 << 16 and draw(st.booleans()):
        buffer = draw(st.binary(min_size=size, max_size=size))  # consistent with its spec
    else:
        buffer = draw(st.binary(max_size=256))
    if draw(st.integers(0, 9)) == 0:
        spec = draw(st.dictionaries(st.text(max_size=6), _JSON, max_size=4))
    return spec, buffer


def _declared_size(spec: dict[str, Any]) -> int | None:
    shape, dtype = (
        spec["shape"],
        DTYPES.get(spec["dtype"]) if isinstance(spec["dtype"], str) else None,
    )
    if (
        dtype is None
        or not isinstance(shape, list)
        or not all(type(d) is int and d >= 0 for d in shape)
    ):
        return None
    return math.prod(shape) * dtype.itemsize


@st.composite
def sealed_inputs(draw: Any) -> list[bytes]:
    """Plaintext frames the attacker seals with its real session: a header, then buffers."""
    if draw(st.integers(0, 19)) == 0:
        return [draw(st.binary(max_size=64))]  # not JSON at all
    pairs = draw(st.lists(_spec_and_buffer(), max_size=4))
    header: Any = {
        "v": draw(st.one_of(st.just(PROTOCOL_VERSION), _JSON)),
        "kind": draw(st.one_of(st.sampled_from([k.value for k in Kind]), st.text(max_size=8))),
        "re": draw(st.one_of(st.none(), st.sampled_from([k.value for k in Kind]), _JSON)),
        "session": draw(st.one_of(st.just(""), _JSON)),
        "client": draw(st.one_of(st.just(""), st.text(max_size=20), _JSON)),
        "epoch": draw(st.one_of(st.integers(0, 3), _JSON)),
        "step": draw(st.one_of(st.integers(0, 50), _JSON)),
        "meta": draw(st.one_of(st.dictionaries(st.text(max_size=8), _JSON, max_size=5), _JSON)),
        "tensors": [spec for spec, _ in pairs],
    }
    if draw(st.integers(0, 9)) == 0:
        header = draw(st.dictionaries(st.text(max_size=8), _JSON, max_size=8))
    buffers = [buffer for _, buffer in pairs]
    if draw(st.integers(0, 9)) == 0:
        buffers = draw(st.lists(st.binary(max_size=64), max_size=5))  # frames != specs
    return [json.dumps(header).encode(), *buffers]


# ---- the arena: a server and honest clients on a loop of their own -----------------------------
class Arena:
    def __init__(self, files: dict[str, Path]) -> None:
        self.files = files
        self.base = files["server"].parent
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.honest_steps: list[int] = []
        self.honest_accuracy: list[float] = []
        self.sent = self.errors = self.rejoins = 0
        t0, self.deadline = time.monotonic(), math.inf
        self._run(self._start())
        self.setup_s = time.monotonic() - t0
        self.deadline = time.monotonic() + FUZZ_SECONDS

    def _run(self, coro: Any, timeout_s: float = 120) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    async def _start(self) -> None:
        self.server = ServerWorker(load_server(self.files["server"]), self.base)
        self.stop = asyncio.Event()
        self.serving = asyncio.create_task(self.server.serve(self.stop))
        while not self.server.bound:
            await asyncio.sleep(0.02)
        self.ctx = zmq.asyncio.Context()
        self.attacker = await self._join()
        self.honest = asyncio.create_task(self._honest_runs())

    async def _join(self) -> DealerConnection:
        keys = self.base / "keys"
        return await join(self.server.cfg.server.bind, self.server.fingerprint, keys, self.ctx)

    async def _honest_runs(self) -> None:
        """Honest clients, one after another, each under its own admitted key, for as long
        as the fuzzing lasts: every run must finish."""
        for i in range(HONEST_KEYS):
            if time.monotonic() > self.deadline and self.honest_steps:
                return
            cfg = load_client(
                self.files["client-1"],
                f'client.name="honest-{i}"',
                f'client.key="keys/honest-{i}.key"',
            )
            summary = await ClientWorker(cfg, self.base, progress=False).run()
            self.honest_steps.append(summary["steps"])
            self.honest_accuracy.append(summary["test_accuracy"])

    def attack(self, frames: list[bytes]) -> None:
        self._run(self._attack(frames), 60)

    async def _attack(self, frames: list[bytes]) -> None:
        assert not self.serving.done(), "the server died"
        channel = self.attacker.channel
        assert channel is not None
        await self.attacker.sock.send_multipart(channel.session.seal(frames))
        self.sent += 1
        try:
            await self.attacker.recv(2.0)
        except PeerError as exc:
            self.errors += 1
            if exc.remote_code == "unauthenticated":  # it said bye: join again
                await self._rejoin()
        except TransportError:  # no answer (a bye, a queued step): join again
            await self._rejoin()
        assert not self.serving.done(), "the server died"

    async def _rejoin(self) -> None:
        self.rejoins += 1
        self.attacker.close()
        self.attacker = await self._join()

    def finish(self) -> None:
        self._run(asyncio.wait_for(asyncio.shield(self.honest), 300), 310)

    def close(self) -> None:
        async def stop() -> None:
            self.honest.cancel()
            self.attacker.close()
            self.stop.set()
            await asyncio.wait_for(
                asyncio.gather(self.serving, self.honest, return_exceptions=True), 15
            )
            self.ctx.destroy(linger=0)

        try:
            self._run(stop(), 30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


@pytest.mark.timeout(int(FUZZ_SECONDS) + 300)  # set-up on a loaded host, then the fuzzing
def test_admitted_fuzzer_kills_nothing_while_honest_clients_train(deployment) -> None:  # type: ignore[no-untyped-def]
    # Prepare: a server, keys for the honest runs, the attacker joined as client-1
    files = deployment(clients=1, dataset="breast_cancer", epochs=1)
    keys = files["server"].parent / "keys"
    for i in range(HONEST_KEYS):
        _, pub = write_keypair(f"honest-{i}", keys)
        (keys / "admitted" / pub.name).write_bytes(pub.read_bytes())
    cfg = load_toml(files["server"])  # the honest keys are the project's too
    cfg["server"]["groups"]["project"] += [f"honest-{i}" for i in range(HONEST_KEYS)]
    files["server"].write_text(to_toml(cfg))
    arena = Arena(files)
    try:
        # Execute: hypothesis-generated sealed messages until the time is up
        @settings(
            max_examples=50,  # per round; rounds run until the time is up
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(frames=sealed_inputs())
        def attack(frames: list[bytes]) -> None:
            if time.monotonic() < arena.deadline:
                arena.attack(frames)

        while time.monotonic() < arena.deadline:
            attack()  # a fresh hypothesis run each round: no idle examples past the deadline
        arena.finish()
        # Assert: the server lives, every honest run finished with the same steps
        assert not arena.serving.done()
        assert arena.sent > 0 and arena.honest_steps
        assert len(set(arena.honest_steps)) == 1 and arena.honest_steps[0] > 0
        print(
            f"fuzz: {arena.sent} sealed messages ({arena.errors} error replies, "
            f"{arena.rejoins} rejoins) in {FUZZ_SECONDS:.0f}s; honest runs: "
            f"{len(arena.honest_steps)} x {arena.honest_steps[0]} steps, test accuracy "
            f"{min(arena.honest_accuracy):.4f}..{max(arena.honest_accuracy):.4f}; server alive "
            f"(setup {arena.setup_s:.1f}s)"
        )
    finally:
        arena.close()
