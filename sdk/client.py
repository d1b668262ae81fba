"""CLIENT: the REQ socket to the broker and the calls programs make through it.

Requests follow the Lazy Pirate pattern: send, poll up to the request timeout,
and on silence close the socket, open a fresh one and send the same request
(same rid, same submit key) again, up to `retries` times. A socket is never
reused after a lost reply, so it can never be left waiting (EFSM), and a late
reply can never be taken for the answer to another request.

Limits:
    One request at a time per client: threads share it through a lock, so a
    thread parked in `result()` holds the client for up to one wait chunk
    (30 s). Threads that wait on results at the same time should each use
    their own `Client`.
    `result(id, timeout)` and `gather(..., timeout)` can overrun `timeout` by
    one request timeout when the broker stops answering; they then raise
    BrokerUnavailable.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import os
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any

import msgpack  # type: ignore[import-untyped]
import zmq
from loguru import logger
from zmq.utils.monitor import parse_monitor_message

from config.errors import ConfigError
from config.settings import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    ClientSettings,
    load_client_settings,
    replace,
    validate_worker_id,
)
from sdk import protocol
from sdk.errors import (
    BrokerUnavailable,
    DecodeError,
    InvalidRequest,
    ResultTimeout,
    TaskFailed,
    TaskNotFound,
    TransportError,
    error_from_reply,
)
from sdk.ids import time_ordered_id
from sdk.records import TASK_STATES, TaskHandle, TaskInfo, WorkerInfo

#: Longest single WAIT the client asks the broker to hold, in seconds.
WAIT_CHUNK_S = 30.0
#: Most tasks one WAIT_MANY request waits for (`gather`).
GATHER_CHUNK = 500
#: Resends per request after a disconnect or a stray reply, before they count
#: as retries.
MAX_FREE_RESENDS = 10
#: Requests whose largest frame is bigger than this get a size hint when they
#: go unanswered: a broker with a smaller max_payload_bytes drops such frames.
LARGE_REQUEST_BYTES = 1 << 20

_LOST = object()


class _Channel:
    """One process's context, REQ socket and disconnect monitor for an endpoint."""

    _serial = itertools.count(1)

    def __init__(self, endpoint: str) -> None:
        """Create the context; sockets open on first use."""
        self.endpoint = endpoint
        self.pid = os.getpid()
        self.context = zmq.Context()
        self.socket: zmq.Socket[bytes] | None = None
        self.monitor: zmq.Socket[bytes] | None = None

    def open(self) -> zmq.Socket[bytes]:
        """Return the REQ socket, connecting a fresh one when there is none."""
        if self.socket is not None:
            return self.socket
        sock = self.context.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        address = f"inproc://hakobu-client-{self.pid}-{id(self)}-{next(self._serial)}"
        self.monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED, address)
        self.monitor.setsockopt(zmq.LINGER, 0)
        self.socket = sock
        try:
            sock.connect(self.endpoint)
        except zmq.ZMQError as exc:
            self.reset()
            raise ConfigError(
                f"invalid clients endpoint {self.endpoint!r}: {exc.strerror} "
                "(setting clients_endpoint / HAKOBU_CLIENTS_ENDPOINT)"
            ) from exc
        return sock

    def disconnected(self) -> bool:
        """Drain the monitor and say whether the connection dropped meanwhile."""
        dropped = False
        while self.monitor is not None and self.monitor.poll(0):
            event = parse_monitor_message(self.monitor.recv_multipart())
            dropped = dropped or event["event"] == zmq.EVENT_DISCONNECTED
        return dropped

    def reset(self) -> None:
        """Close the REQ socket and its monitor without waiting for anything."""
        if self.socket is not None:
            self.socket.disable_monitor()
            self.socket.close(linger=0)
            self.socket = None
        if self.monitor is not None:
            self.monitor.close(linger=0)
            self.monitor = None

    def close(self) -> None:
        """Close sockets and context; a forked child leaves its parent's alone."""
        if os.getpid() != self.pid or self.context.closed:
            return
        self.reset()
        self.context.term()


