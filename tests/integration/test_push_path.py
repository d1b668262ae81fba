"""The push path end to end: the broker picks, records, pushes; preferences and
pins hold; every assignment is a processed notification; capacity holds."""

from __future__ import annotations

import time

import pytest
from helpers.cluster import Cluster
from helpers.sampling import Sampler
from helpers.waiting import wait_until

from sdk import Client, TaskFailed
from worker.runtime import ACK_DELAY_S

TASK_ASSIGNED = "task_assigned"


def over_capacity(client: Client) -> list[tuple[str, int, int]]:
    """Return the workers holding more tasks than their capacity right now."""
    return [
        (w.id, w.in_flight, w.capacity)
        for w in client.workers()
        if w.in_flight > w.capacity
    ]


def all_processed(cluster: Cluster) -> list[dict[str, object]] | None:
    """Return the ASSIGN rows once every one of them is processed, else None."""
    rows = [
        r for r in cluster.notifications() if r["notification_type"] == TASK_ASSIGNED
    ]
    return rows if rows and all(r["processed"] == 1 for r in rows) else None


@pytest.mark.timeout(60)
def test_sixty_tasks_over_two_workers(cluster: Cluster) -> None:
    # Given a broker and two workers of capacity 2
    cluster.start_broker()
    cluster.start_worker("w1", capacity=2)
    cluster.start_worker("w2", capacity=2)
    cluster.wait_workers("w1", "w2")
    client = cluster.client()

    # When 60 tasks go in: a third prefer w1, a third require w2, a third free
    with Sampler(cluster.clients_endpoint, over_capacity, 0.02) as watch:
        handles = []
        for i in range(60):
            if i % 3 == 0:
                handle = client.submit("sleep", 0.02, preferred_worker="w1")
            elif i % 3 == 1:
                handle = client.submit(
                    "sleep", 0.02, preferred_worker="w2", require_worker=True
                )
            else:
                handle = client.submit("echo", {"i": i})
            handles.append((i, handle))
        results = {i: h.result(timeout=30) for i, h in handles}
        infos = {i: client.status(h.id) for i, h in handles}

    # Then every task succeeded once, where it was asked to run
    assert [i for i, info in infos.items() if info.state != "succeeded"] == []
    assert {i: r for i, r in results.items() if i % 3 == 2} == {
        i: {"i": i} for i in range(2, 60, 3)
    }
    assert {infos[i].worker_id for i in range(0, 60, 3)} == {"w1"}
    assert {infos[i].worker_id for i in range(1, 60, 3)} == {"w2"}
    assert {infos[i].worker_id for i in range(2, 60, 3)} <= {"w1", "w2"}
    assert all(info.attempts == 1 for info in infos.values())
    assert all(infos[i].preferred_worker == "w1" for i in range(0, 60, 3))
    # And one processed notification per assignment, to the worker that ran it
    rows = wait_until(
        lambda: all_processed(cluster), 5.0, 0.1, what="every notification processed"
    )
    by_task: dict[str, list[dict[str, object]]] = {}
    for row in rows:
        by_task.setdefault(row["task_id"], []).append(row)
    assert set(by_task) == {h.id for _, h in handles}
    assert all(len(task_rows) == 1 for task_rows in by_task.values())
    assert {r["task_id"]: r["worker_id"] for r in rows} == {
        h.id: infos[i].worker_id for i, h in handles
    }
    # And no worker was ever seen over its capacity
    assert watch.errors == []
    assert len(watch.samples) > 5
    assert [v for v in watch.values() if v] == []


@pytest.mark.timeout(30)
def test_submit_with_same_key_returns_same_task(cluster: Cluster) -> None:
    cluster.start_broker()
    cluster.start_worker("w1", capacity=1)
    client = cluster.client()

    first = client.submit("echo", "once", key="same-key-1")
    again = client.submit("echo", "once", key="same-key-1")
    other = client.submit("echo", "other", key="same-key-2")

    assert again.id == first.id
    assert (first.created, again.created) == (True, False)
    assert other.id != first.id
    assert first.result(timeout=15) == "once"
    rows = cluster.query("select count(*) from tasks where key = ?", ("same-key-1",))
    assert rows == [(1,)]


@pytest.mark.timeout(30)
def test_required_absent_worker_fails_at_start_deadline(cluster: Cluster) -> None:
    # Given one worker, and a task pinned to a worker that never comes
    cluster.start_broker()
    cluster.start_worker("w1", capacity=1)
    cluster.wait_workers("w1")
    client = cluster.client()
    started_at = time.monotonic()

    handle = client.submit(
        "echo",
        "hard",
        preferred_worker="ghost",
        require_worker=True,
        start_deadline=1.0,
    )

    # Then it fails at the deadline, naming the worker, and never ran
    with pytest.raises(TaskFailed) as info:
        handle.result(timeout=15)
    elapsed = time.monotonic() - started_at
    status = client.status(handle.id)
    assert status.state == "failed"
    assert "ghost" in (status.error or "")
    assert "ghost" in str(info.value)
    assert 0.9 <= elapsed <= 8.0
    assert status.worker_id in (None, "")
    assert cluster.notifications(handle.id) == []


@pytest.mark.timeout(30)
def test_preferred_absent_worker_falls_back_after_its_wait(cluster: Cluster) -> None:
    # Given one worker, and a task preferring a worker that never comes
    cluster.start_broker()
    cluster.start_worker("w1", capacity=1)
    cluster.wait_workers("w1")
    client = cluster.client()
    started_at = time.monotonic()

    handle = client.submit("echo", "soft", preferred_worker="ghost", fallback_after=1.0)

    # Then it waits at least fallback_after, then runs on the worker there is
    assert handle.result(timeout=15) == "soft"
    elapsed = time.monotonic() - started_at
    status = client.status(handle.id)
    assert status.worker_id == "w1"
    assert status.preferred_worker == "ghost"
    assert 1.0 <= elapsed <= 8.0
    (row,) = cluster.notifications(handle.id)
    assert row["worker_id"] == "w1"
    assert row["created_at"] - status.created_at >= 0.95


@pytest.mark.timeout(30)
def test_task_times_are_recorded_in_order(cluster: Cluster) -> None:
    cluster.start_broker()
    cluster.start_worker("w1", capacity=1)
    client = cluster.client()

    slow = client.submit("sleep", 0.2)
    quick = [client.submit("echo", i) for i in range(10)]
    assert slow.result(timeout=15) == 0.2
    assert [h.result(timeout=15) for h in quick] == list(range(10))
    infos = [client.status(h.id) for h in [slow, *quick]]

    times = [(i.created_at, i.started_at, i.finished_at) for i in infos]
    assert [t for t in times if None in t] == []
    assert all(created <= started <= finished for created, started, finished in times)
    # started_at is when the broker read the ACK, which may trail the start
    # by up to the worker's ACK delay.
    assert infos[0].finished_at - infos[0].started_at >= 0.2 - ACK_DELAY_S
