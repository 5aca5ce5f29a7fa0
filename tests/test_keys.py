"""Identity files: generation, storage, permissions and the admitted-key set."""

from __future__ import annotations

import base64
import logging
import os
import re
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sl_pipeline.errors import ConfigError
from sl_pipeline.keys import (
    KeyPair,
    fingerprint,
    generate_keypair,
    load_admitted_keys,
    load_keypair,
    load_public_key,
    write_keypair,
)

PUBLIC_TAG = "sl-pipeline-x25519-public-v1"


def _b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def test_generate_keypair_gives_32_byte_public_matching_private() -> None:
    # Execute
    pair = generate_keypair()

    # Assert
    assert len(pair.public) == 32
    assert pair.private.public_key().public_bytes_raw() == pair.public
    assert generate_keypair().public != pair.public
    assert "private" not in repr(pair)


def test_keypair_rejects_wrong_public_length() -> None:
    with pytest.raises(ConfigError, match="32 bytes"):
        KeyPair(private=generate_keypair().private, public=b"short")


def test_write_then_load_round_trip(tmp_path: Path) -> None:
    # Execute
    key_path, pub_path = write_keypair("alice", tmp_path / "keys")

    # Assert
    assert key_path == tmp_path / "keys" / "alice.key"
    assert pub_path == tmp_path / "keys" / "alice.pub"
    pair = load_keypair(key_path)
    assert load_public_key(pub_path) == pair.public
    assert key_path.read_text().startswith("sl-pipeline-x25519-private-v1 ")
    assert pub_path.read_text().startswith(PUBLIC_TAG + " ")


def test_private_key_file_is_mode_0600_even_with_permissive_umask(tmp_path: Path) -> None:
    # Prepare
    old_umask = os.umask(0)
    try:
        # Execute
        key_path, pub_path = write_keypair("bob", tmp_path)
    finally:
        os.umask(old_umask)

    # Assert
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(pub_path.stat().st_mode) == 0o644


def test_write_refuses_to_overwrite_and_names_the_path(tmp_path: Path) -> None:
    # Prepare
    key_path, _ = write_keypair("carol", tmp_path)
    before = key_path.read_bytes()

    # Execute / Assert
    with pytest.raises(ConfigError, match=re.escape(str(key_path))):
        write_keypair("carol", tmp_path)
    assert key_path.read_bytes() == before


def test_write_refuses_when_only_the_pub_exists_and_leaves_no_key(tmp_path: Path) -> None:
    # Prepare
    (tmp_path / "dave.pub").write_text("something else\n")

    # Execute / Assert
    with pytest.raises(ConfigError, match=r"dave\.pub"):
        write_keypair("dave", tmp_path)
    assert not (tmp_path / "dave.key").exists()


@pytest.mark.parametrize("name", ["", "../evil", "a/b", "sp ace", ".hidden", "x" * 65, "é"])
def test_write_rejects_bad_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError, match="invalid key name"):
        write_keypair(name, tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "content",
    [
        "",
        "garbage\n",
        "sl-pipeline-x25519-private-v1\n",
        "sl-pipeline-x25519-private-v1 not*base64\n",
        f"sl-pipeline-x25519-private-v1 {_b64(b'x' * 31)}\n",
        f"{PUBLIC_TAG} {_b64(b'x' * 32)}\n",  # a public key where a private one is needed
        f"sl-pipeline-x25519-private-v1 {_b64(b'x' * 32)} extra\n",
    ],
)
def test_garbled_private_key_raises_config_error_naming_path(tmp_path: Path, content: str) -> None:
    # Prepare
    path = tmp_path / "bad.key"
    path.write_text(content)
    path.chmod(0o600)

    # Execute / Assert
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        load_keypair(path)


def test_binary_and_oversized_files_raise_config_error(tmp_path: Path) -> None:
    binary = tmp_path / "binary.key"
    binary.write_bytes(b"\xff\xfe\x00" * 10)
    big = tmp_path / "big.pub"
    big.write_bytes(b"a" * 10_000)
    with pytest.raises(ConfigError, match=re.escape(str(binary))):
        load_keypair(binary)
    with pytest.raises(ConfigError, match=re.escape(str(big))):
        load_public_key(big)