class Client:
    """Submit tasks to a hakobu broker and ask about them; safe across threads."""

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        request_timeout: float | None = None,
        retries: int | None = None,
        settings: ClientSettings | None = None,
    ) -> None:
        """Take settings from `settings` or the environment; explicit args win."""
        base = settings if settings is not None else load_client_settings()
        self.settings = replace(base, **_overrides(endpoint, request_timeout, retries))
        self._lock = threading.Lock()
        self._rids = itertools.count(secrets.randbelow(2**31) + 1)
        self._channel: _Channel | None = None
        self._closed = False
        self._log = logger.bind(endpoint=self.endpoint)

    @property
    def endpoint(self) -> str:
        """The broker's clients endpoint this client talks to."""
        return self.settings.clients_endpoint

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the socket and context; later calls do nothing."""
        with self._lock:
            self._closed = True
            if self._channel is not None:
                self._channel.close()
                self._channel = None

    # --- calls ----------------------------------------------------------------

    def submit(
        self,
        name: str,
        payload: Any = None,
        *,
        preferred_worker: str | None = None,
        require_worker: bool = False,
        fallback_after: float | None = None,
        start_deadline: float | None = None,
        priority: int = 0,
        tags: Iterable[str] = (),
        delay: float | None = None,
        timeout: float | None = None,
        retries: int = 0,
        key: str | None = None,
    ) -> TaskHandle:
        """Submit one task; return its handle once the broker has stored it.

        Raises:
            InvalidRequest: an argument has the wrong type or range.
            PayloadTooLarge, ProtocolError: the payload cannot be sent.
            BrokerUnavailable: no reply after every retry.
        """
        options = {
            "preferred_worker": preferred_worker,
            "require_worker": require_worker,
            "fallback_after": fallback_after,
            "start_deadline": start_deadline,
            "priority": priority,
            "tags": tags,
            "delay": delay,
            "timeout": timeout,
            "retries": retries,
            "key": key,
        }
        body = _submit_body(self.settings.max_payload_bytes, name, payload, options)
        data = self._call(lambda rid: protocol.Submit(rid=rid, **body))
        task_id = _field(data, "id", str)
        return TaskHandle(task_id, self, bool(data.get("created", True)))

    def call(
        self,
        name: str,
        payload: Any = None,
        *,
        wait: float | None = None,
        **options: Any,
    ) -> Any:
        """Submit one task and return its value once it ended.

        The submit and the wait travel as one request, so a quick task costs
        one round trip instead of two. `options` are `submit`'s keywords (a
        retried call carries the same key, so it never makes a second task);
        `wait` bounds the wait in seconds (None waits without limit).

        Raises:
            TaskFailed: the task ended failed or cancelled.
            ResultTimeout: `wait` seconds passed first.
            InvalidRequest, PayloadTooLarge, BrokerUnavailable: as for submit.
        """
        limit = _wait_limit("wait", wait)
        body = _submit_body(self.settings.max_payload_bytes, name, payload, options)
        deadline = None if limit is None else time.monotonic() + limit
        chunk_s = WAIT_CHUNK_S if limit is None else min(WAIT_CHUNK_S, limit)
        data = self._call(
            functools.partial(protocol.Run, task=body, timeout=chunk_s),
            self._give_up_at(deadline),
        )
        info = _task(data)
        return self._wait_for(info.id, info, deadline, wait)

    def submit_many(
        self, tasks: Iterable[dict[str, Any] | tuple[Any, ...]]
    ) -> list[TaskHandle]:
        """Submit several tasks, one request (and one commit) per size-bounded batch.

        Each item is a dict of `submit` keywords plus "name" and "payload", or a
        tuple (name, payload[, keywords]).
        """
        limit = self.settings.max_payload_bytes
        bodies = [_submit_body(limit, *_spread(item)) for item in tasks]
        handles: list[TaskHandle] = []
        for batch in _batches(bodies, limit):
            data = self._call(functools.partial(protocol.SubmitMany, tasks=batch))
            ids = _field(data, "ids", list)
            created = data.get("created") or [True] * len(ids)
            if len(ids) != len(batch) or len(created) != len(batch):
                raise DecodeError(
                    f"SUBMIT_MANY reply has {len(ids)} ids for {len(batch)}"
                )
            handles += [
                TaskHandle(str(i), self, bool(c))
                for i, c in zip(ids, created, strict=True)
            ]
        return handles

    def status(self, task_id: str) -> TaskInfo:
        """Return the task's current record; raise TaskNotFound for unknown ids."""
        _check_id(task_id)
        data = self._call(lambda rid: protocol.Status(rid=rid, id=task_id))
        return _task(data)

    def result(self, task_id: str, timeout: float | None = None) -> Any:
        """Wait for the task to end and return its value.

        Raises:
            TaskFailed: the task ended failed or cancelled.
            ResultTimeout: `timeout` seconds passed first (None waits without limit).
        """
        _check_id(task_id)
        limit = _wait_limit("timeout", timeout)
        deadline = None if limit is None else time.monotonic() + limit
        return self._wait_for(task_id, None, deadline, timeout)

    def _wait_for(
        self,
        task_id: str,
        info: TaskInfo | None,
        deadline: float | None,
        waited: Any,
    ) -> Any:
        """WAIT until the task ends or `deadline` (monotonic) passes; `info` is
        what is known already, `waited` the wait the caller asked for."""
        give_up = self._give_up_at(deadline)

        def chunk() -> float:
            if deadline is None:
                return WAIT_CHUNK_S
            return max(0.0, min(WAIT_CHUNK_S, deadline - time.monotonic()))

        while True:
            if info is not None:
                if info.is_terminal:
                    return _outcome(info)
                if deadline is not None and time.monotonic() >= deadline:
                    raise ResultTimeout(
                        f"task {task_id} still {info.state} after waiting {waited} s"
                    )
            info = _task(
                self._call(lambda rid: protocol.Wait(rid, task_id, chunk()), give_up)
            )

    def gather(
        self,
        tasks: Iterable[TaskHandle | str],
        timeout: float | None = None,
        *,
        return_exceptions: bool = False,
    ) -> list[Any]:
        """Wait for every task to end; return their values in the order given.

        One request waits for up to GATHER_CHUNK tasks at a time, so awaiting
        many tasks costs a few round trips instead of one each.

        Raises:
            TaskFailed, TaskNotFound: the first task (in the order given)
                that ended failed or cancelled, or that the broker does not
                know, unless `return_exceptions` is true: then that error
                takes the task's place in the list.
            InvalidRequest: `tasks` is a single id or handle, not a list.
            ResultTimeout: `timeout` seconds passed before every task ended.
        """
        if isinstance(tasks, str | TaskHandle):
            raise InvalidRequest("gather takes a list of task ids or handles")
        ids = [t.id if isinstance(t, TaskHandle) else t for t in tasks]
        for task_id in ids:
            _check_id(task_id)
        limit = _wait_limit("timeout", timeout)
        deadline = None if limit is None else time.monotonic() + limit
        infos: dict[str, TaskInfo] = {}
        for start in range(0, len(ids), GATHER_CHUNK):
            chunk = list(dict.fromkeys(ids[start : start + GATHER_CHUNK]))
            infos.update(self._gather_chunk(chunk, deadline, timeout))
        values = []
        for task_id in ids:
            info = infos.get(task_id)
            try:
                if info is None:
                    raise TaskNotFound(f"no task with id {task_id!r}")
                values.append(_outcome(info))
            except (TaskFailed, TaskNotFound) as exc:
                if not return_exceptions:
                    raise
                values.append(exc)
        return values

    def _gather_chunk(
        self, ids: list[str], deadline: float | None, timeout: float | None
    ) -> dict[str, TaskInfo]:
        """Wait on one chunk of distinct ids until all ended; return their infos."""
        done: dict[str, TaskInfo] = {}
        waiting = ids
        while waiting:
            if deadline is None:
                chunk_s = WAIT_CHUNK_S
            else:
                chunk_s = max(0.0, min(WAIT_CHUNK_S, deadline - time.monotonic()))
            request = functools.partial(protocol.WaitMany, ids=waiting, timeout=chunk_s)
            data = self._call(request, self._give_up_at(deadline))
            maps = _field(data, "tasks", list)
            if len(maps) != len(waiting):
                raise DecodeError(f"WAIT_MANY reply has {len(maps)} tasks")
            left = []
            for task_id, raw in zip(waiting, maps, strict=True):
                if not isinstance(raw, dict):
                    raise DecodeError("broker sent a malformed task record")
                if raw.get("missing"):
                    continue  # unknown: no info, gather reports TaskNotFound
                if raw.get("omitted"):
                    # Too big to share a reply: fetched on its own.
                    info = self.status(task_id)
                else:
                    info = _task({"task": raw})
                if info.is_terminal:
                    done[task_id] = info
                else:
                    left.append(task_id)
            waiting = left
            if waiting and deadline is not None and time.monotonic() >= deadline:
                raise ResultTimeout(
                    f"{len(waiting)} task(s) still open after waiting {timeout} s, "
                    f"first {waiting[0]}"
                )
        return done

    def _give_up_at(self, deadline: float | None) -> float | None:
        """When waits bounded by `deadline` stop retrying a silent broker: one
        request timeout after it, for the broker's reply to arrive."""
        if deadline is None:
            return None
        return deadline + self.settings.request_timeout_s

    def cancel(self, task_id: str) -> TaskInfo:
        """Cancel the task if it has not ended; return its record."""
        _check_id(task_id)
        return _task(self._call(lambda rid: protocol.Cancel(rid=rid, id=task_id)))

    def workers(self) -> list[WorkerInfo]:
        """Return every worker the broker knows, with its state and load."""
        data = self._call(lambda rid: protocol.ListWorkers(rid=rid))
        return [WorkerInfo.from_wire(w) for w in _field(data, "workers", list)]

    def tasks(
        self, state: str | None = None, worker: str | None = None, limit: int = 100
    ) -> list[TaskInfo]:
        """Return up to `limit` (at most 10,000) tasks, newest first, without
        their results."""
        _check_list_args(state, worker, limit)
        data = self._call(lambda rid: protocol.ListTasks(rid, state, worker, limit))
        return [TaskInfo.from_wire(t) for t in _field(data, "tasks", list)]

    # --- the Lazy Pirate exchange ---------------------------------------------

    def _call(
        self,
        build: Callable[[int], protocol.Message],
        give_up_at: float | None = None,
    ) -> dict[str, Any]:
        """Send build(rid) until a reply comes, resending on a fresh socket.

        `build` is called for each send with the same rid; it must make the same
        request each time (a WAIT may shorten its timeout). With `give_up_at`
        (monotonic), no attempt waits past it and none starts after it.
        """
        with self._lock:
            channel = self._open_channel()
            rid = next(self._rids)
            attempts = self.settings.request_retries + 1
            failures, free = 0, MAX_FREE_RESENDS
            while True:
                message = build(rid)
                frames = message.encode()
                try:
                    reply = self._exchange(channel, message, frames, rid, give_up_at)
                except BaseException:
                    # NOTE: a REQ socket left between send and reply (Ctrl-C, a
                    # bad reply) would refuse the next send with EFSM.
                    channel.reset()
                    raise
                if isinstance(reply, protocol.Ok):
                    return reply.data
                if isinstance(reply, protocol.Error):
                    raise error_from_reply(
                        reply.type, reply.message, reply.size, reply.limit
                    )
                channel.reset()
                command = message.COMMAND.decode()
                if reply is _LOST and free > 0:
                    free -= 1
                    self._log.debug("client.resend command={} rid={}", command, rid)
                    continue
                failures += 1
                if failures >= attempts:
                    break
                if give_up_at is not None and time.monotonic() >= give_up_at:
                    attempts = failures
                    break
                self._log.warning(
                    "client.retry command={} rid={} attempt={}", command, rid, failures
                )
            wait_s = _wait_s(message, self.settings.request_timeout_s)
            self._log.warning(
                "client.unavailable command={} attempts={}", command, attempts
            )
            size = max(len(frame) for frame in frames)
            hint = ""
            if size > LARGE_REQUEST_BYTES:
                hint = (
                    f"; the request was {size} bytes, and a broker with a smaller "
                    "max_payload_bytes drops such frames without a reply"
                )
            raise BrokerUnavailable(
                f"no reply from the broker at {self.endpoint} within {wait_s:g} s, "
                f"{attempts} attempt(s); is it running? (setting clients_endpoint / "
                f"HAKOBU_CLIENTS_ENDPOINT, request_timeout_s, request_retries){hint}"
            )

    def _exchange(
        self,
        channel: _Channel,
        message: protocol.Message,
        frames: list[bytes],
        rid: int,
        give_up_at: float | None = None,
    ) -> object:
        """Send `message` (as `frames`) once: the reply, _LOST or None (timeout).

        _LOST means resend now: the connection dropped or a stray reply came.
        """
        sock = channel.open()
        channel.disconnected()
        try:
            sock.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.Again:
            return None
        deadline = time.monotonic() + _wait_s(message, self.settings.request_timeout_s)
        if give_up_at is not None:
            deadline = min(deadline, give_up_at)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        if channel.monitor is not None:
            poller.register(channel.monitor, zmq.POLLIN)
        while (remaining := deadline - time.monotonic()) > 0:
            ready = dict(poller.poll(math.ceil(remaining * 1000)))
            if sock in ready:
                reply = protocol.decode(sock.recv_multipart(), protocol.CLIENT_REPLIES)
                if getattr(reply, "rid", None) == rid:
                    return reply
                self._log.warning(
                    "client.stray_reply rid={} want={}",
                    getattr(reply, "rid", None),
                    rid,
                )
                return _LOST
            if channel.monitor in ready and channel.disconnected():
                return _LOST
        return None

    def _open_channel(self) -> _Channel:
        """Return this process's channel, making one after a fork or on first use."""
        if self._closed:
            raise TransportError(f"client for {self.endpoint} is closed")
        channel = self._channel
        if channel is None or channel.pid != os.getpid():
            # NOTE: a forked child must not touch sockets its parent made; it
            # abandons them and builds its own.
            channel = self._channel = _Channel(self.endpoint)
            weakref.finalize(self, channel.close)
        return channel


