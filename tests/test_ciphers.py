"""Transport cipher suites: the suite each side offers and accepts, what seals the messages,
and the one-line refusals when two sides share none (sl_pipeline/ciphers.py)."""

from __future__ import annotations

import io
import json
import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESOCB3

from sl_pipeline import ciphers, handshake
from sl_pipeline.crypto import Initiator, Responder
from sl_pipeline.errors import CipherError, ConfigError, CryptoError, PeerError, ProtocolError
from sl_pipeline.handshake import HELLO, WELCOME, ClientHandshake, ServerHandshake
from sl_pipeline.keys import generate_keypair
from sl_pipeline.messages import PROTOCOL_VERSION
from sl_pipeline.session import Session
from workers.cli import main
from workers.ops.logs import configure_logging

from .threadserver import ThreadServer

SERVER = generate_keypair()
CLIENT = generate_keypair()


def _join(
    offered: tuple[str, ...] = ciphers.DEFAULT_CIPHERS,
    accepted: tuple[str, ...] = ciphers.DEFAULT_CIPHERS,
) -> tuple[Session, Session, dict[str, object]]:
    """A hello and welcome through the real handshake objects: (client, server, welcome)."""
    client = ClientHandshake({"client": "c"}, CLIENT, SERVER.public, ciphers=offered)
    server = ServerHandshake(SERVER, lambda key: key == CLIENT.public, ciphers=accepted)
    reply, server_session, _, _ = server.answer(client.start(), lambda hello, key: {})
    client_session, welcome = client.finish(reply)
    assert isinstance(client_session, Session) and isinstance(server_session, Session)
    return client_session, server_session, welcome


@pytest.mark.parametrize(
    ("offered", "accepted", "chosen"),
    [
        (("aes128-ocb3", "aes256-gcm"), ("aes128-ocb3", "aes256-gcm"), "aes128-ocb3"),
        (("aes256-gcm",), ("aes128-ocb3", "aes256-gcm"), "aes256-gcm"),
        (("aes128-ocb3", "aes256-gcm"), ("aes256-gcm",), "aes256-gcm"),
        # the server's order decides among what the client offers
        (("aes256-gcm", "aes128-ocb3"), ("aes128-ocb3", "aes256-gcm"), "aes128-ocb3"),
    ],
)
def test_the_server_picks_its_first_suite_that_the_client_offers(
    offered: tuple[str, ...], accepted: tuple[str, ...], chosen: str
) -> None:
    client, server, welcome = _join(offered, accepted)

    assert welcome["cipher"] == chosen
    assert client.cipher.name == server.cipher.name == chosen
    for _ in range(3):  # both directions open what the other sealed
        assert server.open(client.seal([b"header", b"x" * 1000])) == [b"header", b"x" * 1000]
        assert client.open(server.seal([b"reply"])) == [b"reply"]


def test_no_common_suite_is_refused_naming_both_lists() -> None:
    with pytest.raises(CryptoError) as refused:
        _join(offered=("aes128-ocb3",), accepted=("aes256-gcm",))

    assert "the client offers ['aes128-ocb3'], the server accepts ['aes256-gcm']" in str(refused)
    assert "list a common suite in client.ciphers or server.ciphers" in str(refused)


def test_a_sealed_frame_is_the_suites_aead_under_the_first_16_key_bytes() -> None:
    # Arrange: fixed keys, so the frame can be recomputed from the documented layout
    k1, k2 = bytes(range(32)), bytes(range(32, 64))
    sender = Session(
        send_key=k1,
        recv_key=k2,
        remote_static=b"",
        handshake_hash=b"",
        cipher=ciphers.AES128_OCB3,
    )

    # Execute
    envelope, frame = sender.seal([b"hello"])

    # Assert: AES-128-OCB3(k1[:16], nonce = index 1 || counter 0, ad = envelope || index 1)
    nonce, index = struct.pack(">IQ", 1, 0), struct.pack(">I", 1)
    assert bytes(frame) == AESOCB3(k1[:16]).encrypt(nonce, b"hello", bytes(envelope) + index)
    assert bytes(frame) != AESGCM(k1).encrypt(nonce, b"hello", bytes(envelope) + index)


def test_ocb3_suite_matches_rfc7253_under_a_truncated_key() -> None:
    # RFC 7253 appendix A, the first vector (key 000102...0F, empty plaintext and data)
    key = bytes(range(16)) + b"\xff" * 16  # the suite keeps the first 16 bytes
    aead = ciphers.AES128_OCB3.aead(key)

    tag = aead.encrypt(bytes.fromhex("BBAA99887766554433221100"), b"", b"")

    assert tag.hex().upper() == "785407BFFFC8AD9EDCC5520AC9111EE6"


def test_both_suites_rekey_along_noises_key_chain() -> None:
    k1, k2 = bytes(range(32)), bytes(range(32, 64))
    for suite in ciphers.SUITES.values():
        args = {"remote_static": b"", "handshake_hash": b"", "rekey_interval": 3, "cipher": suite}
        sender = Session(send_key=k1, recv_key=k2, **args)  # type: ignore[arg-type]
        receiver = Session(send_key=k2, recv_key=k1, **args)  # type: ignore[arg-type]
        for i in range(7):
            assert receiver.open(sender.seal([bytes([i])])) == [bytes([i])]

        # Noise REKEY over the 32-byte key, twice (messages 3 and 6), in every suite
        rekey = struct.pack(">IQ", 0, 2**64 - 1)
        once = AESGCM(k1).encrypt(rekey, bytes(32), None)[:32]
        assert sender._send[0] == AESGCM(once).encrypt(rekey, bytes(32), None)[:32]


