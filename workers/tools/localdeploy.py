"""`sl-pipeline init`: write a ready-to-run local deployment (configs, keys, free ports)."""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sl_pipeline.config import TOPOLOGIES
from sl_pipeline.errors import ConfigError
from sl_pipeline.group import write_group_key
from sl_pipeline.keys import write_keypair

DATASETS: dict[str, dict[str, Any]] = {
    "digits": {"builtin": "cnn", "in_shape": [1, 8, 8], "classes": 10},
    "breast_cancer": {"builtin": "mlp", "in_shape": [30], "classes": 2},
}
DEFAULT_EPOCHS = {"digits": 8, "breast_cancer": 10}
MULTITASK: dict[str, Any] = {"tasks": ["digit", "parity"], "task_classes": [10, 2]}
Table = dict[str, dict[str, Any]]
MULTI_PARTY = ("vertical", "multitask", "roundrobin", "splitfed")  # two clients by default


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def to_toml(data: Table) -> str:
    """Tiny TOML writer for our two-level configs (tables of scalars and lists)."""
    lines: list[str] = []
    for section, table in data.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in table.items())
        lines.append("")
    return "\n".join(lines)


def write_admin_token(path: Path) -> Path:
    """A random token for the server's run API (`sl-pipeline runs`), readable by its owner."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_urlsafe(32) + "\n")
    return path


def _feature_slices(dataset: str, parties: int) -> list[list[int]]:
    width = 30 if dataset == "breast_cancer" else 64
    bounds = [round(i * width / parties) for i in range(parties + 1)]
    return [[bounds[i], bounds[i + 1]] for i in range(parties)]


def _model(dataset: str, topology: str, seed: int) -> dict[str, Any]:
    model: dict[str, Any] = dict(DATASETS[dataset], seed=seed)
    if topology == "ushaped":
        model["cuts"] = [3, 8] if dataset == "digits" else [2, 4]
    if topology == "multihop":
        model["cuts"] = [3, 6] if dataset == "digits" else [2, 4]
    if topology == "vertical":
        model = {
            "builtin": "mlp",
            "in_shape": [0],
            "classes": DATASETS[dataset]["classes"],
            "seed": seed,
        }
    return model


def _client(
    i: int,
    names: list[str],
    endpoint: str,
    dataset: str,
    topology: str,
    model: dict[str, Any],
    train: dict[str, Any],
    seed: int,
) -> Table:
    name, n = names[i], len(names)
    data: dict[str, Any] = {"dataset": dataset, "seed": seed}
    client_model = dict(model)
    client: dict[str, Any] = {
        "server": endpoint,
        "name": name,
        "topology": topology,
        "save": f"state/{name}.pt",
    }
    if topology == "vertical":
        data["feature_slice"] = _feature_slices(dataset, n)[i]
        client_model["in_shape"] = [data["feature_slice"][1] - data["feature_slice"][0]]
        client["role"] = "feature"
        client["group"] = list(names)
    elif topology == "multitask":
        data["task"] = MULTITASK["tasks"][i % len(MULTITASK["tasks"])]
    else:
        data.update(shard=i, shards=n)
    if topology in ("roundrobin", "splitfed", "vertical"):  # vertical: PSI alignment by id
        client["group"] = list(names)
    if topology in ("roundrobin", "vertical"):
        client["group_key"] = "keys/group.secret"
    if topology == "splitfed":  # pairwise masks: its own private key, the others' public keys
        client.update(key=f"keys/{name}.key", group_keys="keys/group")
    return {"client": client, "data": data, "model": client_model, "train": train}


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
    )
    options = {name: getattr(args, name) for name in names}
    if options["clients"] is None:
        options["clients"] = default_clients(options["topology"])
    return options


def default_clients(topology: str) -> int:
    """Parties a topology needs to show what it does: two where it is about several."""
    return 2 if topology in MULTI_PARTY else 1


@dataclass(frozen=True)
class Plan:
    """Every worker's config tables, before keys and files: what init and provision share."""

    server: Table
    relay: Table | None
    clients: list[Table]


