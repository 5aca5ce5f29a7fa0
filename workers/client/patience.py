"""How long a client waits out refusals that mean "later" (pure: the link does the sleeping).

``overloaded`` (a full server, a run waiting for a place, this client's earlier run still
open) and ``name_in_use`` (a live session under its name) are answers, not faults: the
client waits and asks again, with capped exponential backoff and jitter. Whether they
answer a hello or a step, one window bounds them all: ``client.retry_for_s`` from the first
refusal, and at most :func:`max_tries` tries. (Each rejoin used to open a fresh window, so a
step refused again after every rejoin was asked for without end.) An answered request
closes the window. Past it, the client ends with the last refusal's reason and what to do.
"""

from __future__ import annotations

import math

from sl_pipeline.errors import PeerError

# Refusals that end by waiting: a full server, a run queue, a name whose old session may be dead.
WAIT_CODES = ("overloaded", "name_in_use")
FIRST_DELAY_S = 0.2
MAX_DELAY_S = 5.0
MIN_TRIES = 8
MAX_TRIES = 10_000  # with a window of days (or inf): still a bound, of 7 hours or more


def max_tries(window_s: float) -> int:
    """Tries that fit in the window at the shortest capped wait (jitter halves it), and a few
    for the short waits at the start: a count bound that never cuts a window of up to 7
    hours short."""
    if not math.isfinite(window_s):
        return MAX_TRIES
    return min(MAX_TRIES, MIN_TRIES + math.ceil(max(0.0, window_s) / (MAX_DELAY_S / 2)))


class Patience:
    """The window of one run of "later" refusals: when it began, how many came, the next
    wait. ``refused`` returns the wait before asking again, or raises once it is spent."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self.max_tries = max_tries(window_s)
        self.since: float | None = None
        self.tries = 0
        self.delay = FIRST_DELAY_S

    def refused(self, exc: PeerError, now: float, jitter: float) -> float:
        """The wait (seconds) before asking again after refusal ``exc`` at ``now``;
        ``jitter`` in [0, 1) spreads clients refused together. A ``PeerError`` (exit 4)
        with the refusal's reason and what to do once the window is spent."""
        if self.since is None:
            self.since = now
        self.tries += 1
        waited = now - self.since
        if self.tries >= self.max_tries or waited >= self.window_s:
            raise PeerError(
                exc.remote_code,
                f"{exc.reason.rstrip('.')}; still refused after {self.tries} tries in "
                f"{waited:.0f}s (client.retry_for_s = {self.window_s:g}): start this client "
                "again once that has changed, or let it wait longer with --set "
                "client.retry_for_s=SECONDS",
            )
        wait = min(self.delay * (0.5 + jitter), self.window_s - waited)  # the last try: at its end
        self.delay = min(self.delay * 2, MAX_DELAY_S)
        return wait

    def answered(self) -> None:
        """A request was answered: the next refusal starts a new window."""
        self.since, self.tries, self.delay = None, 0, FIRST_DELAY_S
