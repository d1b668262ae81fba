"""What the client hands back: task and worker snapshots, and task handles."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sdk.protocol import unpack_value

if TYPE_CHECKING:
    from sdk.client import Client

#: Task states; the last three are terminal.
TASK_STATES = ("queued", "assigned", "running", "succeeded", "failed", "cancelled")
TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
#: Worker states as the broker sees them.
WORKER_STATES = ("online", "draining", "lost", "offline")


@dataclass(frozen=True)
class TaskInfo:
    """A task as the broker last recorded it."""

    id: str
    name: str
    state: str
    worker_id: str | None
    attempts: int
    preferred_worker: str | None
    result: Any = None
    error: str | None = None
    error_type: str | None = None
    traceback: str | None = None
    require_worker: bool = False
    priority: int = 0
    tags: tuple[str, ...] = ()
    retries: int = 0
    #: Why the task went where it went, or why it is still waiting.
    reason: str = ""
    #: One entry per failed or lost attempt: attempt, worker_id, error_type, error.
    attempt_errors: tuple[dict[str, Any], ...] = ()
    created_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None

    @property
    def is_terminal(self) -> bool:
        """Whether the task has reached succeeded, failed or cancelled."""
        return self.state in TERMINAL_STATES

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> TaskInfo:
        """Build from the broker's task map; the result arrives packed."""
        packed = data.get("result")
        return cls(
            id=data["id"],
            name=data["name"],
            state=data["state"],
            worker_id=data.get("worker_id"),
            attempts=data.get("attempts", 0),
            preferred_worker=data.get("preferred_worker"),
            result=unpack_value(packed) if packed is not None else None,
            error=data.get("error"),
            error_type=data.get("error_type"),
            traceback=data.get("traceback"),
            require_worker=bool(data.get("require_worker", False)),
            priority=data.get("priority", 0),
            tags=tuple(data.get("tags") or ()),
            retries=data.get("retries", 0),
            reason=data.get("reason") or "",
            attempt_errors=tuple(data.get("attempt_errors") or ()),
            created_at=data.get("created_at"),
            started_at=data.get("started_at"),
            finished_at=data.get("finished_at"),
        )


@dataclass(frozen=True)
class WorkerInfo:
    """A worker as the broker sees it now."""

    id: str
    state: str
    capacity: int
    in_flight: int
    tags: tuple[str, ...] = ()
    handlers: tuple[str, ...] = ()
    pid: int = 0
    host: str = ""
    #: Seconds since the broker last heard from it.
    last_seen_s: float | None = None

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> WorkerInfo:
        """Build from the broker's worker map."""
        return cls(
            id=data["id"],
            state=data["state"],
            capacity=data.get("capacity", 0),
            in_flight=data.get("in_flight", 0),
            tags=tuple(data.get("tags") or ()),
            handlers=tuple(data.get("handlers") or ()),
            pid=data.get("pid", 0),
            host=data.get("host", ""),
            last_seen_s=data.get("last_seen_s"),
        )


@dataclass(frozen=True)
class TaskHandle:
    """A submitted task: its id and shortcuts to wait for it or look at it."""

    id: str
    client: Client = field(repr=False, compare=False)
    #: False when an earlier submit with the same key already made this task.
    created: bool = True

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the task to end and return its value; see `Client.result`."""
        return self.client.result(self.id, timeout=timeout)

    def status(self) -> TaskInfo:
        """Return the task's current record."""
        return self.client.status(self.id)
