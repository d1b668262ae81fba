"""The worker's link to its broker: the DEALER socket, READY, heartbeats, liveness.

The session token is fixed for the worker process; the socket is replaced
(same routing id, new connection) whenever the broker goes silent.
"""

from __future__ import annotations

import math
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import zmq
from loguru import logger

from config.errors import ConfigError
from config.settings import WorkerSettings
from sdk import protocol
from sdk.errors import ProtocolError

#: Linger of a socket closed in normal operation, in milliseconds.
LINGER_MS = 500
#: Most messages read from the socket in one loop turn.
RECV_BATCH = 1000


class Session:
    """One DEALER at a time to the broker, with its timers."""

    def __init__(
        self,
        settings: WorkerSettings,
        handlers: list[str],
        ready_state: Callable[[], tuple[list[list[Any]], bool]],
        log: Any = logger,
    ) -> None:
        self.token = secrets.token_hex(8)
        self.socket: zmq.Socket[bytes] | None = None
        self.is_welcomed = False
        #: When the last READY was made (monotonic); see `awaits_welcome`.
        self._ready_at = -math.inf
        self._settings = settings
        self._handlers = list(handlers)
        self._ready_state = ready_state
        self._log = log
        self._identity = settings.worker_id.encode("utf-8")
        self._context: zmq.Context[Any] | None = None
        self._backoff_s = settings.reconnect_min_s
        self._reconnect_at: float | None = None
        self._last_heard_at = 0.0
        self._next_heartbeat_at = 0.0
        self._silence_s = settings.liveness * settings.heartbeat_interval_s

    # --- socket -------------------------------------------------------------

    def open(self, context: zmq.Context[Any], now: float) -> None:
        """Open a fresh DEALER, connect and announce this worker with READY."""
        self._context = context
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, LINGER_MS)
        sock.setsockopt(zmq.ROUTING_ID, self._identity)
        sock.setsockopt(
            zmq.MAXMSGSIZE, protocol.maxmsgsize(self._settings.max_payload_bytes)
        )
        try:
            sock.connect(self._settings.broker_endpoint)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            endpoint = self._settings.broker_endpoint
            raise ConfigError(
                f"cannot connect to broker endpoint {endpoint!r}: {exc} "
                "(check --broker / HAKOBU_BROKER_ENDPOINT)"
            ) from exc
        self.socket = sock
        self.is_welcomed = False
        self._reconnect_at = None
        self._last_heard_at = now
        self._next_heartbeat_at = now + self._settings.heartbeat_interval_s
        self.send_ready()

    def close(self, linger_ms: int = LINGER_MS) -> None:
        """Close the socket if open, waiting at most `linger_ms` to flush it."""
        if self.socket is not None:
            self.socket.close(linger=max(0, linger_ms))
            self.socket = None
        self.is_welcomed = False

    def send(self, message: protocol.Message) -> bool:
        """Send without blocking; a message that cannot go now is dropped."""
        if self.socket is None:
            return False
        try:
            protocol.send_frames(self.socket, message.encode())
        except zmq.ZMQError as exc:
            # Everything we send is repeated by a timer or by the broker.
            self._log.debug(
                "protocol.send_dropped command={} error={}",
                message.COMMAND.decode(),
                exc,
            )
            return False
        self._log.debug("protocol.sent command={}", message.COMMAND.decode())
        return True

    def send_ready(self) -> None:
        """Announce this worker: capacity, tags, handlers and held attempts."""
        self.send(self.ready_message())

    def ready_message(self) -> protocol.Ready:
        """Return READY as of now; the next WELCOME is awaited from here on."""
        held, draining = self._ready_state()
        self.is_welcomed = False
        self._ready_at = time.monotonic()
        return protocol.Ready(
            s=self.token,
            worker_id=self._settings.worker_id,
            capacity=self._settings.capacity,
            tags=list(self._settings.tags),
            handlers=self._handlers,
            held=held,
            draining=draining,
            pid=os.getpid(),
            host=socket.gethostname(),
            max_payload_bytes=self._settings.max_payload_bytes,
        )

    def receive(self, now: float) -> Iterator[protocol.Message]:
        """Yield waiting messages for this session; drop bad or foreign ones.

        One at a time: the caller acts on each (an ASSIGN goes to its child)
        before the next is read and decoded.
        """
        for _ in range(RECV_BATCH):
            sock = self.socket
            if sock is None:
                return
            frames = protocol.recv_frames(sock)
            if frames is None:
                return
            message = self._accept(frames, now)
            if message is not None:
                yield message
            if self.socket is None or not protocol.has_input(self.socket):
                return

    def _accept(self, frames: list[bytes], now: float) -> protocol.Message | None:
        try:
            message = protocol.decode(frames, protocol.BROKER_MESSAGES)
        except ProtocolError as exc:
            self._log.warning("protocol.bad_frame error={}", exc)
            return None
        # Any well-formed broker message shows the link is alive; only those
        # for this session are acted on.
        self._last_heard_at = now
        if getattr(message, "s", None) != self.token:
            self._log.debug(
                "protocol.foreign_session command={}", message.COMMAND.decode()
            )
            return None
        self._log.debug("protocol.received command={}", message.COMMAND.decode())
        return message

    def awaits_welcome(self, now: float) -> bool:
        """True while a READY went out less than a heartbeat ago, unanswered.

        The broker answers every message of a session it does not know with
        RECONNECT; one READY answers them all.
        """
        waited = now - self._ready_at
        return not self.is_welcomed and waited < self._settings.heartbeat_interval_s

    def on_welcome(self) -> None:
        """READY was accepted: the next loss starts again from the shortest backoff."""
        self.is_welcomed = True
        self._backoff_s = self._settings.reconnect_min_s

    # --- timers -------------------------------------------------------------

    def next_timer_at(self) -> float | None:
        """Return when `tick` next has something to do."""
        if self.socket is None:
            return self._reconnect_at
        return min(self._next_heartbeat_at, self._last_heard_at + self._silence_s)

    def tick(self, now: float) -> None:
        """Reconnect when due, heartbeat when due, give up on a silent broker."""
        if self.socket is None:
            if self._reconnect_at is not None and now >= self._reconnect_at:
                if self._context is not None:
                    self._log.info("worker.reconnecting")
                    self.open(self._context, now)
            return
        if now - self._last_heard_at >= self._silence_s:
            self._lose(now)
            return
        if now >= self._next_heartbeat_at:
            self.send(protocol.Heartbeat(s=self.token))
            self._next_heartbeat_at = now + self._settings.heartbeat_interval_s

    def _lose(self, now: float) -> None:
        self._log.warning(
            "worker.broker_lost silent_s={:.2f} retry_in_s={:.2f}",
            now - self._last_heard_at,
            self._backoff_s,
        )
        self.close(linger_ms=0)
        self._reconnect_at = now + self._backoff_s
        self._backoff_s = min(self._backoff_s * 2, self._settings.reconnect_max_s)
