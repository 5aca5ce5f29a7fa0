"""Noise IK handshake and the sealed multipart session, driven with bytes only."""

from __future__ import annotations

import array
import hashlib
import struct
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sl_pipeline import crypto
from sl_pipeline.crypto import (
    ENVELOPE_SIZE,
    MAX_HANDSHAKE_PAYLOAD,
    PROTOCOL_NAME,
    Initiator,
    PlainSession,
    Responder,
    Session,
    hkdf,
)
from sl_pipeline.errors import (
    ConfigError,
    CryptoError,
    LimitError,
    NotAdmittedError,
    ReplayError,
    SLError,
)
from sl_pipeline.keys import KeyPair, generate_keypair

SERVER = generate_keypair()
CLIENT = generate_keypair()
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

buffers_st = st.lists(st.binary(max_size=300), min_size=1, max_size=6)


def _pair(*, rekey_interval: int = 2**20, max_frames: int = 1024) -> tuple[Session, Session]:
    """Run a full handshake; returns (client session, server session)."""
    initiator = Initiator(
        CLIENT, SERVER.public, rekey_interval=rekey_interval, max_frames=max_frames
    )
    responder = Responder(
        SERVER,
        lambda key: key == CLIENT.public,
        rekey_interval=rekey_interval,
        max_frames=max_frames,
    )
    responder.read_message1(initiator.write_message1(b"hello"))
    message2, server = responder.write_message2(b"welcome")
    _, client = initiator.read_message2(message2)
    return client, server


def _flip(frames: list[bytes | bytearray], frame: int, pos: int, mask: int) -> list[bytes]:
    out = [bytes(f) for f in frames]
    data = bytearray(out[frame])
    data[pos] ^= mask
    out[frame] = bytes(data)
    return out


# --- Handshake -------------------------------------------------------------------------------


def test_handshake_round_trip_derives_matching_sessions() -> None:
    # Prepare
    initiator = Initiator(CLIENT, SERVER.public)
    responder = Responder(SERVER, lambda key: key == CLIENT.public)

    # Execute
    message1 = initiator.write_message1(b"client hello")
    payload1, client_key = responder.read_message1(message1)
    message2, server_session = responder.write_message2(b"server hello")
    payload2, client_session = initiator.read_message2(message2)

    # Assert
    assert (payload1, payload2) == (b"client hello", b"server hello")
    assert client_key == CLIENT.public
    assert len(message1) == 96 + len(b"client hello")
    assert len(message2) == 48 + len(b"server hello")
    assert client_session.handshake_hash == server_session.handshake_hash
    assert len(client_session.handshake_hash) == 32
    assert client_session.remote_static == SERVER.public
    assert server_session.remote_static == CLIENT.public
    assert server_session.open(client_session.seal([b"ping"])) == [bytearray(b"ping")]
    assert client_session.open(server_session.seal([b"pong"])) == [bytearray(b"pong")]


def test_client_static_key_is_not_sent_in_clear() -> None:
    message1 = Initiator(CLIENT, SERVER.public).write_message1(b"")
    assert CLIENT.public not in message1


def test_responder_rejects_unadmitted_key() -> None:
    # Prepare
    stranger = generate_keypair()
    responder = Responder(SERVER, lambda key: key == CLIENT.public)

    # Execute / Assert
    with pytest.raises(NotAdmittedError, match="not admitted") as info:
        responder.read_message1(Initiator(stranger, SERVER.public).write_message1(b""))
    assert isinstance(info.value, PermissionError)
    with pytest.raises(CryptoError, match="not valid now"):
        responder.write_message2(b"")  # a refused handshake cannot be continued


def test_initiator_with_wrong_server_key_fails() -> None:
    impostor = generate_keypair()
    message1 = Initiator(CLIENT, impostor.public).write_message1(b"")
    with pytest.raises(CryptoError, match="failed authentication"):
        Responder(SERVER, lambda key: True).read_message1(message1)


