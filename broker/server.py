"""The socket loop: two ROUTERs, one thread, one commit per turn, then sends.

A turn drains what the sockets hold (up to `batch_max` messages), lets the
scheduler decide, runs due timers, commits every staged write in one
transaction, and only then sends ASSIGNs, replies and the rest. A worker is
only expired in a turn that emptied the workers socket, so heartbeats queued
behind a burst are read before anyone is declared lost.

Limits:
- If the store refuses a commit after its retries, memory and disk may
  disagree, so the broker stops (exit code 4) instead of sending anything;
  a restart recovers every task from the store.
"""

from __future__ import annotations

import errno
import math
import os
import signal
import threading
import time
from types import FrameType
from typing import Any, cast

import zmq
from loguru import logger

from broker.clients import ClientDesk, Reply
from broker.confirmations import HeldConfirmations
from broker.ratelimit import RateLimit
from broker.retention import Pruner
from broker.scheduler import Effects, Scheduler, recover
from broker.store import Batch, Store
from config.errors import ConfigError
from config.settings import BrokerSettings, validate_worker_id
from sdk import protocol
from sdk.errors import DecodeError, ProtocolError, StoreError, TransportError

#: Longest poll wait, in seconds, so signals and timers are seen promptly.
MAX_POLL_S = 0.1
#: Milliseconds sockets keep unsent messages after close.
LINGER_MS = 500
#: Queue limit per peer; a worker this far behind is treated as unreachable.
HWM_MESSAGES = 100_000
#: Exit code when the store fails.
EXIT_STORE_FAILED = 4
#: Exit code when an endpoint cannot be bound.
EXIT_BIND_FAILED = 5
#: Exit code after an unexpected error outside one message's handling.
EXIT_CRASHED = 1
#: Largest capacity a worker may announce.
MAX_CAPACITY = 10_000
#: Turns with at most this many messages make the next poll spin (spin_s).
SPIN_AFTER_MESSAGES = 4
#: Longest that writes no message depends on may wait for a shared commit.
LAZY_COMMIT_S = 0.05
#: Messages to workers that may wait until the client replies are sent.
_DEFERRABLE = (protocol.Stored, protocol.Heartbeat)
#: Messages that carry a decision: held STOREDs to their worker travel behind.
_DECISIONS = (protocol.Assign, protocol.Abort)
#: Messages that carry no decision, so they need no commit before sending.
_CHATTER = (protocol.Heartbeat, protocol.Welcome, protocol.Reconnect, protocol.Stop)


def serve(settings: BrokerSettings) -> int:
    """Run a broker until SIGTERM or SIGINT; return the process exit code."""
    try:
        broker = Broker(settings)
    except StoreError as exc:
        logger.critical("store.failed error={}", exc)
        return EXIT_STORE_FAILED
    except TransportError as exc:
        logger.critical("broker.bind_failed error={}", exc)
        return EXIT_BIND_FAILED
    return broker.run()


