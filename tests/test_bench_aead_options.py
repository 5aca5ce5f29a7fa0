"""bench.aead_options: every candidate cipher round-trips, and the figures are speeds."""

from __future__ import annotations

import pytest

from bench import aead_options


def test_every_candidate_opens_what_it_sealed_and_rejects_a_flipped_bit() -> None:
    # Setup: the ciphers cryptography offers are always there; AEGIS ones only if installed.
    ciphers = aead_options.candidates()
    assert {"aes256gcm", "aes128gcm", "chacha20poly1305", "aes256ocb3"} <= set(ciphers)
    message = bytes(range(256)) * 16
    for name, (seal, open_) in ciphers.items():
        # Execute
        sealed = bytes(seal(message))
        # Check: the tag is appended, the plaintext comes back, tampering is caught.
        assert len(sealed) >= len(message) + 16, name
        assert bytes(open_(sealed)) == message, name
        tampered = bytearray(sealed)
        tampered[0] ^= 1
        with pytest.raises(Exception):  # noqa: B017 - each library has its own error type
            open_(bytes(tampered))


def test_speeds_are_bytes_over_time_for_seal_and_open() -> None:
    seal, open_ = aead_options.candidates()["aes256gcm"]
    result = aead_options.speeds(seal, open_, 64 * 1024, repeats=8)
    assert set(result) == {"seal_gb_s", "open_gb_s"}
    assert all(0.01 < v < 1000 for v in result.values())