def _message1_without_ciphers() -> tuple[Initiator, list[bytes]]:
    """What a client of the build before cipher suites sends: a hello naming none."""
    initiator = Initiator(CLIENT, SERVER.public)
    hello = json.dumps({"client": "old", "ts": 1}).encode()
    return initiator, [
        HELLO,
        str(PROTOCOL_VERSION).encode(),
        b"noise",
        initiator.write_message1(hello),
    ]


def test_a_client_that_names_no_suite_gets_aes256_gcm_or_a_refusal() -> None:
    initiator, hello = _message1_without_ciphers()
    server = ServerHandshake(SERVER, lambda key: True)
    reply, session, _, _ = server.answer(hello, lambda hello, key: {})
    payload, old_client = initiator.read_message2(reply[1])  # Noise's own transport: AESGCM

    assert json.loads(payload)["cipher"] == "aes256-gcm" == session.cipher.name
    assert session.open(old_client.seal([b"step"])) == [b"step"]

    _, hello = _message1_without_ciphers()
    strict = ServerHandshake(SERVER, lambda key: True, ciphers=("aes128-ocb3",))
    with pytest.raises(CryptoError, match="the client offers \\['aes256-gcm'\\]"):
        strict.answer(hello, lambda hello, key: {})


@pytest.mark.parametrize("named", ["aes256-gcm", "rot13", 7, None])
def test_a_welcome_naming_a_suite_the_client_did_not_offer_is_refused(named: object) -> None:
    # Arrange: a server (its own Responder) that names what it likes
    client = ClientHandshake({"client": "c"}, CLIENT, SERVER.public, ciphers=("aes128-ocb3",))
    responder = Responder(SERVER, lambda key: True)
    responder.read_message1(bytes(client.start()[3]))
    welcome = {} if named is None else {"cipher": named}
    reply, _ = responder.write_message2(json.dumps(welcome).encode(), ciphers.AES256_GCM)

    # Execute / Assert: no session under a suite the client did not choose to offer
    with pytest.raises(CryptoError, match="which this client did not offer"):
        client.finish([WELCOME, reply])


@pytest.mark.parametrize("offer", ["aes128-ocb3", ["aes128-ocb3", 1], {"a": 1}])
def test_a_malformed_offer_is_a_protocol_error(offer: object) -> None:
    initiator = Initiator(CLIENT, SERVER.public)
    hello = json.dumps({"client": "c", "ts": 1, "ciphers": offer}).encode()
    frames = [HELLO, str(PROTOCOL_VERSION).encode(), b"noise", initiator.write_message1(hello)]

    with pytest.raises(ProtocolError, match="'ciphers' must be a list of suite names"):
        ServerHandshake(SERVER, lambda key: True).answer(frames, lambda hello, key: {})


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("[]", "client.ciphers must list at least 1, got none"),
        ('["aes128-gcm"]', "client.ciphers[0] = 'aes128-gcm' is not allowed"),
        ('"aes256-gcm"', "client.ciphers must be a list"),
    ],
)
def test_a_bad_cipher_list_is_a_config_error_naming_the_key(
    deployment,  # type: ignore[no-untyped-def]
    capsys: pytest.CaptureFixture[str],
    value: str,
    message: str,
) -> None:
    files = deployment(dataset="breast_cancer")

    code = main(["client", "--config", str(files["client-1"]), "--set", f"client.ciphers={value}"])

    err = capsys.readouterr().err
    assert code == ConfigError.exit_code and message in err and "Traceback" not in err


def test_client_and_server_without_a_common_suite_stop_in_one_line(
    deployment,  # type: ignore[no-untyped-def]
    capsys: pytest.CaptureFixture[str],
) -> None:
    files = deployment(dataset="breast_cancer")
    fast = ["--set", "client.retry_for_s=1", "--set", "client.connect_timeout_s=0.3"]
    only_ocb = ["--set", 'client.ciphers=["aes128-ocb3"]']

    with ThreadServer(files["server"], 'server.ciphers=["aes256-gcm"]'):
        code = main(["client", "--config", str(files["client-1"]), *only_ocb, *fast])
    configure_logging("text", "INFO", stream=io.StringIO())  # the server thread outlives capture

    err = capsys.readouterr().err
    assert code == PeerError.exit_code, err  # 4: the peer refused, its reason printed
    (line,) = [line for line in err.splitlines() if line.startswith("sl-pipeline client:")]
    assert "[cipher]: no common cipher" in line and "server accepts ['aes256-gcm']" in line
    assert "list a common suite in client.ciphers or server.ciphers" in line
    assert "Traceback" not in err


def test_a_server_picking_a_suite_not_offered_stops_the_client_at_once(
    deployment,  # type: ignore[no-untyped-def]
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Arrange: a server that seals with AES-256-GCM whatever the client offers
    monkeypatch.setattr(handshake, "server_choice", lambda offered, accepted: ciphers.AES256_GCM)
    files = deployment(dataset="breast_cancer")
    only_ocb = ["--set", 'client.ciphers=["aes128-ocb3"]', "--set", "client.retry_for_s=30"]

    # Execute
    with ThreadServer(files["server"]):
        code = main(["client", "--config", str(files["client-1"]), *only_ocb])
    configure_logging("text", "INFO", stream=io.StringIO())

    # Assert: one line naming the pick and the offer, exit 3, no retries of the same answer
    err = capsys.readouterr().err
    assert code == CipherError.exit_code == 3, err
    (line,) = [line for line in err.splitlines() if line.startswith("sl-pipeline client:")]
    assert "the server chose cipher 'aes256-gcm', which this client did not offer" in line
    assert "retrying" not in err and "Traceback" not in err
