"""A vertical party's side of the PSI alignment: two rounds through the server.

The server pairs each round's posts of the two parties and hands each the other's sealed
payload (see :meth:`workers.server.engines.vertical.VerticalEngine._relay_psi`). The
step number of a post carries a random session number so that a server which already
answered an earlier alignment (training, then ``predict``) never answers this one from
its reply cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch

from sl_pipeline.config import ClientConfig, ClientSection, resolve_path
from sl_pipeline.data import PartyData, Split, check_width, prepare
from sl_pipeline.errors import ConfigError, ProtocolError
from sl_pipeline.group import load_group_key
from sl_pipeline.messages import Kind, Message
from sl_pipeline.psi import PsiParty
from sl_pipeline.sources import Source, require_labels
from workers.topologies import topology

log = logging.getLogger("sl_pipeline.client")

# The other party may start much later. A wait longer than the server's silence limit
# (server.client_timeout_s, 120 s by default) would let it drop this party and its post, so
# wait 60 s at a time: the worker then rejoins and posts again, for at most
# client.wait_for_parties_s in all (workers/client/parties.py).
PSI_WAIT_S = 60.0
Request = Callable[[Message, float], Awaitable[Message]]
MakeMessage = Callable[..., Message]


def psi_key(cfg: ClientConfig, base: Path, has_ids: bool) -> bytes | None:
    """The group key sealing the PSI when this party aligns its rows by PSI, else None.

    Vertical parties with ids align by PSI unless ``data.align = "position"`` says the rows
    are already aligned; everything PSI needs is checked now, before joining the server."""
    d, c = cfg.data, cfg.client
    aligns = topology(c.topology).aligns_rows
    if d.align and not aligns:
        raise ConfigError(f"data.align applies to vertical parties; this is {c.topology}")
    if d.align == "psi" and not has_ids:
        raise ConfigError('data.align = "psi" needs data.id: the column of row ids')
    if not aligns or not has_ids or d.align == "position":
        return None
    if cfg.privacy.get("dpsgd"):
        raise ConfigError(
            "privacy.dpsgd with PSI alignment is not supported yet; align the rows "
            'beforehand and set data.align = "position"'
        )
    psi_partner(c)
    if not c.group_key:
        raise ConfigError(
            "vertical alignment by PSI seals its messages with client.group_key, a secret "
            "both parties hold and the server does not; set client.group_key"
        )
    return load_group_key(resolve_path(base, c.group_key, "client.group_key"))


def holds_labels(cfg: ClientConfig) -> bool:
    """Every client but a vertical feature party holds its rows' labels."""
    return not topology(cfg.client.topology).feature_parties or cfg.client.role == "label"


def own_view(cfg: ClientConfig, data: PartyData) -> PartyData:
    """A vertical feature party keeps no labels, even when its file has a label column."""
    if holds_labels(cfg):
        return data
    return replace(
        data,
        train=Split(data.train.x, None, data.train.ids),
        test=Split(data.test.x, None, data.test.ids),
    )


def first_data(cfg: ClientConfig, source: Source, aligned_later: bool) -> PartyData:
    """This party's split rows; no rows yet while a PSI alignment has to choose them."""
    m = cfg.model
    if cfg.train.epochs > 0 and holds_labels(cfg):
        role = "label" if cfg.client.role == "label" else cfg.client.topology
        require_labels(source, cfg.data, f"this {role} client")
    if not aligned_later:
        return own_view(cfg, prepare(source, cfg.data, m.classes, m.in_shape))
    check_width(source, cfg.data, m.in_shape)
    empty = Split(torch.empty((0, *m.in_shape)), None, torch.empty(0, dtype=torch.int64))
    return PartyData(empty, empty, list(m.in_shape), m.classes)


async def aligned_data(
    cfg: ClientConfig,
    source: Source,
    key: bytes,
    request: Request,
    make: MakeMessage,
    saved: Path | None = None,
    resuming: bool = False,
) -> tuple[PartyData, int]:
    """The rows both parties hold, in the agreed order, split and encoded; and their count.

    With checkpoints, the agreed rows are kept in ``saved`` (positions in this party's own
    file, no ids): a party resuming alone from its checkpoint reuses them, since the other
    party, mid-training, will not run a PSI again."""
    assert source.ids is not None
    rows = _saved_rows(saved, source.ids) if saved is not None and resuming else None
    if rows is None:
        rows = await align_rows(source.ids, key, cfg.client, request, make)
        if saved is not None:
            _save_rows(saved, source.ids, rows)
    else:
        log.info("resuming with the %d aligned rows saved in %s", len(rows), saved)
    m = cfg.model
    return own_view(cfg, prepare(source.take(rows), cfg.data, m.classes, m.in_shape)), len(rows)


def rows_file(cfg: ClientConfig, base: Path) -> Path | None:
    """Where a party with checkpoints keeps its aligned rows; None without checkpoints."""
    if not cfg.checkpoint.dir:
        return None
    folder = resolve_path(base, cfg.checkpoint.dir, "checkpoint.dir", must_exist=False)
    return folder / f"{cfg.client.name}.aligned.json"


def _digest(ids: Sequence[str]) -> str:
    """Which file the rows belong to: a changed file (other ids, other order) aligns again."""
    return hashlib.sha256("\x00".join(ids).encode()).hexdigest()


def _saved_rows(path: Path, ids: Sequence[str]) -> list[int] | None:
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    rows = saved.get("rows") if isinstance(saved, dict) else None
    if saved.get("ids") != _digest(ids) or not isinstance(rows, list):
        return None
    if not all(isinstance(r, int) and 0 <= r < len(ids) for r in rows):
        return None
    return rows


def _save_rows(path: Path, ids: Sequence[str], rows: list[int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"ids": _digest(ids), "rows": rows}))
    os.replace(tmp, path)  # never a half-written file after a crash


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
    sealed = reply.tensor("sealed")
    if sealed.dtype != torch.uint8 or sealed.dim() != 1:  # .numpy() fails on bfloat16
        raise ProtocolError(f"PSI round {round_}: the other party's post is no byte string")
    return sealed.numpy().tobytes()
