"""The client without a real broker: timeouts and retries (C14), no fd leaks,
local refusal of bad arguments and payloads (C06, C28), thread safety (C10),
against nothing or a small fake broker ROUTER run by the test."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from helpers.waiting import free_port, wait_until

from broker import validation
from config.settings import ClientSettings
from sdk import (
    BrokerUnavailable,
    Client,
    InvalidRequest,
    PayloadTooLarge,
    ProtocolError,
    ResultTimeout,
    TaskFailed,
    TaskNotFound,
)
from sdk import client as client_module
from sdk import protocol as p

PROJECT_DIR = Path(__file__).resolve().parents[2]
#: Reply plan of the fake broker: (seconds to hold the reply, reply or None).
Plan = list[tuple[float, p.Message | None]]


def ok(request: p.Message, **data: Any) -> Plan:
    """Answer at once with OK and `data`."""
    return [(0.0, p.Ok(rid=request.rid, data=data))]  # type: ignore[attr-defined]


def task_map(task_id: str, state: str, **extra: Any) -> dict[str, Any]:
    """Return a broker task map with the fields TaskInfo needs."""
    return {
        "id": task_id,
        "name": "echo",
        "state": state,
        "worker_id": "w1",
        "attempts": 1,
        "preferred_worker": None,
        **extra,
    }


def echo_broker(request: p.Message) -> Plan:
    """Answer like a broker whose tasks all succeed with their key as value."""
    if isinstance(request, p.Submit):
        return ok(request, id=request.key, created=True)
    if isinstance(request, p.SubmitMany):
        keys = [t["key"] for t in request.tasks]
        return ok(request, ids=keys, created=[True] * len(keys))
    if isinstance(request, p.Wait | p.Status | p.Cancel):
        value = p.pack_value(request.id, 1024)
        return ok(request, task=task_map(request.id, "succeeded", result=value))
    if isinstance(request, p.ListWorkers):
        worker = {"id": "w1", "state": "online", "capacity": 2, "in_flight": 0}
        return ok(request, workers=[worker])
    return ok(request, tasks=[])


class FakeBroker:
    """A clients ROUTER in a thread that answers each request by `answer`."""

    def __init__(
        self,
        answer: Callable[[p.Message], Plan],
        port: int = 0,
        maxmsgsize: int = -1,
    ) -> None:
        self.answer = answer
        self.requests: list[p.Message] = []
        self.port = port
        #: Like the broker's ZMQ_MAXMSGSIZE: a bigger frame drops the connection.
        self.maxmsgsize = maxmsgsize
        self._stop = threading.Event()
        self.sent = 0
        self._error: zmq.ZMQError | None = None
        self._bound = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._bound.wait(5), "fake broker did not bind"
        if self._error is not None:
            raise self._error

    @property
    def endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def _run(self) -> None:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, self.maxmsgsize)
        try:
            if self.port:
                sock.bind(self.endpoint)
            else:
                self.port = sock.bind_to_random_port("tcp://127.0.0.1")
        except zmq.ZMQError as exc:
            self._error = exc
            self._stop.set()
        self._bound.set()
        pending: list[tuple[float, bytes, p.Message]] = []
        try:
            while not self._stop.is_set():
                if sock.poll(10):
                    identity, frames = p.split_client_envelope(sock.recv_multipart())
                    request = p.decode(frames, p.CLIENT_REQUESTS)
                    self.requests.append(request)
                    for delay, reply in self.answer(request):
                        if reply is not None:
                            pending.append((time.monotonic() + delay, identity, reply))
                now = time.monotonic()
                for item in [i for i in pending if i[0] <= now]:
                    pending.remove(item)
                    sock.send_multipart(p.client_envelope(item[1], item[2]))
                    self.sent += 1
        finally:
            sock.close(linger=0)
            ctx.term()

    def stop(self) -> None:
        """Stop the thread and close its socket."""
        self._stop.set()
        self._thread.join(5)


@pytest.fixture
def fake() -> Iterator[Callable[..., FakeBroker]]:
    """Start fake brokers on demand; all are stopped at teardown."""
    started: list[FakeBroker] = []

    def start(
        answer: Callable[[p.Message], Plan] = echo_broker,
        port: int = 0,
        maxmsgsize: int = -1,
    ):
        broker = FakeBroker(answer, port, maxmsgsize)
        started.append(broker)
        return broker

    yield start
    for broker in started:
        broker.stop()


def open_fds() -> int:
    """Count this process's open file descriptors."""
    return len(os.listdir("/proc/self/fd"))


