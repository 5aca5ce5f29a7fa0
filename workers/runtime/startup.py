"""Pieces every worker shares: keys from config, the ops HTTP server, stop signals."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from sl_pipeline.codec import Limits
from sl_pipeline.config import OpsConfig, resolve_path
from sl_pipeline.errors import ConfigError, SLError, TransportError
from sl_pipeline.keys import KeyPair, load_admitted_keys, load_keypair, load_public_key
from sl_pipeline.messages import error_message
from sl_pipeline.zmtp_router import ZmtpRouter, listen_advice
from workers.ops.http import OpsServer, parse_listen
from workers.ops.metrics import WorkerMetrics
from workers.ops.runsclient import PLACEHOLDER, TOKEN_MIN_CHARS, read_token

log = logging.getLogger("sl_pipeline")

INSECURE_WARNING = (
    "INSECURE MODE: activations, gradients and labels cross the network in plaintext and any "
    "peer may join. Use only for local experiments; remove --insecure and configure keys "
    "(sl-pipeline keygen / sl-pipeline init) for anything real."
)


def warn_insecure(role: str) -> None:
    log.warning(INSECURE_WARNING, extra={"role": role})


def load_own_key(base: Path, value: str, dotted: str) -> KeyPair:
    if not value:
        raise ConfigError(
            f"{dotted} is not set: encryption needs this worker's private key "
            "(create one with `sl-pipeline keygen NAME --out DIR`), or pass --insecure"
        )
    return load_keypair(resolve_path(base, value, dotted))


def load_peer_key(base: Path, value: str, dotted: str) -> bytes:
    if not value:
        raise ConfigError(f"{dotted} is not set: pin the peer's public key file (NAME.pub)")
    return load_public_key(resolve_path(base, value, dotted))


def load_admitted(base: Path, value: str, dotted: str) -> dict[bytes, str]:
    if not value:
        raise ConfigError(
            f"{dotted} is not set: list the public keys this worker admits "
            "(a folder of NAME.pub files, or a file of 'NAME BASE64' lines)"
        )
    return load_admitted_keys(resolve_path(base, value, dotted))


async def bind_router(bind: str, section: str, limits: Limits, **options: Any) -> ZmtpRouter:
    """Listen on ``[section] bind``. A port another process holds is a config problem
    (exit status 2, naming the key), not a network failure."""
    try:
        return await ZmtpRouter.bind(bind, limits, **options)
    except TransportError as exc:
        cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else OSError()
        host = bind.removeprefix("tcp://").rsplit(":", 1)[0].strip("[]")
        advice = listen_advice(cause, host, f"[{section}] bind")
        raise ConfigError(
            f"{section}.bind = {bind!r}: cannot listen there ({exc}); {advice}"
        ) from None


def ops_secrets(
    cfg: OpsConfig, base: Path, metrics: WorkerMetrics, key: KeyPair | None = None
) -> str:
    """The token /metrics asks for ("": none), read at start-up; and, with
    ``label_names = "hashed"``, names hashed with a key derived from the worker's own (a
    server's run ids and client names; a client's series name nobody)."""
    if cfg.label_names == "hashed":
        if key is None:
            raise ConfigError(
                'ops.label_names = "hashed" hashes names with this worker\'s private key, '
                'and it runs --insecure, without one: use "plain", or run with keys'
            )
        metrics.hash_names(
            key.private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        )
    return read_metrics_token(cfg, base)


def read_metrics_token(cfg: OpsConfig, base: Path) -> str:
    """The token /metrics asks for ("": none); the status token (``with_status_token``)
    checked against it."""
    token = read_token(base, cfg.metrics_token, "ops.metrics_token") if cfg.metrics_token else ""
    check_status_token(cfg.status_token, token, status_key(cfg))
    return token


def ops_tokens(cfg: OpsConfig, base: Path) -> tuple[OpsConfig, str]:
    """``cfg`` with its status token read (``with_status_token``), and the metrics token."""
    cfg = with_status_token(cfg, base)
    return cfg, read_metrics_token(cfg, base)


def status_key(cfg: OpsConfig) -> str:
    """The setting the status token came from, as errors name it."""
    return "ops.status_token_file" if cfg.status_token_file else "ops.status_token"


def with_status_token(cfg: OpsConfig, base: Path) -> OpsConfig:
    """``cfg`` with ``status_token`` read from ``[ops] status_token_file`` (its file checked
    as the metrics token's is: long, no placeholder, a warning where others may read it)."""
    if cfg.status_token and cfg.status_token_file:
        raise ConfigError(
            "ops.status_token and ops.status_token_file are both set: keep the file "
            "(status_token_file) and remove status_token, the token written in the config"
        )
    if not cfg.status_token_file:
        return cfg
    token = read_token(base, cfg.status_token_file, "ops.status_token_file")
    return dataclasses.replace(cfg, status_token=token)


def check_status_token(status: str, metrics: str, key: str = "ops.status_token") -> None:
    """Every worker (before, only a server checked the second): a status token anyone
    could guess, or the one Prometheus holds, would show /status's names to them."""
    if status and len(status) < TOKEN_MIN_CHARS:
        raise ConfigError(
            f"{key} is shorter than {TOKEN_MIN_CHARS} characters: whoever reaches "
            "the ops port could guess it and read /status's names; write a long random one"
        )
    if status.startswith(PLACEHOLDER):  # deploy/k8s's example, public in this repository
        raise ConfigError(
            f"{key} holds the example's placeholder, which anyone can read in this "
            "project's repository; write a long random token (head -c 32 /dev/urandom | base64)"
        )
    if status and status == metrics:
        raise ConfigError(
            f"{key} is the token of ops.metrics_token, so whoever scrapes /metrics "
            "could read /status's peer names and which name each hashed label stands for; "
            "give /status a token of its own"
        )


async def start_ops(
    cfg: OpsConfig,
    metrics: WorkerMetrics,
    status: Callable[[], Mapping[str, Any]],
    ready: Callable[[], bool],
    routes: Callable[[Any], None] | None = None,
    metrics_token: str = "",
) -> OpsServer | None:
    if not cfg.listen:
        return None
    host, port = parse_listen(cfg.listen)
    ops = OpsServer(metrics, status, ready, host, port, routes, cfg.status_token, metrics_token)
    try:
        await ops.start()
    except OSError as exc:
        raise ConfigError(
            f"ops.listen = {cfg.listen!r}: cannot listen there ({exc.strerror or exc}); "
            f"{listen_advice(exc, host, '[ops] listen')}"
        ) from None
    log.info("ops HTTP listening on %s", ops.url)
    return ops


def install_stop_signals(stop: asyncio.Event) -> None:
    """SIGTERM/SIGINT set ``stop``: the worker stops intake and drains within a bound. A
    SIGINT ignored when the process started (a shell's background job) stays ignored."""
    from workers import SIGINT_IGNORED_AT_START

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM,) if SIGINT_IGNORED_AT_START else (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread
            loop.add_signal_handler(sig, stop.set)


async def tell_peers_we_stop(endpoint: ZmtpRouter, peers: Mapping[bytes, Any], role: str) -> None:
    """A retryable ``shutting_down`` error to every peer: a client waiting for a reply
    rejoins (with backoff) at once instead of waiting out its whole reply timeout."""
    notice = error_message(
        "shutting_down", f"{role} is stopping; rejoin when it is back", retryable=True
    )
    for identity, peer in list(peers.items()):
        try:
            await endpoint.send(identity, peer.channel.pack(notice))
        except (SLError, OSError) as exc:  # best effort: we are going away anyway
            log.debug("could not tell %s that we stop: %s", peer.name, exc)
