"""`sl-pipeline provision project.toml --out DIR`: one start kit per site, as NVFlare does.

Each site (the server, every client, the relay, and the operator's admin kit) gets a folder
holding its own private key and nothing of anybody else's: the public keys of the peers it
talks to, its config and a start script. A site given an ``ops_port`` also holds
``keys/metrics.token``, a token of its own that its /metrics asks for: the site's Prometheus
sends that file (the operator's admin kit holds a copy of the server's), and
``keys/status.token``, the token /status asks for before it names peers ([ops]
status_token_file; the admin kit holds the server's too). Copy each folder to
its machine; nothing else moves.
``init`` stays the one-machine shortcut (every key in one folder).

A project file::

    [project]
    name = "hospital-study"
    topology = "vanilla"          # any --topology of init
    dataset = "digits"            # the built-in data; a client's [client.data] overrides it
    epochs = 8

    [server]
    host = "10.0.0.10"            # the address clients reach it at
    port = 5555
    ops_port = 9100               # 0: no ops port (no metrics, no run API)

    [[client]]
    name = "site-a"
    host = "10.0.0.11"
    ops_port = 9100

    [[relay]]                     # multihop only
    name = "relay-1"
    host = "10.0.0.12"
    port = 5556
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sl_pipeline.config import ServerSection, from_mapping, read_toml
from sl_pipeline.errors import ConfigError
from sl_pipeline.group import write_group_key
from sl_pipeline.keys import write_keypair
from workers.tools.localdeploy import (
    CLIENT_CHECKPOINT,
    DATASETS,
    METRICS_TOKEN,
    STATUS_TOKEN,
    Plan,
    Table,
    plan_deployment,
    to_toml,
    write_admin_token,
)
from workers.tools.staging import renamed, staged
from workers.topologies import REGISTRY
from workers.topologies import topology as find_topology

EXAMPLE = """# An sl-pipeline project: one kit per site (`sl-pipeline provision THIS --out kits`).
[project]
name = "study"
topology = "vanilla"          # any --topology of init
dataset = "digits"            # built-in data; a client's own: [client.data] path = "..."
epochs = 8

[server]
host = "127.0.0.1"            # the address the clients reach it at
port = 5555
ops_port = 9100               # metrics and the run API (sl-pipeline runs); 0 = none

[[client]]
name = "client-1"
host = "127.0.0.1"