def test_missing_key_file_raises_config_error_naming_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.key"
    with pytest.raises(ConfigError, match=re.escape(str(missing))):
        load_keypair(missing)
    with pytest.raises(ConfigError, match=re.escape(str(missing))):
        load_public_key(missing)


def test_load_warns_when_private_key_is_group_readable(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare
    key_path, _ = write_keypair("erin", tmp_path)
    key_path.chmod(0o640)

    # Execute
    with caplog.at_level(logging.WARNING, logger="sl_pipeline.keys"):
        load_keypair(key_path)

    # Assert
    assert any(
        "chmod 600" in r.getMessage() and str(key_path) in r.getMessage() for r in caplog.records
    )


def test_load_does_not_warn_for_0600(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    key_path, _ = write_keypair("frank", tmp_path)
    with caplog.at_level(logging.WARNING, logger="sl_pipeline.keys"):
        load_keypair(key_path)
    assert caplog.records == []


def test_admitted_keys_from_directory(tmp_path: Path) -> None:
    # Prepare
    _, alice_pub = write_keypair("alice", tmp_path)
    _, bob_pub = write_keypair("bob", tmp_path)
    (tmp_path / "notes.txt").write_text("ignored")

    # Execute
    admitted = load_admitted_keys(tmp_path)

    # Assert
    assert admitted == {load_public_key(alice_pub): "alice", load_public_key(bob_pub): "bob"}


def test_admitted_keys_from_file_with_comments(tmp_path: Path) -> None:
    # Prepare
    a, b = generate_keypair().public, generate_keypair().public
    path = tmp_path / "admitted.txt"
    path.write_text(f"# clients\n\nalice {_b64(a)}  # laptop\n   bob {_b64(b)}\n")

    # Execute / Assert
    assert load_admitted_keys(path) == {a: "alice", b: "bob"}


@pytest.mark.parametrize(
    "lines",
    [
        ["alice"],  # missing key
        ["alice AAAA"],  # wrong length
        ["alice {a} extra"],
        ["alice {a}", "bob {a}"],  # same key twice
        ["alice {a}", "alice {b}"],  # same name twice
        ["../x {a}"],
        ["# only comments"],  # admits nobody
    ],
)
def test_bad_admitted_file_raises_config_error_naming_path(
    tmp_path: Path, lines: list[str]
) -> None:
    # Prepare
    a, b = _b64(generate_keypair().public), _b64(generate_keypair().public)
    path = tmp_path / "admitted.txt"
    path.write_text("\n".join(line.format(a=a, b=b) for line in lines) + "\n")

    # Execute / Assert
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        load_admitted_keys(path)


def test_admitted_dir_with_garbled_pub_names_that_file(tmp_path: Path) -> None:
    write_keypair("alice", tmp_path)
    bad = tmp_path / "mallory.pub"
    bad.write_text("junk\n")
    with pytest.raises(ConfigError, match=re.escape(str(bad))):
        load_admitted_keys(tmp_path)


def test_empty_admitted_dir_and_missing_path_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no admitted keys"):
        load_admitted_keys(tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_admitted_keys(tmp_path / "missing")


@settings(max_examples=50, deadline=None)
@given(
    st.dictionaries(
        st.from_regex(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,20}", fullmatch=True),
        st.binary(min_size=32, max_size=32),
        min_size=1,
        max_size=8,
    )
)
def test_admitted_file_round_trips(
    tmp_path_factory: pytest.TempPathFactory, names: dict[str, bytes]
) -> None:
    # Prepare: distinct keys only (duplicates are rejected by design)
    expected = {key: name for name, key in names.items()}
    if len(expected) != len(names):
        return
    path = tmp_path_factory.mktemp("adm") / "admitted.txt"
    path.write_text("".join(f"{name} {_b64(key)}\n" for name, key in names.items()))

    # Execute / Assert
    assert load_admitted_keys(path) == expected


def test_fingerprint_is_short_stable_hex() -> None:
    key = bytes(range(32))
    assert fingerprint(key) == fingerprint(key)
    assert len(fingerprint(key)) == 16
    int(fingerprint(key), 16)
    assert fingerprint(key) != fingerprint(bytes(32))
