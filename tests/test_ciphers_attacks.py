"""Red team of the transport cipher suites (sl_pipeline/ciphers.py): an on-path attacker, a
hostile enrolled client, a hostile server, a stranger and a replayer try to change the
offer or the pick, to make the two sides use different suites, to make a server that
accepts only AES-256-GCM touch OCB, or to make a suite reuse a (key, nonce) pair; both
suites refuse every altered, replayed, reordered, truncated or spliced frame. Sans-IO
except the last tests, which go over loopback sockets (a server, a relay, a client)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
import zmq.asyncio

from sl_pipeline import ciphers
from sl_pipeline.chunked import MIN_CHUNK_BYTES
from sl_pipeline.crypto import Initiator, Responder
from sl_pipeline.errors import (
    BadTagError,
    ConfigError,
    CryptoError,
    LimitError,
    PeerError,
    ProtocolError,
    ReplayError,
    SLError,
)
from sl_pipeline.handshake import HELLO, WELCOME, ClientHandshake, ServerHandshake
from sl_pipeline.keys import generate_keypair
from sl_pipeline.messages import PROTOCOL_VERSION, Kind, Message
from sl_pipeline.session import Session
from sl_pipeline.transport import DealerConnection
from workers.cli import main
from workers.client.link import make_handshake
from workers.tools.inprocess import build_deployment, wait_until

from .conftest import load_client, load_server

SERVER = generate_keypair()
CLIENT = generate_keypair()
STRANGER = generate_keypair()
GCM, OCB = "aes256-gcm", "aes128-ocb3"
BOTH = (OCB, GCM)
VERSION = str(PROTOCOL_VERSION).encode()
Frames = list[bytes]


def _server(accepted: Sequence[str] = BOTH) -> ServerHandshake:
    return ServerHandshake(SERVER, lambda key: key == CLIENT.public, ciphers=accepted)


def _client(offered: Sequence[str] = BOTH) -> ClientHandshake:
    return ClientHandshake({"client": "c"}, CLIENT, SERVER.public, ciphers=offered)


def _no_welcome_fields(hello: dict[str, Any], key: bytes | None) -> dict[str, Any]:
    return {}


def _join(offered: Sequence[str] = BOTH, accepted: Sequence[str] = BOTH) -> tuple[Session, Session]:
    client = _client(offered)
    reply, server_session, _, _ = _server(accepted).answer(client.start(), _no_welcome_fields)
    client_session, _ = client.finish(reply)
    assert isinstance(client_session, Session) and isinstance(server_session, Session)
    return client_session, server_session


def _hello_with(payload: bytes, key: Any = CLIENT) -> Frames:
    """A hello a hostile client (or a stranger, with its own key) writes itself."""
    initiator = Initiator(key, SERVER.public)
    return [HELLO, VERSION, b"noise", initiator.write_message1(payload)]


def _flipped(blob: bytes, position: int) -> bytes:
    data = bytearray(blob)
    data[position] ^= 0x01
    return bytes(data)


# --- the offer and the pick ----------------------------------------------------------------


def test_an_on_path_attacker_cannot_rewrite_the_offer_in_any_byte_of_message_1() -> None:
    # A FIPS server and a client offering OCB first: the attacker tries every byte of the
    # hello's Noise message (ephemeral, encrypted static key, encrypted offer) to reach OCB
    hello = _client().start()
    for position in range(len(hello[3])):
        forged = [*hello[:3], _flipped(hello[3], position)]
        with pytest.raises(CryptoError, match=r"handshake message failed authentication|X25519"):
            _server((GCM,)).answer(forged, _no_welcome_fields)


def test_an_on_path_attacker_cannot_rewrite_the_pick_in_any_byte_of_message_2() -> None:
    # the genuine welcome names OCB; each altered copy goes to a fresh attempt's client,
    # which must refuse it (an Initiator is single-use, so one handshake per position)
    size = len(_join_reply(BOTH)[1][1])
    for position in range(size):
        client, reply = _join_reply(BOTH)
        with pytest.raises(CryptoError):
            client.finish([WELCOME, _flipped(reply[1], position)])


def _join_reply(accepted: Sequence[str]) -> tuple[ClientHandshake, Frames]:
    client = _client()
    reply, _, _, _ = _server(accepted).answer(client.start(), _no_welcome_fields)
    return client, reply


def test_a_welcome_spliced_from_another_attempt_is_refused() -> None:
    # Arrange: the same client says hello twice (a retry); the server answers both, one
    # from a server that picks AES-256-GCM. The attacker swaps the answers.
    first, second = _client(), _client()
    fips_reply, _, _, _ = _server((GCM,)).answer(first.start(), _no_welcome_fields)
    ocb_reply, _, _, _ = _server().answer(second.start(), _no_welcome_fields)

    # Execute / Assert: each welcome is bound to its own attempt's ephemeral key
    with pytest.raises(CryptoError, match="failed authentication"):
        second.finish(fips_reply)
    with pytest.raises(CryptoError, match="failed authentication"):
        first.finish(ocb_reply)


def test_a_plaintext_welcome_or_a_hello_rewritten_to_plain_mode_gets_no_session() -> None:
    # An on-path attacker answers a Noise hello with a plaintext welcome that picks a suite
    client = _client((GCM,))
    client.start()
    for payload in (json.dumps({"cipher": GCM}).encode(), bytes(200)):
        with pytest.raises(CryptoError):
            client.finish([WELCOME, payload])

    # and rewrites a hello's mode frame to plaintext: an encrypting server refuses it
    hello = _client().start()
    with pytest.raises(CryptoError, match="this server requires encryption"):
        _server().answer([*hello[:2], b"plain", hello[3]], _no_welcome_fields)


def test_a_stranger_cannot_reach_the_pick() -> None:
    # a stranger's key authenticates its own hello but is not admitted: refused before any
    # suite is chosen or any welcome field computed
    picked: list[object] = []

    def accept(hello: dict[str, Any], key: bytes | None) -> dict[str, Any]:
        picked.append(hello)
        return {}

    hello = _hello_with(json.dumps({"ts": 1, "ciphers": [OCB]}).encode(), STRANGER)
    with pytest.raises(SLError, match="not admitted"):
        _server().answer(hello, accept)
    assert picked == []


def test_a_replayed_hello_is_refused_before_the_pick() -> None:
    server = _server()
    hello = _client((GCM,)).start()
    server.answer(hello, _no_welcome_fields)

    with pytest.raises(ReplayError, match="replayed hello"):
        server.answer(hello, _no_welcome_fields)


def test_the_accept_callbacks_welcome_cannot_name_the_cipher() -> None:
    # Arrange: a welcome builder (a server or relay's accept()) that writes the suite fields
    def colliding(hello: dict[str, Any], key: bytes | None) -> dict[str, Any]:
        return {"cipher": OCB, "ciphers": [OCB], "session": "s"}

    client = _client()
    reply, server_session, _, _ = _server((GCM,)).answer(client.start(), colliding)

    # Execute
    client_session, welcome = client.finish(reply)

    # Assert: the handshake's own pick wins, and both sides seal with it
    assert welcome["cipher"] == GCM == server_session.cipher_name == client_session.cipher_name
    assert welcome["session"] == "s"
    assert isinstance(client_session, Session) and isinstance(server_session, Session)
    assert server_session.open(client_session.seal([b"x"])) == [b"x"]


ALL_OFFERS = [
    list(offer)
    for size in range(4)
    for offer in itertools.product([OCB, GCM, "AES128-OCB3", "aes128-ocb3 ", "rot13"], repeat=size)
]


def test_a_fips_server_never_makes_an_ocb_aead_whatever_the_offer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Arrange: building an OCB AEAD anywhere in this process fails the test
    def no_ocb(key: bytes) -> ciphers.Aead:
        raise AssertionError("an OCB AEAD was made")

    bomb = dataclasses.replace(ciphers.AES128_OCB3, make=no_ocb)
    monkeypatch.setitem(ciphers.SUITES, OCB, bomb)
    server = _server((GCM,))

    # Execute: every offer of up to 3 names (dups, near misses, unknown ones), and none
    outcomes = set()
    for i, offer in enumerate([*ALL_OFFERS, None]):
        hello = {"ts": i + 1} if offer is None else {"ts": i + 1, "ciphers": offer}
        try:
            _, session, _, _ = server.answer(
                _hello_with(json.dumps(hello).encode()), _no_welcome_fields
            )
        except CryptoError as exc:
            assert "no common cipher" in exc.message
            outcomes.add("refused")
        else:
            assert isinstance(session, Session) and session.cipher is ciphers.AES256_GCM
            outcomes.add(session.cipher_name)

    # Assert: both outcomes happened, and OCB was never keyed
    assert outcomes == {"refused", GCM}


BAD_OFFERS: list[tuple[object, type[SLError], str]] = [
    ([], CryptoError, "no common cipher: the client offers []"),
    (["x" * 15_000], CryptoError, "no common cipher"),
    ([""] * 5000, ProtocolError, "limit 16384"),
    ([OCB] * 3000, ProtocolError, "limit 16384"),
    # escaping grew these names up to 10-fold: the refusal (and log line) was 883 and
    # 2,739 characters before it was bounded after escaping
    (["\x1b[31m\n\u2028\u202e" * 8] * 20, CryptoError, "no common cipher"),
    (["\U0010ffff" * 40] * 9, CryptoError, "no common cipher"),
    ([None], ProtocolError, "must be a list of suite names"),
    ([[OCB]], ProtocolError, "must be a list of suite names"),
    ({OCB: 1}, ProtocolError, "must be a list of suite names"),
    (OCB + GCM, ProtocolError, "must be a list of suite names"),  # no substring match
    (True, ProtocolError, "must be a list of suite names"),
    (7, ProtocolError, "must be a list of suite names"),
    ("[" * 5000, ProtocolError, "not JSON"),  # nesting, as raw JSON
    ("\xff", ProtocolError, "not JSON"),  # not UTF-8, as raw bytes
]


@pytest.mark.parametrize(("offer", "error", "message"), BAD_OFFERS)
def test_a_bad_offer_is_a_quick_one_line_refusal(
    offer: object, error: type[SLError], message: str
) -> None:
    if isinstance(offer, str) and offer[:1] in "[\xff":  # raw payloads, not JSON values
        payload = offer.encode("latin-1")
    else:
        payload = json.dumps({"ts": 1, "ciphers": offer}).encode()
    hello = _hello_with(payload)

    started = time.perf_counter()
    with pytest.raises(error) as refused:
        _server((GCM,)).answer(hello, _no_welcome_fields)
    elapsed = time.perf_counter() - started

    text = refused.value.message
    assert message in text and "\n" not in text and "\u2028" not in text
    assert len(text) < 400 and elapsed < 0.5  # no echo of a huge offer, no slow path


def test_a_hostile_welcome_cannot_pick_outside_the_offer_even_with_a_duplicate_key() -> None:
    # JSON with the suite named twice: the client reads the last, which it did not offer
    for welcome in (
        '{"cipher": "aes256-gcm", "cipher": "aes128-ocb3"}',
        '{"cipher": "AES256-GCM"}',
        '{"cipher": "aes256-gcm\\u0000"}',
        '{"cipher": ["aes256-gcm"]}',
    ):
        client = _client((GCM,))
        responder = Responder(SERVER, lambda key: True)
        responder.read_message1(bytes(client.start()[3]))
        reply, _ = responder.write_message2(welcome.encode(), ciphers.AES128_OCB3)
        with pytest.raises(CryptoError, match="which this client did not offer"):
            client.finish([WELCOME, reply])


def test_a_server_sealing_with_another_suite_than_it_named_is_refused_at_once() -> None:
    # a hostile server names AES-256-GCM (offered) but seals with OCB: no silent mismatch
    client = _client()
    responder = Responder(SERVER, lambda key: True)
    responder.read_message1(bytes(client.start()[3]))
    reply, server = responder.write_message2(b'{"cipher": "aes256-gcm"}', ciphers.AES128_OCB3)
    session, _ = client.finish([WELCOME, reply])

    with pytest.raises(BadTagError):
        session.open(server.seal([b"step"]))
    with pytest.raises(BadTagError):
        server.open(session.seal([b"step"]))


def test_an_older_server_naming_no_suite_gives_aes256_gcm_and_the_welcome_says_so() -> None:
    # Before: the session was AES-256-GCM but the welcome had no "cipher", so the client's
    # join line said "cipher none" (plaintext) on an encrypted link
    client = _client()
    responder = Responder(SERVER, lambda key: True)
    responder.read_message1(bytes(client.start()[3]))
    reply, old_server = responder.write_message2(b'{"session": "old"}')  # Noise's AES-GCM

    session, welcome = client.finish([WELCOME, reply])

    assert welcome == {"session": "old", "cipher": GCM}
    assert old_server.open(session.seal([b"step"])) == [b"step"]
    assert session.open(old_server.seal([b"reply"])) == [b"reply"]


def test_a_plaintext_welcome_cannot_claim_a_suite() -> None:
    # --insecure: whatever the server's welcome says, the client's welcome says "none"
    client = ClientHandshake({"client": "c"}, None, None)
    client.start()
    _, welcome = client.finish([WELCOME, json.dumps({"cipher": OCB}).encode()])
    assert welcome["cipher"] == "none"


# --- the transport -------------------------------------------------------------------------


@dataclasses.dataclass
class _Recording:
    """A suite's AEAD that logs (suite, key, nonce) of every sealing call."""

    inner: ciphers.Aead
    key: bytes
    log: list[tuple[str, bytes, bytes]]
    name: str

    def encrypt(self, nonce: Any, data: Any, ad: Any) -> bytes:
        self.log.append((self.name, self.key, bytes(nonce)))
        return self.inner.encrypt(nonce, data, ad)

    def encrypt_into(self, nonce: Any, data: Any, ad: Any, out: Any) -> int:
        self.log.append((self.name, self.key, bytes(nonce)))
        return self.inner.encrypt_into(nonce, data, ad, out)

    def decrypt_into(self, nonce: Any, data: Any, ad: Any, out: Any) -> int:
        return self.inner.decrypt_into(nonce, data, ad, out)


