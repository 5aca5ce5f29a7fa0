"""One live session per client name on a server: who may take a name over; and how many
names one run may hold."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from sl_pipeline.errors import LimitError, NameInUseError
from sl_pipeline.messages import Kind
from workers.runtime.peers import Peer
from workers.server.runs import Run

log = logging.getLogger("sl_pipeline.server")


def check_name_free(
    peers: Iterable[Peer],
    name: str,
    hello: dict[str, Any],
    takeover_after_s: float,
    run: Run | None,
) -> None:
    """Refuse a second live session under one name (``run``: the one the name trains in);
    a restarted client may take over."""
    live = [p for p in peers if p.name == name and p.confirmed]
    if not live or hello.get("role") == "relay":  # a restarted relay rejoins at once
        return
    silent = time.monotonic() - max(p.last_seen for p in live)
    if hello.get("takeover"):
        log.warning("%s takes over the session of its name (deliberate takeover)", name)
        return
    if silent >= takeover_after_s:
        return  # the old session is silent: presumed gone (killed, cut off)
    resume = hello.get("resume")
    newest = run.replies.newest(name, Kind.FORWARD.value) if run else None
    if resumes_within(resume, newest):
        log.warning("%s resumes from its checkpoint: replacing its old session", name)
        return
    where = f" in run {run.id}" if run else ""
    raise NameInUseError(
        f"client name {name!r} is in use: another session under it sent a message "
        f"{silent:.1f}s ago{where}. Stop the other client (or wait {takeover_after_s:g}s "
        "after it died), or start this one with --takeover to replace it"
    )


def resumes_within(resume: Any, newest: tuple[int, int] | None) -> bool:
    """Whether a hello's resume point is one this server has applied (a restarted client)."""
    if newest is None or not isinstance(resume, list) or len(resume) != 2:
        return False
    try:
        return (int(resume[0]), int(resume[1])) <= newest
    except (TypeError, ValueError):
        return False


def check_room(run: Run, client: str, max_names: int) -> None:
    """Whether ``client``, new to ``run``, may join it: a run holds ``server.max_names``
    names at most. A relay names the clients behind it, and every name a run ever held is
    in each checkpoint and ``runs.json`` (every group's step writes them): without a bound,
    one group's relay making names up grew what each step of every group cost."""
    if client not in run.members and len(run.members) >= max_names:
        raise LimitError(
            f"run {run.id} holds {len(run.members)} clients (server.max_names = {max_names}); "
            "a run takes no more: train this client in a new run ([client] run), or ask the "
            "server's operator to raise server.max_names"
        )


def finished_message(client: str, sender: str, run_id: str) -> str:
    """Why ``client``'s training message for run ``run_id``, which it finished, is refused
    (``sender`` is the peer that sent it: the client itself, or the relay it trains behind)."""
    if client != sender:
        return (
            f"{client} finished its part of run {run_id}, which {sender} still serves for its "
            f"other clients: a relay trains one run at a time; stop that run (`sl-pipeline "
            f"runs stop {run_id}`) or let it end, then start {client} again"
        )
    return (
        f"{client} finished its part of run {run_id}; start it again to train a new run, or "
        "name one with [client] run"
    )