def _overrides(
    endpoint: str | None, request_timeout: float | None, retries: int | None
) -> dict[str, Any]:
    """Check the explicit constructor arguments and return them as settings."""
    changes: dict[str, Any] = {}
    for key, value, kind in (
        ("clients_endpoint", endpoint, str),
        ("request_timeout_s", request_timeout, int | float),
        ("request_retries", retries, int),
    ):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, kind):
            raise ConfigError(f"invalid client setting {key}={value!r}: wrong type")
        changes[key] = float(value) if key == "request_timeout_s" else value
    return changes


def _wait_s(message: protocol.Message, request_timeout_s: float) -> float:
    """Return how long to wait for the reply to `message`."""
    if isinstance(message, protocol.Wait | protocol.WaitMany | protocol.Run):
        return message.timeout + request_timeout_s
    return request_timeout_s


def _field(data: dict[str, Any], key: str, kind: type) -> Any:
    """Return data[key], or raise DecodeError when it is missing or ill-typed."""
    value = data.get(key)
    if not isinstance(value, kind):
        raise DecodeError(f"broker reply lacks a valid {key!r} field")
    return value


def _task(data: dict[str, Any]) -> TaskInfo:
    """Build the TaskInfo in a reply's `task` field."""
    try:
        return TaskInfo.from_wire(_field(data, "task", dict))
    except (KeyError, TypeError) as exc:
        raise DecodeError(f"broker sent a malformed task record: {exc}") from exc


