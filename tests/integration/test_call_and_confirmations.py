"""`Client.call` (submit and wait in one RUN request) and how the broker
sends STORED: right behind the worker's next decision, or on its own within
the hold time when no decision follows."""

from __future__ import annotations

import os
import time

import msgpack  # type: ignore[import-untyped]
import pytest
import zmq
from helpers.cluster import Cluster
from helpers.raw import RawSockets
from helpers.waiting import wait_until

from broker.confirmations import HOLD_S
from sdk import InvalidRequest, ResultTimeout, TaskFailed, protocol


@pytest.mark.timeout(60)
def test_call_returns_the_value_and_raises_like_result(cluster: Cluster) -> None:
    # Given a broker and one worker
    cluster.start_broker()
    cluster.start_worker("w1", capacity=2)
    client = cluster.client()
    cluster.wait_workers("w1")

    # When tasks are called
    value = client.call("echo", {"x": [1, 2]}, wait=30)
    with pytest.raises(TaskFailed) as failed:
        client.call("fail", "boom", wait=30)
    with pytest.raises(ResultTimeout, match="after waiting 0.3 s"):
        client.call("sleep", 5, wait=0.3)

    # Then the value came back, the failure and the timeout were raised,
    # and each call made exactly one task
    assert value == {"x": [1, 2]}
    assert failed.value.error_type == "RuntimeError"
    rows = cluster.query("select name, state from tasks order by id")
    assert [r[0] for r in rows] == ["echo", "fail", "sleep"]
    assert [r[1] for r in rows[:2]] == ["succeeded", "failed"]


@pytest.mark.timeout(60)
def test_call_with_a_known_key_waits_for_that_task(cluster: Cluster) -> None:
    # Given a task submitted with a key
    cluster.start_broker()
    cluster.start_worker("w1", capacity=2)
    client = cluster.client()
    first = client.submit("echo", "first", key="k-1")

    # When the same key is called with another payload
    value = client.call("echo", "second", key="k-1", wait=30)

    # Then the call waited for the first task, and made none of its own
    assert value == "first"
    assert cluster.query("select count(*) from tasks")[0][0] == 1
    assert first.result(timeout=5) == "first"


@pytest.mark.timeout(60)
def test_a_call_answered_at_once_survives_a_broker_kill(cluster: Cluster) -> None:
    # Given a broker with no worker, so a called task stays queued
    broker = cluster.start_broker()
    client = cluster.client()

    # When a call that does not wait is answered, and the broker is killed
    with pytest.raises(ResultTimeout, match="still queued"):
        client.call("echo", 1, wait=0, key="answered")
    cluster.kill(broker)

    # Then the task it was told about is on disk
    assert cluster.query("select key, state from tasks") == [("answered", "queued")]
    cluster.restart(broker)
    assert client.submit("echo", 1, key="answered").created is False


@pytest.mark.timeout(30)
def test_call_refuses_bad_arguments_before_sending(cluster: Cluster) -> None:
    # Given a broker that is not running at all
    client = cluster.client(request_timeout=0.2)

    # Then bad keywords are refused at once, before anything is sent
    with pytest.raises(InvalidRequest, match="colour"):
        client.call("echo", 1, wait=5, colour="red")
    with pytest.raises(InvalidRequest, match="retries"):
        client.call("echo", 1, wait=5, retries=-1)


@pytest.mark.timeout(30)
def test_run_with_a_malformed_task_gets_an_error_reply(
    cluster: Cluster, raw: RawSockets
) -> None:
    # Given a broker
    cluster.start_broker()

    # When RUN carries a task body with a wrong type and one with no name
    wrong = protocol.Run(rid=7, task={"name": 5, "payload": b"", "key": "a"}, timeout=1)
    nameless = protocol.Run(rid=8, task={"payload": b"", "key": "b"}, timeout=1)
    replies = [
        raw.request(cluster.clients_endpoint, m.encode()) for m in (wrong, nameless)
    ]

    # Then each is answered with InvalidRequest, and the broker still serves
    assert [(r.rid, r.type) for r in replies] == [  # type: ignore[attr-defined]
        (7, "InvalidRequest"),
        (8, "InvalidRequest"),
    ]
    cluster.start_worker("w1")
    assert cluster.client().call("echo", 3, wait=30) == 3
    assert cluster.query("select count(*) from tasks")[0][0] == 1


@pytest.mark.timeout(60)
def test_nan_wait_timeouts_are_refused_and_waits_still_end(
    cluster: Cluster, raw: RawSockets
) -> None:
    # Given a broker, a worker and a task still running
    cluster.start_broker()
    cluster.start_worker("w1", capacity=2)
    client = cluster.client()
    running = client.submit("sleep", 5)
    nan = float("nan")
    task = {"name": "echo", "payload": b"\xc0", "key": "nan-run"}

    # When RUN, WAIT and WAIT_MANY name a NaN timeout
    requests = [
        protocol.Run(rid=11, task=task, timeout=nan),
        protocol.Wait(rid=12, id=running.id, timeout=nan),
        protocol.WaitMany(rid=13, ids=[running.id], timeout=nan),
    ]
    replies = [raw.request(cluster.clients_endpoint, m.encode()) for m in requests]

    # Then each is refused by rid, nothing was submitted, and a bounded wait
    # still ends on time
    assert [(r.rid, r.type) for r in replies] == [  # type: ignore[attr-defined]
        (11, "InvalidRequest"),
        (12, "InvalidRequest"),
        (13, "InvalidRequest"),
    ]
    started = time.monotonic()
    with pytest.raises(ResultTimeout, match="after waiting 1 s"):
        client.call("sleep", 5, wait=1)
    assert time.monotonic() - started < 4.0
    assert cluster.query("select count(*) from tasks")[0][0] == 2


