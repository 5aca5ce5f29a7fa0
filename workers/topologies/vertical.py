"""Vertically partitioned data: each party holds different features of the same samples.

Every feature party runs its own bottom model on its columns; the server fuses their cut-layer
outputs and, unless a label client holds them, the labels. Parties first align their rows by
id (PSI) under a group secret the server never sees."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from workers.topologies.base import DATASETS, Deployment, Table, Topology, feature_slices

if TYPE_CHECKING:
    from workers.client.steps import StepRunner


class Vertical(Topology):
    name = "vertical"
    engine_kind = "fusion"
    default_clients = min_clients = 2
    label_client = True
    aligns_rows = True
    lists_group = True
    group_secret = True

    @property
    def runner(self) -> type[StepRunner]:
        from workers.client.runners import VerticalRunner

        return VerticalRunner

    def model_table(self, d: Deployment) -> dict[str, Any]:
        classes = DATASETS[d.dataset]["classes"]
        return {"builtin": "mlp", "in_shape": [0], "classes": classes, "seed": d.seed}

    def client_tables(self, i: int, d: Deployment, tables: Table) -> None:
        first, last = feature_slices(d.dataset, len(d.names))[i]
        tables["data"]["feature_slice"] = [first, last]
        tables["model"]["in_shape"] = [last - first]
        tables["client"]["role"] = "feature"

    def server_tables(self, d: Deployment, tables: Table) -> None:
        tables["server"].update(parties=len(d.names), fuse="concat")
        if d.label_client:  # the first client holds the labels
            tables["server"]["label_holder"] = d.names[0]
        else:
            tables["data"] = {"dataset": d.dataset, "seed": d.seed}


TOPOLOGY = Vertical()
