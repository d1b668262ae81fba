"""The clients desk: checks client requests, parks waits, builds replies.

Requests that change state (submit, cancel) act on the scheduler during the
turn; every reply is built after the turn's commit, so a client never hears
of a task that is not on disk yet.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, cast

from loguru import logger

from broker.keys import KeyIndex
from broker.scheduler import Scheduler
from broker.state import OPEN_STATES, TaskState, row_to_wire
from broker.store import Store
from broker.validation import check_submit
from sdk import protocol
from sdk.errors import DecodeError
from sdk.ids import time_ordered_id
from sdk.records import TASK_STATES

#: Longest a single WAIT may be parked, in seconds.
MAX_WAIT_S = 3600.0
#: Ended tasks kept in memory for the WAIT and STATUS that usually follow.
RECENT_ENDED = 20_000
#: Results larger than this are read back from the store instead.
RECENT_RESULT_BYTES = 64 * 1024
#: Most result, error and traceback bytes the recent cache holds in all.
RECENT_BYTES = 32 * 1024 * 1024
#: Most ids in one WAIT_MANY request.
MAX_WAIT_MANY_IDS = 1000

Reply = tuple[bytes, protocol.Message]


@dataclass(order=True)
class Waiter:
    """A parked WAIT (one id) or WAIT_MANY (`many`, several ids) request."""

    deadline: float
    identity: bytes = field(compare=False)
    rid: int = field(compare=False)
    ids: list[str] = field(compare=False)
    pending: set[str] = field(compare=False)
    many: bool = field(default=False, compare=False)
    is_done: bool = field(default=False, compare=False)


class ClientDesk:
    """Handles the requests of one broker's clients endpoint."""

    def __init__(self, scheduler: Scheduler, store: Store, max_payload_bytes: int):
        self.scheduler = scheduler
        self.store = store
        self.max_payload_bytes = max_payload_bytes
        self.keys = KeyIndex(store)
        self.recent: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._recent_bytes = 0
        self.waiters: dict[str, list[Waiter]] = {}
        self._wait_heap: list[Waiter] = []
        self._reads: list[tuple[bytes, protocol.Message]] = []
        #: A RUN made a task this turn: its reply, a read, may come at once
        #: (wait 0), so the turn must commit like a SUBMIT's.
        self.ran_new_task = False

    # --- during the turn ----------------------------------------------------------

    def handle(
        self, identity: bytes, msg: protocol.Message, replies: list[Reply]
    ) -> None:
        """Act on one decoded request; replies to reads wait for `after_commit`."""
        if isinstance(msg, protocol.Wait | protocol.WaitMany | protocol.Run):
            # NaN compares false with everything: as a deadline it would
            # never come, and would hold every later wait behind it.
            if math.isnan(msg.timeout):
                logger.warning("request.refused reason=nan_timeout")
                problem = "timeout must be a number of seconds, not NaN"
                replies.append((identity, _error(msg.rid, "InvalidRequest", problem)))
                return
        if isinstance(msg, protocol.Submit):
            replies.append((identity, self._submit(msg)))
        elif isinstance(msg, protocol.SubmitMany):
            replies.append((identity, self._submit_many(msg)))
        elif isinstance(msg, protocol.Run):
            self._run(identity, msg, replies)
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
        task_id = self.keys.find(msg.key)
        if task_id is not None:
            return protocol.Ok(rid=msg.rid, data={"id": task_id, "created": False})
        task = self._accept(msg)
        return protocol.Ok(rid=msg.rid, data={"id": task.id, "created": True})

    def _run(self, identity: bytes, msg: protocol.Run, replies: list[Reply]) -> None:
        try:
            built = protocol.build(protocol.Submit, {**msg.task, "rid": msg.rid})
        except DecodeError as exc:
            replies.append((identity, _error(msg.rid, "InvalidRequest", str(exc))))
            return
        request = cast(protocol.Submit, built)
        error = self._check(request)
        if error is not None:
            replies.append((identity, error))
            return
        task_id = self.keys.find(request.key)
        if task_id is None:
            task_id = self._accept(request).id
            self.ran_new_task = True
        # Answered after the commit as a WAIT: at once if it ended, else parked.
        self._reads.append((identity, protocol.Wait(msg.rid, task_id, msg.timeout)))

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
        known = self.keys.find_many([r.key for r in requests])
        ids, created = [], []
        for request in requests:
            # A key repeated within the request made its task a moment ago.
            task_id = known.get(request.key) or self.keys.in_memory(request.key)
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

    def _accept(self, msg: protocol.Submit) -> TaskState:
        task = self.scheduler.submit(msg, time_ordered_id())
        self.keys.add(msg.key, task.id)
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

    def forget(self, task_ids: list[str], keys: list[str]) -> None:
        """Drop what memory holds of tasks pruned from the store."""
        for task_id in task_ids:
            data = self.recent.pop(task_id, None)
            if data is not None:
                self._recent_bytes -= _size(data)
        self.keys.forget(keys)

    # --- after the commit ----------------------------------------------------------

    def after_commit(
        self, ended: list[TaskState], now: float, replies: list[Reply]
    ) -> None:
        """Answer reads, wake waits for ended tasks, and expire old waits."""
        for task in ended:
            data = task.wire()
            for waiter in self.waiters.pop(task.id, []):
                waiter.pending.discard(task.id)
                if not waiter.pending:
                    waiter.is_done = True
                    replies.append((waiter.identity, self._wake(waiter, data)))
            self._remember(task.id, data)
        reads, self._reads = self._reads, []
        for identity, msg in reads:
            replies.append((identity, self._read(identity, msg, now)))
        replies[:] = [(i, m) for i, m in replies if m is not None]
        while self._wait_heap and self._wait_heap[0].deadline <= now:
            waiter = heapq.heappop(self._wait_heap)
            if waiter.is_done:
                continue
            waiter.is_done = True
            for task_id in waiter.pending:
                self.waiters[task_id].remove(waiter)
                if not self.waiters[task_id]:
                    del self.waiters[task_id]
            replies.append((waiter.identity, self._wake(waiter, None)))

    def _remember(self, task_id: str, data: dict[str, Any]) -> None:
        size = _size(data)
        if size > RECENT_RESULT_BYTES:
            return
        self.recent[task_id] = data
        self._recent_bytes += size
        while len(self.recent) > RECENT_ENDED or self._recent_bytes > RECENT_BYTES:
            _, old = self.recent.popitem(last=False)
            self._recent_bytes -= _size(old)

    def _wake(self, waiter: Waiter, data: dict[str, Any] | None) -> protocol.Message:
        """Build the reply of a waiter that is done or out of time."""
        if not waiter.many:
            current = data if data is not None else self._task_map(waiter.ids[0])
            return _task_reply(waiter.rid, current)
        return self._many_reply(waiter.rid, waiter.ids)

    def _many_reply(self, rid: int, ids: list[str]) -> protocol.Message:
        maps: list[dict[str, Any]] = []
        budget = self.max_payload_bytes
        for task_id in ids:
            data = self._task_map(task_id)
            if data is None:
                maps.append({"id": task_id, "state": "", "missing": True})
                continue
            size = _size(data)
            if maps and size > budget:
                data = {"id": task_id, "state": data["state"], "omitted": True}
            else:
                budget -= size
            maps.append(data)
        return protocol.Ok(rid=rid, data={"tasks": maps})

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
            if msg.state is not None and msg.state not in TASK_STATES:
                known = ", ".join(TASK_STATES)
                problem = f"unknown state {msg.state[:40]!r}; one of {known}"
                return _error(rid, "InvalidRequest", problem)
            limit = max(1, min(msg.limit, protocol.MAX_LIST_LIMIT))
            if msg.state in OPEN_STATES:
                # Open tasks live in memory; their rows may lag (see _start).
                tasks = self._live_list(msg.state, msg.worker, limit)
            else:
                rows = self.store.list_tasks(msg.state, msg.worker, limit)
                tasks = [self._live_map(r["id"]) or row_to_wire(r) for r in rows]
            for task in tasks:
                task["result"] = None
            return protocol.Ok(rid=rid, data={"tasks": tasks})
        if isinstance(msg, protocol.WaitMany):
            return self._wait_many(identity, msg, now)
        task_id = cast(protocol.Status | protocol.Wait | protocol.Cancel, msg).id
        data = self._task_map(task_id)
        if data is None:
            return _error(rid, "TaskNotFound", f"no task with id {task_id!r}")
        if isinstance(msg, protocol.Wait) and data["state"] in OPEN_STATES:
            self._park(Waiter(now, identity, rid, [task_id], {task_id}), msg.timeout)
            return None
        return _task_reply(rid, data)

    def _wait_many(
        self, identity: bytes, msg: protocol.WaitMany, now: float
    ) -> protocol.Message | None:
        if not 1 <= len(msg.ids) <= MAX_WAIT_MANY_IDS:
            problem = f"WAIT_MANY takes 1 to {MAX_WAIT_MANY_IDS} ids"
            return _error(msg.rid, "InvalidRequest", problem)
        pending = set()
        for task_id in msg.ids:
            data = self._task_map(task_id)
            if data is not None and data["state"] in OPEN_STATES:
                pending.add(task_id)
        if not pending or msg.timeout <= 0:
            return self._many_reply(msg.rid, msg.ids)
        waiter = Waiter(now, identity, msg.rid, list(msg.ids), pending, many=True)
        self._park(waiter, msg.timeout)
        return None

    def _park(self, waiter: Waiter, timeout: float) -> None:
        waiter.deadline += min(max(timeout, 0.0), MAX_WAIT_S)
        for task_id in waiter.pending:
            self.waiters.setdefault(task_id, []).append(waiter)
        heapq.heappush(self._wait_heap, waiter)

    def _live_list(
        self, state: str, worker: str | None, limit: int
    ) -> list[dict[str, Any]]:
        """Return up to `limit` open tasks in `state`, newest first."""
        found = [
            t
            for t in self.scheduler.tasks.values()
            if t.state == state and (worker is None or t.worker_id == worker)
        ]
        found.sort(key=lambda t: t.seq, reverse=True)
        return [m for t in found[:limit] if (m := self._live_map(t.id)) is not None]

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


def _size(data: dict[str, Any]) -> int:
    """Roughly how many bytes a task map adds to a reply."""
    return (
        256
        + len(data.get("result") or b"")
        + len(data.get("error") or "")
        + len(data.get("traceback") or "")
    )


def _task_reply(rid: int, data: dict[str, Any] | None) -> protocol.Message:
    if data is None:
        return _error(rid, "TaskNotFound", "the task is gone")
    return protocol.Ok(rid=rid, data={"task": data})


def _error(rid: int, error_type: str, message: str) -> protocol.Error:
    return protocol.Error(rid=rid, type=error_type, message=message)
