"""The scheduler: the broker's decisions, as a state machine without I/O.

Events go in (submit, worker ready, ack, result, release, drain, bye, cancel,
tick); what must happen comes out in `Effects`: rows to write (a `Batch`),
messages to send to workers, tasks that ended. The server commits the batch
and only then sends, so every decision is on disk before anyone hears of it.
The clock is set by the caller each turn (`begin_turn`); nothing here reads
time, sockets or the database, except `load_payload` for large payloads.
"""

from __future__ import annotations

import heapq
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from loguru import logger

from broker.models import TASK_ABORT, TASK_ASSIGNED
from broker.queues import Queues
from broker.state import Note, TaskState, WorkerState
from broker.store import Batch, dump_list, note_message
from config.settings import BrokerSettings
from sdk import protocol

#: Longest pause between re-sends of one notification, in seconds.
MAX_RESEND_INTERVAL_S = 30.0
#: Longest delay before retrying a failed task, in seconds.
MAX_RETRY_DELAY_S = 60.0
#: Seconds between sweeps for expired workers and overdue fallbacks.
SWEEP_INTERVAL_S = 0.1


@dataclass
class Effects:
    """What one loop turn decided: writes first, then sends."""

    batch: Batch = field(default_factory=Batch)
    sends: list[tuple[str, protocol.Message]] = field(default_factory=list)
    ended: list[TaskState] = field(default_factory=list)


