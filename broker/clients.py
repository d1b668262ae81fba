"""The clients desk: checks client requests, parks waits, builds replies.

Requests that change state (submit, cancel) act on the scheduler during the
turn; every reply is built after the turn's commit, so a client never hears
of a task that is not on disk yet.
"""

from __future__ import annotations

import heapq
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, cast

from loguru import logger

from broker.scheduler import Scheduler
from broker.state import TaskState, row_to_wire
from broker.store import Store
from broker.validation import check_submit
from sdk import protocol
from sdk.errors import DecodeError

#: Idempotency keys remembered in memory (older ones are looked up on disk).
KEY_CACHE_SIZE = 200_000
#: Longest a single WAIT may be parked, in seconds.
MAX_WAIT_S = 3600.0
#: Ended tasks kept in memory for the WAIT and STATUS that usually follow.
RECENT_ENDED = 20_000
#: Results larger than this are read back from the store instead.
RECENT_RESULT_BYTES = 64 * 1024

Reply = tuple[bytes, protocol.Message]


@dataclass(order=True)
class Waiter:
    """A parked WAIT request."""

    deadline: float
    identity: bytes = field(compare=False)
    rid: int = field(compare=False)
    task_id: str = field(compare=False)
    is_done: bool = field(default=False, compare=False)


