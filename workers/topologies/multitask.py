"""Multi-task split learning: one shared trunk at the server, one head per task; each client
trains one task (its config names it) on the same kind of input."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from workers.topologies.base import Deployment, Table, Topology

if TYPE_CHECKING:
    from workers.client.steps import StepRunner


# The tasks of a generated deployment: the digit itself, and whether it is odd.
TASKS: dict[str, Any] = {"tasks": ["digit", "parity"], "task_classes": [10, 2]}


class Multitask(Topology):
    name = "multitask"
    engine_kind = "multitask"
    default_clients = min_clients = 2
    datasets = ("digits",)
    datasets_note = " (tasks: digit, parity)"
    tasks = TASKS

    @property
    def runner(self) -> type[StepRunner]:
        from workers.client.runners import MultitaskRunner

        return MultitaskRunner

    def client_tables(self, i: int, d: Deployment, tables: Table) -> None:
        tables["data"]["task"] = TASKS["tasks"][i % len(TASKS["tasks"])]

    def server_tables(self, d: Deployment, tables: Table) -> None:
        tables["server"].update(TASKS)


TOPOLOGY = Multitask()
