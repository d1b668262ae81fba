"""STORED confirmations held back to travel behind the worker's next decision.

A STORED only lets a worker drop its copy of a result, so it need not wake
the worker on its own: it waits until an ASSIGN or ABORT goes to the same
worker (one wake-up for both) or until HOLD_S passed. Under load every turn
carries decisions and nothing waits; one task at a time, the worker is not
woken while the client it finished for is.
"""

from __future__ import annotations

import math

from sdk import protocol

#: Longest a STORED waits for a decision to travel with.
HOLD_S = 0.02

Send = tuple[str, protocol.Message]


class HeldConfirmations:
    """STORED messages per worker, and when the oldest must go."""

    def __init__(self, hold_s: float = HOLD_S) -> None:
        self._hold_s = hold_s
        self._held: dict[str, list[protocol.Message]] = {}
        self._due_at = math.inf

    def due_at(self) -> float:
        """Return when the oldest held STORED must go (inf when none is held)."""
        return self._due_at

    def hold(self, sends: list[Send], now: float) -> None:
        """Keep these STOREDs until `release` lets them go."""
        for worker_id, message in sends:
            self._held.setdefault(worker_id, []).append(message)
        if sends and self._due_at == math.inf:
            self._due_at = now + self._hold_s

    def release(self, decided: set[str], now: float) -> list[Send]:
        """Return the STOREDs of workers in `decided`, or all once they are due."""
        if not self._held:
            return []
        if now >= self._due_at:
            workers = list(self._held)
        else:
            workers = [w for w in decided if w in self._held]
        out: list[Send] = []
        for worker_id in workers:
            out += [(worker_id, m) for m in self._held.pop(worker_id)]
        if not self._held:
            self._due_at = math.inf
        return out