def check_options(topology: str, clients: int, dataset: str, label_client: bool) -> None:
    if topology not in TOPOLOGIES:
        raise ConfigError(f"--topology {topology!r} is unknown; choose one of {list(TOPOLOGIES)}")
    if dataset not in DATASETS:
        raise ConfigError(f"--dataset {dataset!r} is unknown; choose one of {sorted(DATASETS)}")
    if clients < 1 or (topology in ("vertical", "multitask") and clients < 2):
        raise ConfigError(
            f"--clients must be at least {2 if topology in ('vertical', 'multitask') else 1}"
        )
    if topology == "multitask" and dataset != "digits":
        raise ConfigError("--topology multitask runs on --dataset digits (tasks: digit, parity)")
    if label_client and topology != "vertical":
        raise ConfigError("--label-client applies to --topology vertical only")


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
) -> Plan:
    """The configs of a server, its clients ``names`` and (multihop) a relay at
    ``relay = (bind, endpoint)``; clients reach the server at ``server_endpoint``."""
    check_options(topology, len(names), dataset, label_client)
    model = _model(dataset, topology, seed)
    train = {
        "epochs": epochs or DEFAULT_EPOCHS[dataset],
        "batch_size": 32,
        "lr": 0.05,
        "momentum": 0.9,
        "seed": seed,
        "wire_dtype": wire_dtype,
        "pipeline_depth": pipeline_depth,
    }
    server_section: dict[str, Any] = {
        "bind": server_bind,
        "topology": topology,
        "save": "state/server.pt",
        "run_clients": len(names),  # a run ends once every client finished its part
    }
    server: Table = {"server": server_section, "model": model, "train": train}
    if topology == "vertical" and label_client:  # the first client holds the labels
        server_section.update(parties=len(names), fuse="concat", label_holder=names[0])
    elif topology == "vertical":
        server_section.update(parties=len(names), fuse="concat")
        server["data"] = {"dataset": dataset, "seed": seed}
    if topology in ("roundrobin", "splitfed"):
        server_section["parties"] = len(names)
        server_section["group"] = list(names)
    if topology == "multitask":
        server_section.update(MULTITASK)
    endpoint = server_endpoint
    relay_cfg: Table | None = None
    if topology == "multihop":
        if relay is None:
            raise ConfigError("--topology multihop needs a relay")
        relay_cfg = {
            "relay": {
                "bind": relay[0],
                "upstream": server_endpoint,
                "name": "relay-1",
                "segment": 1,
                "save": "state/relay-1.pt",
            },
            "model": model,
            "train": train,
        }
        endpoint = relay[1]
        server_section["relays"] = ["relay-1"]  # it speaks for its clients
    client_cfgs = [
        _client(i, names, endpoint, dataset, topology, model, train, seed)
        for i in range(len(names))
    ]
    if label_client:
        client_cfgs[0]["client"]["role"] = "label"
    return Plan(server, relay_cfg, client_cfgs)


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
) -> dict[str, Any]:
    """Write DIR/server.toml, DIR/client-N.toml (and relay-1.toml, keys). Returns the paths."""
    check_options(topology, clients, dataset, label_client)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "server.toml").exists():
        raise ConfigError(f"{out / 'server.toml'} exists; choose an empty folder for init")
    port = free_port()
    relay_port = free_port() if topology == "multihop" else 0
    endpoint = f"tcp://127.0.0.1:{port}"
    relay_endpoint = f"tcp://127.0.0.1:{relay_port}"
    plan = plan_deployment(
        [f"client-{i + 1}" for i in range(clients)],
        endpoint,
        endpoint,
        (relay_endpoint, relay_endpoint) if relay_port else None,
        topology=topology,
        dataset=dataset,
        epochs=epochs,
        seed=seed,
        wire_dtype=wire_dtype,
        pipeline_depth=pipeline_depth,
        label_client=label_client,
    )
    server, relay, client_cfgs = plan.server, plan.relay, plan.clients
    # One machine: the server's state is checkpointed every step (exactly-once after a
    # crash); without fsync, as the files share the machine's fate anyway.
    server["checkpoint"] = {"dir": "state/server-checkpoints", "fsync": False}
    _secure(out, insecure, server, relay, client_cfgs, topology)
    if ops:
        for cfg in [server, *([relay] if relay else []), *client_cfgs]:
            cfg["ops"] = {"listen": f"127.0.0.1:{free_port()}"}
        write_admin_token(out / "keys" / "admin.token")
        server["ops"]["admin_token"] = "keys/admin.token"
    paths = {"server": out / "server.toml"}
    paths["server"].write_text(to_toml(server))
    if relay is not None:
        paths["relay-1"] = out / "relay-1.toml"
        paths["relay-1"].write_text(to_toml(relay))
    for i, cfg in enumerate(client_cfgs):
        paths[f"client-{i + 1}"] = out / f"client-{i + 1}.toml"
        paths[f"client-{i + 1}"].write_text(to_toml(cfg))
    return {"dir": str(out), "files": {k: str(v) for k, v in paths.items()}, "port": port}


def start_commands(files: dict[str, str]) -> list[tuple[str, str]]:
    """(site, command) to start each worker of a deployment: server, relays, clients."""
    order = sorted(files, key=lambda n: (n != "server", not n.startswith("relay"), n))
    return [(name, f"sl-pipeline {name.split('-')[0]} --config {files[name]}") for name in order]


def _secure(
    out: Path,
    insecure: bool,
    server: Table,
    relay: Table | None,
    clients: list[Table],
    topology: str,
) -> None:
    keys = out / "keys"
    keys.mkdir(parents=True, exist_ok=True)
    if topology in ("roundrobin", "vertical"):
        write_group_key(keys / "group.secret")  # shared by the clients, never by the server
    client_pubs = {}
    if not insecure or topology == "splitfed":
        client_pubs = {
            c["client"]["name"]: write_keypair(c["client"]["name"], keys)[1] for c in clients
        }
    if topology == "splitfed":  # each client gets the others' public keys, never a secret
        group = keys / "group"
        group.mkdir(exist_ok=True)
        for pub in client_pubs.values():
            (group / pub.name).write_bytes(pub.read_bytes())
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
