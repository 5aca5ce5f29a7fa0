"""The buffers a session seals into and opens into: fresh for every message and filled by the
AEAD to the last byte. A chunked message's pieces and its assembled buffers are allocated
uninitialised (``chunked.empty_buffer``), so a byte the AEAD left unwritten would be a byte of
some earlier message: such a message is refused. Driven with bytes (the session is sans-IO)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESOCB3

from sl_pipeline.ciphers import AES128_OCB3, CipherSuite
from sl_pipeline.errors import CryptoError
from sl_pipeline.session import Session

BIG = 64 * 1024  # one part; 6 * BIG is chunked (chunk_bytes 4 * BIG)


class _ShortAead:
    """AES-128-OCB3 that leaves the last byte of what it writes unwritten (a broken binding)."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESOCB3(key)

    def encrypt(self, nonce: Any, data: Any, aad: Any) -> bytes:
        return self._aead.encrypt(nonce, data, aad)

    def encrypt_into(self, nonce: Any, data: Any, aad: Any, out: Any) -> int:
        return self._short(self._aead.encrypt(nonce, data, aad), out)

    def decrypt_into(self, nonce: Any, data: Any, aad: Any, out: Any) -> int:
        return self._short(self._aead.decrypt(nonce, bytes(data), aad), out)

    @staticmethod
    def _short(result: bytes, out: Any) -> int:
        memoryview(out)[: len(result) - 1] = result[:-1]
        return len(result) - 1


SHORT = CipherSuite("aes128-ocb3", 16, _ShortAead)


def _pair(
    sender_suite: CipherSuite = AES128_OCB3,
    receiver_suite: CipherSuite = AES128_OCB3,
    chunk_bytes: int = 4 * BIG,
) -> tuple[Session, Session]:
    k1, k2 = os.urandom(32), os.urandom(32)
    common: dict[str, Any] = {"handshake_hash": b"h", "chunk_bytes": chunk_bytes}
    sender = Session(send_key=k1, recv_key=k2, remote_static=b"a", cipher=sender_suite, **common)
    receiver = Session(
        send_key=k2, recv_key=k1, remote_static=b"b", cipher=receiver_suite, **common
    )
    return sender, receiver


def _deliver(sender: Session, receiver: Session, buffers: list[bytes]) -> Any:
    result = None
    for part in sender.seal_parts(buffers):
        result = receiver.feed([bytes(frame) for frame in part])
    return result


@pytest.mark.parametrize("tensor_bytes", [BIG, 6 * BIG], ids=["one-part", "chunked"])
def test_each_message_opens_into_its_own_buffers_holding_only_its_bytes(
    tensor_bytes: int,
) -> None:
    # Prepare: messages of the same sizes, so the allocator hands back freed memory
    sender, receiver = _pair()
    messages = [[os.urandom(40), os.urandom(tensor_bytes)] for _ in range(6)]

    # Execute: keep every other message's buffers, drop the rest
    kept: list[tuple[list[bytes], Any]] = []
    for i, message in enumerate(messages):
        opened = _deliver(sender, receiver, message)
        assert [bytes(b) for b in opened] == message
        if i % 2 == 0:
            kept.append((message, opened))

    # Assert: the kept ones still hold their own bytes, and no two share memory
    tensors = [np.frombuffer(opened[1], dtype=np.uint8) for _, opened in kept]
    assert [[bytes(b) for b in opened] for _, opened in kept] == [m for m, _ in kept]
    for i, a in enumerate(tensors):
        assert not any(np.shares_memory(a, b) for b in tensors[i + 1 :])


@pytest.mark.parametrize("tensor_bytes", [BIG, 6 * BIG], ids=["one-part", "chunked"])
def test_an_open_that_leaves_a_byte_unwritten_refuses_the_message(tensor_bytes: int) -> None:
    sender, receiver = _pair(receiver_suite=SHORT)
    with pytest.raises(CryptoError, match=r"opened to \d+ of its \d+ bytes"):
        _deliver(sender, receiver, [b"header", os.urandom(tensor_bytes)])


@pytest.mark.parametrize("tensor_bytes", [BIG, 6 * BIG], ids=["one-part", "chunked"])
def test_a_seal_that_leaves_a_byte_unwritten_sends_nothing(tensor_bytes: int) -> None:
    sender, _ = _pair(sender_suite=SHORT)
    with pytest.raises(CryptoError, match=r"wrote \d+ of its \d+ bytes"):
        list(sender.seal_parts([b"header", os.urandom(tensor_bytes)]))


def test_pieces_still_in_flight_are_never_sealed_over() -> None:
    # Prepare: the parts of several chunked messages all held, as ZeroMQ holds what it sends
    sender, receiver = _pair()
    messages = [[b"header", os.urandom(6 * BIG)] for _ in range(4)]

    # Execute: seal them all before any is delivered, then deliver in order
    in_flight = [list(sender.seal_parts(message)) for message in messages]
    opened = []
    for parts in in_flight:
        for part in parts:
            result = receiver.feed([bytes(frame) for frame in part])
        opened.append([bytes(b) for b in result])

    # Assert: every message opens to its own bytes (an overwritten piece fails its tag)
    assert opened == messages


def test_released_pieces_are_sealed_into_again_and_the_pool_stays_bounded() -> None:
    # Prepare: other work allocates piece-sized buffers in between, taking freed memory
    sender, receiver = _pair()
    addresses: set[int] = set()
    other_work = []
    for _ in range(8):
        parts = list(sender.seal_parts([b"header", os.urandom(6 * BIG)]))
        for part in parts:
            frame = np.frombuffer(part[1], dtype=np.uint8)
            if frame.nbytes >= 4 * BIG:  # a full piece
                addresses.add(frame.__array_interface__["data"][0])
            del frame
            receiver.feed([bytes(f) for f in part])
        del parts, part
        other_work.append(np.ones(4 * BIG + 16, dtype=np.uint8))

    # Assert: the full pieces of all eight messages went into the same two buffers
    assert len(addresses) <= 2
