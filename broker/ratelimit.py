"""A log gate for events that a hostile peer can repeat at will."""

from __future__ import annotations

import time


class RateLimit:
    """Let through at most `per_s` events a second; count the rest."""

    def __init__(self, per_s: float = 5.0) -> None:
        self.interval_s = 1.0 / per_s
        self.next_at = 0.0
        self.suppressed = 0

    def allow(self) -> bool:
        """Whether to log this event now; the caller reports `take_suppressed`."""
        now = time.monotonic()
        if now >= self.next_at:
            self.next_at = now + self.interval_s
            return True
        self.suppressed += 1
        return False

    def take_suppressed(self) -> int:
        """Return and reset how many events were not logged."""
        count, self.suppressed = self.suppressed, 0
        return count
