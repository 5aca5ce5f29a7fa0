"""Client side of round-robin and SplitFed: weights the server relays but cannot read."""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Mapping
from typing import Any

import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from sl_pipeline.config import resolve_path
from sl_pipeline.errors import ConfigError, CryptoError, ProtocolError
from sl_pipeline.group import load_group_key, open_weights, run_id, seal_weights
from sl_pipeline.keys import load_admitted_keys, load_keypair
from sl_pipeline.messages import Kind, Message
from sl_pipeline.secagg import MaskingKeys, average_from_sum, masked_tensor, new_nonce
from sl_pipeline.tensors import all_finite
from workers.client.host import RunnerConfig, RunnerHost
from workers.client.parties import WAITS_FOR, PartyWindow, window_s
from workers.client.steps import StepRunner

TURN_TIMEOUT_S = 900.0
log = logging.getLogger("sl_pipeline.client")
MAX_ATTEMPTS = 20  # SplitFed: aborted attempts at one round before giving up


def segment_vector(segment: torch.nn.Module) -> torch.Tensor:
    """The segment's weights as one vector in host memory, where they are sealed, masked
    and sent (``train.device = "cuda"`` keeps them on the GPU)."""
    return parameters_to_vector(segment.parameters()).detach().cpu()


def load_segment_vector(segment: torch.nn.Module, vector: torch.Tensor) -> None:
    """Weights from the wire into the segment, on the device it trains on: a parameter's
    data cannot be swapped for a tensor on another device."""
    first = next(segment.parameters())
    vector_to_parameters(vector.to(first.device, torch.float32), segment.parameters())


class _GroupRunner(StepRunner):
    def members(self) -> list[str]:
        c = self.cfg.client
        if len(c.group) < 1 or c.name not in c.group:
            raise ConfigError(
                f"{c.topology}: client.group must list every client, this one included"
            )
        return sorted(c.group)

    def vector(self) -> torch.Tensor:
        return segment_vector(self.bottom)

    def load_vector(self, vector: torch.Tensor) -> None:
        load_segment_vector(self.bottom, vector)

    def resumed_mid_epoch(self, epoch: int) -> bool:
        """True when this epoch's steps restart from a checkpoint, past its first step:
        the weights restored are newer than any the group handed over."""
        return self.host.start[0] == epoch and self.host.start[1] > 0


class RoundRobinRunner(_GroupRunner):
    """Clients take turns; the weights of the client segment travel sealed with the group
    key, bound to this run and to the turn, which this client computes itself."""

    def __init__(self, worker: RunnerHost, cfg: RunnerConfig) -> None:
        super().__init__(worker, cfg)
        self.run_nonce = secrets.token_hex(32)  # fresh per run; kept in the checkpoint
        self.run: bytes | None = None

    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), "run_nonce": self.run_nonce}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        self.run_nonce = str(state.get("run_nonce", self.run_nonce))

    def group_key(self) -> bytes:
        c = self.cfg.client
        if not c.group_key:
            raise ConfigError("roundrobin: set client.group_key (a secret shared by the clients)")
        return load_group_key(resolve_path(self.host.base, c.group_key, "client.group_key"))

    def expected_turn(self, epoch: int) -> int:
        """Turns completed before this client's turn in ``epoch`` (all of them at the end)."""
        members = self.members()
        if epoch >= self.cfg.train.epochs:
            return self.cfg.train.epochs * len(members)
        return epoch * len(members) + members.index(self.cfg.client.name)

    def _run_of(self, grant: Message) -> bytes:
        nonces = grant.meta.get("run")
        if not isinstance(nonces, Mapping) or sorted(nonces) != self.members():
            raise ProtocolError("roundrobin: the grant does not name this group's run")
        if nonces[self.cfg.client.name] != self.run_nonce:
            raise CryptoError("roundrobin: the grant is for another run of this client")
        run = run_id({str(k): str(v) for k, v in nonces.items()})
        if self.run is not None and run != self.run:
            raise CryptoError("roundrobin: the server changed this run's members mid-run")
        self.run = run
        return run

    async def _acquire(self, epoch: int, final: bool = False) -> None:
        key, expected = self.group_key(), self.expected_turn(epoch)
        meta = {"op": "acquire", "final": final, "run": self.run_nonce}
        reply = await self.host.request(
            self.host.message(Kind.WEIGHTS, 0, meta=meta), timeout_s=TURN_TIMEOUT_S
        )
        run = self._run_of(reply)
        turn = reply.meta.get("turn")
        if turn != expected:
            raise ProtocolError(
                f"roundrobin: the server granted turn {turn!r}, but this client's turn is "
                f"{expected} (a replayed or rolled-back grant); refusing it"
            )
        if expected == 0:
            if "sealed" in reply.tensors:
                raise ProtocolError("roundrobin: weights handed over before the first turn")
            return
        weights = open_weights(key, reply.tensor("sealed"), run, expected)
        if not self.resumed_mid_epoch(epoch):
            self.load_vector(weights)

    async def before_epoch(self, epoch: int) -> None:
        await self._acquire(epoch)

    async def after_epoch(self, epoch: int) -> None:
        await super().after_epoch(epoch)
        assert self.run is not None  # set by this epoch's grant
        turn = self.expected_turn(epoch) + 1
        sealed = seal_weights(self.group_key(), self.vector(), self.run, turn)
        await self.host.request(
            self.host.message(Kind.WEIGHTS, 1, meta={"op": "release"}, tensors={"sealed": sealed})
        )

    async def after_training(self) -> bool:
        self.host.epoch = self.cfg.train.epochs
        await self._acquire(self.host.epoch, final=True)
        return True


