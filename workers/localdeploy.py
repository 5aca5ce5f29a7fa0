"""`sl-pipeline init`: write a ready-to-run local deployment (configs, keys, free ports)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from sl_pipeline.errors import ConfigError
from sl_pipeline.keys import write_keypair

DATASETS = {
    "digits": {"builtin": "cnn", "in_shape": [1, 8, 8], "classes": 10},
    "breast_cancer": {"builtin": "mlp", "in_shape": [30], "classes": 2},
}
DEFAULT_EPOCHS = {"digits": 8, "breast_cancer": 10}


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


def to_toml(data: dict[str, dict[str, Any]]) -> str:
    """Tiny TOML writer for our two-level configs (tables of scalars and lists)."""
    lines: list[str] = []
    for section, table in data.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in table.items())
        lines.append("")
    return "\n".join(lines)


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
) -> dict[str, Any]:
    """Write DIR/server.toml and DIR/client-N.toml (and keys). Returns the file paths."""
    if topology not in ("vanilla", "ushaped"):
        raise ConfigError(f"--topology {topology!r} is not available yet; use vanilla or ushaped")
    if dataset not in DATASETS:
        raise ConfigError(f"--dataset {dataset!r} is unknown; choose one of {sorted(DATASETS)}")
    if clients < 1:
        raise ConfigError("--clients must be at least 1")
    out.mkdir(parents=True, exist_ok=True)
    if (out / "server.toml").exists():
        raise ConfigError(f"{out / 'server.toml'} exists; choose an empty folder for init")
    model: dict[str, Any] = dict(DATASETS[dataset], seed=seed)
    if topology == "ushaped":
        model["cuts"] = [3, 8] if dataset == "digits" else [2, 4]
    train = {"epochs": epochs or DEFAULT_EPOCHS[dataset], "batch_size": 32, "lr": 0.05,
             "momentum": 0.9, "seed": seed}
    port = free_port()
    server: dict[str, dict[str, Any]] = {
        "server": {"bind": f"tcp://127.0.0.1:{port}", "topology": topology},
        "model": model,
        "train": train,
    }
    client_cfgs = [
        {
            "client": {"server": f"tcp://127.0.0.1:{port}", "name": f"client-{i + 1}"},
            "data": {"dataset": dataset, "shard": i, "shards": clients, "seed": seed},
            "model": model,
            "train": train,
        }
        for i in range(clients)
    ]
    if insecure:
        server["server"]["insecure"] = True
        for cfg in client_cfgs:
            cfg["client"]["insecure"] = True
    else:
        _wire_keys(out, server, client_cfgs)
    if ops:
        server["ops"] = {"listen": f"127.0.0.1:{free_port()}"}
        for cfg in client_cfgs:
            cfg["ops"] = {"listen": f"127.0.0.1:{free_port()}"}
    paths = {"server": out / "server.toml"}
    paths["server"].write_text(to_toml(server))
    for i, cfg in enumerate(client_cfgs):
        paths[f"client-{i + 1}"] = out / f"client-{i + 1}.toml"
        paths[f"client-{i + 1}"].write_text(to_toml(cfg))
    return {"dir": str(out), "files": {k: str(v) for k, v in paths.items()}, "port": port}


def _wire_keys(out: Path, server: dict[str, Any], clients: list[dict[str, Any]]) -> None:
    keys = out / "keys"
    admitted = keys / "admitted"
    admitted.mkdir(parents=True, exist_ok=True)
    write_keypair("server", keys)
    server["server"]["key"] = "keys/server.key"
    server["server"]["admitted"] = "keys/admitted"
    for cfg in clients:
        name = cfg["client"]["name"]
        _, pub = write_keypair(name, keys)
        (admitted / pub.name).write_bytes(pub.read_bytes())
        cfg["client"]["key"] = f"keys/{name}.key"
        cfg["client"]["server_key"] = "keys/server.pub"
