"""The range of every number in a worker's config, checked when the file is loaded.

A value a worker cannot use is refused here, naming its key and the range, before anything
starts: not taken silently as 1 or as "off" (``checkpoint.keep = 0`` kept one checkpoint,
``server.max_runs = 0`` ran one run), not left to fail minutes later deep in torch with a
traceback (a seed of 2**64). Keys where 0 has a documented meaning (``train.threads``,
``train.pipeline_depth``, ``server.max_batch``, ``server.stalled_run_s``...) keep it.
"""

from __future__ import annotations

import math
import re
from typing import Any

from .errors import ConfigError

# Integers whose small values mean nothing (a batch of 0 samples, a classifier of one class),
# and lists that must not be empty (no cipher suite: no session).
# A server of 0 clients refuses everyone as "full"; a limit of 0 admits no message.
# 0 checkpoints kept, a checkpoint every 0 steps, 0 runs, 0 names, a 0 MiB reply cache, a
# burst of 0 hellos: each was taken as 1 without a word. An MLP of width 0 or 1 has a layer
# of no units (its second layer is half as wide). (0 epochs is a client with none left.)
AT_LEAST: dict[str, int | float] = {
    "train.batch_size": 1,
    "model.classes": 2,
    "model.hidden": 2,
    "server.max_clients": 1,
    "server.max_runs": 1,
    "server.parties": 1,
    "checkpoint.every_steps": 1,
    "checkpoint.keep": 1,
    "data.shards": 1,
    "client.max_average_ratio": 1.0,
}
for _side in ("server", "client", "relay"):
    AT_LEAST[f"{_side}.ciphers"] = 1
for _side in ("server", "relay"):
    AT_LEAST.update({f"{_side}.max_names": 1, f"{_side}.reply_cache_mib": 1})
AT_LEAST.update({"server.hello_burst": 1, "relay.rejoin_burst": 1, "relay.segment": 1})
AT_LEAST.update(
    {
        f"limits.{name}": 1
        for name in (
            "max_frames",
            "max_header_bytes",
            "max_tensor_bytes",
            "max_message_bytes",
            "max_inflight_bytes",
        )
    }
)

# Numbers that must be above 0: a rate of 0 hellos a second refuses every hello after the
# first burst, for good (on loopback every client shares one source address); a timeout of
# 0 s drops every peer at once or waits for no reply; a learning rate of 0 trains nothing.
ABOVE_ZERO = {
    "train.lr",
    "server.hellos_per_s",
    "server.client_timeout_s",
    "relay.rejoins_per_s",
    "relay.timeout_s",
    "relay.request_log_mib",  # a log of no bytes: a checkpoint at every step, unsaid
    "client.timeout_s",
    "client.connect_timeout_s",
}

# Values beyond which a setting means nothing sensible: torch crashes (a segfault) asked for
# 100000 threads; momentum above 1 makes every step larger than the last (training diverges).
# A seed must fit the generators that use it (numpy's and torch's take 32 and 64 bits; the
# batch order mixes the epoch in), and TOML's integers are 64-bit.
MAX_SEED = 2**32 - 1
AT_MOST: dict[str, int | float] = {"train.threads": 1024, "train.momentum": 1.0}
AT_MOST.update({f"{section}.seed": MAX_SEED for section in ("model", "train", "data")})
# Every other number has a ceiling too: a timeout of 1e300 s (or 1e12) was taken, and a client
# waited on a server that was not there until it was killed; 99999999999 epochs, a port of
# 99999. Beyond these nothing sensible is meant: a typo, or a unit mistaken.
YEAR_S = 365 * 24 * 3600  # any duration
MAX_MIB = 4 * 1024 * 1024  # 4 TiB: any memory or disk budget in MiB
MAX_BYTES = 2**40  # 1 TiB: a message, a tensor, what is in flight
MAX_COUNT = 1_000_000  # peers, names, runs, parties, epochs, bursts, checkpoints kept
MAX_DIM = 2**24  # a model's width, a feature count, a column index, a class count
AT_MOST.update(
    {
        key: YEAR_S
        for key in (
            "ops.linger_s",
            "server.client_timeout_s",
            "server.empty_run_s",
            "server.stalled_run_s",
            "server.open_step_s",
            "server.takeover_after_s",
            "client.timeout_s",
            "client.connect_timeout_s",
            "client.retry_for_s",
            "client.wait_for_parties_s",
            "relay.timeout_s",
        )
    }
)
AT_MOST.update(
    {
        key: MAX_MIB
        for key in (
            "data.max_memory_mb",
            "server.reply_cache_mib",
            "server.checkpoint_replies_mib",
            "relay.reply_cache_mib",
            "relay.request_log_mib",
        )
    }
)
AT_MOST.update(
    {
        f"limits.{name}": MAX_BYTES
        for name in ("max_header_bytes", "max_tensor_bytes", "max_message_bytes")
    }
)
AT_MOST.update({"limits.max_inflight_bytes": MAX_BYTES, "limits.max_frames": MAX_COUNT})
AT_MOST.update(
    {
        key: MAX_COUNT
        for key in (
            "train.epochs",
            "checkpoint.every_steps",
            "checkpoint.keep",
            "server.max_clients",
            "server.max_names",
            "server.hello_burst",
            "server.parties",
            "server.max_runs",
            "server.run_clients",
            "data.shard",
            "data.shards",
            "relay.max_names",
            "relay.rejoin_burst",
            "server.hellos_per_s",
            "server.run_starts_per_min",
            "relay.rejoins_per_s",
            "client.max_average_ratio",
        )
    }
)
AT_MOST.update(
    {
        key: MAX_DIM
        for key in (
            "model.classes",
            "model.hidden",
            "model.in_shape",
            "model.cuts",
            "server.task_classes",
            "data.feature_slice",
            "train.batch_size",
            "server.max_batch",
            "relay.max_batch",
            "relay.segment",
        )
    }
)
# A group's ended runs kept: the runs list (runs.json, each checkpoint) holds 500 at most
# (workers.server.runs.KEEP_ENDED); a run's files are kept up to 10 years after it ended.
AT_MOST.update({"server.keep_ended_runs": 500, "server.keep_ended_for_s": 10 * YEAR_S})
# float32's largest is 3.4e38: a bound above it bounds nothing; a learning rate above 100
# sends any model's weights to inf in a step or two.
AT_MOST.update({"limits.max_abs_value": 1e38, "train.lr": 100.0})
# Steps a pipelined client may keep in flight; the server's reply cache keeps as many per
# client. Deeper cost more than a point of digits accuracy even with staleness compensation
# (docs/performance.md, "Accuracy by depth").
MAX_PIPELINE_DEPTH = 16
AT_MOST["train.pipeline_depth"] = MAX_PIPELINE_DEPTH
# provision's project file
AT_MOST.update({"project.epochs": MAX_COUNT, "project.seed": MAX_SEED})
AT_MOST["project.pipeline_depth"] = MAX_PIPELINE_DEPTH
for _site in ("server", "client", "relay"):
    AT_MOST.update({f"{_site}.port": 65535, f"{_site}.ops_port": 65535})
