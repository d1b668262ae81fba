"""The executor: one spawned child process per capacity slot runs the handlers.

Handlers never run in the worker process, so a handler that holds the GIL,
forks or crashes can neither starve the heartbeat loop nor take the worker
down. The parent side here never blocks for long: it is driven by the
worker's poll loop (`fds`, `next_deadline_at`, `collect`).

Each child has two one-way pipes, jobs in and replies out. A socket pair would
do with one, but there the worker's read of a reply wakes the child blocked
in its next read for nothing (space freed on a socket wakes its readers too),
an extra context switch per job.

Limits:
- A job waits for its slot's child to finish starting (importing the task
  modules) before it is sent; its timeout counts from the send.
- A handler is killed together with its process group; programs it started in
  another session or process group survive.
- On Linux a child dies with the thread that spawned it (PR_SET_PDEATHSIG), so
  the loop that calls `launch` and `collect` must outlive the children.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import time
from collections.abc import Callable, Iterable
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from typing import Any

from loguru import logger

from worker import pipe
from worker.child import child_main
from worker.jobs import Job, Key, Outcome, describe_exit
from worker.slots import REAP_TIMEOUT_S, Slot, backoff_s, kill_tree, reap

#: Seconds an aborted handler gets to return before its process is killed.
ABORT_GRACE_S = 0.5
#: Longest time between checks of every child, for deaths no pipe reports
#: (a handler's fork that outlives it keeps the pipe and sentinel open).
#: Only reply pipes are polled: a child's death closes its reply pipe as
#: surely as its sentinel, and half the descriptors make each poll cheaper.
SWEEP_S = 0.25


class Executor:
    """Run jobs in `capacity` spawned child processes, one job per child."""

    def __init__(
        self,
        capacity: int,
        worker_id: str,
        module_names: list[str],
        max_payload_bytes: int,
        *,
        abort_grace_s: float = ABORT_GRACE_S,
    ) -> None:
        self._mp = multiprocessing.get_context("spawn")
        self._slots = [Slot(i) for i in range(capacity)]
        self._worker_id = worker_id
        self._modules = list(module_names)
        self._max_payload_bytes = max_payload_bytes
        self._abort_grace_s = abort_grace_s
        self._done: list[Outcome] = []
        self._reaping: list[BaseProcess] = []
        #: Reply pipe ends by fd, for the generation `_mapped`.
        self._replies_by_fd: dict[int, Slot] = {}
        self._mapped = -1
        #: When `collect` next checks every slot, and when a deadline may be due.
        self._sweep_at = 0.0
        self._due_at = math.inf
        self._log = logger.bind(worker=worker_id)
        #: Bumped whenever the set of file descriptors to poll changes.
        self.generation = 0
        #: Set while the worker drains: dead children are not replaced.
        self.is_draining = False

    # --- lifecycle ----------------------------------------------------------

    def launch(self) -> None:
        """Start every child; call before creating any ZeroMQ context."""
        for slot in self._slots:
            if slot.process is None:
                self._spawn(slot)

    def limit_results(self, max_payload_bytes: int) -> None:
        """Refuse results above this size too (the broker's limit)."""
        self._max_payload_bytes = min(self._max_payload_bytes, max_payload_bytes)

    def wait_ready(
        self, timeout_s: float, give_up: Callable[[], bool] = lambda: False
    ) -> bool:
        """Block until every child has said hello; False on timeout or give_up()."""
        end = time.monotonic() + timeout_s
        while not all(slot.is_ready for slot in self._slots):
            left = end - time.monotonic()
            if left <= 0 or give_up():
                return False
            conns = [
                s.replies
                for s in self._slots
                if s.replies is not None and not s.is_ready
            ]
            if conns:
                wait(conns, timeout=min(left, 0.1))
            self.collect(time.monotonic())
        return True

    def shutdown(self, timeout_s: float = 1.0) -> None:
        """Stop every child: idle ones get EOF, busy or slow ones are killed."""
        for slot in self._slots:
            if slot.job is not None and slot.process is not None:
                kill_tree(slot.process)
            slot.close_pipes()
        processes = [s.process for s in self._slots if s.process is not None]
        end = time.monotonic() + max(0.0, timeout_s)
        while (alive := [p for p in processes if p.exitcode is None]) and (
            left := end - time.monotonic()
        ) > 0:
            wait([p.sentinel for p in alive], timeout=left)
            for process in alive:
                process.join(0)
        for process in processes + self._reaping:
            if process.exitcode is None:
                kill_tree(process)
            reap(process)
        for slot in self._slots:
            slot.process = None
            slot.job = None
            slot.respawn_at = None
        self._reaping.clear()
        self.generation += 1

    # --- what the loop asks -------------------------------------------------

    @property
    def capacity(self) -> int:
        return len(self._slots)

    def free_slots(self) -> list[int]:
        """Return the indexes of slots without a job."""
        return [s.index for s in self._slots if s.job is None]

    def free_slot(self) -> int | None:
        """Return the index of the first slot without a job, or None."""
        for slot in self._slots:
            if slot.job is None:
                return slot.index
        return None

    @property
    def is_busy(self) -> bool:
        """True while any slot holds a job."""
        for slot in self._slots:
            if slot.job is not None:
                return True
        return False

    @property
    def free_count(self) -> int:
        return sum(1 for s in self._slots if s.job is None)

    def running(self) -> list[Key]:
        """Return (task, attempt) of every job in a slot."""
        return [s.job.key for s in self._slots if s.job is not None]

    def holds(self, key: Key) -> bool:
        """Return True when (task, attempt) is in a slot."""
        return self._find(key) is not None

    def is_started(self, key: Key) -> bool:
        """Return True when (task, attempt) was handed to a ready child."""
        slot = self._find(key)
        return slot is not None and slot.is_sent

    def fds(self) -> list[int]:
        """Return the reply pipe ends the loop must poll."""
        return [s.replies.fileno() for s in self._slots if s.replies is not None]

    def next_deadline_at(self) -> float | None:
        """Return the earliest monotonic instant at which `collect` has work.

        It may be early (a deadline that no longer applies); never late.
        """
        return None if self._due_at == math.inf else self._due_at

    # --- what the loop does -------------------------------------------------

    def start(self, slot_index: int, job: Job, now: float) -> None:
        """Give `job` to a free slot; it is sent once the child is ready."""
        slot = self._slots[slot_index]
        if slot.job is not None:
            raise RuntimeError(f"slot {slot_index} is busy with {slot.job.key}")
        slot.job = job
        slot.is_sent = False
        slot.deadline_at = None
        slot.abort_at = None
        if slot.is_ready:
            self._send(slot, now)

    def abort(self, key: Key, now: float, reason: str = "") -> bool:
        """Ask the handler of `key` to stop; kill it after the abort grace."""
        slot = self._find(key)
        if slot is None or slot.job is None:
            return False
        if slot.abort_at is not None:
            return True
        slot.abort_reason = reason
        if not slot.is_sent:
            self._done.append(self._cancelled(slot.job, reason, "before it started"))
            slot.job = None
            return True
        slot.cancel.set()
        slot.is_cancel_set = True
        slot.abort_at = now + self._abort_grace_s
        self._due_at = min(self._due_at, slot.abort_at)
        return True

    def kill(self, key: Key) -> bool:
        """Kill the handler of `key` at once; no outcome is reported."""
        slot = self._find(key)
        if slot is None:
            return False
        if slot.is_sent:
            self._retire(slot, time.monotonic(), kill=True)
        slot.job = None
        return True

    def collect(self, now: float, ready: Iterable[Any] | None = None) -> list[Outcome]:
        """Read finished jobs, detect crashes, enforce timeouts and aborts.

        `ready` is what the loop's poll found readable: then only those pipes
        are looked at, and every child only once per SWEEP_S.
        Without it every child is checked.
        """
        outcomes, self._done = self._done, []
        is_sweep = ready is None or now >= self._sweep_at
        if is_sweep:
            self._sweep_at = now + SWEEP_S
            for slot in self._slots:
                outcomes += self._read(slot, now)
                self._check_death(slot, now, outcomes)
        else:
            for key in ready or ():
                self._on_ready(key, now, outcomes)
        if is_sweep or now >= self._due_at:
            self._on_due(now, outcomes)
        return outcomes

    # --- internals ----------------------------------------------------------

    def _on_ready(self, key: Any, now: float, outcomes: list[Outcome]) -> None:
        if self._mapped != self.generation:
            self._map_fds()
        slot = self._replies_by_fd.get(key)
        if slot is not None:
            outcome = self._read_one(slot, now)
            if outcome is not None:
                outcomes.append(outcome)
            if slot.reader is not None and slot.reader.has_message:
                outcomes += self._read(slot, now)
            if slot.replies is None:
                self._check_death(slot, now, outcomes)

    def _map_fds(self) -> None:
        self._replies_by_fd.clear()
        for slot in self._slots:
            if slot.replies is not None:
                self._replies_by_fd[slot.replies.fileno()] = slot
        self._mapped = self.generation

    def _check_death(self, slot: Slot, now: float, outcomes: list[Outcome]) -> None:
        if slot.process is not None and not slot.process.is_alive():
            outcomes += self._read(slot, now)
            outcomes += self._on_death(slot, now)

    def _on_due(self, now: float, outcomes: list[Outcome]) -> None:
        """Enforce timeouts and aborts, restart children, find the next deadline."""
        due_at = math.inf
        for slot in self._slots:
            if slot.job is not None and slot.is_sent:
                outcomes += self._enforce(slot, now)
            if slot.process is None and slot.respawn_at is not None:
                if now >= slot.respawn_at and not self.is_draining:
                    self._respawn(slot, now)
            for at in (slot.deadline_at, slot.abort_at):
                if at is not None and at < due_at:
                    due_at = at
            if slot.process is None and slot.respawn_at is not None:
                if slot.respawn_at < due_at and not self.is_draining:
                    due_at = slot.respawn_at
        self._due_at = due_at

    def _find(self, key: Key) -> Slot | None:
        for slot in self._slots:
            if slot.job is not None and slot.job.key == key:
                return slot
        return None

    def _respawn(self, slot: Slot, now: float) -> None:
        try:
            self._spawn(slot)
        except OSError as exc:
            # Out of processes or memory: try again later, keep serving.
            slot.failures += 1
            slot.respawn_at = now + backoff_s(slot.failures)
            self._log.warning(
                "worker.child_spawn_failed slot={} error={}", slot.index, exc
            )

    def _spawn(self, slot: Slot) -> None:
        job_reader, job_writer = self._mp.Pipe(duplex=False)
        reply_reader, reply_writer = self._mp.Pipe(duplex=False)
        cancel = self._mp.Event()
        process = self._mp.Process(
            target=child_main,
            args=(job_reader, reply_writer, cancel, self._modules, os.getpid()),
            name=f"hakobu-handler-{slot.index}",
            daemon=False,  # handlers may start their own multiprocessing children
        )
        try:
            process.start()
        finally:
            # The child has its own copies now; ours would hide its EOF.
            job_reader.close()
            reply_writer.close()
        slot.process, slot.cancel = process, cancel
        slot.open_pipes(job_writer, reply_reader)
        slot.is_ready = slot.is_cancel_set = False
        slot.respawn_at = None
        self.generation += 1
        self._log.debug("worker.child_started slot={} pid={}", slot.index, process.pid)

    def _send(self, slot: Slot, now: float) -> None:
        job = slot.job
        if job is None or slot.jobs is None:
            return
        message = (
            job.task,
            job.attempt,
            job.name,
            job.payload,
            self._worker_id,
            self._max_payload_bytes,
        )
        # The child is idle reading its pipe now, so clearing cannot race it.
        # NOTE: only the worker sets the flag, so it knows when it needs
        # clearing; clearing costs a lock and a semaphore round trip.
        if slot.is_cancel_set:
            slot.cancel.clear()
            slot.is_cancel_set = False
        try:
            pipe.send(slot.jobs.fileno(), message)
        except OSError as exc:
            # The child is gone; the death check reports the job as crashed.
            self._log.debug(
                "worker.child_send_failed slot={} error={}", slot.index, exc
            )
        slot.is_sent = True
        if job.timeout_s is not None and job.timeout_s > 0:
            slot.deadline_at = now + job.timeout_s
            self._due_at = min(self._due_at, slot.deadline_at)

    def _read(self, slot: Slot, now: float) -> list[Outcome]:
        """Read every message waiting in the slot's reply pipe."""
        outcomes = []
        while slot.replies is not None and slot.reader is not None:
            try:
                if not slot.reader.has_message and not slot.replies.poll(0):
                    break
            except (EOFError, OSError):
                self._on_eof(slot)
                break
            outcome = self._read_one(slot, now)
            if outcome is not None:
                outcomes.append(outcome)
        return outcomes

    def _read_one(self, slot: Slot, now: float) -> Outcome | None:
        """Read one message from a reply pipe known to be readable."""
        if slot.reader is None:
            return None
        try:
            message = slot.reader.read()
        except (EOFError, OSError):
            self._on_eof(slot)
            return None
        return self._on_message(slot, message, now)

    def _on_eof(self, slot: Slot) -> None:
        # The child closed its end: it is dead or dying.
        slot.close_replies()
        self.generation += 1
        if slot.process is not None and slot.process.exitcode is None:
            kill_tree(slot.process)
            slot.process.join(REAP_TIMEOUT_S)

    def _on_message(self, slot: Slot, message: Any, now: float) -> Outcome | None:
        kind = message[0]
        if kind == "hello":
            slot.is_ready = True
            slot.failures = 0
            for error in message[2]:
                self._log.warning("worker.child_import_failed error={}", error)
            if slot.job is not None and not slot.is_sent:
                self._send(slot, now)
            return None
        job = slot.job
        if job is None or (message[1], message[2]) != job.key:
            self._log.warning(
                "worker.child_stray_reply slot={} task={} attempt={}",
                slot.index,
                message[1],
                message[2],
            )
            return None
        slot.job = None
        slot.deadline_at = None
        if slot.abort_at is not None:
            slot.abort_at = None
            return self._cancelled(job, slot.abort_reason, "the handler stopped")
        if kind == "ok":
            return Outcome(job.task, job.attempt, True, value=message[3])
        return Outcome(
            job.task,
            job.attempt,
            False,
            error_type=message[3],
            error=message[4],
            traceback=message[5],
        )

    def _enforce(self, slot: Slot, now: float) -> list[Outcome]:
        job = slot.job
        if job is None:
            return []
        if slot.abort_at is not None and now >= slot.abort_at:
            self._retire(slot, now, kill=True)
            return [self._cancelled(job, slot.abort_reason, "the handler was killed")]
        if slot.deadline_at is not None and now >= slot.deadline_at:
            self._retire(slot, now, kill=True)
            return [
                Outcome(
                    job.task,
                    job.attempt,
                    False,
                    error_type="TaskTimeout",
                    error=f"task ran past its timeout of {job.timeout_s} s; "
                    "its handler process was killed",
                )
            ]
        return []

    def _on_death(self, slot: Slot, now: float) -> list[Outcome]:
        process = slot.process
        if process is None:
            return []
        process.join(REAP_TIMEOUT_S)
        code, pid = process.exitcode, process.pid
        was_ready, is_aborted = slot.is_ready, slot.abort_at is not None
        job, is_sent = slot.job, slot.is_sent
        self._retire(slot, now, kill=False)
        reap(process)
        if not was_ready:
            slot.failures += 1
            slot.respawn_at = now + backoff_s(slot.failures)
        self._log.warning(
            "worker.child_died slot={} pid={} exitcode={} task={}",
            slot.index,
            pid,
            code,
            job.task if job else None,
        )
        if job is None:
            return []
        if is_aborted:
            return [
                self._cancelled(job, slot.abort_reason, "the handler process ended")
            ]
        when = "" if is_sent and was_ready else " while starting"
        return [
            Outcome(
                job.task,
                job.attempt,
                False,
                error_type="HandlerCrashed",
                error=f"handler process {describe_exit(code)}{when}",
            )
        ]

    def _retire(self, slot: Slot, now: float, *, kill: bool) -> None:
        """Drop the slot's child (killing it if asked); it is respawned later."""
        if slot.process is not None and kill:
            kill_tree(slot.process)
            slot.process.join(REAP_TIMEOUT_S)
            if slot.process.exitcode is None:
                self._reaping.append(slot.process)
            else:
                reap(slot.process)
        slot.close_pipes()
        slot.process, slot.cancel = None, None
        slot.is_ready = slot.is_sent = slot.is_cancel_set = False
        slot.job = None
        slot.deadline_at = slot.abort_at = None
        slot.respawn_at = now
        self._due_at = min(self._due_at, now)
        self.generation += 1

    @staticmethod
    def _cancelled(job: Job, reason: str, how: str) -> Outcome:
        because = f": {reason}" if reason else ""
        return Outcome(
            job.task,
            job.attempt,
            False,
            error_type="Cancelled",
            error=f"attempt aborted{because} ({how})",
            cancelled=True,
        )
