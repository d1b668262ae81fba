"""The deadlines of a graceful stop: grace for handlers, then a short flush.

A drain that starts at t ends by t + grace_s + FLUSH_S at the latest, broker
or not: handlers get grace_s, unconfirmed results get what is left of FLUSH_S,
and CLOSE_RESERVE_S of it is kept for BYE, the socket linger and the children.
"""

from __future__ import annotations

#: Seconds a draining worker waits for STORED once nothing runs.
FLUSH_S = 2.0
#: Seconds kept, out of grace_s + FLUSH_S, for BYE, closing and child shutdown.
CLOSE_RESERVE_S = 0.8
#: Longest linger of the final BYE, in seconds.
BYE_LINGER_S = 0.5


class Drain:
    """When handlers must be done, and when the worker must be gone."""

    def __init__(self, now: float, grace_s: float) -> None:
        self.started_at = now
        self.grace_end_at = now + grace_s
        self.exit_by_at = self.grace_end_at + FLUSH_S
        self.flush_until_at: float | None = None

    def force(self, now: float) -> None:
        """End the grace now (a second signal)."""
        self.grace_end_at = min(self.grace_end_at, now)

    def is_grace_over(self, now: float) -> bool:
        return now >= self.grace_end_at

    def start_flush(self, now: float) -> float:
        """Start waiting for STORED (once); return until when."""
        if self.flush_until_at is None:
            self.flush_until_at = min(now + FLUSH_S, self.exit_by_at - CLOSE_RESERVE_S)
        return self.flush_until_at

    def next_at(self, is_running: bool) -> float | None:
        """Return the next instant the drain has to act at."""
        return self.grace_end_at if is_running else self.flush_until_at

    def linger_ms(self, now: float) -> int:
        """Return how long the last BYE may linger without passing the deadline."""
        return int(min(BYE_LINGER_S, max(0.0, self.exit_by_at - now - 0.1)) * 1000)
