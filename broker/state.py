"""The broker's in-memory records of live tasks, workers and notifications.

Times ending in `_at` are monotonic seconds unless the name says `wall`;
columns stored in the database use Unix seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from broker.models import ENDED_STATES
from broker.store import dump_list, load_list

#: States of a task still in the broker's hands.
OPEN_STATES = frozenset({"queued", "assigned", "running"})
TERMINAL_STATES = frozenset(ENDED_STATES)
#: Legal task moves; anything else is a bug and raises.
TRANSITIONS: frozenset[tuple[str, str]] = frozenset(
    {
        ("queued", "assigned"),
        ("queued", "running"),  # a returning worker re-adopts its attempt
        ("queued", "succeeded"),  # a lost worker's result arrives late
        ("queued", "failed"),
        ("queued", "cancelled"),
        ("assigned", "running"),
        ("assigned", "queued"),
        ("assigned", "succeeded"),
        ("assigned", "failed"),
        ("assigned", "cancelled"),
        ("running", "queued"),
        ("running", "succeeded"),
        ("running", "failed"),
        ("running", "cancelled"),
    }
)
#: Payloads up to this size stay in memory; larger ones are read back to send.
INLINE_PAYLOAD_BYTES = 64 * 1024


class IllegalTransition(RuntimeError):
    """A task was asked to make a move the state table forbids."""


@dataclass(slots=True, eq=False)
class TaskState:
    """A task that is not terminal yet (or ended during this loop turn)."""

    id: str
    name: str
    state: str
    payload: bytes | None
    created_wall: float
    seq: int
    priority: int = 0
    tags: frozenset[str] = frozenset()
    preferred_worker: str | None = None
    require_worker: bool = False
    fallback_after: float | None = None
    start_deadline_wall: float | None = None
    not_before_wall: float | None = None
    retries: int = 0
    timeout: float | None = None
    key: str | None = None
    attempts: int = 0
    failures: int = 0
    losses: int = 0
    worker_id: str | None = None
    reason: str = ""
    result: bytes | None = None
    error_type: str | None = None
    error: str | None = None
    traceback: str | None = None
    attempt_errors: list[dict[str, Any]] = field(default_factory=list)
    started_wall: float | None = None
    finished_wall: float | None = None
    #: Monotonic time the task last entered the queue (fallback clock).
    queued_at: float = 0.0
    #: Bumped whenever the task enters a queue, so stale heap entries are skipped.
    queue_version: int = 0
    #: Which queue holds it: delayed, pinned, preferred or general.
    where: str = ""
    #: The worker of the latest attempt, kept after a requeue.
    last_worker: str | None = None
    history: list[tuple[str, str, str]] = field(default_factory=list)

    def move(self, new_state: str, cause: str) -> None:
        """Change state if the table allows it; keep a short history."""
        if (self.state, new_state) not in TRANSITIONS:
            raise IllegalTransition(
                f"task {self.id}: {self.state} -> {new_state} ({cause}); "
                f"history {self.history[-6:]}"
            )
        self.history.append((self.state, new_state, cause))
        del self.history[:-12]
        self.state = new_state

    @property
    def is_open(self) -> bool:
        """Whether the task still waits or runs."""
        return self.state in OPEN_STATES

    def row(self) -> dict[str, Any]:
        """Return the full row to insert."""
        return {
            "id": self.id,
            "name": self.name,
            "state": self.state,
            "worker_id": self.worker_id,
            "attempts": self.attempts,
            "preferred_worker": self.preferred_worker,
            "require_worker": self.require_worker,
            "fallback_after": self.fallback_after,
            "start_deadline_at": self.start_deadline_wall,
            "priority": self.priority,
            "tags": dump_list(sorted(self.tags)),
            "payload": self.payload,
            "retries": self.retries,
            "timeout": self.timeout,
            "not_before": self.not_before_wall,
            "key": self.key,
            "reason": self.reason,
            "created_at": self.created_wall,
            "failures": self.failures,
            "losses": self.losses,
            "result": self.result,
            "error_type": self.error_type,
            "error": self.error,
            "traceback": self.traceback,
            "attempt_errors": dump_list(self.attempt_errors),
            "started_at": self.started_wall,
            "finished_at": self.finished_wall,
        }

    def wire(self) -> dict[str, Any]:
        """Return the task map clients receive."""
        return {
            "id": self.id,
            "name": self.name,
            "state": self.state,
            "worker_id": self.worker_id,
            "attempts": self.attempts,
            "preferred_worker": self.preferred_worker,
            "require_worker": self.require_worker,
            "priority": self.priority,
            "tags": sorted(self.tags),
            "retries": self.retries,
            "result": self.result,
            "error_type": self.error_type,
            "error": self.error,
            "traceback": self.traceback,
            "reason": self.reason,
            "attempt_errors": self.attempt_errors,
            "created_at": self.created_wall,
            "started_at": self.started_wall,
            "finished_at": self.finished_wall,
        }

    @classmethod
    def from_row(cls, row: dict[str, Any], seq: int, now: float) -> TaskState:
        """Rebuild a live task from its row after a restart."""
        payload = bytes(row["payload"])
        return cls(
            id=row["id"],
            name=row["name"],
            state=row["state"],
            payload=payload if len(payload) <= INLINE_PAYLOAD_BYTES else None,
            created_wall=row["created_at"],
            seq=seq,
            priority=row["priority"],
            tags=frozenset(load_list(row["tags"])),
            preferred_worker=row["preferred_worker"],
            require_worker=bool(row["require_worker"]),
            fallback_after=row["fallback_after"],
            start_deadline_wall=row["start_deadline_at"],
            not_before_wall=row["not_before"],
            retries=row["retries"],
            timeout=row["timeout"],
            key=row["key"],
            attempts=row["attempts"],
            failures=row["failures"],
            losses=row["losses"],
            worker_id=row["worker_id"],
            reason=row["reason"] or "",
            error_type=row["error_type"],
            error=row["error"],
            traceback=row["traceback"],
            attempt_errors=load_list(row["attempt_errors"]),
            started_wall=row["started_at"],
            queued_at=now,
        )


def row_to_wire(row: dict[str, Any]) -> dict[str, Any]:
    """Return the client task map for a stored row."""
    result = row.get("result")
    return {
        "id": row["id"],
        "name": row["name"],
        "state": row["state"],
        "worker_id": row["worker_id"],
        "attempts": row["attempts"],
        "preferred_worker": row["preferred_worker"],
        "require_worker": bool(row["require_worker"]),
        "priority": row["priority"],
        "tags": load_list(row["tags"]),
        "retries": row["retries"],
        "result": bytes(result) if result is not None else None,
        "error_type": row["error_type"],
        "error": row["error"],
        "traceback": row["traceback"],
        "reason": row["reason"] or "",
        "attempt_errors": load_list(row["attempt_errors"]),
        "created_at": row["created_at"],
        "started_at": row["started_at"],
        "finished_at": row["finished_at"],
    }


@dataclass(slots=True, eq=False)
class WorkerState:
    """A worker id the broker knows, connected or not."""

    id: str
    state: str = "unknown"
    session: str | None = None
    capacity: int = 0
    tags: frozenset[str] = frozenset()
    handlers: frozenset[str] = frozenset()
    pid: int = 0
    host: str = ""
    #: (task id, attempt) pairs occupying a slot on this worker.
    held: set[tuple[str, int]] = field(default_factory=set)
    last_heard_at: float = 0.0
    #: Monotonic time it stopped being assignable; None while it is.
    unavailable_since: float | None = 0.0
    idle_since: float = 0.0
    #: True after a send found no route to it; cleared when it speaks again.
    is_unroutable: bool = False
    #: True after it was told to RECONNECT; cleared by its next READY.
    is_awaiting_ready: bool = False
    first_seen_wall: float = 0.0
    last_seen_wall: float = 0.0
    #: Sessions this id had before, now replaced; they are told to stop.
    old_sessions: set[str] = field(default_factory=set)
    #: Monotonic deadline for a worker recovered from the store to re-register.
    recovery_deadline: float | None = None
    #: Monotonic time until which silence does not make it lost: a stale
    #: process with its id took its connection (see Scheduler.stale_session).
    reconnect_grace_until: float = 0.0

    @property
    def is_assignable(self) -> bool:
        """Whether new work may go to it now."""
        return (
            self.state == "online"
            and not self.is_unroutable
            and not self.is_awaiting_ready
            and len(self.held) < self.capacity
        )

    @property
    def free(self) -> int:
        """Free slots."""
        return max(0, self.capacity - len(self.held))

    def row(self) -> dict[str, Any]:
        """Return the row to upsert."""
        return {
            "id": self.id,
            "state": self.state,
            "session": self.session,
            "capacity": self.capacity,
            "tags": dump_list(sorted(self.tags)),
            "handlers": dump_list(sorted(self.handlers)),
            "pid": self.pid,
            "host": self.host,
            "first_seen_at": self.first_seen_wall,
            "last_seen_at": self.last_seen_wall,
        }

    def wire(self, now: float) -> dict[str, Any]:
        """Return the worker map clients receive."""
        return {
            "id": self.id,
            "state": self.state,
            "capacity": self.capacity,
            "in_flight": len(self.held),
            "tags": sorted(self.tags),
            "handlers": sorted(self.handlers),
            "pid": self.pid,
            "host": self.host,
            "last_seen_s": round(now - self.last_heard_at, 3)
            if self.last_heard_at
            else None,
        }


@dataclass(slots=True, eq=False)
class Note:
    """An unacknowledged worker_notifications row and its resend schedule."""

    id: int
    worker_id: str
    kind: str
    task_id: str
    attempt: int
    sends: int
    next_send_at: float
    reason: str = ""
