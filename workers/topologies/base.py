"""What defines a topology: one object the rest of the code asks, instead of comparing names.

A :class:`Topology` names the client's step runner, builds the server's engine, says what a
deployment of it needs (clients, relays, keys, datasets) and writes its part of the configs
that ``sl-pipeline init`` and ``provision`` generate. Its defaults are vanilla's: one cut,
the client sends activations and labels, the server holds the rest of the model and the loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sl_pipeline.config import ServerConfig
from sl_pipeline.topologies import OWN_FEATURES

if TYPE_CHECKING:
    from workers.client.steps import StepRunner
    from workers.server.engines import Engine

Table = dict[str, dict[str, Any]]
# The built-in datasets a generated deployment trains on, and the model each one gets.
DATASETS: dict[str, dict[str, Any]] = {
    "digits": {"builtin": "cnn", "in_shape": [1, 8, 8], "classes": 10},
    "breast_cancer": {"builtin": "mlp", "in_shape": [30], "classes": 2},
}
FEATURES = {"digits": 64, "breast_cancer": 30}


@dataclass(frozen=True)
class Deployment:
    """What a generated deployment was asked for."""

    names: list[str]  # the clients, in order
    dataset: str
    seed: int = 0
    label_client: bool = False  # the first client holds the labels


class Topology:
    name = ""
    default_clients = 1  # the parties a generated deployment has, to show what it does
    min_clients = 1
    relays = 0  # relays between the clients and the server
    datasets: tuple[str, ...] = tuple(DATASETS)  # the built-in datasets it trains on
    datasets_note = ""  # why only those, where it is not all of them
    label_client = False  # a client may hold the labels (``--label-client``)
    aligns_rows = False  # parties align their rows by id (PSI) before training
    lists_group = False  # each client's config lists the whole group
    group_secret = False  # clients share a secret key that the server never sees
    pairwise_keys = False  # clients hold each other's public keys (secure aggregation)
    engine_kind = "vanilla"  # the server's engine (a key of workers.server.engines.ENGINES)
    # The tasks of a generated deployment (multi-task: ``tasks`` and ``task_classes``).
    tasks: dict[str, Any] | None = None

    @property
    def feature_parties(self) -> bool:
        """Each party holds a different slice of the features (vertical partitioning)."""
        return self.name in OWN_FEATURES

    # Runners and engines are imported when a worker asks for one, not with the registry:
    # they load torch, which init, provision and the other light commands never need.
    @property
    def runner(self) -> type[StepRunner]:
        """The client's step, built with the worker."""
        from workers.client.steps import StepRunner

        return StepRunner

    def engine(self, cfg: ServerConfig, base: Path) -> Engine:
        """The server's engine for a config of this topology (the engines' factory builds
        the kind this topology names)."""
        from workers.server.engines import build_engine

        return build_engine(self.engine_kind, cfg, base)

    # ---- its part of a generated deployment (init, provision) ---------------------------
    def model_table(self, d: Deployment) -> dict[str, Any]:
        return dict(DATASETS[d.dataset], seed=d.seed)

    def client_tables(self, i: int, d: Deployment, tables: Table) -> None:
        """Client ``i``'s part of the data (the default: shard ``i`` of them all)."""
        tables["data"].update(shard=i, shards=len(d.names))

    def server_tables(self, d: Deployment, tables: Table) -> None:
        return None


class GroupTopology(Topology):
    """Several clients with horizontally partitioned data, who hand the client segment's
    weights to each other through the server; the server knows the group."""

    default_clients = 2
    lists_group = True

    def server_tables(self, d: Deployment, tables: Table) -> None:
        tables["server"].update(parties=len(d.names), group=list(d.names))


def feature_slices(dataset: str, parties: int) -> list[list[int]]:
    """Contiguous column ranges, one per party, of a built-in dataset's features."""
    width = FEATURES[dataset]
    bounds = [round(i * width / parties) for i in range(parties + 1)]
    return [[bounds[i], bounds[i + 1]] for i in range(parties)]