class ClientDesk:
    """Handles the requests of one broker's clients endpoint."""

    def __init__(self, scheduler: Scheduler, store: Store, max_payload_bytes: int):
        self.scheduler = scheduler
        self.store = store
        self.max_payload_bytes = max_payload_bytes
        self.keys: OrderedDict[str, str] = OrderedDict()
        self.recent: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.waiters: dict[str, list[Waiter]] = {}
        self._wait_heap: list[Waiter] = []
        self._reads: list[tuple[bytes, protocol.Message]] = []

    # --- during the turn ----------------------------------------------------------

    def handle(
        self, identity: bytes, msg: protocol.Message, replies: list[Reply]
    ) -> None:
        """Act on one decoded request; replies to reads wait for `after_commit`."""
        if isinstance(msg, protocol.Submit):
            replies.append((identity, self._submit(msg)))
        elif isinstance(msg, protocol.SubmitMany):
            replies.append((identity, self._submit_many(msg)))
        elif isinstance(msg, protocol.Cancel):
            task = self.scheduler.cancel(msg.id)
            if task is not None:
                logger.info("task.cancel_requested task={}", msg.id)
            self._reads.append((identity, msg))
        else:
            self._reads.append((identity, msg))

    def _submit(self, msg: protocol.Submit) -> protocol.Message:
        error = self._check(msg)
        if error is not None:
            return error
        task_id = self._known_key(msg.key)
        if task_id is not None:
            return protocol.Ok(rid=msg.rid, data={"id": task_id, "created": False})
        task = self._accept(msg)
        return protocol.Ok(rid=msg.rid, data={"id": task.id, "created": True})

    def _submit_many(self, msg: protocol.SubmitMany) -> protocol.Message:
        requests = []
        for index, body in enumerate(msg.tasks):
            try:
                built = protocol.build(protocol.Submit, {**body, "rid": msg.rid})
            except DecodeError as exc:
                return _error(msg.rid, "InvalidRequest", f"task {index}: {exc}")
            request = cast(protocol.Submit, built)
            error = self._check(request)
            if error is not None:
                return _error(msg.rid, error.type, f"task {index}: {error.message}")
            requests.append(request)
        ids, created = [], []
        for request in requests:
            task_id = self._known_key(request.key)
            if task_id is None:
                task_id = self._accept(request).id
                created.append(True)
            else:
                created.append(False)
            ids.append(task_id)
        return protocol.Ok(rid=msg.rid, data={"ids": ids, "created": created})

    def _check(self, msg: protocol.Submit) -> protocol.Error | None:
        if len(msg.payload) > self.max_payload_bytes:
            logger.warning(
                "task.refused reason=payload_too_large bytes={}", len(msg.payload)
            )
            return protocol.Error(
                rid=msg.rid,
                type="PayloadTooLarge",
                message=f"payload is {len(msg.payload)} bytes",
                size=len(msg.payload),
                limit=self.max_payload_bytes,
            )
        problem = check_submit(msg)
        if problem is not None:
            logger.warning("task.refused reason={!r}", problem)
            return _error(msg.rid, "InvalidRequest", problem)
        return None

    def _known_key(self, key: str) -> str | None:
        task_id = self.keys.get(key)
        if task_id is None:
            task_id = self.store.task_id_for_key(key)
        return task_id

    def _accept(self, msg: protocol.Submit) -> TaskState:
        task = self.scheduler.submit(msg, uuid.uuid4().hex)
        self.keys[msg.key] = task.id
        if len(self.keys) > KEY_CACHE_SIZE:
            self.keys.popitem(last=False)
        worker = self.scheduler.workers.get(msg.preferred_worker or "")
        if worker is not None and worker.state == "unknown":
            logger.warning(
                "task.unknown_worker task={} worker={} required={}",
                task.id,
                worker.id,
                msg.require_worker,
            )
        logger.debug("task.submitted task={} name={}", task.id, task.name)
        return task

    # --- after the commit ----------------------------------------------------------

    def after_commit(
        self, ended: list[TaskState], now: float, replies: list[Reply]
    ) -> None:
        """Answer reads, wake waits for ended tasks, and expire old waits."""
        for task in ended:
            data = task.wire()
            for waiter in self.waiters.pop(task.id, []):
                waiter.is_done = True
                replies.append((waiter.identity, _task_reply(waiter.rid, data)))
            if task.result is None or len(task.result) <= RECENT_RESULT_BYTES:
                self.recent[task.id] = data
        while len(self.recent) > RECENT_ENDED:
            self.recent.popitem(last=False)
        reads, self._reads = self._reads, []
        for identity, msg in reads:
            replies.append((identity, self._read(identity, msg, now)))
        replies[:] = [(i, m) for i, m in replies if m is not None]
        while self._wait_heap and self._wait_heap[0].deadline <= now:
            waiter = heapq.heappop(self._wait_heap)
            if waiter.is_done:
                continue
            self.waiters.get(waiter.task_id, []).remove(waiter)
            current = self._task_map(waiter.task_id)
            replies.append((waiter.identity, _task_reply(waiter.rid, current)))

    @property
    def has_reads(self) -> bool:
        """Whether requests wait for replies built after the commit."""
        return bool(self._reads)

    def next_wait_deadline(self) -> float | None:
        """Return when the earliest parked wait runs out."""
        while self._wait_heap and self._wait_heap[0].is_done:
            heapq.heappop(self._wait_heap)
        return self._wait_heap[0].deadline if self._wait_heap else None

    def _read(self, identity: bytes, msg: protocol.Message, now: float) -> Any:
        rid = msg.rid  # type: ignore[attr-defined]
        if isinstance(msg, protocol.ListWorkers):
            workers = [
                w.wire(now)
                for w in self.scheduler.workers.values()
                if w.state != "unknown"
            ]
            return protocol.Ok(rid=rid, data={"workers": workers})
        if isinstance(msg, protocol.ListTasks):
            limit = max(1, min(msg.limit, 10_000))
            rows = self.store.list_tasks(msg.state, msg.worker, limit)
            tasks = [self._live_map(row["id"]) or row_to_wire(row) for row in rows]
            for task in tasks:
                task["result"] = None
            return protocol.Ok(rid=rid, data={"tasks": tasks})
        task_id = cast(protocol.Status | protocol.Wait | protocol.Cancel, msg).id
        data = self._task_map(task_id)
        if data is None:
            return _error(rid, "TaskNotFound", f"no task with id {task_id!r}")
        if isinstance(msg, protocol.Wait) and data["state"] in (
            "queued",
            "assigned",
            "running",
        ):
            timeout = min(max(msg.timeout, 0.0), MAX_WAIT_S)
            waiter = Waiter(now + timeout, identity, rid, msg.id)
            self.waiters.setdefault(msg.id, []).append(waiter)
            heapq.heappush(self._wait_heap, waiter)
            return None
        return _task_reply(rid, data)

    def _task_map(self, task_id: str) -> dict[str, Any] | None:
        live = self._live_map(task_id)
        if live is not None:
            return live
        recent = self.recent.get(task_id)
        if recent is not None:
            return recent
        row = self.store.task_row(task_id)
        return row_to_wire(row) if row is not None else None

    def _live_map(self, task_id: str) -> dict[str, Any] | None:
        task = self.scheduler.tasks.get(task_id)
        if task is None:
            return None
        data = task.wire()
        if task.state == "queued":
            data["reason"] = self.scheduler.why_waiting(task)
        return data


def _task_reply(rid: int, data: dict[str, Any] | None) -> protocol.Message:
    if data is None:
        return _error(rid, "TaskNotFound", "the task is gone")
    return protocol.Ok(rid=rid, data={"task": data})


def _error(rid: int, error_type: str, message: str) -> protocol.Error:
    return protocol.Error(rid=rid, type=error_type, message=message)