def _recorded(suite: ciphers.CipherSuite, log: list[tuple[str, bytes, bytes]]) -> Any:
    def make(key: bytes) -> ciphers.Aead:
        return _Recording(suite.make(key), key, log, suite.name)

    return dataclasses.replace(suite, make=make)


def _busy_sender(sender: Session, steps: int) -> None:
    """Seal as a busy peer does: one-part and chunked messages, retries of the same
    plaintext, refused seals, and a chunked message whose parts are sealed late (after
    later messages, across rekeys): what a caller that breaks off and resumes would do."""
    big = bytes(range(256)) * (MIN_CHUNK_BYTES // 64)  # 4 chunks
    late = []
    for step in range(steps):
        if step % 4 == 0:
            list(sender.seal_parts([b"h", big]))
        elif step % 4 == 1:
            sender.seal([b"a", b"b"])
            sender.seal([b"a", b"b"])  # the same step again (a retry): a new counter
        elif step % 4 == 2:
            with pytest.raises(LimitError):  # refused before anything is sealed
                sender.seal([b""] * 2000)
            parts = sender.seal_parts([big])
            next(parts)  # the head went out; the rest is sealed some steps later
            late.append(parts)
        else:
            list(sender.seal_parts([b"one part"]))
            if len(late) > 1:
                list(late.pop(0))
    for parts in late:
        list(parts)


@pytest.mark.parametrize("suite", [ciphers.AES128_OCB3, ciphers.AES256_GCM], ids=lambda s: s.name)
def test_no_key_and_nonce_pair_is_sealed_twice(suite: ciphers.CipherSuite) -> None:
    # Arrange: a session that rekeys every 3 messages and chunks at the minimum size
    log: list[tuple[str, bytes, bytes]] = []
    sender = Session(
        send_key=bytes(range(32)),
        recv_key=bytes(range(32, 64)),
        remote_static=b"",
        handshake_hash=b"",
        rekey_interval=3,
        chunk_bytes=MIN_CHUNK_BYTES,
        cipher=_recorded(suite, log),
    )

    # Execute
    _busy_sender(sender, 40)

    # Assert: every sealing call used a fresh (key, nonce) with the suite's key size, never
    # REKEY's nonce (index 0), and the keys changed at every rekey
    sealed = [(key, nonce) for _, key, nonce in log]
    assert len(sealed) > 150 and len(set(sealed)) == len(sealed)
    assert {len(key) for key, _ in sealed} == {suite.key_bytes}
    assert all(nonce[:4] != bytes(4) for _, nonce in sealed)
    assert len({key for key, _ in sealed}) == sender._send_counter // 3 + 1


def _bytes(frames: Sequence[Any]) -> Frames:
    return [bytes(frame) for frame in frames]


@pytest.mark.parametrize("suite", BOTH)
def test_every_altered_replayed_reordered_truncated_or_spliced_message_is_refused(
    suite: str,
) -> None:
    # Arrange: a session under the suite, another session, and a genuine message 0 and 1
    client, server = _join((suite,), (suite,))
    other_client, _ = _join((suite,), (suite,))
    first = _bytes(client.seal([b"header", b"tensor" * 8]))
    assert server.open(first) == [b"header", b"tensor" * 8]
    message = _bytes(client.seal([b"header", b"tensor" * 9]))
    other_client.seal([b"x"])  # so its next message has message's counter, 1
    forgeries = [
        [*message[:i], _flipped(frame, position), *message[i + 1 :]]
        for i, frame in enumerate(message)
        for position in range(len(frame))
    ]
    forgeries += [
        first,  # replayed
        message[:2],  # truncated: a frame dropped
        [*message[:2], message[2][:-1]],  # truncated: a byte dropped
        [*message[:2], message[2][-16:]],  # only the tag
        [message[0], message[2], message[1]],  # frames reordered
        [*message[:2], first[2]],  # a frame spliced from another message
        [message[0], *_bytes(other_client.seal([b"header", b"tensor" * 9]))[1:]],  # session
        [message[0], *_bytes(server.seal([b"header", b"tensor" * 9]))[1:]],  # direction
        [*message, message[2]],  # a frame added
    ]

    # Execute / Assert: each refused, and the genuine message still opens after all of them
    for forged in forgeries:
        with pytest.raises(ProtocolError):
            server.open(forged)
    assert server.open(message) == [b"header", b"tensor" * 9]
    later, latest = _bytes(client.seal([b"2"])), _bytes(client.seal([b"3"]))
    with pytest.raises(ReplayError, match="messages lost"):  # reordered messages
        server.open(latest)
    assert (server.open(later), server.open(latest)) == ([b"2"], [b"3"])


@pytest.mark.parametrize("suite", BOTH)
def test_a_chunked_message_is_refused_when_a_part_is_spliced_repeated_or_cut(suite: str) -> None:
    client, server = _join((suite,), (suite,))
    client.chunk_bytes = server.chunk_bytes = MIN_CHUNK_BYTES
    big = bytes(range(256)) * (MIN_CHUNK_BYTES // 64)  # a head and 4 chunks

    def parts(payload: bytes) -> list[Frames]:
        return [_bytes(part) for part in client.seal_parts([payload])]

    genuine, other = parts(big), parts(big[::-1])
    attempts = [
        [genuine[0], genuine[2]],  # a chunk skipped
        [genuine[0], genuine[1], genuine[1]],  # a chunk repeated
        [genuine[0], other[1]],  # a chunk of another message (counter differs)
        [genuine[0], [genuine[1][0], other[1][1]]],  # its sealed piece under our envelope
        [genuine[0], [genuine[2][0], genuine[1][1]]],  # a piece under another index
        [*genuine[:-1], parts(b"x")[0]],  # cut before the final chunk
    ]
    for attempt in attempts:
        with pytest.raises(ProtocolError):
            for part in attempt:
                server.feed(part)
        server._assembly = None  # the peer would rejoin; here the next attempt starts over
    for part in genuine[:-1]:
        assert server.feed(part) is None
    assert server.feed(genuine[-1]) == [big]


def test_the_same_keys_under_the_other_suite_open_nothing() -> None:
    # a client and server that somehow disagreed on the suite (same Split keys) cannot talk
    client, server = _join((OCB,), (OCB,))
    as_gcm = Session(
        send_key=server._send[0],
        recv_key=server._recv[0],
        remote_static=b"",
        handshake_hash=b"",
        cipher=ciphers.AES256_GCM,
    )
    with pytest.raises(BadTagError):
        as_gcm.open(client.seal([b"step"]))
    with pytest.raises(BadTagError):
        client.open(as_gcm.seal([b"reply"]))


# --- over loopback: the server's log, and a relay both ways ---------------------------------


@contextlib.asynccontextmanager
async def _serving(files: dict[str, Any], *server: str, relay: Sequence[str] = ()) -> Any:
    """The server (and the relay, if ``relay`` is not None) in this loop, stopped after."""
    run = build_deployment(files, server_overrides=server, relay_overrides=relay)
    stop = asyncio.Event()
    services = [asyncio.ensure_future(run.server.serve(stop))]
    try:
        await wait_until(run.server.ready)
        yield run, stop, services
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*services, return_exceptions=True), 30)