[[client]]
name = "client-2"
host = "127.0.0.1"
"""
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class ProjectSection:
    name: str = "sl-pipeline"
    topology: str = "vanilla"
    dataset: str = "digits"
    epochs: int = 0  # 0: the dataset's default
    seed: int = 0
    wire_dtype: str = "float32"
    pipeline_depth: int = 1
    label_client: bool = False


@dataclass(frozen=True)
class SiteSection:
    name: str = ""
    host: str = "127.0.0.1"
    port: int = 5556
    ops_port: int = 0
    data: dict[str, Any] = field(default_factory=dict)  # a client's own [data] keys


@dataclass(frozen=True)
class ServerSite:
    host: str = "127.0.0.1"
    port: int = 5555
    ops_port: int = 9100


@dataclass(frozen=True)
class Project:
    project: ProjectSection = field(default_factory=ProjectSection)
    server: ServerSite = field(default_factory=ServerSite)
    client: list[SiteSection] = field(default_factory=list)
    relay: list[SiteSection] = field(default_factory=list)


def _check(project: Project) -> None:
    names = [c.name for c in project.client] + [r.name for r in project.relay]
    if not project.client:
        raise ConfigError("the project has no [[client]]: add one table per client site")
    if not NAME.fullmatch(project.project.name):  # it names the group of the project's sites
        raise ConfigError(
            f"project name {project.project.name!r}: use 1-64 letters, digits, '_', '.', '-'"
        )
    for kind, sites in (("client", project.client), ("relay", project.relay)):
        for index, site in enumerate(sites, 1):
            if not site.name:
                raise ConfigError(f'[[{kind}]] number {index} has no name: add name = "..."')
    _check_choices(project.project)
    _check_ports(project)
    for name in names:
        if not NAME.fullmatch(name):
            raise ConfigError(f"site name {name!r}: use 1-64 letters, digits, '_', '.', '-'")
    clash = {n for n in names if names.count(n) > 1} | ({"server", "admin"} & set(names))
    if clash:
        raise ConfigError(f"site names must be unique and not server/admin: {sorted(clash)}")
    relays = find_topology(project.project.topology).relays
    if len(project.relay) != relays:
        with_relay = [name for name, t in REGISTRY.items() if t.relays]
        raise ConfigError(
            f"a {', '.join(with_relay)} project has exactly one [[relay]]; other topologies none"
        )


def _check_choices(p: ProjectSection) -> None:
    """Named by the project's keys: init's own messages name its flags (--dataset ...)."""
    if p.topology not in REGISTRY:
        raise ConfigError(
            f"project.topology = {p.topology!r} is unknown; choose one of {list(REGISTRY)}"
        )
    if p.dataset not in DATASETS:
        raise ConfigError(
            f"project.dataset = {p.dataset!r} is unknown; choose one of {sorted(DATASETS)}"
        )


def _check_ports(project: Project) -> None:
    """Two listeners on one host and port: the second worker to start could not."""
    taken: dict[tuple[str, int], str] = {}
    server = project.server
    listeners = [("server port", server.host, server.port)]
    listeners.append(("server ops_port", server.host, server.ops_port))
    for relay in project.relay:
        listeners.append((f"relay {relay.name!r} port", relay.host, relay.port))
    for site in [*project.relay, *project.client]:
        listeners.append((f"{site.name!r} ops_port", site.host, site.ops_port))
    for what, host, port in listeners:
        if not port:
            continue
        if (host, port) in taken:
            raise ConfigError(
                f"the {what} and the {taken[host, port]} are both {host}:{port}: one of "
                "them could not start; give each listener on a host its own port"
            )
        taken[host, port] = what


def _script(role: str, config: str, site: str, host: str, metrics_token: str = "") -> str:
    scrape = (
        f"# Its /metrics answers only Authorization: Bearer <the token in {metrics_token}>:\n"
        f"# give that file to this site's Prometheus (authorization: credentials_file).\n"
    )
    return (
        "#!/bin/sh\n"
        f"# Start {role} {site!r}. Run it on {host}, where this folder was copied.\n"
        + (scrape if metrics_token else "")
        + f'cd "$(dirname "$0")" && exec sl-pipeline {role} --config {config} "$@"\n'
    )


class Kit:
    """One site's folder: its own key pair, the public keys it trusts, config, start script."""

    def __init__(self, out: Path, site: str) -> None:
        self.dir = out / site
        self.site = site
        self.keys = self.dir / "keys"
        self.keys.mkdir(parents=True, mode=0o700)

    def own_key(self) -> Path:
        return write_keypair(self.site, self.keys)[1]

    def trust(self, public: Path, folder: str = "") -> None:
        target = self.keys / folder if folder else self.keys
        target.mkdir(exist_ok=True)
        (target / public.name).write_bytes(public.read_bytes())

    def write(self, role: str, cfg: Table, host: str) -> Path:
        name = "server.toml" if role == "server" else f"{self.site}.toml"
        (self.dir / name).write_text(to_toml(cfg))
        script = self.dir / "start.sh"
        token = cfg.get("ops", {}).get("metrics_token", "")
        script.write_text(_script(role, name, self.site, host, token))
        os.chmod(script, 0o755)
        return script


def write_example(path: Path) -> Path:
    if path.exists():
        raise ConfigError(f"{path} exists; give a new file name for the example project")
    path.write_text(EXAMPLE)
    return path