def test_impostor_server_reply_fails_at_initiator() -> None:
    # Prepare: the impostor holds a key, but not the one the client pinned
    initiator = Initiator(CLIENT, SERVER.public)
    message1 = initiator.write_message1(b"")
    impostor = Responder(generate_keypair(), lambda key: True)

    # Execute / Assert
    with pytest.raises(CryptoError):
        impostor.read_message1(message1)


@pytest.mark.parametrize("side", ["initiator", "responder"])
def test_wrong_prologue_fails(side: str) -> None:
    initiator = Initiator(CLIENT, SERVER.public, b"x" if side == "initiator" else b"sl-pipeline/1")
    responder = Responder(
        SERVER, lambda key: True, b"x" if side == "responder" else b"sl-pipeline/1"
    )
    with pytest.raises(CryptoError):
        responder.read_message1(initiator.write_message1(b""))


def test_tampered_message2_fails_and_initiator_is_spent() -> None:
    # Prepare
    initiator = Initiator(CLIENT, SERVER.public)
    responder = Responder(SERVER, lambda key: True)
    responder.read_message1(initiator.write_message1(b""))
    message2, _ = responder.write_message2(b"reply")
    tampered = bytearray(message2)
    tampered[-1] ^= 1

    # Execute / Assert
    with pytest.raises(CryptoError):
        initiator.read_message2(bytes(tampered))
    with pytest.raises(CryptoError, match="not valid now"):
        initiator.read_message2(message2)


def test_handshake_steps_out_of_order_raise() -> None:
    with pytest.raises(CryptoError, match="not valid now"):
        Initiator(CLIENT, SERVER.public).read_message2(bytes(48))
    with pytest.raises(CryptoError, match="not valid now"):
        Responder(SERVER, lambda key: True).write_message2(b"")
    initiator = Initiator(CLIENT, SERVER.public)
    initiator.write_message1(b"")
    with pytest.raises(CryptoError, match="not valid now"):
        initiator.write_message1(b"")


def test_low_order_ephemeral_is_rejected_as_crypto_error() -> None:
    message1 = bytes(32) + bytes(64)  # all-zero X25519 point gives an all-zero secret
    with pytest.raises(CryptoError, match="invalid X25519"):
        Responder(SERVER, lambda key: True).read_message1(message1)


def test_handshake_limits() -> None:
    with pytest.raises(LimitError):
        Initiator(CLIENT, SERVER.public).write_message1(bytes(MAX_HANDSHAKE_PAYLOAD + 1))
    big = Initiator(CLIENT, SERVER.public).write_message1(bytes(MAX_HANDSHAKE_PAYLOAD))
    assert len(big) == 65535  # the Noise maximum message size
    with pytest.raises(CryptoError, match="bytes; expected"):
        Responder(SERVER, lambda key: True).read_message1(big + b"x")
    with pytest.raises(ConfigError):
        Initiator(CLIENT, b"short")
    with pytest.raises(ConfigError):
        Initiator(CLIENT, SERVER.public, rekey_interval=0)


def test_two_handshakes_with_same_statics_have_different_keys() -> None:
    # Prepare
    client1, server1 = _pair()
    client2, server2 = _pair()

    # Execute
    sealed1, sealed2 = client1.seal([b"same"]), client2.seal([b"same"])

    # Assert: fresh ephemerals make every session's keys independent
    assert client1.handshake_hash != client2.handshake_hash
    assert sealed1[1] != sealed2[1]
    with pytest.raises(CryptoError):
        server2.open(sealed1)
    assert server1.open(sealed1) == [bytearray(b"same")]


# --- Known answers -----------------------------------------------------------------------------


def test_noise_hkdf_matches_rfc5869_hkdf() -> None:
    # Noise's HKDF(ck, ikm) is RFC 5869 HKDF with salt=ck and empty info.
    ck, ikm = bytes(range(32)), b"input key material"
    expected = HKDF(hashes.SHA256(), length=96, salt=ck, info=b"").derive(ikm)
    assert b"".join(hkdf(ck, ikm, 3)) == expected
    assert b"".join(hkdf(ck, b"", 2)) == expected_two(ck)


def expected_two(ck: bytes) -> bytes:
    return HKDF(hashes.SHA256(), length=64, salt=ck, info=b"").derive(b"")