def _outcome(info: TaskInfo) -> Any:
    """Return a succeeded task's value or raise TaskFailed for the others."""
    if info.state == "succeeded":
        return info.result
    error_type = info.error_type or (
        "Cancelled" if info.state == "cancelled" else "Error"
    )
    raise TaskFailed(
        info.id, error_type, info.error or "", info.traceback or "", info.state
    )


# --- local checks of submit arguments ---------------------------------------------

#: Keywords a submit (or a submit_many item) may carry besides name and payload.
SUBMIT_OPTIONS = tuple(
    f.name
    for f in dataclasses.fields(protocol.Submit)
    if f.name not in ("rid", "name", "payload")
)
# NOTE: the bounds below mirror broker/validation.py, which refuses the same
# requests; checking them here fails fast, before anything is sent.
#: Longest submit key, in characters.
MAX_KEY_CHARS = 200
#: Largest absolute priority the broker accepts.
MAX_PRIORITY = 1_000_000
#: Most retries the broker accepts for one task.
MAX_RETRIES = 1000
#: Longest tag of a task, in characters.
MAX_TAG_CHARS = 100
#: Longest duration (fallback_after, start_deadline, delay, timeout): 10 years.
MAX_DURATION_S = 315_360_000.0


def check_submit_item(
    item: dict[str, Any] | tuple[Any, ...],
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
) -> None:
    """Check one submit_many item as submit_many would, sending nothing.

    Raises:
        InvalidRequest: the item or one of its keywords is refused.
        PayloadTooLarge, ProtocolError: its payload cannot be sent.
    """
    _submit_body(max_payload_bytes, *_spread(item))


