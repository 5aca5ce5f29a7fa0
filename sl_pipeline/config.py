"""Typed worker configuration: TOML in, frozen dataclasses out, every bad key named.

One TOML file per worker. Unknown keys are refused with their dotted name (hypercorn's
``Config.from_mapping`` silently ignores them: that is the counterexample). Relative
paths are resolved against the config file's folder. Flags override file values via
:func:`apply_overrides` with ``section.key=value`` strings.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from .ciphers import DEFAULT_CIPHERS, CipherName
from .configbounds import AT_LEAST, check_float, check_int
from .configbounds import MAX_PIPELINE_DEPTH as MAX_PIPELINE_DEPTH  # train.pipeline_depth
from .configfile import apply_overrides, read_toml
from .errors import ConfigError, LimitError
from .limits import Limits

TOPOLOGIES = ("vanilla", "ushaped", "vertical", "multitask", "multihop", "roundrobin", "splitfed")
Topology = Literal[
    "vanilla", "ushaped", "vertical", "multitask", "multihop", "roundrobin", "splitfed"
]
_ENDPOINT = re.compile(r"^tcp://(\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.*-]+):(\d{1,5})$")


@dataclass(frozen=True)
class ModelConfig:
    """Which network, and where it is cut. All parties build it from the same seed."""

    builtin: str = ""  # "cnn" | "mlp"
    sequential: str = ""  # "pkg.module:function" returning an nn.Sequential
    factories: list[str] = field(default_factory=list)  # one import path per segment
    cuts: list[int] = field(default_factory=list)  # indices into the Sequential
    in_shape: list[int] = field(default_factory=list)
    classes: int = 2
    hidden: int = 64
    seed: int = 0


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 5
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    optimizer: Literal["sgd", "adam"] = "sgd"
    seed: int = 0
    device: str = "cpu"
    pipeline_depth: int = 1  # >1: steps in flight (client overlaps server); 0: auto from RTT
    # pipelining: the client's momentum less the ~(1 - 1/depth) its stale gradients add
    staleness_compensation: bool = True
    threads: int = 1  # torch intra-op threads; 0 = torch's default (oversubscribes small hosts)
    wire_dtype: Literal["float32", "float16", "bfloat16", "int8", "int4", "int2", "int2-ef"] = (
        "float32"
    )


@dataclass(frozen=True)
class DataConfig:
    dataset: str = ""  # "digits" | "breast_cancer" ; or a file below
    path: str = ""  # .csv, .parquet or .npz, or a folder of images (docs/data.md)
    label: str = ""  # label column (CSV) or array name (NPZ); "" = this party has no labels
    features: str = "x"  # NPZ array of features
    test_fraction: float = 0.2
    seed: int = 0
    shard: int = 0  # which horizontal shard this client holds
    shards: int = 1
    feature_slice: list[int] = field(default_factory=list)  # vertical: [start, stop)
    task: str = ""  # multitask: which task's labels
    id: str = ""  # identifier column, kept as the row id, never a feature (docs/data.md)
    align: Literal["", "psi", "position"] = ""  # vertical: "" = psi when data.id is set
    encode: Literal["onehot", "ordinal"] = "onehot"  # text feature columns
    unknown: Literal["ignore", "error"] = "ignore"  # a category not seen in training rows
    missing: Literal["error", "impute"] = "error"  # impute: training mean / most frequent
    categorical: list[str] = field(default_factory=list)  # read as text though numeric
    image: str = ""  # CSV column of image file paths (relative to the CSV's folder)
    resize: bool = False  # resize images to model.in_shape instead of refusing other sizes
    max_memory_mb: int = 1024  # decoded images beyond this go to a memory-mapped temp file


@dataclass(frozen=True)
class OpsConfig:
    listen: str = ""  # "HOST:PORT"; empty = no ops HTTP server
    log_format: Literal["text", "json"] = "text"
    log_level: str = "INFO"
    # File holding the token that `sl-pipeline runs` must present (the server's run API);
    # empty = the run API is off.
    admin_token: str = ""
    # /status names peers and their key fingerprints only for `Authorization: Bearer TOKEN`
    # with this token; empty: never (peers are counted; with metrics_token, only for its
    # token, and without either token /status shows the role alone). At least 16 characters,
    # and not the metrics token. Written here, it is a secret in the config file: prefer
    # status_token_file.
    status_token: str = ""
    # File holding the /status token (as status_token, read at start; mode 0600, as init and
    # provision write keys/status.token). Set this or status_token, not both.
    status_token_file: str = ""
    # File holding the token that /metrics asks for (`Authorization: Bearer TOKEN`: a
    # Prometheus scrape config's `authorization: {credentials_file: FILE}`); without it,
    # /metrics answers 401. Empty: /metrics is open to whoever reaches the port.
    metrics_token: str = ""
    # How a server's run ids and client names, which may name tenants (a group's name, a
    # hospital's client), show as /metrics label values: "plain", or "hashed": a short hash
    # keyed with the worker's private key ([server] key; not with --insecure), stable while
    # the key is; /status with status_token lists which name each hash stands for.
    label_names: Literal["plain", "hashed"] = "plain"
    # A client that finished keeps serving /metrics until one scrape after its finish (so a
    # short run's final figures reach Prometheus), at most this long; 0 = exit at once.
    linger_s: float = 30.0


@dataclass(frozen=True)
class CheckpointConfig:
    dir: str = ""  # empty = no checkpoints
    every_steps: int = 1  # 1: nothing applied is ever lost, so no rollback is needed
    keep: int = 3
    fsync: bool = True  # survive power loss, not only a killed process


@dataclass(frozen=True)
class LimitsConfig:
    max_frames: int = 32
    max_header_bytes: int = 64 * 1024
    max_tensor_bytes: int = 256 * 1024 * 1024
    max_message_bytes: int = 512 * 1024 * 1024
    # bytes of unfinished chunked messages, all peers together; over it, the peer holding
    # the most loses its session (it rejoins and resends)
    max_inflight_bytes: int = 1024 * 1024 * 1024
    # the largest magnitude a peer's activations or gradients may hold; a tensor beyond it
    # is refused with a protocol error (finite but huge values would wreck the shared model)
    max_abs_value: float = 1e6

    def to_limits(self) -> Limits:
        try:
            return Limits(**dataclasses.asdict(self))
        except LimitError as exc:  # a config value, not a peer's message: exit 2, not 3
            raise ConfigError(f"{exc}; raise it in [limits]") from None


@dataclass(frozen=True)
class ServerSection:
    bind: str = "tcp://127.0.0.1:5555"
    topology: Topology = "vanilla"
    key: str = ""
    admitted: str = ""
    insecure: bool = False
    ciphers: list[CipherName] = field(default_factory=lambda: list(DEFAULT_CIPHERS))
    max_clients: int = 64
    client_timeout_s: float = 120.0
    # Admitted peers that may speak for clients of their own (the `client` field of a
    # message): relays only. Everyone else is known by its admitted name alone.
    relays: list[str] = field(default_factory=list)
    max_names: int = 256  # names (clients, a relay's clients) a run holds, replies remembered
    # Samples one forward/evaluate/predict may carry; 0 = the larger of train.batch_size
    # and 256 (a client's evaluation batch). A bigger batch is refused before any work.
    max_batch: int = 0
    reply_cache_mib: int = 256  # each run's remembered replies, in all (oldest steps go first)
    # what a checkpoint keeps of them: each name's newest reply, and older ones up to this
    checkpoint_replies_mib: int = 16
    hellos_per_s: float = 20.0  # per key and group (--insecure: address), after hello_burst
    hello_burst: int = 100  # hellos a key may send at once before the rate applies
    fuse: Literal["concat", "sum", "mean"] = "concat"
    parties: int = 1  # vertical: feature parties; roundrobin/splitfed: clients per round
    group: list[str] = field(default_factory=list)  # roundrobin/splitfed: the members, by name
    tasks: list[str] = field(default_factory=list)  # multitask: task names
    task_classes: list[int] = field(default_factory=list)  # multitask: classes per task
    label_holder: str = ""  # vertical: "" = this server holds the labels; else a client's name
    # Where to save this server's segment(s) at the end / load at start: the newest run's
    # model, a copy that retention (keep_ended_*) removes with that run's files
    save: str = ""
    # Send the cut gradient before computing weight gradients when no other request waits
    # (the client's backward overlaps them); same updates, one extra partial backward.
    reply_first: bool = True
    runs_dir: str = ""  # each run's folder (saved model) and runs.json; "" = next to save
    max_runs: int = 4  # runs training at once; one more waits (its clients retry); split by groups
    # A run that applied no step this long after its first training message gives its place
    # up when a new run needs it (a run starts on its first training message, not a hello)
    empty_run_s: float = 60.0
    # A run in which no client applied a step or finished this long gives its place up when
    # a new run needs it, or when the client that started it asks for a new one: a member
    # that vanished (a crash, or a hostile co-client) cannot hold a run open forever. 0 = never.
    stalled_run_s: float = 3600.0
    # Runs one client may start a minute, after a burst of as many: each run that ends saves
    # its model and fsyncs checkpoints, and one admitted key starting and finishing runs at
    # its hello rate made 113 in 10 s. One more waits (overloaded: it retries). The clients
    # behind one relay together start at most 16 times as many. 0 = no bound.
    run_starts_per_min: float = 6.0
    # U-shaped: a step whose output went to a client and whose gradient has not come back
    # this long, counted from when another client's forward began to wait (or from the step,
    # if later), is abandoned (nothing of it is applied; a late gradient is answered
    # step_lost and its client redoes the step), so a client that died or stalls mid-step
    # holds the others up at most this long. A client whose late gradients showed it slow
    # gets twice, then 4x this, until its steps fit again. 0 = never (a step is then
    # abandoned only when its client leaves: bye, or its session goes).
    open_step_s: float = 10.0
    run_clients: int = 0  # a run ends when this many clients finished; 0 = all that joined
    # Ended runs of a group kept, listed and on disk (each run's folder under runs_dir); an
    # older one leaves the list and its folder is removed. 0 = folders kept forever (the list
    # still holds the newest 500 only; older folders are the operator's to archive)
    keep_ended_runs: int = 500
    # An ended run is removed (list and folder) this long after it ended; 0 = no age limit
    keep_ended_for_s: float = 0.0
    # A client name whose session sent nothing for this long may be taken by a new session.
    takeover_after_s: float = 5.0
    # Who may train in one run (docs/security.md): GROUP = [NAME, ...], or a table of members,
    # token (a run-API token for its runs only), max_clients and max_runs (its own share of
    # the server's; else an even share). Empty: every admitted client is in one.
    groups: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ClientSection:
    server: str = "tcp://127.0.0.1:5555"
    name: str = "client-1"
    key: str = ""
    server_key: str = ""
    insecure: bool = False
    ciphers: list[CipherName] = field(default_factory=lambda: list(DEFAULT_CIPHERS))
    timeout_s: float = 30.0
    connect_timeout_s: float = 10.0
    retry_for_s: float = 60.0
    wait_for_parties_s: float = 0.0
    topology: Topology = "vanilla"
    role: Literal["trainer", "feature", "label"] = "trainer"
    group: list[str] = field(default_factory=list)  # roundrobin/splitfed: every client's name
    group_key: str = ""  # roundrobin, vertical PSI: secret shared by the clients, not the server
    group_keys: str = ""  # splitfed: folder of the other members' public keys (NAME.pub)
    # splitfed: refuse a round's average whose norm exceeds this many times the norm of the
    # weights this client submitted (at least 1.0); it then keeps its own weights
    max_average_ratio: float = 10.0
    save: str = ""  # where to save this client's segment(s) at the end of training
    run: str = ""  # the training run to join; "" = the server's current one (or a new one)
    takeover: bool = False  # replace a live session of the same name (deliberately)


@dataclass(frozen=True)
class RelaySection:
    bind: str = "tcp://127.0.0.1:5556"
    upstream: str = "tcp://127.0.0.1:5555"
    name: str = "relay-1"
    key: str = ""
    admitted: str = ""
    upstream_key: str = ""
    insecure: bool = False
    ciphers: list[CipherName] = field(default_factory=lambda: list(DEFAULT_CIPHERS))
    segment: int = 1  # which segment of the model this relay holds
    timeout_s: float = 30.0
    relays: list[str] = field(default_factory=list)  # downstream relays (a longer chain)
    max_names: int = 256  # names whose replies (their last steps) this relay remembers
    max_batch: int = 0  # samples per message; 0 = the larger of train.batch_size and 256
    reply_cache_mib: int = 256  # the remembered replies, in all (oldest steps go first)
    # with checkpoint.every_steps > 1: the requests applied since the last checkpoint, kept
    # to run again after a restart; a step that would take the log over it checkpoints
    request_log_mib: float = 256.0
    # A client's fresh start (a hello without a resume point, then a step) makes the relay
    # join the server again, to learn the run: per client name, this many per second after
    # a burst of rejoin_burst; one more is refused as a retryable `overloaded`.
    rejoins_per_s: float = 0.2
    rejoin_burst: int = 10  # such joins a client name may cause at once, before the rate
    save: str = ""


@dataclass(frozen=True)
class WorkerConfig:
    """The sections every worker's file may have."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ops: OpsConfig = field(default_factory=OpsConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)


