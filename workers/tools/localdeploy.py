"""`sl-pipeline init`: write a ready-to-run local deployment (configs, keys, free ports)."""

from __future__ import annotations

import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sl_pipeline.config import ServerSection
from sl_pipeline.errors import ConfigError
from sl_pipeline.group import write_group_key
from sl_pipeline.keys import write_keypair
from workers import topologies
from workers.tools.ports import free_port
from workers.tools.staging import staged
from workers.topologies import REGISTRY, Topology
from workers.topologies.base import DATASETS, FEATURES, Deployment, Table

DEFAULT_EPOCHS = {"digits": 8, "breast_cancer": 10}
DEVICE_NAME = re.compile(r"cpu|auto|cuda(:\d+)?")  # what train.device accepts
# The topologies a generated deployment gives two clients by default.
MULTI_PARTY = tuple(name for name, t in REGISTRY.items() if t.default_clients > 1)
# Every client's state after every applied step (docs/reliability.md: a client killed
# without a stop carries on with the same command; its measured cost is there too).
CLIENT_CHECKPOINT: dict[str, Any] = {"dir": "state/client-checkpoints", "every_steps": 1}
# The file of the token a worker's /metrics asks for ([ops] metrics_token), in its folder.
METRICS_TOKEN = "keys/metrics.token"
# The file of the token /status asks for before it names peers ([ops] status_token_file).
STATUS_TOKEN = "keys/status.token"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table: {"key" = value, ...}
        return (
            "{" + ", ".join(f"{_toml_value(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
        )
    return repr(value)


def to_toml(data: Table) -> str:
    """Tiny TOML writer for our two-level configs (tables of scalars, lists, inline tables)."""
    lines: list[str] = []
    for section, table in data.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in table.items())
        lines.append("")
    return "\n".join(lines)


def write_admin_token(path: Path) -> Path:
    """A random token for the server's run API (`sl-pipeline runs`) or its /metrics,
    readable by its owner."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_urlsafe(32) + "\n")
    return path


def _client(i: int, d: Deployment, spec: Topology, endpoint: str, tables: Table) -> Table:
    name = d.names[i]
    client: dict[str, Any] = {
        "server": endpoint,
        "name": name,
        "topology": spec.name,
        "save": f"state/{name}.pt",
    }
    out = {"client": client, "data": {"dataset": d.dataset, "seed": d.seed}, **tables}
    out["model"] = dict(tables["model"])
    spec.client_tables(i, d, out)
    if spec.lists_group:
        client["group"] = list(d.names)
    if spec.group_secret:
        client["group_key"] = "keys/group.secret"
    if spec.pairwise_keys:  # pairwise masks: its own private key, the others' public keys
        client.update(key=f"keys/{name}.key", group_keys="keys/group")
    return {key: out[key] for key in ("client", "data", "model", "train")}


def deployment_options(args: Any) -> dict[str, Any]:
    """The keyword arguments of :func:`init_deployment` from parsed command-line flags."""
    names = (
        "topology",
        "clients",
        "dataset",
        "epochs",
        "insecure",
        "ops",
        "seed",
        "wire_dtype",
        "pipeline_depth",
        "label_client",
        "device",
    )
    options = {name: getattr(args, name) for name in names}
    if options["clients"] is None:
        options["clients"] = default_clients(options["topology"])
    return options


def default_clients(name: str) -> int:
    """Parties a topology needs to show what it does: two where it is about several."""
    return topologies.topology(name).default_clients


@dataclass(frozen=True)
class Plan:
    """Every worker's config tables, before keys and files: what init and provision share."""

    server: Table
    relay: Table | None
    clients: list[Table]


def check_options(
    name: str,
    clients: int,
    dataset: str,
    label_client: bool,
    epochs: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    most_clients: int | None = ServerSection.max_clients,
) -> Topology:
    if epochs is not None and epochs < 1:
        raise ConfigError(f"--epochs must be at least 1, got {epochs}")
    if seed < 0:
        raise ConfigError(f"--seed must not be negative, got {seed}")
    if not DEVICE_NAME.fullmatch(device):
        raise ConfigError(f"--device {device!r} is not a device; use cpu, cuda, cuda:N or auto")
    if name not in REGISTRY:
        raise ConfigError(f"--topology {name!r} is unknown; choose one of {list(REGISTRY)}")
    spec = REGISTRY[name]
    if dataset not in DATASETS:
        raise ConfigError(f"--dataset {dataset!r} is unknown; choose one of {sorted(DATASETS)}")
    if clients < spec.min_clients:
        raise ConfigError(f"--clients must be at least {spec.min_clients}")
    if most_clients is not None and clients > most_clients:  # the rest would wait forever
        raise ConfigError(
            f"--clients must be at most {most_clients}, the peers a server admits at once "
            "(server.max_clients); for more, sl-pipeline provision (it raises it to the sites)"
        )
    if spec.feature_parties and clients > FEATURES[dataset]:  # each party needs a column
        raise ConfigError(
            f"--clients must be at most {FEATURES[dataset]} for --topology {name} on "
            f"--dataset {dataset} (one feature column per party at least)"
        )
    if dataset not in spec.datasets:
        raise ConfigError(
            f"--topology {name} runs on --dataset {', '.join(spec.datasets)}{spec.datasets_note}"
        )
    if label_client and not spec.label_client:
        holders = [n for n, t in REGISTRY.items() if t.label_client]
        raise ConfigError(f"--label-client applies to --topology {', '.join(holders)} only")
    return spec