# --- no broker at all ------------------------------------------------------------


@pytest.mark.timeout(20)
def test_silent_endpoint_raises_broker_unavailable_within_the_retry_bound() -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with Client(endpoint, request_timeout=0.3, retries=2) as client:
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable) as caught:
            client.submit("echo", "A")
        elapsed = time.monotonic() - started

    assert 0.3 * 3 * 0.9 <= elapsed <= 0.3 * 3 + 1.0
    assert isinstance(caught.value, TimeoutError)
    assert endpoint in str(caught.value)
    assert "request_timeout_s" in str(caught.value)
    assert "bytes" not in str(caught.value)  # small requests get no size hint


@pytest.mark.timeout(30)
@pytest.mark.parametrize("call", ["result", "gather"])
def test_waits_with_a_timeout_give_up_one_request_timeout_after_it(
    call: str,
) -> None:
    # Given nothing answering, waits of 0.5 s, and 1 s request timeouts with
    # 2 retries (each WAIT attempt would wait 0.5 + 1 s: 4.5 s in all)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with Client(endpoint, request_timeout=1.0, retries=2) as client:
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable):
            if call == "result":
                client.result("some-task", timeout=0.5)
            else:
                client.gather(["some-task", "other-task"], timeout=0.5)
        elapsed = time.monotonic() - started

    # Then the call ends one request timeout after its own timeout
    assert 1.5 * 0.9 <= elapsed <= 1.5 + 1.0


@pytest.mark.timeout(20)
def test_unanswered_large_request_names_its_size_and_the_frame_limit(fake) -> None:
    # Given a broker whose frame limit (max_payload_bytes 1 MiB - slack) is
    # below a 1.5 MiB payload the client's default 16 MiB setting allows
    broker = fake(maxmsgsize=1 << 20)
    with Client(broker.endpoint, request_timeout=0.3, retries=0) as client:
        # When the client sends it, the broker drops the frame and never answers
        with pytest.raises(BrokerUnavailable) as caught:
            client.submit("echo", b"x" * (3 << 19))

    # Then the error says how big the request was and why it may be dropped
    message = str(caught.value)
    size = int(re.search(r"the request was (\d+) bytes", message).group(1))
    assert 3 << 19 < size < (3 << 19) + 1024
    assert "a broker with a smaller max_payload_bytes drops such frames" in message
    assert broker.requests == []


@pytest.mark.timeout(60)
def test_hundred_timed_out_requests_leak_no_fds_and_then_succeed(fake) -> None:
    # Given a client whose broker is not there yet (C14 c)
    port = free_port()
    with Client(f"tcp://127.0.0.1:{port}", request_timeout=0.05, retries=0) as client:
        with pytest.raises(BrokerUnavailable):
            client.status("warm-up")
        before = open_fds()

        # When 100 requests time out
        for i in range(100):
            with pytest.raises(BrokerUnavailable):
                client.submit("echo", i)

        # Then at most a few descriptors remain, and C succeeds once it is up
        wait_until(lambda: open_fds() - before < 5, 5, what=lambda: f"{open_fds()}")
        fake(port=port)
        started = time.monotonic()
        handle = wait_until(lambda: client.submit("echo", "C", key="C"), 3)
        assert time.monotonic() - started < 1.0
        assert handle.id == "C" and handle.result(timeout=5) == "C"