@dataclass(frozen=True)
class ServerConfig(WorkerConfig):
    server: ServerSection = field(default_factory=ServerSection)
    privacy: dict[str, Any] = field(default_factory=dict)  # label protection (vertical)
    data: DataConfig = field(default_factory=DataConfig)  # vertical: the labels it holds


@dataclass(frozen=True)
class ClientConfig(WorkerConfig):
    client: ClientSection = field(default_factory=ClientSection)
    data: DataConfig = field(default_factory=DataConfig)
    privacy: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RelayConfig(WorkerConfig):
    relay: RelaySection = field(default_factory=RelaySection)


T = TypeVar("T")


def from_mapping(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, refusing unknown keys and wrong types by name."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"[{where or 'top'}] must be a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"unknown key {key!r}; valid keys here: {', '.join(sorted(names))}")
    values = {}
    for name, raw in data.items():
        dotted = f"{where}.{name}" if where else name
        values[name] = _convert(hints[name], raw, dotted)
    return cls(**values)


def _convert(hint: Any, raw: Any, dotted: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return from_mapping(typing.cast(type, hint), raw, dotted)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if raw not in allowed:
            raise ConfigError(f"{dotted} = {raw!r} is not allowed; choose one of {list(allowed)}")
        return raw
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(raw, list):
            raise ConfigError(f"{dotted} must be a list, got {type(raw).__name__}")
        if len(raw) < AT_LEAST.get(dotted, 0):
            raise ConfigError(f"{dotted} must list at least {AT_LEAST[dotted]}, got none")
        return [_convert(item, v, f"{dotted}[{i}]") for i, v in enumerate(raw)]
    if origin is dict:
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{dotted} must be a table, got {type(raw).__name__}")
        return dict(raw)
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"internal: unsupported union type for {dotted}")
    return _scalar(hint, raw, dotted)