def plan_deployment(
    names: list[str],
    server_bind: str,
    server_endpoint: str,
    relay: tuple[str, str] | None = None,
    *,
    topology: str = "vanilla",
    dataset: str = "digits",
    epochs: int | None = None,
    seed: int = 0,
    wire_dtype: str = "float32",
    pipeline_depth: int = 1,
    label_client: bool = False,
    device: str = "cpu",
    most_clients: int | None = ServerSection.max_clients,
    group: str = "project",
) -> Plan:
    """The configs of a server, its clients ``names`` and (multihop) a relay at
    ``relay = (bind, endpoint)``; clients reach the server at ``server_endpoint``; the
    server's peers form ``group``, the one whose members may train together.
    ``most_clients = None``: any count (the caller raises ``server.max_clients`` to it)."""
    spec = check_options(
        topology, len(names), dataset, label_client, epochs, seed, device, most_clients
    )
    d = Deployment(list(names), dataset, seed, label_client)
    train = {
        "epochs": epochs or DEFAULT_EPOCHS[dataset],
        "batch_size": 32,
        "lr": 0.05,
        "momentum": 0.9,
        "seed": seed,
        "wire_dtype": wire_dtype,
        "pipeline_depth": pipeline_depth,
    }
    if device != "cpu":  # cpu is the default: configs written without --device stay as before
        train["device"] = device
    shared: Table = {"model": spec.model_table(d), "train": train}
    server = _server(d, spec, server_bind, shared)
    endpoint, relay_cfg = server_endpoint, None
    if spec.relays:
        if relay is None:
            raise ConfigError(f"--topology {topology} needs a relay")
        relay_cfg = _relay(relay[0], server_endpoint, shared)
        endpoint = relay[1]
        server["server"]["relays"] = ["relay-1"]  # it speaks for its clients
    server["server"]["groups"] = {group: server["server"].get("relays") or list(names)}
    clients = [_client(i, d, spec, endpoint, shared) for i in range(len(names))]
    if label_client:
        clients[0]["client"]["role"] = "label"
    return Plan(server, relay_cfg, clients)


def _server(d: Deployment, spec: Topology, bind: str, shared: Table) -> Table:
    section: dict[str, Any] = {
        "bind": bind,
        "topology": spec.name,
        "save": "state/server.pt",
        "run_clients": len(d.names),  # a run ends once every client finished its part
    }
    server: Table = {"server": section, **shared}
    spec.server_tables(d, server)
    return server


def _relay(bind: str, upstream: str, shared: Table) -> Table:
    section = {
        "bind": bind,
        "upstream": upstream,
        "name": "relay-1",
        "segment": 1,
        "save": "state/relay-1.pt",
    }
    return {"relay": section, **shared}


def init_deployment(
    out: Path,
    *,
    topology: str = "vanilla",
    clients: int = 1,
    dataset: str = "digits",
    epochs: int | None = None,
    insecure: bool = False,
    ops: bool = False,
    seed: int = 0,
    wire_dtype: str = "float32",
    pipeline_depth: int = 1,
    label_client: bool = False,
    device: str = "cpu",
) -> dict[str, Any]:
    """Write DIR/server.toml, DIR/client-N.toml (and relay-1.toml, keys). Returns the paths."""
    spec = check_options(topology, clients, dataset, label_client, epochs, seed, device)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "server.toml").exists():
        raise ConfigError(f"{out / 'server.toml'} exists; choose an empty folder for init")
    port = free_port()
    relay_endpoint = f"tcp://127.0.0.1:{free_port()}" if spec.relays else ""
    endpoint = f"tcp://127.0.0.1:{port}"
    plan = plan_deployment(
        [f"client-{i + 1}" for i in range(clients)],
        endpoint,
        endpoint,
        (relay_endpoint, relay_endpoint) if relay_endpoint else None,
        topology=topology,
        dataset=dataset,
        epochs=epochs,
        seed=seed,
        wire_dtype=wire_dtype,
        pipeline_depth=pipeline_depth,
        label_client=label_client,
        device=device,
    )
    # One machine: the server's state is checkpointed every step (exactly-once after a
    # crash); without fsync, as the files share the machine's fate anyway.
    plan.server["checkpoint"] = {"dir": "state/server-checkpoints", "fsync": False}
    for client in plan.clients:  # and a client's, so a kill -9 costs nothing applied
        client["checkpoint"] = dict(CLIENT_CHECKPOINT, fsync=False)
    if ops:
        _ops_ports(plan)
    with staged(out, "the deployment", "init", _moved_into, beside=False) as stage:
        _secure(stage, insecure, plan, spec)
        names = _write_plan(stage, plan)
    return {"dir": str(out), "files": {n: str(out / f"{n}.toml") for n in names}, "port": port}


