"""Where queued tasks wait: pinned and preferred heaps per worker, shared
buckets per (task name, tags), and a heap of tasks not yet due.

Order within every heap is priority with ageing: a task's key is
`created / priority_aging_s - priority`, so waiting `priority_aging_s` seconds
counts as much as one priority level. The key never changes while a task
waits, so the heaps stay valid, and a low-priority task overtakes any later
arrival once it has waited long enough (no starvation). Entries are removed
lazily: each carries the task's `queue_version` at push time and is skipped
when the task has moved since.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator

from broker.state import TaskState, WorkerState

Entry = tuple[float, int, int, TaskState]
BucketKey = tuple[str, frozenset[str]]


class Queues:
    """Every queued task, indexed by who may take it."""

    def __init__(self, priority_aging_s: float) -> None:
        self.priority_aging_s = priority_aging_s
        self.pinned: dict[str, list[Entry]] = {}
        self.preferred: dict[str, list[Entry]] = {}
        self.general: dict[BucketKey, list[Entry]] = {}
        self.delayed: list[tuple[float, int, int, TaskState]] = []

    def push(self, task: TaskState, wall: float) -> None:
        """Queue a task where its preference, tags and due time put it."""
        task.queue_version += 1
        if task.not_before_wall is not None and task.not_before_wall > wall:
            entry = (task.not_before_wall, task.seq, task.queue_version, task)
            heapq.heappush(self.delayed, entry)
            task.where = "delayed"
        elif task.preferred_worker and task.require_worker:
            self._push(self.pinned.setdefault(task.preferred_worker, []), task)
            task.where = "pinned"
        elif task.preferred_worker:
            self._push(self.preferred.setdefault(task.preferred_worker, []), task)
            task.where = "preferred"
        else:
            self.push_general(task)

    def push_general(self, task: TaskState) -> None:
        """Queue a task for any eligible worker."""
        task.queue_version += 1
        key = (task.name, task.tags)
        self._push(self.general.setdefault(key, []), task)
        task.where = "general"

    def pop_due(self, wall: float) -> Iterator[TaskState]:
        """Yield delayed tasks whose time has come."""
        while self.delayed and self.delayed[0][0] <= wall:
            _, _, version, task = heapq.heappop(self.delayed)
            if version == task.queue_version and task.state == "queued":
                yield task

    def pick(self, worker: WorkerState) -> tuple[TaskState, str] | None:
        """Pop the task this worker should run next, with where it came from."""
        best: tuple[Entry, list[Entry], str] | None = None
        for heap, source in self._sources(worker):
            head = _head(heap)
            if head is not None and (best is None or head < best[0]):
                best = (head, heap, source)
        if best is None:
            return None
        heapq.heappop(best[1])
        return best[0][3], best[2]

    def preferring(self, worker_id: str) -> list[TaskState]:
        """Return the live tasks that prefer (not require) this worker."""
        heap = self.preferred.get(worker_id, [])
        return [e[3] for e in heap if _live(e)]

    def _sources(self, worker: WorkerState) -> Iterator[tuple[list[Entry], str]]:
        heap = self.pinned.get(worker.id)
        if heap:
            yield heap, "pinned"
        heap = self.preferred.get(worker.id)
        if heap:
            yield heap, "preferred"
        empty = []
        for key, heap in self.general.items():
            name, tags = key
            if not heap:
                empty.append(key)
            elif name in worker.handlers and tags <= worker.tags:
                yield heap, "tags" if tags else "general"
        for key in empty:
            del self.general[key]

    def _push(self, heap: list[Entry], task: TaskState) -> None:
        key = task.created_wall / self.priority_aging_s - task.priority
        heapq.heappush(heap, (key, task.seq, task.queue_version, task))


def _live(entry: Entry) -> bool:
    task = entry[3]
    return entry[2] == task.queue_version and task.state == "queued"


def _head(heap: list[Entry]) -> Entry | None:
    while heap and not _live(heap[0]):
        heapq.heappop(heap)
    return heap[0] if heap else None