class Broker:
    """One broker: store, scheduler, clients desk and the two sockets."""

    def __init__(self, settings: BrokerSettings) -> None:
        self.settings = settings
        self.store = Store(settings.db, settings.durability)
        self.scheduler = Scheduler(
            settings, self.store.task_payload, self.store.max_note_id() + 1
        )
        self.desk = ClientDesk(self.scheduler, self.store, settings.max_payload_bytes)
        self.stop_signal: int | None = None
        self.send_failures = 0
        self.bad_frames = 0
        self._bad_frame_log = RateLimit()
        self._held_replies: list[tuple[float, Reply]] = []
        self._delayed_identities: set[bytes] = set()
        self._delays_left = (
            settings.fault_delayed_submits if settings.fault_reply_delay_s else 0
        )
        self._carry: Batch | None = None
        self._carry_since = 0.0
        self._last_busy = 0.0
        self.confirmations = HeldConfirmations()
        self.pruner = Pruner(self.store, settings)
        self._recover()

        self.ctx = zmq.Context()
        try:
            self.workers = self._router(settings.workers_endpoint, handover=True)
            self.clients = self._router(settings.clients_endpoint, handover=False)
        except TransportError:
            self.ctx.destroy(0)
            self.store.close()
            raise
        self.poller = zmq.Poller()
        self.poller.register(self.workers, zmq.POLLIN)
        self.poller.register(self.clients, zmq.POLLIN)

    def _router(self, endpoint: str, handover: bool) -> zmq.Socket[bytes]:
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, LINGER_MS)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if handover:
            sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        sock.setsockopt(
            zmq.MAXMSGSIZE, protocol.maxmsgsize(self.settings.max_payload_bytes)
        )
        sock.setsockopt(zmq.SNDHWM, HWM_MESSAGES)
        sock.setsockopt(zmq.RCVHWM, HWM_MESSAGES)
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as exc:
            sock.close(0)
            raise TransportError(
                f"cannot bind {endpoint}: {exc}; is another broker running there?"
            ) from exc
        return sock

    def _recover(self) -> None:
        settings = self.settings
        self.scheduler.begin_turn(time.monotonic(), time.time())
        window = 3 * settings.liveness * settings.heartbeat_interval_s + 5.0
        tasks = self.store.open_tasks()
        notes = self.store.pending_notes()
        recover(self.scheduler, tasks, notes, self.store.workers(), window)
        if tasks or notes:
            logger.info(
                "broker.recovered tasks={} notifications={}", len(tasks), len(notes)
            )

    # --- the loop --------------------------------------------------------------------

    def run(self) -> int:
        """Serve until a stop signal; return the exit code."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)
        s = self.settings
        logger.info(
            "broker.started version={} workers_endpoint={} clients_endpoint={} db={} "
            "durability={} heartbeat_s={} liveness={} ack_timeout_s={}",
            protocol.PROTOCOL_VERSION,
            s.workers_endpoint,
            s.clients_endpoint,
            s.db,
            s.durability,
            s.heartbeat_interval_s,
            s.liveness,
            s.ack_timeout_s,
        )
        code = 0
        try:
            while self.stop_signal is None:
                self.step()
        except StoreError as exc:
            logger.critical("store.failed error={}", exc)
            code = EXIT_STORE_FAILED
        except Exception:
            # Memory may now disagree with the store; restart recovers from disk.
            logger.opt(exception=True).critical("broker.crashed")
            code = EXIT_CRASHED
        finally:
            # After a failure the deferred batch may hold a half-done turn;
            # dropping it is safe: it only holds writes no message relied on.
            self.close(commit=code == 0)
        logger.info(
            "broker.stopped signal={} resends={} send_failures={} bad_frames={}",
            self.stop_signal,
            self.scheduler.resends,
            self.send_failures,
            self.bad_frames,
        )
        return code

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stop_signal = signum

    def step(self) -> None:
        """Run one turn: drain, decide, commit, send."""
        readable = self._poll()
        now, wall = time.monotonic(), time.time()
        effects = self.scheduler.begin_turn(now, wall, self._carry)
        replies: list[Reply] = []

        budget = self.settings.batch_max
        # Poll is level-triggered: a socket it did not report holds nothing.
        worker_count = client_count = 0
        if self.workers in readable:
            worker_count = self._drain_workers(budget)
        if self.clients in readable:
            client_count = self._drain_clients(max(budget - worker_count, 1), replies)
        if 0 < worker_count + client_count <= SPIN_AFTER_MESSAGES:
            # Sparse traffic: a reply is likely soon, so spin before sleeping.
            # Under load the socket is rarely empty and spinning only burns CPU.
            self._last_busy = now
        self.scheduler.tick(may_expire=worker_count < budget)
        self.scheduler.assign()

        if self._must_commit(effects, replies, now):
            if self.settings.fault_commit_delay_s:
                time.sleep(self.settings.fault_commit_delay_s)
            self.store.commit(effects.batch)
            self._carry = None
            self.desk.ran_new_task = False
        elif self._carry is None and len(effects.batch):
            self._carry, self._carry_since = effects.batch, now

        # Decisions go out first, as they are what a task waits on; client
        # replies next; confirmations and heartbeats last: a reply may end a
        # client's wait, a STORED only lets a worker drop its copy.
        first = [(w, m) for w, m in effects.sends if type(m) not in _DEFERRABLE]
        self._send_workers(first)
        self.desk.after_commit(effects.ended, now, replies)
        for task in effects.ended:
            self.scheduler.tasks.pop(task.id, None)
        self._send_clients(replies, now)
        later = []
        if len(first) < len(effects.sends):
            later = [s for s in effects.sends if type(s[1]) is protocol.Heartbeat]
            stored = [s for s in effects.sends if type(s[1]) is protocol.Stored]
            self.confirmations.hold(stored, now)
        decided = {w for w, m in first if type(m) in _DECISIONS}
        later += self.confirmations.release(decided, now)
        if later:
            self._send_workers(later)
        # Prune only between commits, never interleaved with staged writes.
        if self._carry is None and now >= self.pruner.due_at(now):
            pruned = self.pruner.run(now, wall)
            self.desk.forget(pruned.task_ids, pruned.keys)

    def _must_commit(self, effects: Effects, replies: list[Reply], now: float) -> bool:
        # Writes that no outgoing message depends on (ACKs, worker rows,
        # requeues) may wait up to LAZY_COMMIT_S to share a later commit.
        if not len(effects.batch):
            return False
        # Reads (STATUS, WAIT, lists) need no commit: what they show of
        # uncommitted writes (an ACK, a requeue) a restart recovers alike.
        if replies or effects.ended or self.stop_signal or self.desk.ran_new_task:
            return True
        if any(type(msg) not in _CHATTER for _, msg in effects.sends):
            return True
        return self._carry is not None and now - self._carry_since >= LAZY_COMMIT_S

    def _poll(self) -> dict[zmq.Socket[bytes], int]:
        now = time.monotonic()
        due = self.scheduler.next_timer_at()
        if self._carry is not None:
            due = min(due, self._carry_since + LAZY_COMMIT_S)
        else:  # a prune pass waits for the carry's commit (see step)
            due = min(due, self.pruner.due_at(now))
        wait_deadline = self.desk.next_wait_deadline()
        if wait_deadline is not None:
            due = min(due, wait_deadline)
        if self._held_replies:
            due = min(due, self._held_replies[0][0])
        due = min(due, self.confirmations.due_at())
        timeout_s = min(max(due - now, 0.0), MAX_POLL_S)
        spin_s = max(0.0, self._last_busy + self.settings.spin_s - now)
        return _spin_poll(self.poller, timeout_s, spin_s)

    # --- workers -------------------------------------------------------------------

    def _drain_workers(self, budget: int) -> int:
        count = 0
        while count < budget:
            frames = protocol.recv_frames(self.workers)
            if frames is None:
                break
            count += 1
            try:
                self._on_worker(frames, time.monotonic())
            except ProtocolError as exc:
                self._bad_frame("workers", exc, frames)
            except StoreError:
                raise
            except Exception:  # one message is a loop boundary: log, go on
                logger.exception("broker.message_failed endpoint=workers")
            if not protocol.has_input(self.workers):
                break
        return count

    def _on_worker(self, frames: list[bytes], at: float) -> None:
        identity = frames[0]
        decoded = protocol.decode(frames[1:], protocol.WORKER_MESSAGES)
        msg = cast(protocol.WorkerMessage, decoded)
        try:
            worker_id = identity.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DecodeError("worker id is not UTF-8") from exc
        scheduler = self.scheduler
        session = msg.s
        status = scheduler.session_status(worker_id, session)
        if status == "replaced":
            scheduler.stale_session(worker_id)
            reason = f"worker id {worker_id} was taken over by a newer process"
            logger.warning("worker.refused worker={} reason=replaced", worker_id)
            stop = protocol.Stop(s=session, reason=reason)
            scheduler.effects.sends.append((worker_id, stop))
            return
        if isinstance(msg, protocol.Ready):
            problem = _check_ready(msg, worker_id, self.settings.max_payload_bytes)
            if problem is None:
                scheduler.ready(msg, at)
                return
            logger.warning("worker.refused worker={!r} reason={!r}", worker_id, problem)
            stop = protocol.Stop(s=session, reason=problem)
            scheduler.effects.sends.append((worker_id, stop))
            return
        if status == "unknown":
            if not isinstance(msg, protocol.Bye):
                scheduler.ask_ready(worker_id)
                again = protocol.Reconnect(s=session, reason="unknown session")
                scheduler.effects.sends.append((worker_id, again))
            return
        scheduler.heard(worker_id, at)
        worker = scheduler.workers[worker_id]
        if isinstance(msg, protocol.Ack):
            scheduler.ack(worker, msg.n)
        elif isinstance(msg, protocol.Result):
            if msg.ok and len(msg.value) > self.settings.max_payload_bytes:
                msg = _too_large(msg, self.settings.max_payload_bytes)
            scheduler.result(worker, msg)
        elif isinstance(msg, protocol.Release):
            scheduler.release(worker, msg)
        elif isinstance(msg, protocol.Drain):
            scheduler.drain(worker)
        elif isinstance(msg, protocol.Bye):
            scheduler.bye(worker)

    def _send_workers(self, sends: list[tuple[str, protocol.Message]]) -> None:
        for worker_id, msg in sends:
            frames = protocol.worker_envelope(worker_id.encode("utf-8"), msg)
            try:
                protocol.send_frames(self.workers, frames)
            except zmq.ZMQError as exc:
                if exc.errno not in (errno.EHOSTUNREACH, zmq.EAGAIN):
                    raise
                self.send_failures += 1
                logger.warning(
                    "broker.send_failed worker={} command={} error={}",
                    worker_id,
                    msg.COMMAND.decode(),
                    "unreachable" if exc.errno == errno.EHOSTUNREACH else "queue full",
                )
                self.scheduler.unroutable(worker_id)

    # --- clients -------------------------------------------------------------------

    def _drain_clients(self, budget: int, replies: list[Reply]) -> int:
        count = 0
        while count < budget:
            frames = protocol.recv_frames(self.clients)
            if frames is None:
                break
            count += 1
            try:
                identity, rest = protocol.split_client_envelope(frames)
            except ProtocolError as exc:
                self._bad_frame("clients", exc, frames)
                continue
            try:
                msg = protocol.decode(rest, protocol.CLIENT_REQUESTS)
            except ProtocolError as exc:
                self._bad_frame("clients", exc, frames)
                error = protocol.Error(
                    rid=protocol.peek_rid(rest),
                    type=type(exc).__name__,
                    message=str(exc),
                    size=getattr(exc, "size", 0),
                )
                replies.append((identity, error))
                continue
            if isinstance(msg, protocol.Submit) and self._delays_left:
                self._delays_left -= 1
                self._delayed_identities.add(identity)
            try:
                self.desk.handle(identity, msg, replies)
            except StoreError:
                raise
            except Exception as exc:  # one request is a loop boundary: log, answer
                logger.exception("broker.message_failed endpoint=clients")
                rid = getattr(msg, "rid", 0)
                text = f"the broker failed on this request: {type(exc).__name__}"
                replies.append((identity, protocol.Error(rid, "HakobuError", text)))
            if not protocol.has_input(self.clients):
                break
        return count

    def _send_clients(self, replies: list[Reply], now: float) -> None:
        if self._delayed_identities or self._held_replies:
            replies = self._hold_back(replies, now)
        for identity, msg in replies:
            try:
                protocol.send_frames(
                    self.clients, protocol.client_envelope(identity, msg)
                )
            except zmq.ZMQError as exc:
                if exc.errno not in (errno.EHOSTUNREACH, zmq.EAGAIN):
                    raise
                logger.debug("client.gone command={}", msg.COMMAND.decode())

    def _hold_back(self, replies: list[Reply], now: float) -> list[Reply]:
        # The test-only reply delay: hold the marked replies, release due ones.
        due_at = now + self.settings.fault_reply_delay_s
        ready = []
        for identity, msg in replies:
            if identity in self._delayed_identities:
                self._delayed_identities.discard(identity)
                self._held_replies.append((due_at, (identity, msg)))
            else:
                ready.append((identity, msg))
        while self._held_replies and self._held_replies[0][0] <= now:
            ready.append(self._held_replies.pop(0)[1])
        return ready

    # --- misc -------------------------------------------------------------------------

    def _bad_frame(self, endpoint: str, exc: Exception, frames: list[bytes]) -> None:
        self.bad_frames += 1
        if self._bad_frame_log.allow():
            logger.warning(
                "protocol.bad_frame endpoint={} error={!r} frames={} bytes={} "
                "suppressed={}",
                endpoint,
                str(exc)[:200],
                len(frames),
                sum(len(f) for f in frames),
                self._bad_frame_log.take_suppressed(),
            )

    def close(self, commit: bool = True) -> None:
        """Commit deferred writes (unless told not to), close everything."""
        if self._carry is not None and commit:
            self.store.commit(self._carry)
        self._carry = None
        if commit and not self.workers.closed:
            # Confirmations of results stored: spares the workers a resend.
            self._send_workers(self.confirmations.release(set(), math.inf))
        for sock in (self.workers, self.clients):
            if not sock.closed:
                sock.close(LINGER_MS)
        self.ctx.term()
        self.store.close()


def _check_ready(msg: protocol.Ready, worker_id: str, limit: int) -> str | None:
    if msg.worker_id != worker_id:
        return f"READY names {msg.worker_id!r} but the routing id is {worker_id!r}"
    try:
        validate_worker_id(worker_id)
    except ConfigError as exc:
        return str(exc)
    if 0 < msg.max_payload_bytes < limit:
        return (
            f"worker max_payload_bytes {msg.max_payload_bytes} is below the "
            f"broker's {limit}: tasks the broker accepts could not reach this "
            "worker; give both the same HAKOBU_MAX_PAYLOAD_BYTES"
        )
    if not 1 <= msg.capacity <= MAX_CAPACITY:
        return f"capacity must be 1-{MAX_CAPACITY}"
    if len(msg.tags) > protocol.MAX_TAGS:
        return f"at most {protocol.MAX_TAGS} tags"
    if any(len(h) > protocol.MAX_NAME_CHARS for h in msg.handlers):
        return "handler names must be at most 200 characters"
    if not all(isinstance(p, list) and len(p) == 2 for p in msg.held):
        return "held must list [task, attempt] pairs"
    if not all(isinstance(t, str) and isinstance(a, int) for t, a in msg.held):
        return "held must list [task, attempt] pairs"
    return None


def _too_large(msg: protocol.Result, limit: int) -> protocol.Result:
    return protocol.Result(
        s=msg.s,
        task=msg.task,
        attempt=msg.attempt,
        ok=False,
        error_type="PayloadTooLarge",
        error=f"result is {len(msg.value)} bytes, over the limit of {limit}",
    )


def _spin_poll(
    poller: zmq.Poller, timeout_s: float, spin_s: float = 0.0
) -> dict[Any, int]:
    """Poll for up to `timeout_s`; for the first `spin_s` of it, poll without
    sleeping and yield the CPU between polls.

    A sleeping process costs a wake-up when a message comes (tens of
    microseconds, more on a virtual machine whose idle CPU halts); one that
    spins is already running. Other runnable processes still get the CPU.
    """
    if spin_s > 0:
        end = time.monotonic() + min(spin_s, timeout_s)
        while True:
            found = poller.poll(0)
            if found:
                return dict(found)
            if time.monotonic() >= end:
                break
            os.sched_yield()
        timeout_s = max(0.0, timeout_s - spin_s)
    return dict(poller.poll(math.ceil(timeout_s * 1000)))
