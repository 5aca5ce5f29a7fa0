"""A vertical party's side of the PSI alignment: two rounds through the server.

The server pairs each round's posts of the two parties and hands each the other's sealed
payload (see :meth:`workers.vertical.VerticalEngine._relay_psi`). The step number of a post
carries a random session number so that a server which already answered an earlier
alignment (training, then ``predict``) never answers this one from its reply cache.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable, Sequence

import torch

from sl_pipeline.config import ClientSection
from sl_pipeline.errors import ConfigError, ProtocolError
from sl_pipeline.messages import Kind, Message
from sl_pipeline.psi import PsiParty

log = logging.getLogger("sl_pipeline.client")

PSI_WAIT_S = 600.0  # the other party may start later than this one
Request = Callable[[Message, float], Awaitable[Message]]
MakeMessage = Callable[..., Message]


def psi_partner(client: ClientSection) -> str:
    """The one other vertical party (client.group lists both, this one included)."""
    others = [name for name in client.group if name != client.name]
    if client.name not in client.group or len(others) != 1:
        raise ConfigError(
            f"vertical alignment by PSI runs between two parties: set client.group to both "
            f"parties' names (this one, {client.name!r}, included); got {client.group}"
        )
    return others[0]


async def align_rows(
    ids: Sequence[str], key: bytes, client: ClientSection, request: Request, make: MakeMessage
) -> list[int]:
    """This party's rows in the intersection, in the order both parties agree on."""
    party = PsiParty(ids, key, client.name, psi_partner(client))
    session = secrets.randbelow(2**40)
    theirs = await _exchange(request, make, session, 0, party.first())
    theirs = await _exchange(request, make, session, 1, party.second(theirs))
    rows = party.result(theirs)
    log.info(
        "aligned by PSI: %d of this party's %d rows are in the intersection", len(rows), len(ids)
    )
    if not rows:
        raise ConfigError(
            "the parties share no id: check that data.id names the same identifier on both "
            "sides and that the ids are written the same way (ids compare as exact text)"
        )
    return rows


async def _exchange(
    request: Request, make: MakeMessage, session: int, round_: int, payload: bytes
) -> bytes:
    sealed = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    msg = make(
        Kind.WEIGHTS,
        session * 2 + round_,
        meta={"op": "psi", "round": round_},
        tensors={"sealed": sealed},
    )
    reply = await request(msg, PSI_WAIT_S)
    if reply.kind is not Kind.WEIGHTS or reply.meta.get("round") != round_:
        raise ProtocolError(f"PSI round {round_}: unexpected reply {reply.kind.value}")
    return reply.tensor("sealed").numpy().tobytes()