def _submit_body(
    limit: int, name: Any, payload: Any, options: dict[str, Any]
) -> dict[str, Any]:
    """Check one submit's arguments and return its wire body (without rid).

    The payload is packed here, so an oversize or unpackable one is refused
    before anything is sent.
    """
    unknown = sorted(set(options) - set(SUBMIT_OPTIONS))
    if unknown:
        raise InvalidRequest(f"unknown submit keyword(s): {', '.join(unknown)}")
    _check_text("name", name, protocol.MAX_NAME_CHARS)
    preferred = _preferred_worker(options.get("preferred_worker"))
    require = options.get("require_worker", False)
    if not isinstance(require, bool):
        raise InvalidRequest(f"require_worker must be a bool, not {require!r}")
    if require and preferred is None:
        raise InvalidRequest("require_worker=True needs a preferred_worker")
    key = options.get("key")
    if key is None:
        key = time_ordered_id()
    _check_text("key", key, MAX_KEY_CHARS)
    priority = options.get("priority", 0)

    return {
        "name": name,
        "payload": protocol.pack_value(payload, limit),
        "key": key,
        "preferred_worker": preferred,
        "require_worker": require,
        "fallback_after": _seconds("fallback_after", options.get("fallback_after")),
        "start_deadline": _seconds("start_deadline", options.get("start_deadline")),
        "priority": _integer("priority", priority, -MAX_PRIORITY, MAX_PRIORITY),
        "tags": _tags(options.get("tags", ())),
        "delay": _seconds("delay", options.get("delay")),
        "timeout": _seconds("timeout", options.get("timeout"), positive=True),
        "retries": _integer("retries", options.get("retries", 0), 0, MAX_RETRIES),
    }