def _ops_ports(plan: Plan) -> None:
    """An ops port on loopback for every worker, each /metrics behind one token (the server's
    names the clients and runs, a client's shows its training): one machine, one Prometheus,
    whose one ``credentials_file`` then reads them all; and the server's run API token."""
    for cfg in [plan.server, *([plan.relay] if plan.relay else []), *plan.clients]:
        cfg["ops"] = {"listen": f"127.0.0.1:{free_port()}", "metrics_token": METRICS_TOKEN}
        cfg["ops"]["status_token_file"] = STATUS_TOKEN  # a file: no secret in the config
    plan.server["ops"]["admin_token"] = "keys/admin.token"


def _moved_into(stage: Path, out: Path) -> None:
    """The staged keys and files moved into ``out``, server.toml last (init's mark of a
    finished folder); refused if any is there already."""
    made = sorted(stage.iterdir(), key=lambda p: p.name == "server.toml")
    for path in made:
        if (out / path.name).exists():
            raise ConfigError(f"{out / path.name} exists; choose an empty folder for init")
    for path in made:
        path.rename(out / path.name)


def _write_plan(out: Path, plan: Plan) -> list[str]:
    for key in ("admin_token", "metrics_token", "status_token_file"):
        if key in plan.server.get("ops", {}):
            write_admin_token(out / plan.server["ops"][key])
    tables = {"server": plan.server, **({"relay-1": plan.relay} if plan.relay else {})}
    tables.update({f"client-{i + 1}": cfg for i, cfg in enumerate(plan.clients)})
    for name, cfg in tables.items():
        (out / f"{name}.toml").write_text(to_toml(cfg))
    return list(tables)


def start_commands(files: dict[str, str]) -> list[tuple[str, str]]:
    """(site, command) to start each worker of a deployment: server, relays, clients."""
    order = sorted(files, key=lambda n: (n != "server", not n.startswith("relay"), n))
    return [(name, f"sl-pipeline {name.split('-')[0]} --config {files[name]}") for name in order]


def _client_keys(
    keys: Path, insecure: bool, clients: list[Table], spec: Topology
) -> dict[str, Path]:
    """The clients' key pairs (and the group secret) their topology and security need."""
    if spec.group_secret:
        write_group_key(keys / "group.secret")  # shared by the clients, never by the server
    client_pubs = {}
    if not insecure or spec.pairwise_keys:
        client_pubs = {
            c["client"]["name"]: write_keypair(c["client"]["name"], keys)[1] for c in clients
        }
    if spec.pairwise_keys:  # each client gets the others' public keys, never a secret
        group = keys / "group"
        group.mkdir(exist_ok=True)
        for pub in client_pubs.values():
            (group / pub.name).write_bytes(pub.read_bytes())
    return client_pubs


def _secure(out: Path, insecure: bool, plan: Plan, spec: Topology) -> None:
    server, relay, clients = plan.server, plan.relay, plan.clients
    keys = out / "keys"
    keys.mkdir(parents=True, exist_ok=True)
    client_pubs = _client_keys(keys, insecure, clients, spec)
    if insecure:
        for cfg, section in [
            (server, "server"),
            *([(relay, "relay")] if relay else []),
            *[(c, "client") for c in clients],
        ]:
            assert cfg is not None
            cfg[section]["insecure"] = True
        return
    admitted = keys / "admitted"
    admitted.mkdir(exist_ok=True)
    write_keypair("server", keys)
    server["server"].update(key="keys/server.key", admitted="keys/admitted")
    downstream = admitted
    upstream_key = "keys/server.pub"
    if relay is not None:
        _, pub = write_keypair("relay-1", keys)
        (admitted / pub.name).write_bytes(pub.read_bytes())
        downstream = keys / "relay-1-admitted"
        downstream.mkdir(exist_ok=True)
        relay["relay"].update(
            key="keys/relay-1.key", admitted="keys/relay-1-admitted", upstream_key="keys/server.pub"
        )
        upstream_key = "keys/relay-1.pub"
    for cfg in clients:
        name = cfg["client"]["name"]
        pub = client_pubs[name]
        (downstream / pub.name).write_bytes(pub.read_bytes())
        cfg["client"].update(key=f"keys/{name}.key", server_key=upstream_key)
