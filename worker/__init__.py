"""The worker side of hakobu: the `task` decorator and the `Worker` runtime."""

from __future__ import annotations

from worker.context import TaskContext
from worker.registry import task
from worker.runtime import Worker

__all__ = ["TaskContext", "Worker", "task"]