# Cacophony test vector "Noise_IK_25519_AESGCM_SHA256" (also shipped with snow).
VECTOR = {
    "prologue": "4a6f686e2047616c74",
    "init_static": "e61ef9919cde45dd5f82166404bd08e38bceb5dfdfded0a34c8df7ed542214d1",
    "init_ephemeral": "893e28b9dc6ca8d611ab664754b8ceb7bac5117349a4439a6b0569da977c464a",
    "resp_static": "4a3acbfdb163dec651dfa3194dece676d437029c62a408b4c5ea9114246e4893",
    "resp_ephemeral": "bbdb4cdbd309f1a1f2e1456967fe288cadd6f712d65dc7b7793d5e63da6b375b",
    "handshake_hash": "6f10a9444730da77dfc8c8c0b95db115d2c9d7f163f5069a23615e91463fbc2f",
}
VECTOR_MESSAGES = [
    (
        "4c756477696720766f6e204d69736573",
        "ca35def5ae56cec33dc2036731ab14896bc4c75dbb07a61f879f8e3afa4c79444e417bc55c7a8166c993"
        "356c1be41ef67818a292426f301556c7f26b21d25ddb097153891a9a956cff47b83e63ad8d701c1342c2"
        "09cff1ca5ecd43402762ac249e3bd3a4c0a145fe07cb5dae28ea13a3",
    ),
    (
        "4d757272617920526f746862617264",
        "95ebc60d2b1fa672c1f46a8aa265ef51bfe38e7ccb39ec5be34069f144808843af2ccf9972e22afc67ae"
        "afcd25162f7f98c363b7762e3e4cb7d272e39f27a5",
    ),
    ("462e20412e20486179656b", "66acfc92e3197de166809e6d4d5d003dcc819a84bc3522ca53c9d9"),
    ("4361726c204d656e676572", "71f89aa6533a6de70b0826864dd75f60806ee40170c16290189eb3"),
    (
        "4a65616e2d426170746973746520536179",
        "4795a3423550c8bf00386bd496a3e2c76c10669d2a75ab8f79b5094c5412a25705",
    ),
    (
        "457567656e2042f6686d20766f6e2042617765726b",
        "aa0bb39097555c918e40be82abc2b909eb79d9eb87adb07e268fc37323a6cf904fd01fb391",
    ),
]


def _key(name: str) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(bytes.fromhex(VECTOR[name]))


def _pair_of(name: str) -> KeyPair:
    private = _key(name)
    return KeyPair(private=private, public=private.public_key().public_bytes_raw())


def test_cacophony_known_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: inject the vector's ephemerals (initiator's first, then responder's)
    ephemerals: Iterator[X25519PrivateKey] = iter([_key("init_ephemeral"), _key("resp_ephemeral")])
    monkeypatch.setattr(crypto, "_generate_ephemeral", lambda: next(ephemerals))
    prologue = bytes.fromhex(VECTOR["prologue"])
    server = _pair_of("resp_static")
    initiator = Initiator(_pair_of("init_static"), server.public, prologue)
    responder = Responder(server, lambda key: True, prologue)
    (p0, c0), (p1, c1) = [(bytes.fromhex(p), bytes.fromhex(c)) for p, c in VECTOR_MESSAGES[:2]]

    # Execute
    message1 = initiator.write_message1(p0)
    assert responder.read_message1(message1)[0] == p0
    message2, server_session = responder.write_message2(p1)
    assert initiator.read_message2(message2)[0] == p1

    # Assert: byte-exact handshake, hash, and Split() keys (checked with plain Noise framing)
    assert (message1, message2) == (c0, c1)
    # This vector file records h as it stands after the first message; the final hash is
    # that value with message 2's "e" and encrypted payload mixed in (MixHash twice).
    h1 = bytes.fromhex(VECTOR["handshake_hash"])
    final = hashlib.sha256(hashlib.sha256(h1 + message2[:32]).digest() + message2[32:]).digest()
    assert server_session.handshake_hash == final
    to_server = crypto._CipherState(server_session._recv[0])
    to_client = crypto._CipherState(server_session._send[0])
    for i, (payload, ciphertext) in enumerate(VECTOR_MESSAGES[2:]):
        cipher = to_server if i % 2 == 0 else to_client
        assert cipher.encrypt_with_ad(b"", bytes.fromhex(payload)).hex() == ciphertext