class Scheduler:
    """Every live task and known worker, and the rules that move them."""

    def __init__(
        self,
        settings: BrokerSettings,
        load_payload: Callable[[str], bytes],
        next_note_id: int = 1,
    ) -> None:
        self.settings = settings
        self.load_payload = load_payload
        self.tasks: dict[str, TaskState] = {}
        self.workers: dict[str, WorkerState] = {}
        self.notes: dict[int, Note] = {}
        self.assign_notes: dict[tuple[str, int], int] = {}
        self.queues = Queues(settings.priority_aging_s)
        self.now = 0.0
        self.wall = 0.0
        self.effects = Effects()
        self.next_note_id = next_note_id
        self.seq = 0
        self.is_dirty = True
        self.resends = 0
        self._note_timers: list[tuple[float, int]] = []
        self._deadlines: list[tuple[float, int, TaskState]] = []
        self._next_heartbeat_at = 0.0
        self._next_sweep_at = 0.0

    def begin_turn(
        self, now: float, wall: float, batch: Batch | None = None
    ) -> Effects:
        """Set the clock for this turn and start collecting its effects.

        `batch` continues writes an earlier turn left uncommitted.
        """
        self.now, self.wall = now, wall
        self.effects = Effects(batch=batch if batch is not None else Batch())
        return self.effects

    # --- clients -------------------------------------------------------------

    def submit(self, request: protocol.Submit, task_id: str) -> TaskState:
        """Accept a checked SUBMIT as a new queued task."""
        self.seq += 1
        task = TaskState(
            id=task_id,
            name=request.name,
            state="queued",
            payload=request.payload,
            created_wall=self.wall,
            seq=self.seq,
            priority=request.priority,
            tags=frozenset(request.tags),
            preferred_worker=request.preferred_worker,
            require_worker=request.require_worker,
            fallback_after=request.fallback_after,
            retries=request.retries,
            timeout=request.timeout,
            key=request.key,
            queued_at=self.now,
        )
        if request.delay:
            task.not_before_wall = self.wall + request.delay
        if request.start_deadline is not None:
            task.start_deadline_wall = self.wall + request.start_deadline
            entry = (task.start_deadline_wall, task.seq, task)
            heapq.heappush(self._deadlines, entry)
        if task.preferred_worker and task.preferred_worker not in self.workers:
            self.workers[task.preferred_worker] = WorkerState(
                id=task.preferred_worker, unavailable_since=self.now
            )
        self.tasks[task_id] = task
        self.effects.batch.add_task(task.row())
        self.queues.push(task, self.wall)
        self.is_dirty = True
        return task

    def cancel(self, task_id: str) -> TaskState | None:
        """Cancel a live task; None when it is not live (ended or unknown)."""
        task = self.tasks.get(task_id)
        if task is None or not task.is_open:
            return None
        if task.state != "queued" and task.worker_id:
            worker = self.workers[task.worker_id]
            self._send_abort(worker, task.id, task.attempts, "cancelled by request")
        task.error_type, task.error = "Cancelled", "cancelled by request"
        self._end(task, "cancelled", "cancel")
        return task

    # --- workers ---------------------------------------------------------------

    def session_status(self, worker_id: str, session: str) -> str:
        """Say whether a session is current ("ok"), "replaced" or "unknown"."""
        worker = self.workers.get(worker_id)
        if worker is None:
            return "unknown"
        if session in worker.old_sessions:
            return "replaced"
        if worker.session != session or worker.state not in ("online", "draining"):
            return "unknown"
        return "ok"

    def heard(self, worker_id: str, at: float) -> None:
        """Note traffic from a current session, timestamped when it was read."""
        worker = self.workers[worker_id]
        worker.last_heard_at = max(worker.last_heard_at, at)
        worker.last_seen_wall = self.wall
        if worker.is_unroutable:
            worker.is_unroutable = False
            self.is_dirty = True

    def ready(self, msg: protocol.Ready, at: float) -> None:
        """Register a worker (again) and reconcile what it holds with our view."""
        worker = self.workers.get(msg.worker_id)
        if worker is None:
            worker = self.workers[msg.worker_id] = WorkerState(id=msg.worker_id)
        if not worker.first_seen_wall:
            worker.first_seen_wall = self.wall
        same_process = worker.session == msg.s
        if not same_process and worker.state in ("online", "draining"):
            logger.warning(
                "worker.replaced worker={} old_pid={} new_pid={}",
                worker.id,
                worker.pid,
                msg.pid,
            )
        if not same_process and worker.session:
            worker.old_sessions.add(worker.session)
            self._supersede_notes(worker)
        worker.session = msg.s
        worker.state = "draining" if msg.draining else "online"
        worker.capacity = msg.capacity
        worker.tags = frozenset(msg.tags)
        worker.handlers = frozenset(msg.handlers)
        worker.pid, worker.host = msg.pid, msg.host
        worker.last_heard_at = at
        worker.last_seen_wall = self.wall
        worker.unavailable_since = self.now if msg.draining else None
        worker.is_unroutable = worker.is_awaiting_ready = False
        worker.recovery_deadline = None
        worker.reconnect_grace_until = 0.0
        held = {(str(t), int(a)) for t, a in msg.held}
        self._reconcile(worker, held, same_process)
        if not worker.held:
            worker.idle_since = self.now
        self.effects.batch.workers[worker.id] = worker.row()
        welcome = protocol.Welcome(
            s=msg.s, max_payload_bytes=self.settings.max_payload_bytes
        )
        self.effects.sends.append((worker.id, welcome))
        self.is_dirty = True
        logger.info(
            "worker.registered worker={} capacity={} tags={} held={} pid={}",
            worker.id,
            worker.capacity,
            ",".join(sorted(worker.tags)),
            len(held),
            worker.pid,
        )

    def _reconcile(
        self, worker: WorkerState, held: set[tuple[str, int]], same_process: bool
    ) -> None:
        for pair in list(worker.held - held):
            task_id, attempt = pair
            task = self.tasks.get(task_id)
            if not self._is_current(task, attempt, worker):
                worker.held.discard(pair)
                continue
            note_id = self.assign_notes.get(pair)
            if same_process and note_id in self.notes:
                self.notes[note_id].next_send_at = self.now  # never arrived: resend
                heapq.heappush(self._note_timers, (self.now, note_id))
                continue
            worker.held.discard(pair)
            self._requeue(
                task,
                "WorkerLost",
                f"worker {worker.id} restarted without attempt {attempt}",
                loss=note_id is None,
            )
        for pair in held:
            task_id, attempt = pair
            task = self.tasks.get(task_id)
            if self._is_current(task, attempt, worker):
                worker.held.add(pair)
                self._settle_assign(pair)
                if task.state == "assigned":
                    self._start(task)
            elif (
                task is not None
                and task.state == "queued"
                and task.attempts == attempt
                and task.last_worker == worker.id
            ):
                worker.held.add(pair)
                task.worker_id = worker.id
                task.reason = f"re-adopted from {worker.id} after it reconnected"
                self._start(task)
            else:
                worker.held.add(pair)
                self._send_abort(worker, task_id, attempt, "attempt superseded")

    def ack(self, worker: WorkerState, note_ids: list[int]) -> None:
        """Mark notifications delivered; an acknowledged ASSIGN means running."""
        for note_id in note_ids:
            note = self.notes.get(note_id)
            if note is None or note.worker_id != worker.id:
                logger.debug("protocol.stale_ack worker={} n={}", worker.id, note_id)
                continue
            self._processed(note)
            if note.kind != TASK_ASSIGNED:
                continue
            task = self.tasks.get(note.task_id)
            if (
                self._is_current(task, note.attempt, worker)
                and task.state == "assigned"
            ):
                self._start(task)

    def result(self, worker: WorkerState, msg: protocol.Result) -> None:
        """Take one attempt's outcome; store it if it still counts."""
        pair = (msg.task, msg.attempt)
        if pair in worker.held:
            worker.held.discard(pair)
            self.is_dirty = True
            if not worker.held:
                worker.idle_since = self.now
        self._settle_assign(pair)
        self.effects.sends.append(
            (
                worker.id,
                protocol.Stored(
                    s=worker.session or "", task=msg.task, attempt=msg.attempt
                ),
            )
        )
        task = self.tasks.get(msg.task)
        if task is None or not task.is_open:
            logger.debug("task.late_result task={} attempt={}", msg.task, msg.attempt)
            return
        current = task.attempts == msg.attempt and (
            task.worker_id == worker.id
            or (task.state == "queued" and task.last_worker == worker.id)
        )
        if not current:
            if msg.ok and task.attempts > msg.attempt:
                # An earlier attempt finished after all: the first result wins.
                if task.state != "queued" and task.worker_id:
                    other = self.workers[task.worker_id]
                    self._send_abort(other, task.id, task.attempts, "result arrived")
                task.worker_id = worker.id
                self._succeed(task, msg.value)
            return
        task.worker_id = worker.id
        if msg.ok:
            self._succeed(task, msg.value)
        elif msg.cancelled:
            self._requeue(task, "Cancelled", msg.error or "aborted on worker")
        else:
            self._failed_attempt(task, msg)

    def release(self, worker: WorkerState, msg: protocol.Release) -> None:
        """Take back an attempt the worker will not finish."""
        pair = (msg.task, msg.attempt)
        worker.held.discard(pair)
        self._settle_assign(pair)
        task = self.tasks.get(msg.task)
        if self._is_current(task, msg.attempt, worker):
            reason = f"released by {worker.id}: {msg.reason or 'no reason given'}"
            self._requeue(task, "Released", reason)
        self.is_dirty = True

    def drain(self, worker: WorkerState) -> None:
        """Assign nothing more to a worker that is shutting down."""
        if worker.state == "online":
            worker.state = "draining"
            worker.unavailable_since = self.now
            self.effects.batch.workers[worker.id] = worker.row()
            self.is_dirty = True
            logger.info(
                "worker.draining worker={} held={}", worker.id, len(worker.held)
            )

    def bye(self, worker: WorkerState) -> None:
        """A worker left cleanly; whatever it still holds goes back."""
        self._drop(worker, "offline", f"worker {worker.id} exited")
        logger.info("worker.offline worker={}", worker.id)

    def unroutable(self, worker_id: str) -> None:
        """A send found no connection for this worker."""
        worker = self.workers.get(worker_id)
        if worker is not None and not worker.is_unroutable:
            worker.is_unroutable = True
            worker.unavailable_since = worker.unavailable_since or self.now

    def stale_session(self, worker_id: str) -> None:
        """A replaced process spoke with this id, so it holds the id's
        connection now: the current process is cut off until it notices the
        silence and registers again. Give it that long before silence counts.
        """
        worker = self.workers.get(worker_id)
        if worker is not None and worker.state in ("online", "draining"):
            window = self.settings.liveness * self.settings.heartbeat_interval_s
            worker.reconnect_grace_until = self.now + 2 * window + 1.0

    def ask_ready(self, worker_id: str) -> None:
        """Stop assigning to a worker until it registers again."""
        worker = self.workers.get(worker_id)
        if worker is not None:
            worker.is_awaiting_ready = True

    # --- time ----------------------------------------------------------------------

    def tick(self, may_expire: bool) -> None:
        """Run every timer that is due: heartbeats, re-sends, delays, deadlines."""
        settings = self.settings
        if self.now >= self._next_heartbeat_at:
            self._next_heartbeat_at = self.now + settings.heartbeat_interval_s
            for worker in self.workers.values():
                if worker.session and worker.state in ("online", "draining"):
                    beat = protocol.Heartbeat(s=worker.session)
                    self.effects.sends.append((worker.id, beat))
        self._resend_due()
        for task in self.queues.pop_due(self.wall):
            task.not_before_wall = None
            self.queues.push(task, self.wall)
            self.is_dirty = True
        self._expire_start_deadlines()
        if self.now >= self._next_sweep_at:
            self._next_sweep_at = self.now + SWEEP_INTERVAL_S
            self._fall_back()
            if may_expire:
                self._expire_workers()

    def next_timer_at(self) -> float:
        """Return the monotonic time of the next timer, for the poll timeout."""
        timers = self._note_timers
        # Drop timers of notes acknowledged or rescheduled meanwhile, so they
        # never wake the loop for nothing.
        while timers:
            at, note_id = timers[0]
            note = self.notes.get(note_id)
            if note is not None and note.next_send_at == at:
                break
            heapq.heappop(timers)
        due = min(self._next_heartbeat_at, self._next_sweep_at)
        return min(due, timers[0][0]) if timers else due

    def _resend_due(self) -> None:
        settings = self.settings
        while self._note_timers and self._note_timers[0][0] <= self.now:
            at, note_id = heapq.heappop(self._note_timers)
            note = self.notes.get(note_id)
            if note is None or note.next_send_at != at:
                continue
            worker = self.workers[note.worker_id]
            task = self.tasks.get(note.task_id)
            if note.kind == TASK_ASSIGNED and not self._is_current(
                task, note.attempt, worker
            ):
                self._supersede(note)
                continue
            if not worker.session or worker.state not in ("online", "draining"):
                self._schedule_note(note, settings.ack_timeout_s)
                continue
            if note.sends >= settings.max_sends:
                self._give_up(note, worker)
                continue
            note.sends += 1
            self.resends += 1
            backoff = settings.ack_timeout_s * 2 ** (note.sends - 1)
            backoff = min(backoff, MAX_RESEND_INTERVAL_S) * random.uniform(0.8, 1.2)
            self._schedule_note(note, backoff)
            self.effects.batch.update_note(
                note.id, sends=note.sends, last_sent_at=self.wall
            )
            self.effects.sends.append((worker.id, self._note_message(note, worker)))
            logger.debug(
                "worker.resend worker={} n={} task={} sends={}",
                worker.id,
                note.id,
                note.task_id,
                note.sends,
            )

    def _give_up(self, note: Note, worker: WorkerState) -> None:
        logger.warning(
            "worker.unresponsive worker={} n={} task={} sends={}",
            worker.id,
            note.id,
            note.task_id,
            note.sends,
        )
        self._supersede(note)
        task = self.tasks.get(note.task_id)
        pair = (note.task_id, note.attempt)
        if note.kind == TASK_ASSIGNED and self._is_current(task, note.attempt, worker):
            worker.held.discard(pair)
            self._requeue(
                task,
                "WorkerUnreachable",
                f"worker {worker.id} did not acknowledge after {note.sends} sends",
            )
        worker.is_awaiting_ready = True
        reason = "unacknowledged notifications; register again"
        self.effects.sends.append(
            (worker.id, protocol.Reconnect(s=worker.session or "", reason=reason))
        )

    def _expire_start_deadlines(self) -> None:
        if self._deadlines and self._deadlines[0][0] <= self.wall:
            self.assign()  # a task that can start now is not late (deadline 0)
        while self._deadlines and self._deadlines[0][0] <= self.wall:
            _, _, task = heapq.heappop(self._deadlines)
            if task.state != "queued" or task.id not in self.tasks:
                continue
            waited = self.wall - task.created_wall
            why = self.why_waiting(task)
            task.error_type = "StartDeadline"
            task.error = f"did not start within {waited:.1f}s: {why}"
            self._end(task, "failed", "start_deadline")

    def _fall_back(self) -> None:
        for worker_id in list(self.queues.preferred):
            worker = self.workers.get(worker_id)
            if worker is None or self._is_available(worker):
                continue
            since = worker.unavailable_since or 0.0
            for task in self.queues.preferring(worker_id):
                limit = task.fallback_after
                if limit is None:
                    limit = self.settings.fallback_after_s
                away = self.now - max(since, task.queued_at)
                if away >= limit:
                    task.reason = (
                        f"preferred worker {worker_id} unavailable for {away:.1f}s "
                        f"(fallback_after {limit:g}s)"
                    )
                    self.queues.push_general(task)
                    self.is_dirty = True

    def _expire_workers(self) -> None:
        limit = self.settings.liveness * self.settings.heartbeat_interval_s
        for worker in list(self.workers.values()):
            if worker.recovery_deadline is not None:
                if self.now >= worker.recovery_deadline:
                    worker.recovery_deadline = None
                    why = "did not come back after the broker restarted"
                    self._drop(worker, "lost", f"worker {worker.id} {why}")
                    logger.warning("worker.lost worker={} reason=not_back", worker.id)
                continue
            if worker.state not in ("online", "draining"):
                continue
            if self.now < worker.reconnect_grace_until:
                continue
            silent = self.now - worker.last_heard_at
            if silent > limit:
                why = f"worker {worker.id} was lost: no heartbeat for {silent:.1f}s"
                self._drop(worker, "lost", why)
                logger.warning(
                    "worker.lost worker={} silent_s={:.2f} requeued={}",
                    worker.id,
                    silent,
                    why,
                )

    # --- assignment ------------------------------------------------------------

    def assign(self) -> int:
        """Give queued tasks to workers with free slots; return how many."""
        if not self.is_dirty:
            return 0
        self.is_dirty = False
        ready = [w for w in self.workers.values() if w.is_assignable]
        count = 0
        while ready:
            worker = max(ready, key=lambda w: (w.free, -w.idle_since))
            picked = self.queues.pick(worker)
            if picked is None:
                ready.remove(worker)
                continue
            task, source = picked
            self._assign(task, worker, source)
            count += 1
            if not worker.is_assignable:
                ready.remove(worker)
        return count

    def _assign(self, task: TaskState, worker: WorkerState, source: str) -> None:
        task.attempts += 1
        task.move("assigned", f"assign:{source}")
        task.worker_id = task.last_worker = worker.id
        task.reason = self._reason(task, worker, source)
        pair = (task.id, task.attempts)
        worker.held.add(pair)
        note = self._new_note(
            worker, TASK_ASSIGNED, task.id, task.attempts, task.reason
        )
        self.assign_notes[pair] = note.id
        self.effects.batch.update_task(
            task.id,
            state="assigned",
            worker_id=worker.id,
            attempts=task.attempts,
            reason=task.reason,
        )
        self.effects.sends.append((worker.id, self._note_message(note, worker)))
        logger.debug(
            "task.assigned task={} worker={} attempt={} via={}",
            task.id,
            worker.id,
            task.attempts,
            source,
        )

    def _reason(self, task: TaskState, worker: WorkerState, source: str) -> str:
        if source == "pinned":
            return f"pinned to {worker.id}"
        if source == "preferred":
            return f"preferred worker {worker.id}"
        load = f"least loaded: {worker.id} had {worker.free} of {worker.capacity} free"
        if task.preferred_worker:
            load = f"{task.reason}; {load}"
        if source == "tags":
            return f"tags {','.join(sorted(task.tags))} matched; {load}"
        return load

    def why_waiting(self, task: TaskState) -> str:
        """Explain why a queued task has not been assigned yet."""
        if task.where == "delayed" and task.not_before_wall:
            return f"delayed for {max(0.0, task.not_before_wall - self.wall):.1f}s more"
        if task.where in ("pinned", "preferred"):
            kind = "required" if task.where == "pinned" else "preferred"
            worker = self.workers.get(task.preferred_worker or "")
            name = task.preferred_worker
            if worker is None or worker.state == "unknown":
                return f"waiting for {kind} worker {name}, which has never connected"
            if worker.state != "online" or worker.is_awaiting_ready:
                return f"waiting for {kind} worker {name}, which is {worker.state}"
            used = f"{len(worker.held)}/{worker.capacity}"
            return f"waiting for a free slot on {kind} worker {name} ({used} busy)"
        online = [w for w in self.workers.values() if w.state == "online"]
        able = [w for w in online if task.name in w.handlers]
        if not able:
            return f"no connected worker has a handler named {task.name!r}"
        able = [w for w in able if task.tags <= w.tags]
        if not able:
            return f"no connected worker has tags {','.join(sorted(task.tags))}"
        return f"all {len(able)} eligible workers are busy"

    # --- transitions --------------------------------------------------------------

    def _start(self, task: TaskState) -> None:
        # Memory only: the row says "assigned" until the task ends, and the
        # end writes started_at (a restart treats assigned and running alike).
        task.move("running", "ack")
        task.started_wall = self.wall

    def _succeed(self, task: TaskState, value: bytes) -> None:
        task.result = value
        task.error_type = task.error = task.traceback = None
        self._end(task, "succeeded", "result")

    def _failed_attempt(self, task: TaskState, msg: protocol.Result) -> None:
        task.failures += 1
        if task.failures <= task.retries:
            delay = self.settings.retry_backoff_s * 2 ** (task.failures - 1)
            task.traceback = msg.traceback or None
            self._requeue(
                task,
                msg.error_type or "Error",
                msg.error,
                delay=min(delay, MAX_RETRY_DELAY_S),
            )
            logger.warning(
                "task.retry task={} attempt={} error_type={}",
                task.id,
                task.attempts,
                msg.error_type,
            )
            return
        self._record_error(task, msg.error_type or "Error", msg.error)
        task.traceback = msg.traceback or None
        self._end(task, "failed", "result")

    def _requeue(
        self,
        task: TaskState,
        error_type: str,
        error: str,
        loss: bool = False,
        delay: float = 0.0,
    ) -> None:
        self._record_error(task, error_type, error)
        if loss:
            task.losses += 1
            if task.losses >= self.settings.max_attempts:
                task.error = (
                    f"{error}; lost its worker {task.losses} times "
                    f"(max_attempts {self.settings.max_attempts})"
                )
                self._end(task, "failed", "max_attempts")
                return
        task.move("queued", f"requeue:{error_type}")
        task.worker_id = None
        task.queued_at = self.now
        task.not_before_wall = self.wall + delay if delay else None
        self.queues.push(task, self.wall)
        self.is_dirty = True
        self.effects.batch.update_task(
            task.id,
            state="queued",
            worker_id=None,
            failures=task.failures,
            losses=task.losses,
            not_before=task.not_before_wall,
            error_type=task.error_type,
            error=task.error,
            attempt_errors=dump_list(task.attempt_errors),
        )

    def _record_error(self, task: TaskState, error_type: str, error: str) -> None:
        task.error_type, task.error = error_type, error
        task.attempt_errors.append(
            {
                "attempt": task.attempts,
                "worker_id": task.worker_id or task.last_worker,
                "error_type": error_type,
                "error": error,
            }
        )

    def _end(self, task: TaskState, state: str, cause: str) -> None:
        task.move(state, cause)
        task.finished_wall = self.wall
        self.effects.batch.update_task(
            task.id,
            state=state,
            worker_id=task.worker_id,
            result=task.result,
            error_type=task.error_type,
            error=task.error,
            traceback=task.traceback,
            attempt_errors=dump_list(task.attempt_errors),
            failures=task.failures,
            losses=task.losses,
            reason=task.reason,
            started_at=task.started_wall,
            finished_at=self.wall,
        )
        self.effects.ended.append(task)
        level = "INFO" if state == "succeeded" else "WARNING"
        logger.log(
            level,
            "task.{} task={} name={} worker={} attempts={}",
            state,
            task.id,
            task.name,
            task.worker_id,
            task.attempts,
        )

    def _drop(self, worker: WorkerState, state: str, why: str) -> None:
        worker.state = state
        worker.unavailable_since = self.now
        for task_id, attempt in list(worker.held):
            task = self.tasks.get(task_id)
            if self._is_current(task, attempt, worker):
                # Counted even when unacknowledged: a worker that keeps
                # vanishing with the task must not get it for ever.
                error_type = "WorkerLost" if state == "lost" else "WorkerExited"
                self._requeue(task, error_type, why, loss=True)
        worker.held.clear()
        self._supersede_notes(worker)
        self.effects.batch.workers[worker.id] = worker.row()
        self.is_dirty = True

    # --- notifications -------------------------------------------------------------

    def _new_note(
        self, worker: WorkerState, kind: str, task_id: str, attempt: int, reason: str
    ) -> Note:
        note = Note(
            id=self.next_note_id,
            worker_id=worker.id,
            kind=kind,
            task_id=task_id,
            attempt=attempt,
            sends=1,
            next_send_at=0.0,
            reason=reason,
        )
        self.next_note_id += 1
        self.notes[note.id] = note
        self._schedule_note(note, self.settings.ack_timeout_s)
        self.effects.batch.add_note(
            {
                "id": note.id,
                "worker_id": worker.id,
                "notification_type": kind,
                "task_id": task_id,
                "attempt": attempt,
                "message": note_message(attempt, reason),
                "processed": 0,
                "superseded": False,
                "sends": 1,
                "created_at": self.wall,
                "last_sent_at": self.wall,
            }
        )
        return note

    def _send_abort(
        self, worker: WorkerState, task_id: str, attempt: int, reason: str
    ) -> None:
        pending = self.assign_notes.get((task_id, attempt))
        if pending is not None and pending in self.notes:
            self._supersede(self.notes[pending])
        note = self._new_note(worker, TASK_ABORT, task_id, attempt, reason)
        if worker.session and worker.state in ("online", "draining"):
            self.effects.sends.append((worker.id, self._note_message(note, worker)))

    def _note_message(self, note: Note, worker: WorkerState) -> protocol.Message:
        session = worker.session or ""
        if note.kind == TASK_ABORT:
            return protocol.Abort(
                s=session,
                n=note.id,
                task=note.task_id,
                attempt=note.attempt,
                reason=note.reason,
            )
        task = self.tasks[note.task_id]
        payload = task.payload
        if payload is None:
            payload = self.load_payload(task.id)
        return protocol.Assign(
            s=session,
            n=note.id,
            task=task.id,
            attempt=note.attempt,
            name=task.name,
            payload=payload,
            timeout=task.timeout,
        )

    def _schedule_note(self, note: Note, after: float) -> None:
        note.next_send_at = self.now + after
        heapq.heappush(self._note_timers, (note.next_send_at, note.id))

    def _processed(self, note: Note) -> None:
        del self.notes[note.id]
        self.assign_notes.pop((note.task_id, note.attempt), None)
        self.effects.batch.update_note(note.id, processed=1)

    def _supersede(self, note: Note) -> None:
        self.notes.pop(note.id, None)
        if self.assign_notes.get((note.task_id, note.attempt)) == note.id:
            del self.assign_notes[(note.task_id, note.attempt)]
        self.effects.batch.update_note(note.id, superseded=True)

    def _supersede_notes(self, worker: WorkerState) -> None:
        for note in [n for n in self.notes.values() if n.worker_id == worker.id]:
            self._supersede(note)

    def _settle_assign(self, pair: tuple[str, int]) -> None:
        note_id = self.assign_notes.get(pair)
        if note_id is not None and note_id in self.notes:
            self._processed(self.notes[note_id])

    def _is_available(self, worker: WorkerState) -> bool:
        return (
            worker.state == "online"
            and not worker.is_unroutable
            and not worker.is_awaiting_ready
        )

    @staticmethod
    def _is_current(
        task: TaskState | None, attempt: int, worker: WorkerState
    ) -> TypeGuard[TaskState]:
        return (
            task is not None
            and task.state in ("assigned", "running")
            and task.attempts == attempt
            and task.worker_id == worker.id
        )


