"""The context a handler receives as its second argument, and its cancel signal."""

from __future__ import annotations

import os
from typing import Protocol


class TaskCancelled(Exception):
    """A handler noticed `ctx.cancelled` and stopped early."""


class CancelFlag(Protocol):
    """Anything with `is_set()`, e.g. a multiprocessing Event."""

    def is_set(self) -> bool: ...


class TaskContext:
    """What a handler may know about the attempt it runs."""

    __slots__ = ("task_id", "attempt", "worker_id", "_flag", "_parent_pid")

    def __init__(
        self,
        task_id: str,
        attempt: int,
        worker_id: str,
        flag: CancelFlag | None = None,
        parent_pid: int | None = None,
    ) -> None:
        self.task_id = task_id
        self.attempt = attempt
        self.worker_id = worker_id
        self._flag = flag
        self._parent_pid = parent_pid

    @property
    def cancelled(self) -> bool:
        """True once the attempt was aborted, or the worker process is gone."""
        if self._flag is not None and self._flag.is_set():
            return True
        return self._parent_pid is not None and os.getppid() != self._parent_pid

    def raise_if_cancelled(self) -> None:
        """Raise TaskCancelled when the attempt was aborted."""
        if self.cancelled:
            raise TaskCancelled(f"task {self.task_id} attempt {self.attempt} cancelled")

    def __repr__(self) -> str:
        return (
            f"TaskContext(task_id={self.task_id!r}, attempt={self.attempt}, "
            f"worker_id={self.worker_id!r})"
        )
