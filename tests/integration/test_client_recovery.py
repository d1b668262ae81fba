"""The client after a lost reply (C14): a clear timeout, then a working socket
whose next reply is its own; no descriptor leak while the broker is away."""

from __future__ import annotations

import signal
import threading
import time

import psutil
import pytest
from helpers.cluster import Cluster
from helpers.waiting import wait_until

from sdk import BrokerUnavailable, HakobuError


@pytest.mark.timeout(60)
def test_a_paused_broker_then_next_submit_gets_its_own_reply(
    cluster: Cluster,
) -> None:
    # Given a broker, a worker, and a client with a 1 s timeout and no retries
    broker = cluster.start_broker()
    cluster.start_worker("w1", capacity=1)
    cluster.wait_workers("w1")
    client = cluster.client(request_timeout=1.0, retries=0)

    # When the broker is paused while A is submitted
    cluster.send_signal(broker, signal.SIGSTOP)
    started_at = time.monotonic()
    with pytest.raises(BrokerUnavailable) as info:
        client.submit("echo", "A", key="task-A")
    elapsed = time.monotonic() - started_at
    cluster.send_signal(broker, signal.SIGCONT)

    # Then A timed out clearly, within the SDK's error family
    assert isinstance(info.value, TimeoutError)
    assert isinstance(info.value, HakobuError)
    assert 0.9 <= elapsed <= 2.5
    # And B, submitted next on the same client, is its own task
    handle_b = client.submit("echo", "B", key="task-B")
    assert handle_b.result(timeout=15) == "B"
    status_b = client.status(handle_b.id)
    assert (status_b.name, status_b.result) == ("echo", "B")
    rows = cluster.query("select id, key from tasks where key like 'task-%'")
    ids = {key: task_id for task_id, key in rows}
    assert ids["task-B"] == handle_b.id
    assert ids.get("task-A") != handle_b.id


@pytest.mark.timeout(60)
def test_submit_across_a_pause_creates_one_task(cluster: Cluster) -> None:
    # Given a client that retries (1 s timeout, 2 retries)
    broker = cluster.start_broker()
    cluster.start_worker("w1", capacity=1)
    cluster.wait_workers("w1")
    client = cluster.client(request_timeout=1.0, retries=2)
    cluster.send_signal(broker, signal.SIGSTOP)
    resume = threading.Timer(1.5, cluster.send_signal, (broker, signal.SIGCONT))

    # When the broker resumes while the submit is being retried
    resume.start()
    try:
        handle = client.submit("echo", "paused", key="across-pause")
    finally:
        resume.join()

    # Then the retried submit made exactly one task, and it runs
    assert handle.result(timeout=15) == "paused"
    assert cluster.query("select count(*) from tasks") == [(1,)]


@pytest.mark.timeout(60)
def test_c_timeouts_without_broker_then_it_starts(cluster: Cluster) -> None:
    # Given no broker, and a client with a short timeout and no retries
    client = cluster.client(request_timeout=0.25, retries=0)
    me = psutil.Process()
    with pytest.raises(BrokerUnavailable):
        client.submit("echo", "warm-up")
    fds_before = me.num_fds()

    # When 20 submits time out
    failures = 0
    for i in range(20):
        try:
            client.submit("echo", i)
        except BrokerUnavailable:
            failures += 1

    # Then each raised, and no descriptors leaked
    assert failures == 20
    assert me.num_fds() - fds_before < 5

    # When the broker comes up
    cluster.start_broker()
    cluster.start_worker("w1", capacity=1)
    probe = cluster.client(request_timeout=0.5, retries=0)
    wait_until(lambda: probe.workers(), 20, 0.1, what="broker answering with w1")

    # Then C on the same client succeeds at the first try
    handle = client.submit("echo", "C")
    assert handle.result(timeout=10) == "C"


@pytest.mark.timeout(60)
def test_b_late_reply_to_a_is_never_taken_for_b(cluster: Cluster) -> None:
    # Given a broker whose reply to the first SUBMIT is held back 1.5 s
    cluster.start_broker(
        env={"HAKOBU_FAULT_REPLY_DELAY_S": "1.5", "HAKOBU_FAULT_DELAYED_SUBMITS": "1"}
    )
    cluster.start_worker("w1", capacity=1)
    cluster.wait_workers("w1")
    client = cluster.client(request_timeout=1.0, retries=0)

    # When A times out waiting for its delayed reply, and B is submitted at once
    with pytest.raises(BrokerUnavailable):
        client.submit("echo", "A", key="late-A")
    handle_b = client.submit("echo", "B", key="late-B")

    # Then B's handle is B's own task, and A's late reply went nowhere
    assert handle_b.result(timeout=15) == "B"
    rows = dict(cluster.query("select key, id from tasks"))
    assert rows["late-B"] == handle_b.id
    assert rows["late-A"] != handle_b.id
    assert client.status(rows["late-A"]).name == "echo"
