"""SplitFed secure aggregation: masks only a pair can make, exact sums, members only.

The attack of issue 15 (finding 2): client-1 submits zero vectors under sub-names, gets the
round's sum, and removes client-2's masks. These tests show that sub-names are never
members, that a round needs every member once, and that client-1 together with the server's
whole view recovers nothing correlated with client-2's weights, while a positive control
with the missing pair secret recovers them exactly (so the recovery itself is right).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sl_pipeline.config import ClientConfig, ServerConfig, load
from sl_pipeline.errors import ConfigError, CryptoError, ProtocolError
from sl_pipeline.keys import generate_keypair, load_admitted_keys, load_keypair
from sl_pipeline.messages import Kind, Message
from sl_pipeline.secagg import (
    FIXED_POINT_BITS,
    MaskingKeys,
    average_from_sum,
    mask,
    masked_tensor,
    new_nonce,
    pair_seed,
    round_context,
    sum_masked,
    to_fixed,
)
from sl_pipeline.transport import Channel
from workers.client.worker import ClientWorker
from workers.runtime.checkpoint import decode, encode
from workers.runtime.peers import Peer
from workers.server.aggregation import SecureAggregator
from workers.server.engines import Engine
from workers.server.engines.group import GroupEngine
from workers.server.worker import ServerWorker
from workers.tools.inprocess import run_deployment
from workers.topologies import topology

from .test_topologies import record_inbound

NAMES = ["client-1", "client-2", "client-3"]


def server_engine(cfg: ServerConfig, base: Path) -> Engine:
    """The engine a server of ``cfg`` builds: the one its topology names."""
    return topology(cfg.server.topology).engine(cfg, base)


def _group(names: list[str] = NAMES) -> dict[str, MaskingKeys]:
    pairs = {n: generate_keypair() for n in names}
    return {
        n: MaskingKeys(n, pairs[n].private, {o: pairs[o].public for o in names if o != n})
        for n in names
    }


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.astype(np.float64), b.astype(np.float64))[0, 1])


# ---- the pure core -------------------------------------------------------------------------
def test_masks_cancel_and_the_sum_is_exactly_the_fixed_point_sum() -> None:
    # Prepare
    keys = _group()
    torch.manual_seed(0)
    vectors = {n: torch.randn(1000) for n in NAMES}
    nonces = {n: new_nonce() for n in NAMES}
    # Execute
    masked = [keys[n].masked(vectors[n], 3, nonces) for n in NAMES]
    total = masked_tensor(sum_masked(masked))
    # Assert: bit-identical to the unmasked fixed-point sum, so training is unchanged
    plain = masked_tensor(sum_masked([to_fixed(v) for v in vectors.values()]))
    assert torch.equal(total, plain)
    mean = torch.stack(list(vectors.values())).double().mean(0).float()
    assert torch.allclose(average_from_sum(total, 3), mean, atol=2.0**-FIXED_POINT_BITS)
    for n, words in zip(NAMES, masked, strict=True):
        assert abs(_pearson(words.view(np.int64), to_fixed(vectors[n]).view(np.int64))) < 0.1


def test_a_pair_seed_is_shared_by_its_two_clients_only() -> None:
    a, b, c = generate_keypair(), generate_keypair(), generate_keypair()
    ctx = round_context(0, {"a": new_nonce(), "b": new_nonce()})
    seed = pair_seed(a.private, b.public, ctx, "a", "b")
    assert seed == pair_seed(b.private, a.public, ctx, "a", "b")
    assert seed != pair_seed(c.private, b.public, ctx, "a", "b")  # a third client's try
    other = round_context(0, {"a": new_nonce(), "b": new_nonce()})  # a new attempt
    assert seed != pair_seed(a.private, b.public, other, "a", "b")
    assert seed != pair_seed(a.private, b.public, round_context(1, {"a": b"", "b": b""}), "a", "b")


def test_masks_come_from_a_keystream_not_a_seeded_numpy_generator() -> None:
    words = mask(b"\x01" * 32, 4096)
    assert words.dtype == np.uint64 and len(set(words.tolist())) == 4096
    bits = np.unpackbits(words.view(np.uint8))
    assert abs(bits.mean() - 0.5) < 0.01
    assert not np.array_equal(words, mask(b"\x02" + b"\x01" * 31, 4096))


def test_the_round_members_must_be_exactly_the_group() -> None:
    keys = _group()
    nonces = {"client-1": new_nonce(), "client-1/x": new_nonce(), "client-1/y": new_nonce()}
    with pytest.raises(ProtocolError, match="not the group"):
        keys["client-1"].masked(torch.zeros(4), 0, nonces)


# ---- the server's rounds -------------------------------------------------------------------
def _join(name: str, epoch: int = 0, nonce: bytes | None = None) -> Message:
    nonce = nonce or new_nonce()
    meta = {"op": "join", "nonce": nonce.hex()}
    step = 2 * int.from_bytes(nonce[:6], "big")  # as the client does: a step per attempt
    return Message(kind=Kind.WEIGHTS, client=name, epoch=epoch, step=step, meta=meta)


def _submit(name: str, attempt: str, words: np.ndarray, epoch: int = 0) -> Message:
    meta = {"op": "submit", "attempt": attempt}
    tensors = {"masked": masked_tensor(words)}
    return Message(kind=Kind.WEIGHTS, client=name, epoch=epoch, step=1, meta=meta, tensors=tensors)


def _announce(agg: SecureAggregator, nonces: dict[str, bytes]) -> dict[str, Any]:
    replies: list[Any] = []
    for name in nonces:
        replies = agg.handle(name.encode(), _join(name, nonce=nonces[name]))
    assert {m.meta["op"] for _, m in replies} == {"members"} and len(replies) == 3
    return dict(replies[0][1].meta)


def test_sub_names_and_strangers_are_never_members() -> None:
    # The attack: client-1 also submits under sub-names x and y (the server names
    # them client-1/x, client-1/y); a round must not complete, or even count them.
    agg = SecureAggregator(NAMES)
    assert agg.handle(b"1", _join("client-1")) == []
    for fake in ("client-1/x", "client-1/y", "x"):
        with pytest.raises(ProtocolError, match="not a member"):
            agg.handle(b"1", _join(fake))
    assert agg.queue_depth() == 1  # only client-1 joined; nothing was announced


def test_a_round_sums_once_every_member_submitted_in_the_same_attempt() -> None:
    keys, agg = _group(), SecureAggregator(NAMES)
    nonces = {n: new_nonce() for n in NAMES}
    announced = _announce(agg, nonces)
    got = {n: bytes.fromhex(v) for n, v in announced["nonces"].items()}
    words = {n: keys[n].masked(torch.full((8,), float(i)), 0, got) for i, n in enumerate(NAMES)}
    assert agg.handle(b"1", _submit("client-1", announced["attempt"], words["client-1"])) == []
    with pytest.raises(ProtocolError, match="already submitted"):  # one submission each
        agg.handle(b"1", _submit("client-1", announced["attempt"], words["client-2"]))
    agg.handle(b"2", _submit("client-2", announced["attempt"], words["client-2"]))
    replies = agg.handle(b"3", _submit("client-3", announced["attempt"], words["client-3"]))
    assert {m.meta["op"] for _, m in replies} == {"sum"} and len(replies) == 3
    avg = average_from_sum(replies[0][1].tensors["sum"], 3)
    assert torch.equal(avg, torch.ones(8))  # (0 + 1 + 2) / 3
    late = agg.handle(b"9", _join("client-2"))  # a restarted member gets the same sum
    assert late[0][1].meta["op"] == "sum" and torch.equal(
        late[0][1].tensors["sum"], replies[0][1].tensors["sum"]
    )


def test_a_member_that_starts_over_aborts_the_attempt_with_fresh_nonces() -> None:
    keys, agg = _group(), SecureAggregator(NAMES)
    announced = _announce(agg, {n: new_nonce() for n in NAMES})
    got = {n: bytes.fromhex(v) for n, v in announced["nonces"].items()}
    first = keys["client-1"].masked(torch.ones(8), 0, got)
    agg.handle(b"1", _submit("client-1", announced["attempt"], first))
    # client-3 restarts and joins again with a new nonce: the attempt is void
    replies = agg.handle(b"3", _join("client-3"))
    assert [(i, m.meta["op"]) for i, m in replies] == [(b"1", "retry")]
    stale = agg.handle(b"2", _submit("client-2", announced["attempt"], first))
    assert stale[0][1].meta["op"] == "retry"  # a submission for the void attempt
    again = _announce(agg, {n: new_nonce() for n in NAMES[:2]})  # client-3 already joined
    assert again["attempt"] != announced["attempt"]
    fresh = {n: bytes.fromhex(v) for n, v in again["nonces"].items()}
    second = keys["client-1"].masked(torch.ones(8), 0, fresh)
    # the same weights in two attempts: the difference of the masked words is noise
    diff = (second - first).view(np.int64)
    assert abs(_pearson(diff, np.arange(8))) < 0.9 and len(set(diff.tolist())) == 8


def test_a_member_opening_far_off_rounds_blocks_nobody() -> None:
    # The red team's attack: client-1 joins rounds 10**9 and 10**9 + 1 before the others
    # reach round 0; they must still complete round 0 (a member is in one round at a time).
    keys, agg = _group(), SecureAggregator(NAMES)
    for far in (10**9, 10**9 + 1):
        assert agg.handle(b"1", _join("client-1", epoch=far)) == []
    assert len(agg.open) == 1  # its second far-off join withdrew it from the first
    announced = _announce(agg, {n: new_nonce() for n in NAMES})
    assert set(agg.open) == {0}  # joining round 0 withdrew client-1 from the far-off one
    got = {n: bytes.fromhex(v) for n, v in announced["nonces"].items()}
    replies: list[Any] = []
    for name in NAMES:
        words = keys[name].masked(torch.ones(4), 0, got)
        replies = agg.handle(name.encode(), _submit(name, announced["attempt"], words))
    assert {m.meta["op"] for _, m in replies} == {"sum"} and agg.open == {}


def test_round_state_survives_a_checkpoint() -> None:
    keys, agg = _group(), SecureAggregator(NAMES)
    announced = _announce(agg, {n: new_nonce() for n in NAMES})
    got = {n: bytes.fromhex(v) for n, v in announced["nonces"].items()}
    words = {n: keys[n].masked(torch.ones(8), 0, got) for n in NAMES}
    agg.handle(b"1", _submit("client-1", announced["attempt"], words["client-1"]))
    state, _ = decode(encode({"group": agg.state_dict()}, 0))
    restored = SecureAggregator(NAMES)
    restored.load_state_dict(state["group"])
    restored.handle(b"2", _submit("client-2", announced["attempt"], words["client-2"]))
    replies = restored.handle(b"3", _submit("client-3", announced["attempt"], words["client-3"]))
    assert sorted(i for i, _ in replies) == [b"", b"2", b"3"]  # client-1's: to the cache only
    assert len(replies) == 3 and torch.equal(
        average_from_sum(replies[0][1].tensors["sum"], 3), torch.ones(8)
    )


def test_the_server_needs_the_group_by_name(deployment) -> None:  # type: ignore[no-untyped-def]
    files = deployment(topology="splitfed", clients=3, dataset="breast_cancer")
    cfg = load(ServerConfig, files["server"])
    assert isinstance(server_engine(cfg, files["server"].parent), GroupEngine)
    with pytest.raises(ConfigError, match=r"server\.group"):
        server_engine(
            load(ServerConfig, files["server"], ["server.group=[]"]), files["server"].parent
        )


# ---- key distribution ----------------------------------------------------------------------
@pytest.mark.parametrize("insecure", [False, True])
def test_init_gives_each_client_its_key_and_only_the_others_public_keys(
    deployment, insecure: bool
) -> None:  # type: ignore[no-untyped-def]
    files = deployment(topology="splitfed", clients=3, insecure=insecure)
    base = files["server"].parent
    group = base / "keys" / "group"
    assert sorted(p.name for p in group.iterdir()) == [f"{n}.pub" for n in NAMES]
    assert not (base / "keys" / "group.secret").exists()  # no secret that every client holds
    public = {name: key for key, name in load_admitted_keys(group).items()}
    for name in NAMES:
        text = files[name].read_text()
        assert 'group_keys = "keys/group"' in text and "group_key =" not in text
        assert load_keypair(base / "keys" / f"{name}.key").public == public[name]
    assert 'group = ["client-1", "client-2", "client-3"]' in files["server"].read_text()


# ---- the attack, in a real three-client run --------------------------------------------------
async def test_client_1_with_the_servers_view_learns_nothing_of_client_2(
    deployment, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: record what the server sees, and (for the assertion only) the true weights
    seen = record_inbound(monkeypatch)
    truth: dict[tuple[str, int], torch.Tensor] = {}
    original = MaskingKeys.masked

    def spy(self: MaskingKeys, vector: torch.Tensor, round_: int, nonces: Any) -> np.ndarray:
        truth[(self.me, round_)] = vector.clone()
        return original(self, vector, round_, nonces)

    monkeypatch.setattr(MaskingKeys, "masked", spy)
    files = deployment(topology="splitfed", clients=3, dataset="breast_cancer", epochs=1)
    base = files["server"].parent
    # Execute
    run = await run_deployment(files)
    # Assert: client-1 knows its own private key and everyone's public keys; the server's
    # view adds every nonce and every masked vector. Remove what client-1 can: its own
    # pair mask with client-2. The pair (2, 3) mask stays, and the result is noise.
    keys = {n: load_keypair(base / "keys" / f"{n}.key") for n in NAMES}
    joins = {m.client: bytes.fromhex(m.meta["nonce"]) for m in seen if m.meta.get("op") == "join"}
    victim = next(m for m in seen if m.meta.get("op") == "submit" and m.client == "client-2")
    y2 = victim.tensors["masked"].numpy().view(np.uint64).copy()
    context = round_context(0, joins)
    m12 = mask(
        pair_seed(
            keys["client-1"].private, keys["client-2"].public, context, "client-1", "client-2"
        ),
        y2.size,
    )
    recovered = (y2 + m12).view(np.int64) / 2.0**FIXED_POINT_BITS
    x2 = truth[("client-2", 0)].double().numpy()
    assert abs(_pearson(recovered, x2)) < 0.1
    # Positive control: with the (2, 3) secret, which only client-2 and client-3 hold, the
    # same recovery gives client-2's weights to the fixed-point precision.
    m23 = mask(
        pair_seed(
            keys["client-3"].private, keys["client-2"].public, context, "client-2", "client-3"
        ),
        y2.size,
    )
    exact = (y2 + m12 - m23).view(np.int64) / 2.0**FIXED_POINT_BITS
    assert np.abs(exact - x2).max() <= 2.0**-FIXED_POINT_BITS and _pearson(exact, x2) > 0.999
    # and training still averaged: every client ends with the same segment
    a, b, c = (
        torch.nn.utils.parameters_to_vector(w.bottom.parameters()).detach() for w in run.clients
    )
    assert torch.allclose(a, b, atol=1e-6) and torch.allclose(a, c, atol=1e-6)
    accuracies = ", ".join(f"{s['test_accuracy']:.4f}" for s in run.summaries)
    print(
        f"client-1's recovery of client-2's weights: Pearson r = {_pearson(recovered, x2):.4f}; "
        f"with the (2, 3) secret: r = {_pearson(exact, x2):.6f}; accuracies {accuracies}"
    )


def test_a_client_without_its_key_is_told_what_to_set(deployment) -> None:  # type: ignore[no-untyped-def]
    from workers.cli import main

    files = deployment(topology="splitfed", clients=2)
    code = main(["client", "--config", str(files["client-1"]), "--set", 'client.group_keys=""'])
    assert code == ConfigError.exit_code
    code = main(["client", "--config", str(files["client-1"]), "--set", 'client.group_key="x"'])
    assert code == ConfigError.exit_code


def test_a_bad_announcement_is_refused() -> None:
    from workers.client.group import _announced_nonces

    nonce = new_nonce()
    reply = Message(
        kind=Kind.WEIGHTS, meta={"op": "members", "nonces": {"client-1": new_nonce().hex()}}
    )
    with pytest.raises(CryptoError):
        _announced_nonces(reply, "client-1", nonce)


# ---- the client's side of a round -----------------------------------------------------------
class FakeRound:
    """A server for one SplitFed client: the other two members' nonces, then a scripted
    answer to each submission ("retry" first, to see a fresh attempt)."""

    def __init__(self, answers: list[str]) -> None:
        self.answers = answers
        self.joins: list[bytes] = []
        self.submitted: list[Message] = []

    async def request(self, message: Message, timeout_s: float | None = None) -> Message:
        msg = message
        if msg.meta["op"] == "join":
            self.joins.append(bytes.fromhex(msg.meta["nonce"]))
            nonces = {"client-1": msg.meta["nonce"]}
            nonces.update({n: new_nonce().hex() for n in NAMES[1:]})
            meta = {"op": "members", "attempt": f"a{len(self.joins)}", "nonces": nonces}
            return msg.reply(Kind.WEIGHTS, meta=meta)
        self.submitted.append(msg)
        answer = self.answers.pop(0)
        if answer == "retry":
            return msg.reply(Kind.WEIGHTS, meta={"op": "retry"})
        size = msg.tensors["masked"].numel() + (1 if answer == "bad" else 0)
        fixed = masked_tensor(to_fixed(torch.full((size,), 0.5)))
        return msg.reply(Kind.WEIGHTS, meta={"op": "sum", "parties": 99}, tensors={"sum": fixed})


def _splitfed_client(deployment, server: FakeRound):  # type: ignore[no-untyped-def]
    files = deployment(topology="splitfed", clients=3, dataset="breast_cancer")
    worker = ClientWorker(
        load(ClientConfig, files["client-1"]), files["client-1"].parent, progress=False
    )
    worker.request = server.request  # type: ignore[method-assign]
    return worker


async def test_a_retried_round_uses_a_fresh_nonce_and_steps(deployment) -> None:  # type: ignore[no-untyped-def]
    server = FakeRound(["retry", "sum"])
    worker = _splitfed_client(deployment, server)
    await worker.runner.after_epoch(0)
    assert len(server.joins) == 2 and server.joins[0] != server.joins[1]
    first, second = server.submitted
    assert first.step != second.step  # never answered from the cache of the void attempt
    assert [m.meta["attempt"] for m in server.submitted] == ["a1", "a2"]
    weights = torch.nn.utils.parameters_to_vector(worker.bottom.parameters())
    assert torch.allclose(weights, torch.full_like(weights, 0.5 / 3))  # its own count, not 99


async def test_a_malformed_sum_is_refused(deployment) -> None:  # type: ignore[no-untyped-def]
    worker = _splitfed_client(deployment, FakeRound(["bad"]))
    with pytest.raises(ProtocolError, match="one int64 word per weight"):
        await worker.runner.after_epoch(0)


class ForgedSum(FakeRound):
    """An active server that answers a join with a sum the client never submitted to."""

    async def request(self, message: Message, timeout_s: float | None = None) -> Message:
        size = sum(p.numel() for p in self.worker.bottom.parameters())
        fixed = masked_tensor(to_fixed(torch.zeros(size)))
        return message.reply(Kind.WEIGHTS, meta={"op": "sum", "parties": 3}, tensors={"sum": fixed})


async def test_a_sum_for_a_round_the_client_never_submitted_to_is_refused(deployment) -> None:  # type: ignore[no-untyped-def]
    server = ForgedSum([])
    worker = _splitfed_client(deployment, server)
    server.worker = worker  # type: ignore[attr-defined]
    weights = torch.nn.utils.parameters_to_vector(worker.bottom.parameters()).detach().clone()
    with pytest.raises(ProtocolError, match="never submitted"):
        await worker.runner.after_epoch(0)
    after = torch.nn.utils.parameters_to_vector(worker.bottom.parameters())
    assert torch.equal(after, weights)  # the forged sum was not loaded


def test_a_restarted_server_answers_a_finished_round_from_its_checkpoint(deployment) -> None:  # type: ignore[no-untyped-def]
    # Prepare: a server with checkpoints, and a round every member submitted to
    files = deployment(topology="splitfed", clients=3, dataset="breast_cancer")
    base, sets = files["server"].parent, ['checkpoint.dir="ckpt"', "checkpoint.fsync=false"]
    server = ServerWorker(load(ServerConfig, files["server"], sets), base)
    peers = {n: Peer(n, Channel(None), "test") for n in NAMES}  # type: ignore[arg-type]
    keys = _group()
    weights = torch.ones(server.engine.coordinator.size)  # type: ignore[attr-defined]
    for name in NAMES:
        replies = server._train(name.encode(), peers[name], _join(name))
    attempt = dict(replies[0][1].meta)
    nonces = {n: bytes.fromhex(v) for n, v in attempt["nonces"].items()}
    for name in NAMES:
        words = keys[name].masked(weights, 0, nonces)
        replies = server._train(
            name.encode(), peers[name], _submit(name, attempt["attempt"], words)
        )
    summed = replies[0][1].tensors["sum"]
    # Execute: kill -9 (no on_stop), restart from the checkpoint, client-2 resends its submit
    again = ServerWorker(load(ServerConfig, files["server"], sets), base)
    words = keys["client-2"].masked(weights, 0, nonces)
    resent = again._train(b"new", peers["client-2"], _submit("client-2", attempt["attempt"], words))
    late = again._train(b"new", peers["client-3"], _join("client-3"))
    # Assert: the same sum, from the checkpointed cache and the round's record
    assert [(i, m.meta["op"]) for i, m in resent + late] == [(b"new", "sum"), (b"new", "sum")]
    assert torch.equal(resent[0][1].tensors["sum"], summed)
    assert torch.equal(late[0][1].tensors["sum"], summed)