@pytest.mark.timeout(20)
def test_client_process_exits_promptly_after_a_timed_out_submit() -> None:
    # C08 b: no broker, request timeout 1 s, no retries, no close() call
    code = (
        "from sdk import Client, BrokerUnavailable\n"
        f"c = Client('tcp://127.0.0.1:{free_port()}', request_timeout=1, retries=0)\n"
        "try:\n    c.submit('echo', 'x')\nexcept BrokerUnavailable:\n    pass\n"
    )
    env = {**os.environ, "PYTHONPATH": str(PROJECT_DIR)}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], env=env, timeout=15)

    assert done.returncode == 0
    assert time.monotonic() - started < 1.0 + 3.0


# --- local refusals, nothing sent --------------------------------------------------


@pytest.mark.timeout(20)
def test_oversize_payload_is_refused_before_sending(fake) -> None:
    broker = fake()
    settings = ClientSettings(clients_endpoint=broker.endpoint, max_payload_bytes=1024)
    with Client(settings=settings, request_timeout=2) as client:
        with pytest.raises(PayloadTooLarge) as caught:
            client.submit("echo", b"x" * 2000)
        with pytest.raises(PayloadTooLarge):
            client.submit_many([("echo", "ok"), ("echo", b"y" * 4096)])
        client.submit("echo", b"x" * 900, key="small")

    assert caught.value.limit == 1024 and caught.value.size > 2000
    assert [r.key for r in broker.requests] == ["small"]  # type: ignore[attr-defined]


@pytest.mark.timeout(20)
@pytest.mark.parametrize("value", ["\ud83d", {"k": "a\udc80b"}, [1, object()]])
def test_unpackable_payload_is_refused_before_sending(fake, value: Any) -> None:
    broker = fake()
    with Client(broker.endpoint, request_timeout=2) as client:
        with pytest.raises(ProtocolError):
            client.submit("echo", value)

    assert broker.requests == []


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    "args, kwargs",
    [
        (("",), {}),
        ((7,), {}),
        (("x" * 201,), {}),
        (("echo",), {"tags": "gpu"}),
        (("echo",), {"tags": ["gpu", 1]}),
        (("echo",), {"priority": 1.5}),
        (("echo",), {"retries": -1}),
        (("echo",), {"retries": True}),
        (("echo",), {"delay": -1}),
        (("echo",), {"timeout": 0}),
        (("echo",), {"start_deadline": float("nan")}),
        (("echo",), {"fallback_after": "3"}),
        (("echo",), {"require_worker": True}),
        (("echo",), {"preferred_worker": ""}),
        (("echo",), {"preferred_worker": "w\x00"}),
        (("echo",), {"key": ""}),
        # Bounds the broker enforces (broker/validation.py), refused locally.
        (("echo",), {"priority": 1_000_001}),
        (("echo",), {"priority": -1_000_001}),
        (("echo",), {"retries": 1001}),
        (("echo",), {"tags": ["x" * 101]}),
        (("echo",), {"delay": 315_360_000.5}),
        (("echo",), {"timeout": 1e12}),
        (("echo",), {"fallback_after": 315_360_001}),
        (("echo",), {"start_deadline": 4e8}),
    ],
)
def test_bad_submit_arguments_raise_invalid_request(
    fake, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    broker = fake()
    with Client(broker.endpoint, request_timeout=2) as client:
        with pytest.raises(InvalidRequest):
            client.submit(*args, **kwargs)

    assert broker.requests == []


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"priority": 2_000_000}, "the broker accepts -1000000 to 1000000"),
        ({"preferred_worker": 123}, "preferred_worker must be a str, not int"),
        ({"preferred_worker": b"w1"}, "preferred_worker must be a str, not bytes"),
        ({"preferred_worker": ""}, "preferred_worker must be a worker id, not empty"),
        ({"delay": 4e8}, "delay=4e+08 s is over the limit of 315360000 s (10 years)"),
    ],
)
def test_refusals_say_what_is_wrong(fake, kwargs: dict[str, Any], message: str) -> None:
    broker = fake()
    with Client(broker.endpoint, request_timeout=2) as client:
        with pytest.raises(InvalidRequest) as caught:
            client.submit("echo", **kwargs)

    assert message in str(caught.value)
    assert "--id" not in str(caught.value)
    assert broker.requests == []