def test_symmetric_state_pads_short_protocol_name() -> None:
    assert len(PROTOCOL_NAME) == 28
    assert crypto._SymmetricState(PROTOCOL_NAME).h == PROTOCOL_NAME + bytes(4)


# --- Transport ---------------------------------------------------------------------------------


@FUZZ
@given(st.lists(buffers_st, min_size=1, max_size=8))
def test_seal_open_round_trip_both_directions(messages: list[list[bytes]]) -> None:
    client, server = _pair()
    for buffers in messages:
        sealed = client.seal(buffers)
        assert len(sealed[0]) == ENVELOPE_SIZE and len(sealed) == len(buffers) + 1
        opened = server.open(sealed)
        assert opened == [bytearray(b) for b in buffers]
        assert all(isinstance(frame, bytearray) for frame in opened)
        assert client.open(server.seal(buffers)) == opened


def test_seal_accepts_typed_memoryviews_and_output_is_writable() -> None:
    client, server = _pair()
    floats = array.array("f", [1.5, -2.0, 3.25])
    opened = server.open(client.seal([memoryview(floats), bytearray(b"ab")]))
    assert list(memoryview(opened[0]).cast("f")) == [1.5, -2.0, 3.25]
    opened[0][0] ^= 0xFF  # writable, so torch.frombuffer can use it without a copy


@FUZZ
@given(buffers_st, st.data())
def test_tampering_any_single_byte_fails(buffers: list[bytes], data: st.DataObject) -> None:
    # Prepare
    client, server = _pair()
    sealed = client.seal(buffers)
    frame = data.draw(st.integers(0, len(sealed) - 1), label="frame")
    pos = data.draw(st.integers(0, len(sealed[frame]) - 1), label="byte")
    mask = data.draw(st.integers(1, 255), label="mask")

    # Execute / Assert
    with pytest.raises(CryptoError):
        server.open(_flip(sealed, frame, pos, mask))
    assert server.open(sealed) == [bytearray(b) for b in buffers]  # state did not advance


@pytest.mark.parametrize(
    "mangle",
    [
        lambda f: f[:-1],  # truncated
        lambda f: f[:1],  # only the envelope
        lambda f: [*f, f[-1]],  # added frame
        lambda f: [f[0], f[2], f[1], f[3]],  # reordered
        lambda f: [f[0], f[1], f[1], f[3]],  # duplicated
        lambda f: [f[1], f[0], f[2], f[3]],  # envelope moved
    ],
)
def test_dropped_added_reordered_frames_fail(mangle: object) -> None:
    client, server = _pair()
    sealed = client.seal([b"one", b"two", b"three"])
    with pytest.raises(CryptoError):
        server.open(mangle(sealed))  # type: ignore[operator]
    assert server.open(sealed) == [b"one", b"two", b"three"]


def test_frame_count_in_envelope_is_authenticated() -> None:
    # An attacker who drops a frame and fixes up the count still fails the tags.
    client, server = _pair()
    sealed = client.seal([b"one", b"two"])
    envelope = bytearray(sealed[0])
    struct.pack_into(">I", envelope, 12, 1)
    with pytest.raises(CryptoError, match="failed authentication"):
        server.open([bytes(envelope), sealed[1]])


def test_replay_and_reorder_raise_replay_error_and_next_message_opens() -> None:
    # Prepare
    client, server = _pair()
    m0, m1, m2 = (client.seal([bytes([i])]) for i in range(3))

    # Execute / Assert
    with pytest.raises(ReplayError, match="messages lost"):
        server.open(m1)  # arrives before m0
    assert server.open(m0) == [b"\x00"]
    with pytest.raises(ReplayError, match="replayed"):
        server.open(m0)
    assert server.open(m1) == [b"\x01"]
    with pytest.raises(ReplayError):
        server.open(m1)
    assert server.open(m2) == [b"\x02"]


