"""Long-term X25519 identities: generate, store, load, and the admitted-key set.

Key files are one line of text, ``<type-tag> <base64 of 32 raw bytes>``, so an operator
can read, diff and copy them. The type tag carries a version and says whether the file is
private or public, so a public key passed where a private one is needed fails loudly
instead of silently producing the wrong identity.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import logging
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from sl_pipeline.errors import ConfigError

logger = logging.getLogger(__name__)

PRIVATE_TAG = "sl-pipeline-x25519-private-v1"
PUBLIC_TAG = "sl-pipeline-x25519-public-v1"
KEY_BYTES = 32
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# Key files are tiny; refusing anything large avoids reading a wrong path's gigabytes.
_MAX_KEY_FILE_BYTES = 4096
_MAX_ADMITTED_FILE_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class KeyPair:
    """A static X25519 identity. ``public`` is the 32 raw bytes peers pin or admit."""

    private: X25519PrivateKey = field(repr=False)
    public: bytes

    def __post_init__(self) -> None:
        if len(self.public) != KEY_BYTES:
            raise ConfigError(f"public key must be {KEY_BYTES} bytes, got {len(self.public)}")


def _raw_public(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _keypair(private: X25519PrivateKey) -> KeyPair:
    return KeyPair(private=private, public=_raw_public(private))


def generate_keypair() -> KeyPair:
    """Create a fresh identity from the OS's secure random source."""
    return _keypair(X25519PrivateKey.generate())


def fingerprint(public: bytes) -> str:
    """Short, stable id of a public key for logs: first 16 hex chars of its SHA-256."""
    return hashlib.sha256(public).hexdigest()[:16]


def _validate_name(name: str, where: str = "") -> None:
    if not _NAME_RE.fullmatch(name) or name.startswith("."):
        raise ConfigError(
            f"{where}{': ' if where else ''}invalid key name {name!r}",
            hint="use 1-64 letters, digits, '_', '.' or '-', not starting with '.'",
        )


