"""Run timeouts, retries with backoff and cancellation, with real processes.

A task that runs past its `timeout` is killed and retried, then fails with
TaskTimeout; a failing task is retried with backoff and fails after
retries + 1 attempts; a queued task cancelled never runs; a running task
cancelled frees its worker slot; the `hakobu cancel` and `hakobu tasks`
commands show the same states.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from helpers.cluster import Cluster
from helpers.ledger import Ledger
from helpers.waiting import assert_stays, wait_until

from sdk import Client, TaskFailed

#: First retry delay; the second is twice as long.
BACKOFF_S = 0.3
BROKER_ENV = {"HAKOBU_RETRY_BACKOFF_S": str(BACKOFF_S)}
#: Seconds a CLI command may take (a cold Python start on a busy box).
CLI_TIMEOUT_S = 30.0


def hakobu(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `hakobu ARGS --endpoint <clients endpoint>` and return what it did."""
    return cluster.cli(*args, timeout_s=CLI_TIMEOUT_S)  # type: ignore[no-any-return]


def start(cluster: Cluster, capacity: int = 1) -> Client:
    """Start a broker with a short retry backoff and one worker w1."""
    cluster.start_broker(env=BROKER_ENV)
    cluster.start_worker("w1", capacity=capacity)
    cluster.wait_workers("w1")
    return cluster.client()


def wait_running(client: Client, ledger: Ledger, task_id: str) -> None:
    """Wait until the broker says running and the handler has begun."""
    wait_until(
        lambda: ledger.starts(task_id) and client.status(task_id).state == "running",
        10.0,
        what=lambda: f"task {task_id} running: {client.status(task_id)!r:.300}",
    )


def in_flight(client: Client, worker_id: str) -> int | None:
    """Return the worker's in_flight count as the broker reports it."""
    return next((w.in_flight for w in client.workers() if w.id == worker_id), None)


@pytest.mark.timeout(60)
def test_timeout_kills_each_attempt_then_fails(cluster: Cluster, ledger: Ledger):
    # Given one worker of capacity 1
    client = start(cluster)

    # When a 5 s task may run 0.5 s, with one retry
    handle = client.submit("probe_sleep", 5, timeout=0.5, retries=1)

    # Then it ends failed with TaskTimeout after exactly 2 attempts
    with pytest.raises(TaskFailed) as failed:
        handle.result(timeout=15.0)
    assert failed.value.error_type == "TaskTimeout"
    assert failed.value.state == "failed"
    info = client.status(handle.id)
    assert (info.state, info.attempts, info.error_type) == ("failed", 2, "TaskTimeout")
    assert [e["attempt"] for e in info.attempt_errors] == [1, 2]
    assert {e["error_type"] for e in info.attempt_errors} == {"TaskTimeout"}
    assert info.finished_at - info.created_at < 4.0
    # And each attempt started once and was cut short
    assert [s["attempt"] for s in ledger.starts(handle.id)] == [1, 2]
    assert ledger.ends(handle.id) == []
    # And the worker serves the next task
    after = client.submit("probe_sleep", 0.05)
    assert after.result(timeout=10.0) == 0.05
    assert client.status(after.id).worker_id == "w1"


@pytest.mark.timeout(60)
def test_failing_task_retries_with_backoff_then_fails(cluster: Cluster) -> None:
    # Given one worker of capacity 1
    client = start(cluster)

    # When `fail` is submitted with 2 retries, and another without
    handle = client.submit("fail", "boom", retries=2)
    once = client.submit("fail", "once")

    # Then it fails after exactly 3 attempts, each recorded, backoff between
    with pytest.raises(TaskFailed) as failed:
        handle.result(timeout=15.0)
    assert (failed.value.error_type, failed.value.message) == ("RuntimeError", "boom")
    info = client.status(handle.id)
    assert (info.state, info.attempts) == ("failed", 3)
    assert len(info.attempt_errors) == 3
    assert [e["attempt"] for e in info.attempt_errors] == [1, 2, 3]
    assert {(e["error_type"], e["error"]) for e in info.attempt_errors} == {
        ("RuntimeError", "boom")
    }
    assert info.finished_at - info.created_at >= BACKOFF_S + 2 * BACKOFF_S
    with pytest.raises(TaskFailed):
        once.result(timeout=10.0)
    assert client.status(once.id).attempts == 1

    # And `hakobu tasks --state failed --json` lists both, and only failed ones
    done = hakobu(cluster, "tasks", "--state", "failed", "--json")
    assert done.returncode == 0, done.stderr
    listed = json.loads(done.stdout)
    assert {t["id"] for t in listed} == {handle.id, once.id}
    assert {t["state"] for t in listed} == {"failed"}


@pytest.mark.timeout(60)
def test_cancel_queued_task_never_runs(cluster: Cluster, ledger: Ledger) -> None:
    # Given the only worker busy, and a task queued behind it
    client = start(cluster)
    blocker = client.submit("probe_sleep", 1.5)
    wait_running(client, ledger, blocker.id)
    queued = client.submit("probe_sleep", 0.05)
    assert client.status(queued.id).state == "queued"

    # When the queued task is cancelled
    info = client.cancel(queued.id)

    # Then it is cancelled at once, and its result says so
    assert info.state == "cancelled"
    assert client.status(queued.id).state == "cancelled"
    with pytest.raises(TaskFailed) as failed:
        queued.result(timeout=2.0)
    assert failed.value.state == "cancelled"
    # And it never runs, while the worker goes on with other work
    assert blocker.result(timeout=10.0) == 1.5
    after = client.submit("probe_sleep", 0.05)
    assert after.result(timeout=10.0) == 0.05
    assert ledger.starts(queued.id) == []
    assert client.status(queued.id).state == "cancelled"
    assert client.status(queued.id).attempts == 0


