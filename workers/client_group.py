"""Client side of round-robin and SplitFed: weights the server relays but cannot read."""

from __future__ import annotations

from sl_pipeline.config import resolve_path
from sl_pipeline.errors import ConfigError
from sl_pipeline.group import (
    average_from_sum,
    load_group_key,
    masked_weights,
    open_weights,
    seal_weights,
)
from sl_pipeline.messages import Kind

from .client_steps import StepRunner, parameters_to_vector, vector_to_parameters

TURN_TIMEOUT_S = 900.0


class _GroupRunner(StepRunner):
    def group_key(self) -> bytes:
        c = self.w.cfg.client
        if not c.group_key:
            raise ConfigError(
                f"{c.topology}: set client.group_key (a secret shared by the clients)"
            )
        if len(c.group) < 1 or c.name not in c.group:
            raise ConfigError(
                f"{c.topology}: client.group must list every client, this one included"
            )
        return load_group_key(resolve_path(self.w.base, c.group_key, "client.group_key"))

    def vector(self):  # type: ignore[no-untyped-def]
        return parameters_to_vector(self.bottom.parameters()).detach()

    def load_vector(self, vector) -> None:  # type: ignore[no-untyped-def]
        vector_to_parameters(vector.to(torch_float()), self.bottom.parameters())


def torch_float():  # type: ignore[no-untyped-def]
    import torch

    return torch.float32


class RoundRobinRunner(_GroupRunner):
    """Clients take turns; the weights of the client segment travel sealed with the group key."""

    async def _acquire(self, epoch: int, final: bool = False) -> None:
        key = self.group_key()
        msg = self.w.message(Kind.WEIGHTS, 0, meta={"op": "acquire", "final": final})
        reply = await self.w.request(msg, timeout_s=TURN_TIMEOUT_S)
        if "sealed" in reply.tensors:
            turn = int(reply.meta.get("turn", 0))
            self.load_vector(open_weights(key, reply.tensor("sealed"), turn))

    async def before_epoch(self, epoch: int) -> None:
        await self._acquire(epoch)

    async def after_epoch(self, epoch: int) -> None:
        await super().after_epoch(epoch)
        turn = (
            epoch * len(self.w.cfg.client.group)
            + sorted(self.w.cfg.client.group).index(self.w.cfg.client.name)
            + 1
        )
        sealed = seal_weights(self.group_key(), self.vector(), turn)
        await self.w.request(
            self.w.message(Kind.WEIGHTS, 1, meta={"op": "release"}, tensors={"sealed": sealed})
        )

    async def after_training(self) -> bool:
        self.w.epoch = self.w.cfg.train.epochs
        await self._acquire(self.w.epoch, final=True)
        return True


class SplitFedRunner(_GroupRunner):
    """Clients train in parallel; client segments are averaged after every round."""

    async def after_epoch(self, epoch: int) -> None:
        await super().after_epoch(epoch)
        c = self.w.cfg.client
        masked = masked_weights(self.group_key(), self.vector(), epoch, c.name, sorted(c.group))
        msg = self.w.message(Kind.WEIGHTS, 0, meta={"op": "average"}, tensors={"masked": masked})
        reply = await self.w.request(msg, timeout_s=TURN_TIMEOUT_S)
        parties = int(reply.meta.get("parties", len(c.group)))
        self.load_vector(average_from_sum(reply.tensor("sum"), parties))