def _write_exclusive(path: Path, text: str, mode: int) -> None:
    """Create ``path`` with ``mode``; never replace an existing file (O_EXCL)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise ConfigError(
            f"{path} already exists; refusing to overwrite a key",
            hint="choose another name or move the old key away first",
        ) from None
    except OSError as err:
        raise ConfigError(f"cannot create {path}: {err.strerror}") from err
    try:
        # The umask may only have removed bits; fchmod makes the mode exactly what we asked.
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(text)
    except OSError as err:
        with contextlib.suppress(OSError):
            path.unlink()
        raise ConfigError(f"cannot write {path}: {err.strerror}") from err


def write_keypair(name: str, out_dir: Path) -> tuple[Path, Path]:
    """Generate an identity and write ``out_dir/NAME.key`` (0600) and ``out_dir/NAME.pub``.

    Returns ``(private_path, public_path)``. Never overwrites: an existing file of either
    name raises :class:`ConfigError` naming it.
    """
    _validate_name(name)
    out_dir = Path(out_dir)
    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    key_path, pub_path = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    for path in (key_path, pub_path):  # O_EXCL below still guards against races
        if path.exists():
            raise ConfigError(
                f"{path} already exists; refusing to overwrite a key",
                hint="choose another name or move the old key away first",
            )
    pair = generate_keypair()
    secret = pair.private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    _write_exclusive(key_path, f"{PRIVATE_TAG} {base64.b64encode(secret).decode()}\n", 0o600)
    try:
        _write_exclusive(
            pub_path, f"{PUBLIC_TAG} {base64.b64encode(pair.public).decode()}\n", 0o644
        )
    except ConfigError:
        key_path.unlink()  # do not leave half an identity behind
        raise
    return key_path, pub_path


def _decode_key(text: str, where: str) -> bytes:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{where}: key is not valid base64") from None
    if len(raw) != KEY_BYTES:
        raise ConfigError(f"{where}: key must decode to {KEY_BYTES} bytes, got {len(raw)}")
    return raw


def _read_small(path: Path, limit: int, what: str) -> str:
    try:
        with path.open("rb") as fh:
            data = fh.read(limit + 1)
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist", hint="run the keygen command") from None
    except IsADirectoryError:
        raise ConfigError(
            f"{what} {path} is a folder: name the key file in it (NAME.key for this worker's "
            "own key, NAME.pub for a peer's)"
        ) from None
    except OSError as err:
        raise ConfigError(f"cannot read {what} {path}: {err.strerror}") from err
    if len(data) > limit:
        raise ConfigError(f"{what} {path} is larger than {limit} bytes; is this the right file?")
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path} is not a text key file") from None


def _parse_key_file(path: Path, tag: str, what: str) -> bytes:
    text = _read_small(path, _MAX_KEY_FILE_BYTES, what)
    parts = text.split()
    if parts[:1] == [PRIVATE_TAG] and tag == PUBLIC_TAG:
        raise ConfigError(
            f"{what} {path} is a private key: a peer's key is pinned by its public half; "
            f"name the .pub file written beside it ({path.with_suffix('.pub').name}), and keep "
            "the private key on its own host"
        )
    if len(parts) != 2 or parts[0] != tag:
        raise ConfigError(
            f"{what} {path} is garbled: expected one line '{tag} <base64>'",
            hint="regenerate it with the keygen command",
        )
    return _decode_key(parts[1], f"{what} {path}")


def _warn_if_exposed(path: Path) -> None:
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning(
            "private key %s is readable by group or others (mode %o); run: chmod 600 %s",
            path,
            stat.S_IMODE(mode),
            path,
        )


def load_keypair(path: Path) -> KeyPair:
    """Load a private key file written by :func:`write_keypair`."""
    path = Path(path)
    raw = _parse_key_file(path, PRIVATE_TAG, "private key file")
    _warn_if_exposed(path)
    return _keypair(X25519PrivateKey.from_private_bytes(raw))


def load_public_key(path: Path) -> bytes:
    """Load a ``.pub`` file; returns the 32 raw bytes."""
    return _parse_key_file(Path(path), PUBLIC_TAG, "public key file")


def _add_admitted(keys: dict[bytes, str], key: bytes, name: str, where: str) -> None:
    _validate_name(name, where)
    if key in keys:
        raise ConfigError(f"{where}: key of {name!r} is already admitted as {keys[key]!r}")
    if name in keys.values():
        raise ConfigError(f"{where}: name {name!r} is used by two different keys")
    keys[key] = name


def _admitted_from_dir(path: Path) -> dict[bytes, str]:
    keys: dict[bytes, str] = {}
    for pub in sorted(path.glob("*.pub")):
        _add_admitted(keys, load_public_key(pub), pub.stem, str(pub))
    return keys


def _admitted_from_file(path: Path) -> dict[bytes, str]:
    keys: dict[bytes, str] = {}
    text = _read_small(path, _MAX_ADMITTED_FILE_BYTES, "admitted keys file")
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{path}:{lineno}"
        parts = line.split()
        if len(parts) != 2:
            raise ConfigError(f"{where}: expected 'NAME BASE64', got {len(parts)} fields")
        if parts[0] in (PRIVATE_TAG, PUBLIC_TAG):  # a key file, not a list of admitted keys
            raise ConfigError(
                f"{path} is a {parts[0].split('-')[3]} key file, not a list of admitted keys: "
                "set admitted to the folder of the clients' NAME.pub files (or to a file of "
                "'NAME BASE64' lines)"
            )
        _add_admitted(keys, _decode_key(parts[1], where), parts[0], where)
    return keys


def load_admitted_keys(path: Path) -> dict[bytes, str]:
    """Load the set of client keys a server admits, as ``{public key: name}``.

    ``path`` is a directory (every ``*.pub`` in it; the name is the file stem) or a file
    of ``NAME BASE64`` lines (``#`` starts a comment). An empty set is refused: a server
    that admits nobody is always a mistake.
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"admitted keys path {path} does not exist")
    keys = _admitted_from_dir(path) if path.is_dir() else _admitted_from_file(path)
    if not keys:
        raise ConfigError(
            f"no admitted keys in {path}", hint="add the clients' .pub files or NAME BASE64 lines"
        )
    return keys


__all__ = [
    "KeyPair",
    "fingerprint",
    "generate_keypair",
    "load_admitted_keys",
    "load_keypair",
    "load_public_key",
    "write_keypair",
]