class SplitFedRunner(_GroupRunner):
    """Clients train in parallel; client segments are averaged after every round by secure
    aggregation (:mod:`sl_pipeline.secagg`): the server learns only the sum."""

    def __init__(self, worker: RunnerHost, cfg: RunnerConfig) -> None:
        super().__init__(worker, cfg)
        self.keys = self._masking_keys()
        self.max_ratio = cfg.client.max_average_ratio
        if not 1.0 <= self.max_ratio < math.inf:
            raise ConfigError(
                f"client.max_average_ratio must be a number of at least 1.0, got {self.max_ratio}"
            )
        self.poisoned_rounds = 0  # rounds whose average was refused (kept our own weights)

    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), "poisoned_rounds": self.poisoned_rounds}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        self.poisoned_rounds = int(state.get("poisoned_rounds", 0))

    def report(self) -> dict[str, Any]:
        return {**super().report(), "poisoned_rounds": self.poisoned_rounds}

    def _masking_keys(self) -> MaskingKeys:
        c = self.cfg.client
        if c.group_key:
            raise ConfigError(
                "splitfed: client.group_key is no longer used (a secret every client holds "
                "lets any client remove any mask); set client.group_keys to the folder of "
                "the clients' public keys instead (`sl-pipeline init` writes it)"
            )
        if not c.key or not c.group_keys:
            raise ConfigError(
                "splitfed: set client.key (this client's private key) and client.group_keys "
                "(the folder of the members' NAME.pub files): they make the pairwise masks, "
                "with or without --insecure"
            )
        own = load_keypair(resolve_path(self.host.base, c.key, "client.key"))
        folder = resolve_path(self.host.base, c.group_keys, "client.group_keys")
        by_name = {name: key for key, name in load_admitted_keys(folder).items()}
        missing = [n for n in self.members() if n not in by_name]
        if missing:
            raise ConfigError(f"client.group_keys = {c.group_keys!r} lacks {missing}")
        if by_name[c.name] != own.public:
            raise ConfigError(f"client.group_keys holds another key for {c.name!r} than client.key")
        peers = {n: by_name[n] for n in self.members() if n != c.name}
        return MaskingKeys(c.name, own.private, peers)

    async def after_epoch(self, epoch: int) -> None:
        await super().after_epoch(epoch)
        # One window for the round: each attempt's requests have one of their own, and a
        # server that aborts every attempt would otherwise hold the client 20 of them.
        what = f"round {epoch}'s aggregation"
        waits = window_s(self.cfg.client, "splitfed")
        window = PartyWindow(waits, what, WAITS_FOR["splitfed"])
        for _ in range(MAX_ATTEMPTS):
            summed = await window.within(self._attempt(epoch))
            if summed is not None:
                members = len(self.keys.members)  # ours, not the server's count
                self._load_average(epoch, average_from_sum(summed, members))
                return
        raise ProtocolError(f"splitfed: round {epoch} was aborted {MAX_ATTEMPTS} times")

    def _load_average(self, epoch: int, average: torch.Tensor) -> None:
        """Load the round's average unless it is implausible. Secure aggregation hides each
        update but cannot check one: a member that submits random words makes the average
        ~1e11 per weight. Such a round is refused (logged and counted) and this client keeps
        the weights it submitted; the next round tries again."""
        own = float(self.vector().norm())
        bound = self.max_ratio * max(own, 1.0)
        norm = float(average.norm()) if all_finite([average]) else math.inf
        if norm <= bound:
            self.load_vector(average)
            return
        self.poisoned_rounds += 1
        log.warning(
            "splitfed: round %d's average has norm %.3g, over %.3g (%g x this client's "
            "%.3g): a member submitted garbage; keeping this client's own weights",
            epoch,
            norm,
            bound,
            self.max_ratio,
            own,
        )

    async def _attempt(self, epoch: int) -> torch.Tensor | None:
        """One attempt at the round: join with a fresh nonce, then submit masked weights.
        Returns the sum, or None when the server asks everyone to start over."""
        nonce = new_nonce()
        # A step per attempt, from its nonce: a retry never meets an earlier cached reply.
        step = 2 * int.from_bytes(nonce[:6], "big")
        join = self.host.message(Kind.WEIGHTS, step, meta={"op": "join", "nonce": nonce.hex()})
        reply = await self.host.request(join, timeout_s=TURN_TIMEOUT_S)
        if reply.meta.get("op") == "sum":
            self._check_sum_without_submit(epoch)
            return self._sum_of(reply)
        nonces = _announced_nonces(reply, self.cfg.client.name, nonce)
        words = self.keys.masked(self.vector(), epoch, nonces)
        meta = {"op": "submit", "attempt": str(reply.meta.get("attempt"))}
        msg = self.host.message(
            Kind.WEIGHTS, step + 1, meta=meta, tensors={"masked": masked_tensor(words)}
        )
        reply = await self.host.request(msg, timeout_s=TURN_TIMEOUT_S)
        return self._sum_of(reply) if reply.meta.get("op") == "sum" else None

    def _check_sum_without_submit(self, epoch: int) -> None:
        """A sum in answer to a join is legitimate only for a client that restarted inside
        that round (it submitted in its previous life). Anything else is a server forging a
        round: with made-up sums it could steer the others' segments and read one client's
        weights out of the next real sum."""
        if not (self.host.resumed_from > 0 and epoch == self.host.start[0]):
            raise ProtocolError(
                f"splitfed: the server answered this client's join of round {epoch} with a sum "
                "although this client never submitted to it; refusing it"
            )

    def _sum_of(self, reply: Message) -> torch.Tensor:
        summed = reply.tensor("sum")
        if summed.dtype != torch.int64 or summed.shape != self.vector().shape:
            raise ProtocolError("splitfed: the server's sum is not one int64 word per weight")
        return summed


def _announced_nonces(reply: Message, me: str, nonce: bytes) -> dict[str, bytes]:
    if reply.meta.get("op") != "members" or not isinstance(reply.meta.get("nonces"), Mapping):
        raise ProtocolError(f"splitfed: expected the round's members, got {reply.meta.get('op')!r}")
    try:
        nonces = {str(k): bytes.fromhex(str(v)) for k, v in reply.meta["nonces"].items()}
    except ValueError:
        raise ProtocolError("splitfed: the announced nonces are not hex") from None
    if nonces.get(me) != nonce:
        raise CryptoError("splitfed: the announcement does not carry this attempt's nonce")
    return nonces
