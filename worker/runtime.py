"""The worker runtime: one thread, one poll loop, one DEALER socket.

The loop polls the DEALER, a wake-up socket pair (signals, `request_stop`) and
the executor's reply pipes, with a timeout set by the next
timer. It answers ASSIGN and ABORT with ACK in the same loop turn, keeps every
RESULT in an outbox until STORED, heartbeats from its own timer, reconnects
with backoff when the broker goes silent, and drains on SIGTERM/SIGINT.

Messages to the broker are queued during a turn and sent together: one wake-up
of ZeroMQ's I/O thread instead of one per message. The ACK of ASSIGN/ABORT
waits up to ACK_DELAY_S for the next message that goes anyway (a quick job's
RESULT, usually) and goes first in it, before any RESULT or RELEASE its jobs
caused: a quick task then costs the worker one send, not two, and its
handler starts while nothing else is being sent.

Limits:
- A Worker runs once; build a new one to run again.
- Handlers run in spawned child processes, so they must be importable: define
  them in a task module (`tasks=`) or in a script guarded by
  `if __name__ == "__main__":`.
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Iterable
from importlib import metadata
from typing import Any

import zmq
from loguru import logger

from config.settings import WorkerSettings
from sdk import protocol
from worker import registry
from worker.drain import Drain
from worker.executor import Executor
from worker.jobs import Job, Outcome
from worker.options import worker_settings
from worker.outbox import Key, Outbox, RecentAttempts
from worker.session import Session
from worker.wakeup import Wakeup, install_signal_handlers

#: Exit code after a clean drain.
EXIT_OK = 0
#: Exit code when the broker said STOP (another process took this worker id).
EXIT_STOPPED = 3
#: Longest poll while handlers run, so a death no pipe reports is seen.
BUSY_POLL_S = 0.25
#: Longest poll while no handler runs.
IDLE_POLL_S = 1.0
#: Longest an ACK waits to go out with another message. The broker resends an
#: unacknowledged ASSIGN only after ack_timeout_s, which is seconds.
ACK_DELAY_S = 0.005
#: Failed loop turns in a row after which the error is raised, not logged.
MAX_FAILED_TURNS = 50
#: Longest the worker waits for its handler processes before registering.
CHILD_START_WAIT_S = 30.0


class Worker:
    """Run registered handlers for the broker under one worker id."""

    def __init__(
        self,
        worker_id: str | bytes | None = None,
        *,
        broker: str | None = None,
        capacity: int | None = None,
        tags: Iterable[str] = (),
        tasks: Iterable[str] = (),
        settings: WorkerSettings | None = None,
    ) -> None:
        self._settings = worker_settings(
            worker_id, broker, capacity, tags, tasks, settings
        )
        registry.import_task_modules(["worker.builtins", *self._settings.tasks])
        self._handlers = registry.names()
        self._log = logger.bind(worker=self._settings.worker_id)

        modules = list(dict.fromkeys([*self._settings.tasks, *registry.modules()]))
        self._executor = Executor(
            self._settings.capacity,
            self._settings.worker_id,
            modules,
            self._settings.max_payload_bytes,
        )
        self._session = Session(
            self._settings, self._handlers, self._ready_state, self._log
        )
        self._outbox = Outbox()
        self._recent = RecentAttempts()
        self._wakeup = Wakeup()
        self._has_run = False
        self._stop_requested = False
        self._signals: list[int] = []
        self._signals_seen = 0
        self._drain: Drain | None = None
        #: Messages for the broker queued in this loop turn, in order.
        self._outgoing: list[protocol.Message] = []
        #: Notification ids received and not acknowledged yet, and by when.
        self._acks: list[int] = []
        self._acks_due_at = math.inf

    # --- public -------------------------------------------------------------

    @property
    def worker_id(self) -> str:
        return self._settings.worker_id

    @property
    def settings(self) -> WorkerSettings:
        return self._settings

    @property
    def handlers(self) -> list[str]:
        """Return the handler names this worker announces, sorted."""
        return list(self._handlers)

    @property
    def session(self) -> str:
        return self._session.token

    def request_stop(self) -> None:
        """Ask the worker to drain and exit; safe from signal handlers and threads."""
        self._stop_requested = True
        self._wakeup.wake()

    def run(self) -> int:
        """Serve until drained (return 0) or told STOP by the broker (return 3)."""
        if self._has_run:
            raise RuntimeError("a Worker runs once; create a new one to run again")
        self._has_run = True
        restore = install_signal_handlers(self._on_signal)
        try:
            return self._serve()
        finally:
            restore()
            self._wakeup.close()

    # --- lifecycle ----------------------------------------------------------

    def _serve(self) -> int:
        context: zmq.Context[Any] | None = None
        code = EXIT_OK
        try:
            # Children first: they are spawned before any ZeroMQ context exists.
            self._executor.launch()
            # Announce capacity only once the children can take work, so the
            # first ASSIGNs are not held behind interpreter start-up.
            ready = self._executor.wait_ready(
                CHILD_START_WAIT_S, give_up=lambda: self._stop_requested
            )
            if not ready:
                self._log.warning("worker.children_slow wait_s={}", CHILD_START_WAIT_S)
            context = zmq.Context()
            self._log.info(
                "worker.started version={} endpoint={} capacity={} tags={} "
                "handlers={} session={} pid={}",
                _version(),
                self._settings.broker_endpoint,
                self._settings.capacity,
                ",".join(self._settings.tags),
                ",".join(self._handlers),
                self._session.token,
                os.getpid(),
            )
            self._session.open(context, time.monotonic())
            code = self._loop()
        finally:
            self._session.close(linger_ms=0)
            self._executor.shutdown(timeout_s=0.3)
            if context is not None:
                context.term()
        self._log.info("worker.stopped code={}", code)
        return code

    def _loop(self) -> int:
        poller = zmq.Poller()
        polled: tuple[Any, ...] = ()
        failed_turns = 0
        while True:
            now = time.monotonic()
            wanted = (self._session.socket, self._executor.generation)
            if wanted != polled:
                poller = self._build_poller()
                polled = wanted
            timeout_ms = math.ceil(self._poll_timeout(now) * 1000)
            ready = dict(poller.poll(timeout_ms))
            try:
                code = self._step(time.monotonic(), ready)
            except Exception:  # one loop turn is a boundary: log, go on
                failed_turns += 1
                self._log.exception("worker.loop_error turns={}", failed_turns)
                if failed_turns >= MAX_FAILED_TURNS:
                    self._log.critical("worker.loop_failing turns={}", failed_turns)
                    raise
                continue
            failed_turns = 0
            if code is not None:
                return code

    def _build_poller(self) -> zmq.Poller:
        poller = zmq.Poller()
        # A plain fd, not the socket object: the poll asks objects for fileno().
        poller.register(self._wakeup.reader.fileno(), zmq.POLLIN)
        if self._session.socket is not None:
            poller.register(self._session.socket, zmq.POLLIN)
        for fd in self._executor.fds():
            poller.register(fd, zmq.POLLIN)
        return poller

    def _poll_timeout(self, now: float) -> float:
        is_busy = self._executor.is_busy
        soonest = now + (BUSY_POLL_S if is_busy else IDLE_POLL_S)
        for at in (
            self._session.next_timer_at(),
            self._executor.next_deadline_at(),
            self._outbox.next_due_at(self._settings.ack_timeout_s)
            if self._session.socket is not None
            else None,
            self._drain.next_at(is_busy) if self._drain is not None else None,
            self._acks_due_at if self._acks else None,
        ):
            if at is not None and at < soonest:
                soonest = at
        return max(0.0, soonest - now)

    # --- one turn -----------------------------------------------------------

    def _step(self, now: float, ready: dict[Any, int]) -> int | None:
        """Handle what the poll found, then every timer that fell due."""
        if self._wakeup.reader.fileno() in ready:
            self._wakeup.clear()
        if self._stop_requested or len(self._signals) > self._signals_seen:
            self._begin_drain(now)

        if self._session.socket is not None and self._session.socket in ready:
            code = self._receive(now)
            if code is not None:
                self._flush(now, force=True)
                self._session.close(linger_ms=0)
                return code
        for outcome in self._executor.collect(now, ready):
            self._on_outcome(outcome, now)
        # Before the timers, which may replace the socket.
        self._flush(now)

        self._session.tick(now)
        if self._session.socket is not None:
            self._resend(self._outbox.due(now, self._settings.ack_timeout_s))
        code = None
        if self._drain is not None:
            code = self._drain_step(now, self._drain)
        self._flush(now)
        return code

    def _receive(self, now: float) -> int | None:
        for message in self._session.receive(now):
            if isinstance(message, protocol.Assign | protocol.Abort):
                if not self._acks:
                    self._acks_due_at = now + ACK_DELAY_S
                self._acks.append(message.n)
            code = self._dispatch(message, now)
            if code is not None:
                return code
        return None

    def _send(self, message: protocol.Message) -> None:
        """Queue `message` for the broker; `_flush` sends the queue in order."""
        self._outgoing.append(message)

    def _flush(self, now: float, force: bool = False) -> None:
        """Send the queued messages, led by the ACK when one is due or can ride."""
        if self._acks and (self._outgoing or force or now >= self._acks_due_at):
            ack = protocol.Ack(s=self._session.token, n=self._acks)
            self._outgoing.insert(0, ack)
            self._acks = []
            self._acks_due_at = math.inf
        if self._outgoing:
            outgoing, self._outgoing = self._outgoing, []
            for message in outgoing:
                self._session.send(message)

    def _dispatch(self, message: protocol.Message, now: float) -> int | None:
        if isinstance(message, protocol.Assign):
            self._on_assign(message, now)
        elif isinstance(message, protocol.Abort):
            self._on_abort(message, now)
        elif isinstance(message, protocol.Stored):
            key = (message.task, message.attempt)
            self._recent.add(key)
            if self._outbox.confirm(key):
                self._log.debug("task.stored task={} attempt={}", *key)
        elif isinstance(message, protocol.Welcome):
            self._log.info("worker.registered owed={}", len(self._outbox))
            if message.max_payload_bytes:
                self._executor.limit_results(message.max_payload_bytes)
            self._session.on_welcome()
            self._resend(self._outbox.everything(now))
        elif isinstance(message, protocol.Reconnect):
            if not self._session.awaits_welcome(now):
                self._log.info("worker.reconnect_asked reason={}", message.reason)
                self._send(self._session.ready_message())
        elif isinstance(message, protocol.Stop):
            return self._on_stop(message)
        return None

    def _on_assign(self, message: protocol.Assign, now: float) -> None:
        key = (message.task, message.attempt)
        if self._executor.holds(key) or key in self._outbox or key in self._recent:
            self._log.debug("task.duplicate task={} attempt={}", *key)
            return
        if self._is_draining:
            self._release(key, "worker is draining")
            return
        free = self._executor.free_slot()
        if free is None:
            self._log.warning(
                "task.over_capacity task={} attempt={} capacity={}",
                *key,
                self._settings.capacity,
            )
            self._release(key, f"all {self._settings.capacity} slots are busy")
            return
        timeout_s = message.timeout if message.timeout and message.timeout > 0 else None
        job = Job(
            message.task, message.attempt, message.name, message.payload, timeout_s
        )
        self._executor.start(free, job, now)
        self._log.debug(
            "task.started task={} attempt={} name={} bytes={}",
            *key,
            message.name,
            len(message.payload),
        )

    def _on_abort(self, message: protocol.Abort, now: float) -> None:
        key = (message.task, message.attempt)
        if self._executor.abort(key, now, message.reason):
            self._log.info("task.aborting task={} attempt={}", *key)
            return
        if key in self._outbox or key in self._recent:
            return
        # Never ran here: answer, so the broker can settle it, and remember it,
        # so an ASSIGN still in flight is not started afterwards.
        self._on_outcome(
            Outcome(
                message.task,
                message.attempt,
                False,
                error_type="Cancelled",
                error="aborted before it ran on this worker",
                cancelled=True,
            ),
            now,
        )

    def _on_outcome(self, outcome: Outcome, now: float) -> None:
        result = protocol.Result(
            s=self._session.token,
            task=outcome.task,
            attempt=outcome.attempt,
            ok=outcome.ok,
            value=outcome.value,
            error_type=outcome.error_type,
            error=outcome.error,
            traceback=outcome.traceback,
            cancelled=outcome.cancelled,
        )
        self._outbox.add(result, now)
        self._recent.add(outcome.key)
        self._send(result)
        self._log.info(
            "task.finished task={} attempt={} ok={} error_type={}",
            outcome.task,
            outcome.attempt,
            outcome.ok,
            outcome.error_type or "-",
        )

    def _on_stop(self, message: protocol.Stop) -> int:
        self._log.error("worker.stop_ordered reason={}", message.reason)
        for key in self._executor.running():
            self._executor.kill(key)
        return EXIT_STOPPED

    def _release(self, key: Key, reason: str) -> None:
        self._send(
            protocol.Release(
                s=self._session.token, task=key[0], attempt=key[1], reason=reason
            )
        )
        self._log.info("task.released task={} attempt={} reason={}", *key, reason)

    def _resend(self, results: list[protocol.Result]) -> None:
        for result in results:
            self._log.debug(
                "task.result_resent task={} attempt={}", result.task, result.attempt
            )
            self._send(result)

    def _ready_state(self) -> tuple[list[list[Any]], bool]:
        """Return what READY reports: held [task, attempt] pairs and draining."""
        keys = set(self._executor.running()) | set(self._outbox.keys())
        held = [[task, attempt] for task, attempt in sorted(keys)]
        return held, self._is_draining

    # --- draining -----------------------------------------------------------

    @property
    def _is_draining(self) -> bool:
        return self._drain is not None

    def _begin_drain(self, now: float) -> None:
        signals = self._signals[self._signals_seen :]
        self._signals_seen += len(signals)
        if self._drain is not None:
            if signals:
                self._log.warning("worker.drain_forced signal={}", signals[-1])
                self._drain.force(now)
            return
        self._drain = Drain(now, self._settings.grace_s)
        self._executor.is_draining = True
        why = f"signal {signal.Signals(signals[0]).name}" if signals else "request"
        self._log.info(
            "worker.draining reason={} running={} grace_s={}",
            why,
            len(self._executor.running()),
            self._settings.grace_s,
        )
        self._send(protocol.Drain(s=self._session.token))

    def _drain_step(self, now: float, drain: Drain) -> int | None:
        running = self._executor.running()
        if running and drain.is_grace_over(now):
            for key in running:
                self._executor.kill(key)
                self._release(key, "worker grace period ended")
            running = []
        if running:
            return None
        if len(self._outbox) and now < drain.start_flush(now):
            return None
        if len(self._outbox):
            self._log.warning("worker.results_unconfirmed count={}", len(self._outbox))
        self._flush(now, force=True)
        self._session.send(protocol.Bye(s=self._session.token))
        self._session.close(linger_ms=drain.linger_ms(now))
        return EXIT_OK

    def _on_signal(self, signum: int) -> None:
        # Runs in a signal handler: record and wake, nothing else.
        self._signals.append(signum)
        self._wakeup.wake()


def _version() -> str:
    try:
        return metadata.version("hakobu")
    except metadata.PackageNotFoundError:
        return "unknown"
