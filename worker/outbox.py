"""What the worker owes the broker and what it already did.

`Outbox` keeps each RESULT until the broker answers STORED and says which are
due for a re-send; `RecentAttempts` remembers finished attempts so a late or
repeated ASSIGN is acknowledged but never run twice.
"""

from __future__ import annotations

from collections import OrderedDict

from sdk.protocol import Result

Key = tuple[str, int]

#: Finished attempts remembered for duplicate detection.
RECENT_ATTEMPTS = 10_000


class Outbox:
    """RESULT messages sent but not yet confirmed by STORED.

    Times passed in never go backwards (the monotonic clock), so `_sent_at`
    is kept oldest first and the loop's per-turn questions look at its head.
    """

    def __init__(self) -> None:
        self._results: dict[Key, Result] = {}
        self._sent_at: dict[Key, float] = {}

    def __len__(self) -> int:
        return len(self._results)

    def __contains__(self, key: object) -> bool:
        return key in self._results

    def keys(self) -> list[Key]:
        """Return the keys of unconfirmed results, oldest first."""
        return list(self._results)

    def add(self, result: Result, now: float) -> None:
        """Keep `result`, counted as sent at `now`."""
        key = (result.task, result.attempt)
        self._results[key] = result
        self._sent_at.pop(key, None)
        self._sent_at[key] = now

    def confirm(self, key: Key) -> bool:
        """Drop the result of `key`; return False if it was not here."""
        self._sent_at.pop(key, None)
        return self._results.pop(key, None) is not None

    def due(self, now: float, ack_timeout_s: float) -> list[Result]:
        """Return results unconfirmed for `ack_timeout_s`, marking them sent now."""
        keys = []
        for key, sent_at in self._sent_at.items():
            if now - sent_at < ack_timeout_s:
                break
            keys.append(key)
        for key in keys:
            del self._sent_at[key]
            self._sent_at[key] = now
        return [self._results[key] for key in keys]

    def everything(self, now: float) -> list[Result]:
        """Return every unconfirmed result, marking them all sent now."""
        for key in self._sent_at:
            self._sent_at[key] = now
        return list(self._results.values())

    def next_due_at(self, ack_timeout_s: float) -> float | None:
        """Return when the next re-send falls due, or None when empty."""
        for sent_at in self._sent_at.values():
            return sent_at + ack_timeout_s
        return None


class RecentAttempts:
    """A bounded memory of finished (task, attempt) pairs, oldest forgotten first."""

    def __init__(self, limit: int = RECENT_ATTEMPTS) -> None:
        self._limit = limit
        self._keys: OrderedDict[Key, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def add(self, key: Key) -> None:
        """Remember `key`, forgetting the oldest beyond the limit."""
        self._keys[key] = None
        self._keys.move_to_end(key)
        while len(self._keys) > self._limit:
            self._keys.popitem(last=False)
