"""Retention: when ended tasks leave the store, and the passes that prune them.

A pass deletes up to `prune_batch` tasks that succeeded, failed or were
cancelled more than `retention_s` ago, oldest first, with their notifications,
in a transaction of its own (`Store.prune`). While a pass hits that limit the
next one follows BACKLOG_INTERVAL_S later; otherwise the next pass comes
`retention_s` later, but at least MIN_IDLE_INTERVAL_S and at most
IDLE_INTERVAL_S later. So an ended task is gone about `retention_s` to
`retention_s + min(max(retention_s, 1), 10)` seconds after it ended, unless a
backlog is being worked off.

NOTE: a pass of 1000 tasks takes about 10-25 ms on a small machine, and a
broker there ends about 2,000 tasks/s; one such pass per second could not keep
up, so a backlog is worked off in passes 0.1 s apart (up to ~10,000 tasks/s,
at 10-25% of the loop's time), and the loop runs in between.

Limits:
- A broker that ends more than `prune_batch / BACKLOG_INTERVAL_S` tasks per
  second keeps a growing backlog until the load drops; raise `prune_batch`.
- The task of the newest notification is kept past its retention until a
  newer notification exists (see `Store.prune`).
"""

from __future__ import annotations

import math

from loguru import logger

from broker.store import Pruned, Store
from config.settings import BrokerSettings

#: Longest pause between two passes, in seconds.
IDLE_INTERVAL_S = 10.0
#: Shortest pause after a pass that did not hit `prune_batch`, in seconds.
MIN_IDLE_INTERVAL_S = 1.0
#: Pause after a pass that hit `prune_batch` (a backlog is left), in seconds.
BACKLOG_INTERVAL_S = 0.1


class Pruner:
    """Decide when a prune pass is due and run it on the store."""

    def __init__(self, store: Store, settings: BrokerSettings) -> None:
        self.store = store
        self.retention_s = settings.retention_s
        self.batch = settings.prune_batch
        #: Rows deleted since the broker started.
        self.tasks_pruned = 0
        self.notes_pruned = 0
        self._idle_interval_s = min(
            max(self.retention_s, MIN_IDLE_INTERVAL_S), IDLE_INTERVAL_S
        )
        self._next_at: float | None = None

    @property
    def is_enabled(self) -> bool:
        """Whether ended tasks are pruned at all (`retention_s` above 0)."""
        return self.retention_s > 0

    def due_at(self, now: float) -> float:
        """Return the monotonic time the next pass is due; inf when disabled."""
        if not self.is_enabled:
            return math.inf
        if self._next_at is None:
            # The first pass runs at once: a store kept while the broker was
            # down may hold a backlog.
            self._next_at = now
        return self._next_at

    def run(self, now: float, wall: float) -> Pruned:
        """Run one pass at monotonic `now`, wall clock `wall`; return what went."""
        if not self.is_enabled:
            return Pruned()
        cutoff = wall - self.retention_s
        pruned = self.store.prune(cutoff, self.batch)
        tasks = len(pruned.task_ids)
        is_backlog = tasks >= self.batch
        pause = BACKLOG_INTERVAL_S if is_backlog else self._idle_interval_s
        self._next_at = now + pause

        self.tasks_pruned += tasks
        self.notes_pruned += pruned.notes
        if tasks:
            logger.log(
                "INFO" if is_backlog else "DEBUG",
                "store.pruned tasks={} notifications={} cutoff={:.3f}",
                tasks,
                pruned.notes,
                cutoff,
            )
        return pruned
