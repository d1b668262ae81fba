"""Fixtures for the worker tests: a fake broker on a real ROUTER, a worker runner."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from config.settings import WorkerSettings
from sdk import protocol
from sdk.errors import ProtocolError
from worker import Worker

# Handler child processes are spawned with the parent's sys.path, so this makes
# the probe task module importable on both sides.
HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

PROBES = "worker_probe_tasks"


def wait_until(
    predicate: Callable[[], Any], timeout_s: float, step_s: float = 0.01
) -> Any:
    """Return the first truthy value of `predicate`, or fail after `timeout_s`."""
    end = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= end:
            pytest.fail(f"condition not met within {timeout_s} s: {predicate}")
        time.sleep(step_s)


class FakeBroker:
    """A ROUTER speaking the worker protocol, driven step by step by a test."""

    def __init__(self, context: zmq.Context[Any]) -> None:
        self.context = context
        self.socket = self._bind(None)
        self.seen: list[tuple[bytes, protocol.Message]] = []
        self.n = 0

    def _bind(self, port: int | None) -> zmq.Socket[bytes]:
        sock = self.context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        try:
            if port is None:
                self.port = sock.bind_to_random_port("tcp://127.0.0.1")
            else:
                sock.bind(f"tcp://127.0.0.1:{port}")
        except zmq.ZMQError:
            sock.close(linger=0)
            raise
        return sock

    @property
    def endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.socket.close(linger=0)

    def restart(self) -> None:
        """Close the ROUTER and bind a fresh one on the same port."""
        self.socket.close(linger=0)
        self.socket = wait_until(lambda: self._try_bind(), 5.0)

    def _try_bind(self) -> zmq.Socket[bytes] | None:
        try:
            return self._bind(self.port)
        except zmq.ZMQError:
            return None

    def recv(self, timeout_s: float = 5.0) -> tuple[bytes, protocol.Message]:
        """Return the next (identity, message), failing loudly after `timeout_s`."""
        if not self.socket.poll(int(timeout_s * 1000)):
            pytest.fail(f"fake broker got nothing within {timeout_s} s")
        frames = self.socket.recv_multipart()
        message = protocol.decode(frames[1:], protocol.WORKER_MESSAGES)
        self.seen.append((frames[0], message))
        return frames[0], message

    def expect(
        self,
        kind: type[protocol.Message],
        timeout_s: float = 5.0,
        where: Callable[[Any], bool] = lambda m: True,
    ) -> Any:
        """Skip other messages until one of `kind` matching `where` arrives."""
        end = time.monotonic() + timeout_s
        while True:
            left = end - time.monotonic()
            if left <= 0:
                pytest.fail(f"no {kind.__name__} within {timeout_s} s")
            _, message = self.recv(left)
            if isinstance(message, kind) and where(message):
                return message

    def send(self, identity: bytes, message: protocol.Message) -> None:
        self.socket.send_multipart(protocol.worker_envelope(identity, message))

    def assign(
        self,
        identity: bytes,
        session: str,
        task: str,
        name: str,
        payload: Any,
        *,
        attempt: int = 1,
        timeout: float | None = None,
    ) -> int:
        """Send an ASSIGN with a fresh notification id and return that id."""
        self.n += 1
        self.send(
            identity,
            protocol.Assign(
                s=session,
                n=self.n,
                task=task,
                attempt=attempt,
                name=name,
                payload=protocol.pack_value(payload, 1 << 20),
                timeout=timeout,
            ),
        )
        return self.n

    def register(self, timeout_s: float = 10.0) -> tuple[bytes, protocol.Ready]:
        """Wait for READY, answer WELCOME, return (identity, ready)."""
        end = time.monotonic() + timeout_s
        while True:
            identity, message = self.recv(max(0.01, end - time.monotonic()))
            if isinstance(message, protocol.Ready):
                self.send(identity, protocol.Welcome(s=message.s))
                return identity, message


class RunningWorker:
    """A Worker running in a thread, with its exit code once it returns."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.code: int | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.code = self.worker.run()
        except BaseException as exc:  # reported to the test by join()
            self.error = exc

    def join(self, timeout_s: float) -> int | None:
        self.thread.join(timeout_s)
        if self.thread.is_alive():
            pytest.fail(f"worker still running after {timeout_s} s")
        if self.error is not None:
            raise self.error
        return self.code


FAST = {
    "heartbeat_interval_s": 0.1,
    "liveness": 30,
    "ack_timeout_s": 0.3,
    "grace_s": 1.0,
    "reconnect_min_s": 0.05,
    "reconnect_max_s": 0.2,
}


@pytest.fixture
def zmq_context() -> Iterator[zmq.Context[Any]]:
    context = zmq.Context()
    yield context
    context.term()


@pytest.fixture
def broker(zmq_context: zmq.Context[Any]) -> Iterator[FakeBroker]:
    fake = FakeBroker(zmq_context)
    yield fake
    fake.close()


@pytest.fixture
def start_worker(broker: FakeBroker) -> Iterator[Callable[..., RunningWorker]]:
    started: list[RunningWorker] = []

    def start(worker_id: str = "w1", **overrides: Any) -> RunningWorker:
        values = {**FAST, "broker_endpoint": broker.endpoint, **overrides}
        settings = WorkerSettings(worker_id=worker_id, **values)
        running = RunningWorker(Worker(settings=settings, tasks=[PROBES]))
        started.append(running)
        return running

    yield start
    for running in started:
        running.worker.request_stop()
    # Confirm whatever is still owed so the drains end without waiting.
    end = time.monotonic() + 10.0
    while any(r.thread.is_alive() for r in started) and time.monotonic() < end:
        if broker.socket.closed:
            break
        if not broker.socket.poll(20):
            continue
        frames = broker.socket.recv_multipart()
        try:
            message = protocol.decode(frames[1:], protocol.WORKER_MESSAGES)
        except ProtocolError:
            continue
        if isinstance(message, protocol.Result):
            stored = protocol.Stored(
                s=message.s, task=message.task, attempt=message.attempt
            )
            broker.send(frames[0], stored)
    for running in started:
        running.thread.join(5.0)