def recover(
    scheduler: Scheduler,
    task_rows: list[dict[str, Any]],
    note_rows: list[dict[str, Any]],
    worker_rows: list[dict[str, Any]],
    window_s: float,
) -> None:
    """Rebuild live state from the store after a restart.

    Workers that held attempts get `window_s` to register again; their
    unacknowledged notifications are sent again once they do.
    """
    from broker.store import load_list

    now = scheduler.now
    for row in worker_rows:
        scheduler.workers[row["id"]] = WorkerState(
            id=row["id"],
            state="offline" if row["state"] != "unknown" else "unknown",
            session=row["session"],
            capacity=row["capacity"],
            tags=frozenset(load_list(row["tags"])),
            handlers=frozenset(load_list(row["handlers"])),
            pid=row["pid"],
            host=row["host"],
            unavailable_since=now,
            first_seen_wall=row["first_seen_at"],
            last_seen_wall=row["last_seen_at"],
        )
    for row in task_rows:
        scheduler.seq += 1
        task = TaskState.from_row(row, scheduler.seq, now)
        scheduler.tasks[task.id] = task
        if task.start_deadline_wall is not None:
            entry = (task.start_deadline_wall, task.seq, task)
            heapq.heappush(scheduler._deadlines, entry)
        for worker_id in (task.preferred_worker, task.worker_id):
            if worker_id and worker_id not in scheduler.workers:
                scheduler.workers[worker_id] = WorkerState(
                    id=worker_id, unavailable_since=now
                )
        if task.state == "queued":
            scheduler.queues.push(task, scheduler.wall)
        elif task.worker_id:
            worker = scheduler.workers[task.worker_id]
            worker.held.add((task.id, task.attempts))
            worker.recovery_deadline = now + window_s
            task.last_worker = task.worker_id
    for row in note_rows:
        note = Note(
            id=row["id"],
            worker_id=row["worker_id"],
            kind=row["notification_type"],
            task_id=row["task_id"],
            attempt=row["attempt"],
            sends=row["sends"],
            next_send_at=now,
            reason=json.loads(row["message"] or "{}").get("reason", ""),
        )
        if note.worker_id not in scheduler.workers:
            continue
        scheduler.notes[note.id] = note
        if note.kind == TASK_ASSIGNED:
            scheduler.assign_notes[(note.task_id, note.attempt)] = note.id
        heapq.heappush(scheduler._note_timers, (now, note.id))
    scheduler.is_dirty = True