@pytest.mark.timeout(30)
def test_an_undecodable_request_is_answered_under_its_own_rid(
    cluster: Cluster, raw: RawSockets
) -> None:
    # Given a broker
    cluster.start_broker()
    body = {"rid": 21, "task": {"name": "echo", "payload": b"", "key": "a"}}

    # When a RUN carries a bool for its timeout
    frames = [protocol.HEADER, b"RUN", msgpack.packb({**body, "timeout": True})]
    reply = raw.request(cluster.clients_endpoint, frames)

    # Then the error names the field and comes back under the request's rid
    assert isinstance(reply, protocol.Error)
    assert (reply.rid, reply.type) == (21, "DecodeError")
    assert "Run.timeout" in reply.message
    assert reply.size == sum(len(f) for f in frames)


@pytest.mark.timeout(30)
def test_call_refuses_a_wait_that_is_not_seconds(cluster: Cluster) -> None:
    client = cluster.client(request_timeout=0.2)

    for wait in ("5", True, float("nan")):
        with pytest.raises(InvalidRequest, match="wait"):
            client.call("echo", 1, wait=wait)


def fake_worker(cluster: Cluster, raw: RawSockets) -> tuple[zmq.Socket[bytes], str]:
    """Start a broker, register a DEALER as worker "fake" of capacity 1 and
    return (socket, session)."""
    # A long liveness: the fake sends no heartbeats.
    cluster.start_broker(env={"HAKOBU_LIVENESS": "1000"})
    sock = raw.dealer(cluster.workers_endpoint, identity=b"fake")
    session = "fake-session"
    ready = protocol.Ready(
        s=session,
        worker_id="fake",
        capacity=1,
        handlers=["echo"],
        pid=os.getpid(),
        host="test",
    )
    sock.send_multipart(ready.encode())
    cluster.wait_workers("fake")
    return sock, session


def next_message(
    raw: RawSockets, sock: zmq.Socket[bytes], timeout_s: float = 5.0
) -> protocol.Message:
    """Return the next broker message that is not a heartbeat or welcome."""
    while True:
        message = protocol.decode(raw.recv(sock, timeout_s), protocol.BROKER_MESSAGES)
        if not isinstance(message, protocol.Heartbeat | protocol.Welcome):
            return message


def answer(sock: zmq.Socket[bytes], session: str, assign: protocol.Assign) -> None:
    """ACK and finish `assign` with its own payload as the result."""
    sock.send_multipart(protocol.Ack(s=session, n=[assign.n]).encode())
    result = protocol.Result(
        s=session, task=assign.task, attempt=assign.attempt, ok=True, value=b"\xc0"
    )
    sock.send_multipart(result.encode())


@pytest.mark.timeout(30)
def test_stored_travels_behind_the_next_assign(
    cluster: Cluster, raw: RawSockets
) -> None:
    # Given a fake worker of capacity 1 and two queued tasks
    sock, session = fake_worker(cluster, raw)
    client = cluster.client()
    first, second = client.submit_many([("echo", 1), ("echo", 2)])

    # When the first is answered
    assign = next_message(raw, sock)
    assert isinstance(assign, protocol.Assign) and assign.task == first.id
    answer(sock, session, assign)

    # Then the next ASSIGN comes first, the first task's STORED right behind it
    assign_next, stored = next_message(raw, sock), next_message(raw, sock)
    assert isinstance(assign_next, protocol.Assign)
    assert isinstance(stored, protocol.Stored)
    assert (assign_next.task, stored.task) == (second.id, first.id)


@pytest.mark.timeout(30)
def test_stored_goes_alone_when_no_decision_follows(
    cluster: Cluster, raw: RawSockets
) -> None:
    # Given a fake worker and a single task
    sock, session = fake_worker(cluster, raw)
    handle = cluster.client().submit("echo", 1)
    assign = next_message(raw, sock)
    assert isinstance(assign, protocol.Assign)

    # When it is answered and nothing else is queued
    answered_at = time.monotonic()
    answer(sock, session, assign)
    stored = next_message(raw, sock, timeout_s=5.0)

    # Then STORED still comes, after the hold time and well before any resend
    waited = time.monotonic() - answered_at
    assert isinstance(stored, protocol.Stored)
    assert (stored.task, stored.attempt) == (handle.id, 1)
    assert HOLD_S * 0.5 <= waited < 2.0
    wait_until(lambda: handle.status().state == "succeeded", 5.0)