@pytest.mark.timeout(20)
def test_values_at_the_broker_bounds_are_sent(fake) -> None:
    broker = fake()
    bounds: dict[str, Any] = {
        "priority": -1_000_000,
        "retries": 1000,
        "tags": ["t" * 100],
        "delay": 315_360_000,
        "timeout": 315_360_000.0,
        "fallback_after": 0,
        "start_deadline": 315_360_000,
    }
    with Client(broker.endpoint, request_timeout=2) as client:
        client.submit("echo", key="low", **bounds)
        client.submit("echo", key="high", priority=1_000_000)

    assert [r.priority for r in broker.requests] == [-1_000_000, 1_000_000]  # type: ignore[attr-defined]


def test_local_bounds_mirror_the_broker() -> None:
    assert client_module.MAX_PRIORITY == validation.MAX_PRIORITY
    assert client_module.MAX_RETRIES == validation.MAX_RETRIES
    assert client_module.MAX_TAG_CHARS == validation.MAX_TAG_CHARS
    assert client_module.MAX_KEY_CHARS == validation.MAX_KEY_CHARS


@pytest.mark.timeout(20)
def test_bad_lookups_and_batch_items_raise_invalid_request(fake) -> None:
    broker = fake()
    with Client(broker.endpoint, request_timeout=2) as client:
        for call in (
            lambda: client.status(""),
            lambda: client.result(3),  # type: ignore[arg-type]
            lambda: client.cancel(None),  # type: ignore[arg-type]
            lambda: client.tasks(state="bogus"),
            lambda: client.tasks(limit=0),
            lambda: client.submit_many([{"payload": 1}]),
            lambda: client.submit_many([{"name": "echo", "colour": "red"}]),
            lambda: client.submit_many(["echo"]),  # type: ignore[list-item]
        ):
            with pytest.raises(InvalidRequest):
                call()

    assert broker.requests == []


# --- against the fake broker ---------------------------------------------------------