def _scalar(hint: Any, raw: Any, dotted: str) -> Any:
    if hint is bool:
        if not isinstance(raw, bool):
            raise ConfigError(f"{dotted} must be true or false, got {raw!r}")
        return raw
    if hint is int:
        return check_int(raw, dotted)
    if hint is float:
        return check_float(raw, dotted)
    if hint is str:
        if not isinstance(raw, str):
            raise ConfigError(f"{dotted} must be a string, got {raw!r}")
        return raw
    raise ConfigError(f"internal: no converter for {dotted} ({hint})")


def check_endpoint(value: str, dotted: str) -> str:
    """Validate a ZeroMQ TCP endpoint such as ``tcp://127.0.0.1:5555``."""
    match = _ENDPOINT.match(value)
    if not match:
        raise ConfigError(
            f"{dotted} = {value!r} is not a TCP endpoint; write it as tcp://HOST:PORT"
        )
    if not 0 < int(match.group(2)) < 65536:
        raise ConfigError(
            f"{dotted} = {value!r}: port {int(match.group(2))} is out of range; "
            "give a port from 1 to 65535"
        )
    return value


def resolve_path(base: Path, value: str, dotted: str, *, must_exist: bool = True) -> Path:
    """A config path relative to the config file's folder; missing files named clearly."""
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = base / path
    if must_exist and not path.exists():
        raise ConfigError(f"{dotted} = {value!r}: no such file or directory ({path})")
    return path


def load(cls: type[T], path: Path, overrides: list[str] | None = None) -> T:
    """Read, override and validate one worker's TOML config."""
    data = read_toml(path)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for role in ("server", "client", "relay"):  # another worker's file, given to this one
        # (the file's own sections: a --set of another role's key is an unknown key, below)
        if role in data and role not in names and names & {"server", "client", "relay"}:
            raise ConfigError(
                f"{path} is a {role}'s config (it has a [{role}] section); start it with "
                f"`sl-pipeline {role} --config {path}`, or give this command its own file"
            )
    return from_mapping(cls, apply_overrides(data, overrides or []))
