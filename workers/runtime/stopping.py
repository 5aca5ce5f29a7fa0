"""Waits on another hop that give way to the service's stop.

A relay handling a step waits for its server (``relay.timeout_s`` per try, a rejoin, a second
try). Told to stop meanwhile, it finished that wait first: with its server gone, a minute
after SIGTERM, past a service manager's stop timeout (then SIGKILL: no final checkpoint).
The wait is abandoned instead: nothing of the step was applied yet (the relay applies its
update after the server's answer), and the refusal is the retryable ``shutting_down`` that a
stopping worker gives, so the client resends the step to whoever serves next.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

from sl_pipeline.errors import PeerError

T = TypeVar("T")


class GivesWayOnStop:
    """Mixed in before :class:`~workers.runtime.service.RouterService`."""

    stopping: asyncio.Event | None = None

    async def serve(self, stop: asyncio.Event) -> dict[str, Any]:
        self.stopping = stop
        result: dict[str, Any] = await super().serve(stop)  # type: ignore[misc]
        return result

    async def unless_stopping(self, work: Awaitable[T]) -> T:
        """``work``'s result, unless the service is told to stop first: then ``work`` is
        cancelled and a retryable ``shutting_down`` refusal raised."""
        task = asyncio.ensure_future(work)
        if self.stopping is None:
            return await task
        stopped = asyncio.ensure_future(self.stopping.wait())
        try:
            await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if task.cancelled():
            raise PeerError("shutting_down", "the relay is stopping; resend", retryable=True)
        return task.result()


__all__ = ["GivesWayOnStop"]