def _preferred_worker(value: Any) -> str | None:
    """Return a valid preferred worker id, or None; refuse anything else."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidRequest(
            f"preferred_worker must be a str, not {type(value).__name__} "
            f"({value!r:.80})"
        )
    if not value:
        raise InvalidRequest("preferred_worker must be a worker id, not empty")
    try:
        return validate_worker_id(value)
    except ConfigError as exc:
        raise InvalidRequest(f"preferred_worker: {exc}") from exc


def _spread(item: Any) -> tuple[Any, Any, dict[str, Any]]:
    """Split a submit_many item into (name, payload, keywords)."""
    if isinstance(item, dict):
        options = dict(item)
        if "name" not in options:
            raise InvalidRequest(f"submit_many item without a name: {sorted(item)}")
        return options.pop("name"), options.pop("payload", None), options
    if isinstance(item, tuple | list) and 1 <= len(item) <= 3:
        name, payload, options = (*item, None, None)[:3]
        if options is not None and not isinstance(options, dict):
            raise InvalidRequest("a submit_many tuple is (name, payload[, keywords])")
        return name, payload, dict(options or {})
    raise InvalidRequest(
        f"submit_many items are dicts or tuples, not {type(item).__name__}"
    )


def _envelope_bytes() -> int:
    """Return the bytes a SUBMIT_MANY request takes besides its task bodies."""
    empty = protocol.SubmitMany(rid=2**64 - 1, tasks=[]).encode()
    # An empty array header is 1 byte; a header for any longer list is at most 5.
    return sum(len(frame) for frame in empty) + 4


def _batches(bodies: list[dict[str, Any]], limit: int) -> list[list[dict[str, Any]]]:
    """Group bodies into SUBMIT_MANY requests that fit the broker's frame limit.

    Each body is packed to learn its real size, so a request (all its frames
    together) never exceeds protocol.maxmsgsize(limit); a body too big to share
    a request goes alone.
    """
    room = protocol.maxmsgsize(limit) - _envelope_bytes()
    groups: list[list[dict[str, Any]]] = []
    size = room
    for body in bodies:
        cost = len(msgpack.packb(body, use_bin_type=True))
        if size + cost > room:
            groups.append([])
            size = 0
        groups[-1].append(body)
        size += cost
    return groups


def _check_text(what: str, value: Any, longest: int) -> None:
    """Refuse anything but a non-empty str of at most `longest` characters."""
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"{what} must be a non-empty str, not {value!r:.80}")
    if len(value) > longest:
        raise InvalidRequest(f"{what} is {len(value)} characters, at most {longest}")


def _seconds(what: str, value: Any, positive: bool = False) -> float | None:
    """Return a duration in seconds, or None; refuse anything else.

    Negatives, non-numbers, NaN, infinities and durations over MAX_DURATION_S
    are refused before anything is sent.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(f"{what} must be seconds (a number), not {value!r:.80}")
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        bound = "above 0" if positive else "0 or more"
        raise InvalidRequest(f"{what} must be a finite number of seconds {bound}")
    if value > MAX_DURATION_S:
        raise InvalidRequest(
            f"{what}={value:g} s is over the limit of {MAX_DURATION_S:.0f} s (10 years)"
        )
    return float(value)