@pytest.mark.timeout(60)
def test_cancel_running_task_frees_its_slot(cluster: Cluster, ledger: Ledger):
    # Given two long tasks running on a worker of capacity 2
    client = start(cluster, capacity=2)
    by_sdk = client.submit("probe_sleep", 30)
    by_cli = client.submit("probe_sleep", 30)
    wait_running(client, ledger, by_sdk.id)
    wait_running(client, ledger, by_cli.id)

    # When one is cancelled through the SDK
    cancelled_at = time.monotonic()
    assert client.cancel(by_sdk.id).state == "cancelled"

    # Then it is cancelled, and its slot is free within 2 s
    assert client.status(by_sdk.id).state == "cancelled"
    wait_until(
        lambda: in_flight(client, "w1") == 1,
        max(0.1, cancelled_at + 2.0 - time.monotonic()),
        0.05,
        what=lambda: cluster.describe_workers(client),
    )
    with pytest.raises(TaskFailed) as failed:
        by_sdk.result(timeout=2.0)
    assert failed.value.state == "cancelled"

    # When the other is cancelled with `hakobu cancel ID`
    done = hakobu(cluster, "cancel", by_cli.id)

    # Then the command exits 0 and prints the state
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [by_cli.id, "cancelled"]
    assert client.status(by_cli.id).state == "cancelled"
    cancelled_at = time.monotonic()
    wait_until(
        lambda: in_flight(client, "w1") == 0,
        2.0,
        0.05,
        what=lambda: cluster.describe_workers(client),
    )
    assert time.monotonic() - cancelled_at < 2.0
    # And both freed slots run the following tasks
    following = [client.submit("probe_sleep", 0.05) for _ in range(2)]
    assert [h.result(timeout=10.0) for h in following] == [0.05, 0.05]
    assert {client.status(h.id).worker_id for h in following} == {"w1"}
    # And each cancelled handler started once and never returned
    for handle in (by_sdk, by_cli):
        assert len(ledger.starts(handle.id)) == 1
        assert ledger.ends(handle.id) == []
        assert client.status(handle.id).attempts == 1


@pytest.mark.timeout(60)
def test_start_deadline_fails_a_task_that_cannot_start(
    cluster: Cluster, ledger: Ledger
) -> None:
    # Given the only worker busy for 3 s
    client = start(cluster)
    blocker = client.submit("probe_sleep", 3)
    wait_running(client, ledger, blocker.id)

    # When a task that must start within 0.5 s is queued behind it
    late = client.submit("probe_sleep", 0.05, start_deadline=0.5)

    # Then it fails with StartDeadline soon after 0.5 s, saying why, never run
    with pytest.raises(TaskFailed) as failed:
        late.result(timeout=5.0)
    assert failed.value.error_type == "StartDeadline"
    info = client.status(late.id)
    assert (info.state, info.attempts) == ("failed", 0)
    assert 0.5 <= info.finished_at - info.created_at <= 1.5
    assert "busy" in (info.error or ""), info.error
    assert client.status(blocker.id).state == "running"
    assert ledger.starts(late.id) == []
    client.cancel(blocker.id)
    wait_until(lambda: in_flight(client, "w1") == 0, 5.0, 0.05, what="slot free")


@pytest.mark.timeout(60)
def test_start_deadline_zero_starts_at_once_or_fails_at_once(
    cluster: Cluster, ledger: Ledger
) -> None:
    # Given an idle worker, a task that must start at once starts
    client = start(cluster)
    now = client.submit("echo", "now", start_deadline=0)
    assert now.result(timeout=10) == "now"

    # And behind a busy one it fails at once, saying the worker is busy
    blocker = client.submit("probe_sleep", 3)
    wait_running(client, ledger, blocker.id)
    late = client.submit("echo", "late", start_deadline=0)
    with pytest.raises(TaskFailed) as failed:
        late.result(timeout=5.0)
    assert failed.value.error_type == "StartDeadline"
    assert "busy" in str(failed.value), str(failed.value)
    client.cancel(blocker.id)


@pytest.mark.timeout(60)
def test_cancel_during_retry_backoff_stops_the_retries(cluster: Cluster) -> None:
    # Given a failing task with retries left, waiting out a 2.4 s backoff
    client = start(cluster)
    handle = client.submit("fail", "again", retries=6)
    wait_until(
        lambda: (
            len((info := client.status(handle.id)).attempt_errors) == 4
            and info.state == "queued"
        ),
        10.0,
        what=lambda: f"four failed attempts: {client.status(handle.id)!r:.300}",
    )

    # When it is cancelled during the backoff
    info = client.cancel(handle.id)

    # Then it is cancelled at once and no further attempt runs
    assert (info.state, info.attempts) == ("cancelled", 4)
    with pytest.raises(TaskFailed) as failed:
        handle.result(timeout=2.0)
    assert failed.value.state == "cancelled"
    # (the fifth attempt was due 2.4 s after the fourth failure)
    assert_stays(
        lambda: client.status(handle.id).attempts == 4,
        BACKOFF_S * 2**3 + 0.6,
        what="no attempt after the cancel",
    )
    assert client.status(handle.id).state == "cancelled"