def test_message_from_other_direction_is_rejected() -> None:
    client, _ = _pair()
    with pytest.raises(CryptoError):
        client.open(client.seal([b"reflected"]))


def test_rekey_every_three_messages_round_trips() -> None:
    client, server = _pair(rekey_interval=3)
    first_key = client._send[0]
    for i in range(20):
        payload = [i.to_bytes(2, "big") * i, b"x"]
        assert server.open(client.seal(payload)) == payload
        assert client.open(server.seal(payload)) == payload
    assert client._send[0] != first_key


def test_rekey_happens_where_both_sides_expect_it() -> None:
    # A receiver that rekeys at a different point cannot open the rekeyed message.
    k1, k2 = bytes(range(32)), bytes(range(1, 33))
    sender = Session(
        send_key=k1, recv_key=k2, remote_static=b"", handshake_hash=b"", rekey_interval=3
    )
    receiver = Session(
        send_key=k2, recv_key=k1, remote_static=b"", handshake_hash=b"", rekey_interval=4
    )
    for _ in range(3):
        receiver.open(sender.seal([b"ok"]))
    with pytest.raises(CryptoError):
        receiver.open(sender.seal([b"rekeyed"]))


def test_counter_exhaustion_refuses_to_reuse_a_nonce() -> None:
    client, _ = _pair()
    client._send_counter = 2**64 - 1
    with pytest.raises(CryptoError, match="counter exhausted"):
        client.seal([b"x"])


def test_seal_limits() -> None:
    client, server = _pair(max_frames=2)
    with pytest.raises(LimitError):
        client.seal([])
    with pytest.raises(LimitError):
        client.seal([b"a", b"b", b"c"])
    with pytest.raises(LimitError):
        server.open([bytes(ENVELOPE_SIZE)] + [bytes(16)] * 3)


# --- Plaintext session -------------------------------------------------------------------------


def test_plain_session_round_trip_and_envelope_checks() -> None:
    # Prepare
    sender, receiver = PlainSession(), PlainSession()
    m0, m1 = sender.seal([b"a", memoryview(b"bc")]), sender.seal([b"d"])

    # Execute / Assert
    assert receiver.open(m0) == [b"a", b"bc"]
    with pytest.raises(ReplayError):
        receiver.open(m0)
    with pytest.raises(CryptoError, match="announces"):
        receiver.open([*m1, b"extra"])
    assert receiver.open(m1) == [b"d"]


def test_plain_and_encrypted_sessions_refuse_each_other() -> None:
    client, server = _pair()
    with pytest.raises(CryptoError, match="insecure"):
        server.open(PlainSession().seal([b"x"]))
    with pytest.raises(CryptoError, match="insecure"):
        PlainSession().open(client.seal([b"x"]))


# --- Fuzz: only SLError ever escapes -----------------------------------------------------------


@FUZZ
@given(st.one_of(st.binary(max_size=300), st.binary(min_size=96, max_size=160)))
def test_fuzz_read_message1(message: bytes) -> None:
    with pytest.raises(SLError):
        Responder(SERVER, lambda key: True).read_message1(message)


@FUZZ
@given(st.one_of(st.binary(max_size=200), st.binary(min_size=48, max_size=100)))
def test_fuzz_read_message2(message: bytes) -> None:
    initiator = Initiator(CLIENT, SERVER.public)
    initiator.write_message1(b"")
    with pytest.raises(SLError):
        initiator.read_message2(message)


def _envelope_prefixed(data: bytes) -> bytes:
    return b"SL\x02\x00" + bytes(8) + data[:4].ljust(4, b"\x00")


frames_st = st.lists(st.binary(max_size=64), max_size=6)


@FUZZ
@given(frames_st, st.booleans())
def test_fuzz_session_open(frames: list[bytes], plausible: bool) -> None:
    if plausible and frames:  # a well-formed envelope reaches the AEAD checks
        frames = [_envelope_prefixed(frames[0]), *frames[1:]]
    _, server = _pair()
    with pytest.raises(SLError):
        server.open(frames)
    with pytest.raises(SLError):
        PlainSession().open(frames)  # flags say "encrypted" or the envelope is random
