"""Which AEAD could seal faster than the sessions' AES-256-GCM? ``python -m bench.aead_options``

Measures, on one core with hot buffers, the sealing and opening speed (GB/s) at 64 KiB and
2 MiB of every AEAD ``cryptography`` offers at 128-bit security or more (AES-256/128-GCM,
ChaCha20-Poly1305, AES-256-GCM-SIV, AES-128/256-OCB3) and of AEGIS-128L / AEGIS-256 where a
library for it is importable: PyNaCl >= 1.6 (libsodium >= 1.0.19, ``crypto_aead_aegis*``)
and pyaegis (libaegis; also its AEGIS-128X2 / 256X2, which use 256-bit VAES). Neither is a
dependency of this project: install them in a scratch environment to compare. Also says, per
library, whether a seal releases the GIL (a pure-Python thread keeps counting beside it).

Each figure is the lower quartile of the calls' times (the undisturbed call): a cipher's
best case, not what a call costs inside a round trip (see ``bench.aead_floor``).
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import (
    AESGCM,
    AESGCMSIV,
    AESOCB3,
    ChaCha20Poly1305,
)

Seal = Callable[[bytes], bytes]
Pair = tuple[Seal, Seal]  # (seal, open)
SIZES = {"64KiB": 64 * 1024, "2MiB": 2 * 1024 * 1024}
AD = bytes(16)


def _cryptography() -> dict[str, Pair]:
    ciphers: dict[str, Pair] = {}
    for name, cls, key_bytes in (
        ("aes256gcm", AESGCM, 32),
        ("aes128gcm", AESGCM, 16),
        ("chacha20poly1305", ChaCha20Poly1305, 32),
        ("aes256gcmsiv", AESGCMSIV, 32),
        ("aes128ocb3", AESOCB3, 16),
        ("aes256ocb3", AESOCB3, 32),
    ):
        aead: Any = cls(os.urandom(key_bytes))
        nonce = bytes(12)
        ciphers[name] = (
            partial(aead.encrypt, nonce, associated_data=AD),
            partial(aead.decrypt, nonce, associated_data=AD),
        )
    return ciphers


def _pynacl() -> dict[str, Pair]:
    try:
        import nacl.bindings as sodium  # type: ignore[import-not-found]
    except ImportError:
        return {}
    ciphers: dict[str, Pair] = {}
    for bits in ("128l", "256"):
        prefix = f"crypto_aead_aegis{bits}"
        if not hasattr(sodium, f"{prefix}_encrypt"):
            continue  # libsodium before 1.0.19
        enc, dec = getattr(sodium, f"{prefix}_encrypt"), getattr(sodium, f"{prefix}_decrypt")
        key = os.urandom(getattr(sodium, f"{prefix}_KEYBYTES"))
        nonce = bytes(getattr(sodium, f"{prefix}_NPUBBYTES"))
        ciphers[f"pynacl_aegis{bits}"] = (
            partial(enc, aad=AD, nonce=nonce, key=key),
            partial(dec, aad=AD, nonce=nonce, key=key),
        )
    return ciphers


def _flip(call: Callable[..., bytes], key: bytes, nonce: bytes, data: bytes) -> bytes:
    """pyaegis takes (key, nonce, data, ad); the table's functions take the data alone."""
    return call(key, nonce, data, AD)


def _pyaegis() -> dict[str, Pair]:
    try:
        import pyaegis  # type: ignore[import-not-found]
    except ImportError:
        return {}
    ciphers: dict[str, Pair] = {}
    for name in ("Aegis128L", "Aegis256", "Aegis128X2", "Aegis256X2"):
        aead = getattr(pyaegis, name)()
        key, nonce = aead.random_key(), bytes(aead.NONCE_SIZE)
        ciphers[f"pyaegis_{name.lower()}"] = (
            partial(_flip, aead.encrypt, key, nonce),
            partial(_flip, aead.decrypt, key, nonce),
        )
    return ciphers


def candidates() -> dict[str, Pair]:
    return _cryptography() | _pynacl() | _pyaegis()


def _lower_quartile(fn: Seal, arg: bytes, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(arg)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 4]


def speeds(seal: Seal, open_: Seal, size: int, repeats: int) -> dict[str, float]:
    message = os.urandom(size)
    sealed = b""
    for _ in range(3):  # warm: code, key schedule, buffers
        sealed = bytes(seal(message))
        open_(sealed)
    return {
        "seal_gb_s": size / _lower_quartile(seal, message, repeats) / 1e9,
        "open_gb_s": size / _lower_quartile(open_, sealed, repeats) / 1e9,
    }


def gil_kept(seal: Seal, size: int = SIZES["2MiB"], seconds: float = 0.3) -> float:
    """A counting Python thread's rate while this thread seals in a loop, over its rate
    while this thread sleeps: near 1 when a seal releases the GIL (on a free core)."""
    stop = threading.Event()
    count = [0]

    def spin() -> None:
        while not stop.is_set():
            count[0] += 1

    message = os.urandom(size)
    thread = threading.Thread(target=spin)
    thread.start()
    try:
        before, start = count[0], time.perf_counter()
        time.sleep(seconds)
        alone = (count[0] - before) / (time.perf_counter() - start)
        before, start = count[0], time.perf_counter()
        while time.perf_counter() - start < seconds:
            seal(message)
        beside = (count[0] - before) / (time.perf_counter() - start)
    finally:
        stop.set()
        thread.join()
    return beside / alone if alone else 0.0


def run(repeats_small: int = 400, repeats_large: int = 60) -> dict[str, Any]:
    table: dict[str, dict[str, dict[str, float]]] = {}
    for name, (seal, open_) in candidates().items():
        table[name] = {
            label: speeds(seal, open_, size, repeats_small if size < 1 << 20 else repeats_large)
            for label, size in SIZES.items()
        }
    gil = {
        name: gil_kept(seal)
        for name, (seal, _) in candidates().items()
        if name == "aes256gcm" or name.endswith(("aegis128l", "aegis128x2"))
    }
    return {"aead_options": table, "gil_kept": gil, "loadavg_1min": os.getloadavg()[0]}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.aead_options", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    result = run()
    if args.json:
        print(json.dumps(result))
        return 0
    base = result["aead_options"]["aes256gcm"]["2MiB"]["seal_gb_s"]
    for name, by_size in result["aead_options"].items():
        cells = "  ".join(
            f"{label} seal {v['seal_gb_s']:5.2f} open {v['open_gb_s']:5.2f}"
            for label, v in by_size.items()
        )
        print(f"{name:22s} {cells} GB/s  ({by_size['2MiB']['seal_gb_s'] / base:.2f}x AES-256-GCM)")
    for name, kept in result["gil_kept"].items():
        print(f"GIL: a Python thread keeps {kept:.2f} of its rate beside {name} sealing 2 MiB")
    print(f"1-minute load {result['loadavg_1min']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