def provision(project_file: Path, out: Path) -> dict[str, Any]:
    """Write one folder per site under ``out``; returns {site: start script}."""
    project = from_mapping(Project, read_toml(project_file))
    _check(project)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {str(out)!r} is not empty; provision into a new folder")
    p, srv = project.project, project.server
    relay = project.relay[0] if project.relay else None
    plan = plan_deployment(
        [c.name for c in project.client],
        f"tcp://0.0.0.0:{srv.port}",
        f"tcp://{srv.host}:{srv.port}",
        (f"tcp://0.0.0.0:{relay.port}", f"tcp://{relay.host}:{relay.port}") if relay else None,
        topology=p.topology,
        dataset=p.dataset,
        epochs=p.epochs or None,
        seed=p.seed,
        wire_dtype=p.wire_dtype,
        pipeline_depth=p.pipeline_depth,
        label_client=p.label_client,
        most_clients=None,  # any number of sites: the server's max_clients is raised to it
        group=p.name,  # its sites alone train in its runs ([server] groups)
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written beside --out, renamed into place whole: a full disk or a Ctrl-C leaves no
    # half kits folder (that the rerun would refuse as not empty).
    with staged(out, "the kits", "provision", renamed, beside=True) as stage:
        scripts = _write_kits(project, plan, stage)
    sites = {site: out / script.relative_to(stage) for site, script in scripts.items()}
    return {"dir": str(out), "sites": {k: str(v) for k, v in sites.items()}}


def _write_kits(project: Project, plan: Plan, out: Path) -> dict[str, Path]:
    srv, relay = project.server, (project.relay[0] if project.relay else None)
    server = Kit(out, "server")
    server_pub = server.own_key()
    plan.server["server"].update(key="keys/server.key", admitted="keys/admitted")
    if len(project.client) > ServerSection.max_clients:  # the rest would wait forever
        plan.server["server"]["max_clients"] = len(project.client)
    # Its state survives a crash, and on a real site a power loss too (fsync).
    plan.server["checkpoint"] = {"dir": "state/checkpoints"}
    (server.keys / "admitted").mkdir()
    kits = {c.name: Kit(out, c.name) for c in project.client}
    client_pubs = {name: kit.own_key() for name, kit in kits.items()}
    upstream, downstream, hop = server_pub, server, None
    if relay is not None and plan.relay is not None:
        hop = Kit(out, relay.name)
        relay_pub = hop.own_key()
        hop.trust(server_pub)
        server.trust(relay_pub, "admitted")
        plan.relay["relay"].update(
            name=relay.name,
            key=f"keys/{relay.name}.key",
            admitted="keys/admitted",
            upstream_key="keys/server.pub",
        )
        _ops(hop, plan.relay, relay.ops_port)
        plan.server["server"]["relays"] = [relay.name]  # it speaks for its clients
        plan.server["server"]["groups"] = {project.project.name: [relay.name]}
        upstream, downstream = relay_pub, hop
    group = out / ".group.secret"
    if plan.clients[0]["client"].get("group_key"):
        write_group_key(group)  # shared by the clients only, never by the server
    for site, cfg in zip(project.client, plan.clients, strict=True):
        downstream.trust(client_pubs[site.name], "admitted")
        _client_kit(kits[site.name], site, cfg, upstream, client_pubs, group)
    group.unlink(missing_ok=True)
    scripts = {"server": _server_kit(server, plan.server, srv, out)}
    if hop is not None and relay is not None and plan.relay is not None:
        scripts[relay.name] = hop.write("relay", plan.relay, relay.host)
    for site, cfg in zip(project.client, plan.clients, strict=True):
        scripts[site.name] = kits[site.name].write("client", cfg, site.host)
    return scripts


def _client_kit(
    kit: Kit, site: SiteSection, cfg: Table, upstream: Path, pubs: dict[str, Path], group: Path
) -> None:
    """A client site's keys and config: whom it trusts, its group secret or the group's
    public keys where its topology uses them, its own data file if it has one."""
    kit.trust(upstream)
    cfg["client"].update(key=f"keys/{site.name}.key", server_key=f"keys/{upstream.name}")
    cfg["checkpoint"] = dict(CLIENT_CHECKPOINT)  # with fsync: a site's power loss too
    if "group_key" in cfg["client"]:
        (kit.keys / "group.secret").write_bytes(group.read_bytes())
        os.chmod(kit.keys / "group.secret", 0o600)
    if "group_keys" in cfg["client"]:  # splitfed masks: every member's public key
        for pub in pubs.values():
            kit.trust(pub, "group")
    if "path" in site.data:  # the site's own file instead of the built-in data
        for key in ("dataset", "shard", "shards"):
            cfg["data"].pop(key, None)
    cfg["data"].update(site.data)
    _ops(kit, cfg, site.ops_port)


def _ops(kit: Kit, cfg: Table, port: int) -> None:
    """An ops port on every interface, its /metrics behind a token of this kit's own (a
    client's shows its training to whoever reaches the port): the site's Prometheus sends
    ``keys/metrics.token``, and no other site holds it."""
    if port:
        write_admin_token(kit.dir / METRICS_TOKEN)
        write_admin_token(kit.dir / STATUS_TOKEN)  # /status's names: for the site's operator
        cfg["ops"] = {"listen": f"0.0.0.0:{port}", "metrics_token": METRICS_TOKEN}
        cfg["ops"]["status_token_file"] = STATUS_TOKEN


def _server_kit(kit: Kit, cfg: Table, site: ServerSite, out: Path) -> Path:
    """The server's folder, and the operator's admin kit: the run API's address and token."""
    if site.ops_port:
        _ops(kit, cfg, site.ops_port)  # and the token its /metrics asks for
        write_admin_token(kit.keys / "admin.token")  # the run API's
        cfg["ops"]["admin_token"] = "keys/admin.token"
        admin = out / "admin"
        admin.mkdir(mode=0o700)
        for name in ("admin", "metrics", "status"):  # the operator's copies
            write_admin_token(admin / f"{name}.token").write_bytes(
                (kit.keys / f"{name}.token").read_bytes()
            )
        ops = {"ops": {"listen": f"{site.host}:{site.ops_port}", "admin_token": "admin.token"}}
        (admin / "admin.toml").write_text(to_toml(ops))
    return kit.write("server", cfg, site.host)


__all__ = ["Project", "provision"]