MAX_INT = 2**63 - 1
_ITEM = re.compile(r"\[\d+\]")  # model.in_shape[2] -> model.in_shape
# Fractions strictly between 0 and 1: a test split of no row, or of every row.
FRACTIONS = {"data.test_fraction"}


def check_int(raw: Any, dotted: str) -> int:
    """An integer config value, within its key's range."""
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise ConfigError(f"{dotted} must be an integer, got {raw!r}")
    if raw < 0:
        raise ConfigError(f"{dotted} must not be negative, got {raw}")
    if raw < AT_LEAST.get(dotted, 0):
        raise ConfigError(f"{dotted} must be at least {AT_LEAST[dotted]}, got {raw}")
    if raw > MAX_INT:
        raise ConfigError(f"{dotted} must be at most {MAX_INT} (a 64-bit integer), got {raw}")
    return int(_at_most(raw, dotted))


def check_float(raw: Any, dotted: str) -> float:
    """A number config value (an integer is taken as a float), within its key's range."""
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise ConfigError(f"{dotted} must be a number, got {raw!r}")
    if isinstance(raw, int) and abs(raw) > MAX_INT:
        raise ConfigError(f"{dotted} = {raw} is too large; give a number of sensible size")
    if not math.isfinite(raw):  # a window of inf seconds is a loop without end
        raise ConfigError(f"{dotted} must be a finite number, got {raw}")
    if raw < 0:
        raise ConfigError(f"{dotted} must not be negative, got {raw}")
    if dotted in FRACTIONS and not 0 < raw < 1:
        raise ConfigError(f"{dotted} must be between 0 and 1 (exclusive), got {raw}")
    if dotted in ABOVE_ZERO and raw == 0:
        raise ConfigError(f"{dotted} must be above 0, got {raw}")
    if raw < AT_LEAST.get(dotted, 0):
        raise ConfigError(f"{dotted} must be at least {AT_LEAST[dotted]}, got {raw}")
    return float(_at_most(float(raw), dotted))


def describe(dotted: str) -> str:
    """The range of ``dotted`` beyond "not negative", in words ("" if none), for the docs."""
    parts = []
    if dotted in FRACTIONS:
        parts.append("between 0 and 1")
    if dotted in ABOVE_ZERO:
        parts.append("above 0")
    if dotted in AT_LEAST and not dotted.endswith(".ciphers"):
        parts.append(f"at least {AT_LEAST[dotted]}")
    if dotted in AT_MOST:
        parts.append(f"at most {AT_MOST[dotted]}")
    return ", ".join(parts)


def _at_most(raw: int | float, dotted: str) -> int | float:
    key = _ITEM.sub("", dotted)  # a list's items share its bound
    most = AT_MOST.get(key)
    if most is not None and raw > most:
        low = "above 0" if key in ABOVE_ZERO else f"at least {AT_LEAST.get(key, 0)}"
        raise ConfigError(
            f"{dotted} = {raw} is out of range: it must be {low} and at most {most}; "
            "give a value in that range"
        )
    return raw


__all__ = [
    "ABOVE_ZERO",
    "AT_LEAST",
    "AT_MOST",
    "MAX_PIPELINE_DEPTH",
    "MAX_SEED",
    "check_float",
    "check_int",
    "describe",
]
