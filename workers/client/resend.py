"""Sending a restarted relay the steps it lost again (:mod:`workers.runtime.resends`).

A relay that checkpoints every N > 1 steps resumes behind its client after a ``kill -9``;
its welcome says so (``applied``, ``recover = "resend"``). Right after every join the client
sends the recorded requests after ``applied`` again and drops their replies, before it
resends what it has in flight and carries on.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from sl_pipeline.config import MAX_PIPELINE_DEPTH
from sl_pipeline.errors import PeerError, SLError, TransportError
from sl_pipeline.messages import check_answers
from workers.client.link import MAX_RETRIES_PER_REQUEST, Upstream
from workers.client.patience import WAIT_CODES
from workers.runtime.resends import Step

log = logging.getLogger("sl_pipeline.client")


async def rejoined(
    link: Upstream, join: Callable[[], Awaitable[None]], last_applied: Callable[[], Step | None]
) -> None:
    """``join()``, then send again the steps a restarted relay lost (:func:`resend_lost`),
    joining afresh while the link is lost meanwhile."""
    last: SLError | None = None
    for _ in range(MAX_RETRIES_PER_REQUEST):
        await join()
        try:
            return await resend_lost(link, last_applied())
        except (TransportError, PeerError) as exc:
            if isinstance(exc, PeerError) and not exc.retryable:
                raise
            last = exc
            if isinstance(exc, PeerError) and exc.remote_code in WAIT_CODES:
                await link.wait_out(exc)  # "later": within the one window (Patience)
            else:
                link.lost(exc)
    raise TransportError(f"gave up resending the steps the relay lost (the last: {last})")


async def resend_lost(link: Upstream, last_applied: Step | None) -> None:
    """A relay that checkpoints every N > 1 steps and resumed behind this client: send
    it the recorded requests after its ``applied`` again, the same ones (nothing new is
    released), and drop the replies: this client applied those steps already."""
    depth = link.cfg.train.pipeline_depth or MAX_PIPELINE_DEPTH
    link.recorded.configure(link.welcome, depth, fresh=last_applied is None)
    lost = link.recorded.lost(link.welcome, last_applied)
    held = link.welcome.get("applied")
    if lost is None:
        log.error(
            "the %s lost steps after %s that this client applied (up to %s), and this client "
            "keeps no copy of them to resend: exactly-once needs the %s's checkpoint.dir",
            link.peer,
            held,
            last_applied,
            link.peer,
        )
    elif lost:
        log.warning(
            "the %s resumed at our step %s, behind our %s: resending the %d steps after it",
            link.peer,
            held,
            last_applied,
            len(lost),
        )
    for msg in lost or ():
        assert link.conn is not None
        await link.conn.send(msg)
        check_answers(msg, await link.reply_unless_stopped(link.conn, link.cfg.client.timeout_s))
        link.recorded.resent += 1
