"""The workers' event loop: uvloop's (libuv) where it is installed, asyncio's own otherwise.

Every message a worker sends or receives costs a few event-loop turns: a reader callback, a
future resolved, a task woken. On uvloop those turns cost less, and a small message's round
trip takes about a tenth less time and CPU than on asyncio's loop (docs/performance.md,
"The event loop"). Nothing else changes: the same asyncio APIs, protocols and signal
handling. ``SL_EVENT_LOOP=asyncio`` picks asyncio's loop (to compare, or to rule uvloop out
when something misbehaves); ``uvloop``, the default, falls back to asyncio's loop where
uvloop cannot be imported (it has no Windows build).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from sl_pipeline.errors import ConfigError

T = TypeVar("T")
ENV = "SL_EVENT_LOOP"
CHOICES = ("uvloop", "asyncio")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The factory of the loop ``SL_EVENT_LOOP`` asks for; None for asyncio's own."""
    choice = os.environ.get(ENV, "uvloop").strip().lower() or "uvloop"
    if choice not in CHOICES:
        raise ConfigError(
            f"{ENV}={os.environ[ENV]!r} is not an event loop this worker knows; "
            f"set it to one of {', '.join(CHOICES)} or unset it"
        )
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def loop_name() -> str:
    """What :func:`run` runs on: ``"uvloop"`` or ``"asyncio"`` (for reports)."""
    return "asyncio" if loop_factory() is None else "uvloop"


def running_loop() -> str:
    """The running loop's kind, ``"uvloop"`` or ``"asyncio"``, as the worker's start-up line
    says it."""
    module = type(asyncio.get_running_loop()).__module__
    return "uvloop" if module.startswith("uvloop") else "asyncio"


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on the chosen loop."""
    try:
        factory = loop_factory()
    except ConfigError:
        main.close()  # never awaited: say nothing of it
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


__all__ = ["CHOICES", "ENV", "loop_factory", "loop_name", "run", "running_loop"]
