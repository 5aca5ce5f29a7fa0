"""bench.aead_floor: the AEAD calls of both processes are timed inside real round trips."""

from __future__ import annotations

import pytest

from bench import aead_floor
from sl_pipeline import ciphers


@pytest.mark.timeout(90)
def test_aead_floor_times_every_cipher_call_of_both_processes() -> None:
    # Execute: two pairs of two round trips per size, client here, server in a child
    result = aead_floor.run(pairs=2, per_block=2)

    # Assert: a one-part round trip seals and opens a header and a tensor on each side
    # (8 calls: 4 here, 4 in the server); a 2 MiB one goes as a head and 3 pieces each way
    assert set(result) == {"4KiB", "64KiB", "2MiB"}
    assert result["4KiB"]["aead_calls"] == result["64KiB"]["aead_calls"] == 8
    assert result["2MiB"]["aead_calls"] == 16
    for row in result.values():
        assert row["plain_ms"] > 0 and row["aead_ms"] > 0 and row["floor"] > 1
    assert result["2MiB"]["aead_ms"] > result["4KiB"]["aead_ms"]
    assert ciphers.SUITES["aes256-gcm"] is ciphers.AES256_GCM  # the suites are put back
    assert ciphers.SUITES["aes128-ocb3"] is ciphers.AES128_OCB3


def test_the_suites_go_back_when_the_server_child_cannot_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_child(*args: object) -> None:
        raise OSError("cannot fork")

    monkeypatch.setattr(aead_floor, "start_child", no_child)

    with pytest.raises(OSError, match="cannot fork"):
        aead_floor.run(pairs=1, per_block=1)

    assert ciphers.SUITES["aes256-gcm"] is ciphers.AES256_GCM
    assert ciphers.SUITES["aes128-ocb3"] is ciphers.AES128_OCB3