def _wait_limit(what: str, value: Any) -> float | None:
    """Return how long a wait may last in seconds, None for no limit.

    Negatives mean no waiting and infinity no limit; non-numbers and NaN are
    refused before anything is sent.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(f"{what} must be seconds (a number), not {value!r:.80}")
    try:
        seconds = float(value)
    except OverflowError:  # an int past any float: no limit, or no waiting
        return None if value > 0 else 0.0
    if math.isnan(seconds):
        raise InvalidRequest(f"{what} must be a number of seconds, not NaN")
    return None if math.isinf(seconds) and seconds > 0 else max(0.0, seconds)


def _integer(what: str, value: Any, low: int, high: int = 2**31 - 1) -> int:
    """Return an int between `low` and `high`, or refuse it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{what} must be an int, not {value!r:.80}")
    if not low <= value <= high:
        raise InvalidRequest(
            f"{what}={value} is out of range: the broker accepts {low} to {high}"
        )
    return value


def _tags(value: Any) -> list[str]:
    """Return tags as a list of non-empty str, or refuse them."""
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise InvalidRequest(f"tags must be a list of str, not {value!r:.80}")
    tags = list(value)
    if len(tags) > protocol.MAX_TAGS:
        raise InvalidRequest(f"{len(tags)} tags, at most {protocol.MAX_TAGS}")
    for tag in tags:
        _check_text("a tag", tag, MAX_TAG_CHARS)
    return tags


def _check_id(task_id: Any) -> None:
    """Refuse a task id that is not a non-empty str."""
    _check_text("task id", task_id, MAX_KEY_CHARS)


def _check_list_args(state: Any, worker: Any, limit: Any) -> None:
    """Check the filters of Client.tasks."""
    if state is not None and state not in TASK_STATES:
        raise InvalidRequest(
            f"unknown state {state!r}; one of {', '.join(TASK_STATES)}"
        )
    if worker is not None:
        _check_text("worker", worker, 1024)
    _integer("limit", limit, low=1, high=protocol.MAX_LIST_LIMIT)