@pytest.mark.timeout(30)
def test_one_client_serves_four_threads_without_mixing_replies(fake) -> None:
    broker = fake()
    errors: list[BaseException] = []
    mismatched: list[tuple[str, str]] = []

    def run(thread: int) -> None:
        try:
            for i in range(50):
                key = f"t{thread}-{i}"
                handle = client.submit("echo", i, key=key)
                if handle.id != key or client.status(key).id != key:
                    mismatched.append((key, handle.id))
        except BaseException as exc:  # reported below, in the test thread
            errors.append(exc)

    with Client(broker.endpoint, request_timeout=5) as client:
        threads = [threading.Thread(target=run, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(25)

    assert errors == [] and mismatched == []
    assert len(broker.requests) == 4 * 50 * 2


@pytest.mark.timeout(20)
def test_late_reply_is_never_taken_for_the_next_request(fake) -> None:
    # Given a broker that holds its first reply past the client's timeout (C14 b)
    def slow_first(request: p.Message) -> Plan:
        plan = echo_broker(request)
        return [(1.5, plan[0][1])] if len(broker.requests) == 1 else plan

    broker = fake(slow_first)
    with Client(broker.endpoint, request_timeout=1.0, retries=0) as client:
        # When A times out and B follows at once
        with pytest.raises(BrokerUnavailable):
            client.submit("echo", "A", key="A")
        b = client.submit("echo", "B", key="B")

        # Then B is B, also after A's late reply was sent
        assert b.id == "B"
        wait_until(lambda: broker.sent >= 2, 3)
        assert client.status("B").id == "B"


@pytest.mark.timeout(20)
def test_stray_rid_is_discarded_and_the_request_resent(fake) -> None:
    def wrong_rid_first(request: p.Message) -> Plan:
        if len(broker.requests) == 1:
            stray = p.Ok(rid=request.rid + 1, data={"id": "stray"})  # type: ignore[attr-defined]
            return [(0.0, stray)]
        return echo_broker(request)

    broker = fake(wrong_rid_first)
    with Client(broker.endpoint, request_timeout=2, retries=0) as client:
        handle = client.submit("echo", 1, key="mine")

    assert handle.id == "mine"
    first, second = broker.requests
    assert (first.rid, first.key) == (second.rid, second.key)  # type: ignore[attr-defined]


@pytest.mark.timeout(20)
def test_broker_restart_mid_request_resends_without_waiting_the_timeout(fake) -> None:
    # Given a broker that takes the request and goes away without answering
    gone = threading.Event()

    def vanish(request: p.Message) -> Plan:
        gone.set()
        return []

    first = fake(vanish)
    port = first.port
    with Client(first.endpoint, request_timeout=8, retries=0) as client:
        result: list[Any] = []
        caller = threading.Thread(target=lambda: result.append(client.submit("e", 1)))
        started = time.monotonic()
        caller.start()
        wait_until(gone.is_set, 5)

        # When it restarts on the same port
        first.stop()
        wait_until(lambda: fake(port=port), 5)
        caller.join(8)

    # Then the request was sent again on disconnect, well before the timeout
    assert result and result[0].id
    assert time.monotonic() - started < 5


@pytest.mark.timeout(20)
def test_error_replies_become_sdk_errors(fake) -> None:
    def refuse(request: p.Message) -> Plan:
        rid = request.rid  # type: ignore[attr-defined]
        if isinstance(request, p.Status):
            return [(0.0, p.Error(rid=rid, type="TaskNotFound", message="no task x"))]
        return [(0.0, p.Error(rid, "PayloadTooLarge", "big", size=99, limit=10))]

    broker = fake(refuse)
    with Client(broker.endpoint, request_timeout=2) as client:
        with pytest.raises(TaskNotFound, match="no task x"):
            client.status("x")
        with pytest.raises(PayloadTooLarge) as caught:
            client.submit("echo", 1)

    assert (caught.value.size, caught.value.limit) == (99, 10)


@pytest.mark.timeout(20)
def test_result_raises_task_failed_and_result_timeout(fake) -> None:
    def states(request: p.Message) -> Plan:
        if isinstance(request, p.Wait) and request.id == "bad":
            failed = task_map(
                "bad", "failed", error="boom", error_type="ValueError", traceback="tb"
            )
            return ok(request, task=failed)
        if isinstance(request, p.Wait):
            running = p.Ok(rid=request.rid, data={"task": task_map("slow", "running")})
            return [(request.timeout, running)]
        return echo_broker(request)

    broker = fake(states)
    with Client(broker.endpoint, request_timeout=2) as client:
        with pytest.raises(TaskFailed) as failed:
            client.result("bad", timeout=5)
        started = time.monotonic()
        with pytest.raises(ResultTimeout):
            client.result("slow", timeout=0.5)
        waited = time.monotonic() - started

    assert (failed.value.error_type, failed.value.message) == ("ValueError", "boom")
    assert failed.value.state == "failed" and failed.value.traceback == "tb"
    assert 0.45 <= waited < 1.5
    assert isinstance(ResultTimeout("x"), TimeoutError)


@pytest.mark.timeout(20)
def test_submit_many_splits_by_size_and_keeps_order(fake) -> None:
    broker = fake()
    settings = ClientSettings(clients_endpoint=broker.endpoint, max_payload_bytes=1024)
    items: list[Any] = [
        {"name": "echo", "payload": b"x" * 1000, "key": f"k{i}"} for i in range(100)
    ]
    items.append(("echo", "tuple", {"key": "last", "priority": 3}))
    with Client(settings=settings, request_timeout=2) as client:
        handles = client.submit_many(items)

    assert [h.id for h in handles] == [f"k{i}" for i in range(100)] + ["last"]
    batches = [r for r in broker.requests if isinstance(r, p.SubmitMany)]
    assert len(batches) >= 2
    assert all(p.maxmsgsize(1024) > len(b"".join(b.encode())) for b in batches)


@pytest.mark.timeout(20)
def test_submit_many_sizes_batches_from_encoded_bodies_not_payloads(fake) -> None:
    # Given a broker that drops frames over its limit, and tasks whose small
    # payloads come with large keys, tags and worker ids (~13 KiB each)
    limit = p.maxmsgsize(1024)
    broker = fake(maxmsgsize=limit)
    settings = ClientSettings(clients_endpoint=broker.endpoint, max_payload_bytes=1024)
    items = [
        {
            "name": "n" * 200,
            "payload": b"x" * 900,
            "key": f"{i:03d}" + "k" * 197,
            "tags": [f"{t:02d}" + "t" * 98 for t in range(64)],
            "preferred_worker": "w" * 255,
            "priority": i,
        }
        for i in range(40)
    ]

    # When they are submitted together
    with Client(settings=settings, request_timeout=2, retries=0) as client:
        handles = client.submit_many(items)

    # Then every batch arrived within the frame limit, each as full as fits
    assert [h.id for h in handles] == [item["key"] for item in items]
    batches = [r for r in broker.requests if isinstance(r, p.SubmitMany)]
    sizes = [sum(len(f) for f in b.encode()) for b in batches]
    assert len(batches) >= 5 and max(sizes) <= limit
    body = len(msgpack.packb(batches[0].tasks[0], use_bin_type=True))
    assert all(size + body > limit for size in sizes[:-1])


@pytest.mark.timeout(20)
def test_close_is_idempotent_and_a_closed_client_refuses(fake) -> None:
    broker = fake()
    client = Client(broker.endpoint, request_timeout=2)
    client.workers()
    client.close()
    client.close()

    with pytest.raises(Exception, match="closed"):
        client.workers()


@pytest.mark.timeout(20)
def test_forked_child_builds_its_own_socket(fake) -> None:
    broker = fake()
    with Client(broker.endpoint, request_timeout=2) as client:
        client.submit("echo", 0, key="parent")
        pid = os.fork()
        if pid == 0:  # the child: any failure is its exit code
            code = 1
            try:
                code = 0 if client.submit("echo", 1, key="child").id == "child" else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert client.submit("echo", 2, key="again").id == "again"

    assert os.waitstatus_to_exitcode(status) == 0


def test_wait_limits_are_seconds_none_or_refused() -> None:
    from sdk.client import _wait_limit

    assert _wait_limit("wait", None) is None
    assert _wait_limit("wait", 2.5) == 2.5
    assert _wait_limit("wait", 3) == 3.0
    assert _wait_limit("wait", -1) == 0.0
    assert _wait_limit("wait", float("inf")) is None
    assert _wait_limit("wait", float("-inf")) == 0.0
    # Ints past any float mean no limit, or no waiting, not OverflowError.
    assert _wait_limit("wait", 10**400) is None
    assert _wait_limit("wait", -(10**400)) == 0.0
    for bad in (float("nan"), True, "5", [1]):
        with pytest.raises(InvalidRequest, match="wait"):
            _wait_limit("wait", bad)


def test_task_list_limit_is_refused_past_what_the_broker_lists() -> None:
    client = Client("tcp://127.0.0.1:1", request_timeout=0.1)
    for limit in (0, 10_001):
        with pytest.raises(InvalidRequest, match="1 to 10000"):
            client.tasks(limit=limit)
    client.close()