def _hostile_start(hs: ClientHandshake, offer: object) -> Callable[[], Frames]:
    """``hs.start`` for a hostile enrolled client: its real key, an offer of its own."""

    def start() -> Frames:
        assert hs.static is not None and hs.server_key is not None
        hello = {**hs.hello, "ts": time.time_ns(), "ciphers": offer}
        initiator = hs._initiator = Initiator(hs.static, hs.server_key)  # finish() reads it
        return [HELLO, VERSION, b"noise", initiator.write_message1(json.dumps(hello).encode())]

    return start


async def test_a_flood_of_bad_offers_is_refused_each_time_and_logged_once(
    deployment,  # type: ignore[no-untyped-def]
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Arrange: an enrolled client that says hello 30 times with offers a FIPS server refuses
    files = deployment(dataset="breast_cancer")
    cfg = load_client(files["client-1"])
    topology = load_server(files["server"]).server.topology
    hs = make_handshake(cfg, files["server"].parent, topology)
    offers: list[object] = [[OCB], "x" * 100, [["\n" * 20]], [], [OCB] * 50, None] * 5
    ctx = zmq.asyncio.Context()
    conn = DealerConnection(ctx, cfg.client.server, cfg.limits.to_limits())
    refusals = []
    try:
        with caplog.at_level(logging.WARNING, logger="sl_pipeline"):
            async with _serving(files, 'server.ciphers=["aes256-gcm"]') as (run, _, _):
                # Execute
                for offer in offers:
                    hs.start = _hostile_start(hs, offer)  # type: ignore[method-assign]
                    try:
                        await conn.handshake(hs, 10.0)
                        refusals.append(conn.channel.session.cipher_name)  # type: ignore[union-attr]
                    except PeerError as exc:
                        refusals.append(exc.remote_code)
                sessions = {peer.channel.session.cipher_name for peer in run.server.peers.values()}
    finally:
        conn.close()
        ctx.term()

    # Assert: every bad offer refused (a hello naming none gets AES-256-GCM), no OCB session,
    # and the refusals of one source logged in one line (the next interval says how many)
    assert refusals == ["cipher", "protocol", "protocol", "cipher", "cipher", GCM] * 5
    assert sessions == {GCM}
    lines = [r.getMessage() for r in caplog.records if "refused a handshake" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert "no common cipher: the client offers ['aes128-ocb3']" in lines[0]


async def _step(conn: DealerConnection, cfg: Any, act_shape: Any) -> Message:
    """A client's well-formed first step (epoch 0, step 0), and its answer."""
    tensors = {"act": torch.zeros(4, *act_shape), "labels": torch.zeros(4, dtype=torch.long)}
    step = Message(Kind.FORWARD, client=cfg.client.name, epoch=0, step=0, tensors=tensors)
    await conn.send(step)
    return await conn.recv(20.0)


async def test_a_relay_between_a_fips_server_and_an_ocb_client_keeps_each_hop_to_its_lists(
    deployment,  # type: ignore[no-untyped-def]
) -> None:
    # Arrange: a server that accepts only AES-256-GCM, a relay with the default lists, a
    # client that offers only OCB
    files = deployment(topology="multihop", dataset="breast_cancer", clients=1)
    cfg = load_client(files["client-1"], 'client.ciphers=["aes128-ocb3"]')
    ctx = zmq.asyncio.Context()
    conns = [DealerConnection(ctx, cfg.client.server, cfg.limits.to_limits()) for _ in range(2)]
    try:
        async with _serving(files, 'server.ciphers=["aes256-gcm"]', relay=()) as (run, stop, tasks):
            tasks.append(asyncio.ensure_future(run.relay.serve(stop)))
            await wait_until(run.relay.ready)
            hs = make_handshake(cfg, files["server"].parent, "multihop")
            hs.hello = {**hs.hello, "resume": None}

            # Execute: the client joins the relay and takes a step through it; a hostile
            # client of the relay offers a suite nobody knows
            await conns[0].handshake(hs, 10.0)
            answer = await _step(conns[0], cfg, run.relay.act_shape)
            hs.start = _hostile_start(hs, ["rot13"])  # type: ignore[method-assign]
            with pytest.raises(PeerError, match="no common cipher") as refused:
                await conns[1].handshake(hs, 10.0)
            upstream = run.relay.upstream.channel.session.cipher_name
            at_server = {peer.channel.session.cipher_name for peer in run.server.peers.values()}
            assert conns[0].channel is not None  # until closed: the session goes with the link
            client_hop = conns[0].channel.session.cipher_name
    finally:
        for conn in conns:
            conn.close()
        ctx.term()

    # Assert: OCB on the client's hop, AES-256-GCM on the server's, the step answered
    assert client_hop == OCB
    assert answer.kind == Kind.BACKWARD
    assert (upstream, at_server) == (GCM, {GCM})
    assert refused.value.remote_code == "cipher"
    assert "the server accepts ['aes128-ocb3', 'aes256-gcm']" in refused.value.reason


async def test_a_relay_refuses_what_its_list_lacks_in_both_directions(
    deployment,  # type: ignore[no-untyped-def]
) -> None:
    # Arrange: a relay that lists only OCB
    files = deployment(topology="multihop", dataset="breast_cancer", clients=1)
    cfg = load_client(files["client-1"], 'client.ciphers=["aes256-gcm"]')
    only_ocb = ['relay.ciphers=["aes128-ocb3"]']
    ctx = zmq.asyncio.Context()
    conn = DealerConnection(ctx, cfg.client.server, cfg.limits.to_limits())
    try:
        # Execute / Assert: downstream, a client offering only AES-256-GCM is refused
        async with _serving(files, relay=only_ocb) as (run, stop, tasks):
            tasks.append(asyncio.ensure_future(run.relay.serve(stop)))
            await wait_until(run.relay.ready)
            hs = make_handshake(cfg, files["server"].parent, "multihop")
            with pytest.raises(PeerError, match="no common cipher: the client offers"):
                await conn.handshake(hs, 10.0)
            assert run.relay.upstream.channel.session.cipher_name == OCB

        # upstream, a server accepting only AES-256-GCM: the relay stops at start in one line
        fips = 'server.ciphers=["aes256-gcm"]'
        async with _serving(files, fips, relay=only_ocb) as (run, stop, _):
            with pytest.raises(PeerError, match="no common cipher") as refused:
                await asyncio.wait_for(run.relay.serve(stop), 30)
    finally:
        conn.close()
        ctx.term()
    assert "\n" not in str(refused.value)
    assert "the client offers ['aes128-ocb3'], the server accepts ['aes256-gcm']" in str(
        refused.value
    )


@pytest.mark.parametrize("role", ["server", "relay"])
@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("[]", "ciphers must list at least 1, got none"),
        ('["aes128-gcm"]', "ciphers[0] = 'aes128-gcm' is not allowed"),
        ('["aes256-gcm", 1]', "ciphers[1]"),
    ],
)
def test_a_bad_server_or_relay_cipher_list_is_a_config_error_naming_the_key(
    deployment,  # type: ignore[no-untyped-def]
    capsys: pytest.CaptureFixture[str],
    role: str,
    value: str,
    message: str,
) -> None:
    files = deployment(topology="multihop", dataset="breast_cancer")
    config = files["server" if role == "server" else "relay-1"]

    code = main([role, "--config", str(config), "--set", f"{role}.ciphers={value}"])

    err = capsys.readouterr().err
    assert code == ConfigError.exit_code, err
    assert f"{role}.{message}" in err and "Traceback" not in err
