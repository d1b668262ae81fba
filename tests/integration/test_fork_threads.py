"""Handlers that fork (C09) and many threads at once (C10), small versions."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
from helpers.cluster import Cluster
from helpers.results import results_within
from helpers.sampling import Sampler

from sdk import Client

#: Text that must never appear in any process output.
CRASH_MARKERS = (
    "Assertion failed",
    "SQLite objects created in a thread",
    "connection already opened",
    "Traceback (most recent call last)",
)
#: Heartbeat interval H of the test timing, in seconds.
HEARTBEAT_S = 0.5


def last_seen(client: Client) -> dict[str, float]:
    """Return seconds since the broker last heard from each worker."""
    return {w.id: w.last_seen_s or 0.0 for w in client.workers()}


def status_poll(task_ids: list[str]) -> Callable[[Client], str]:
    """Return a sampler that asks for the next task's status each call."""
    ids = itertools.cycle(task_ids)
    return lambda client: client.status(next(ids)).state


def assert_no_crash_markers(cluster: Cluster) -> None:
    logs = cluster.logs()
    assert [m for m in CRASH_MARKERS if m in logs] == [], cluster.tail(60)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["subprocess", "pool", "fork"])
def test_forking_handlers(cluster: Cluster, kind: str) -> None:
    # Given one worker of capacity 4
    cluster.start_broker()
    cluster.start_worker("w1", capacity=4)
    cluster.wait_workers("w1")
    client = cluster.client()

    # When 20 tasks that fork this way run on it
    with Sampler(cluster.clients_endpoint, last_seen, 0.1) as poller:
        handles = [client.submit("probe_fork", kind) for _ in range(20)]
        results = results_within(client, handles, 15)

    # Then all succeed once, nothing asserted in libzmq, heartbeats kept time
    assert results == [kind] * 20
    runs = cluster.ledger.executions()
    assert sorted(runs[h.id] for h in handles) == [1] * 20
    assert poller.errors == []
    assert poller.samples, "the heartbeat sampler never got an answer"
    assert max(seen.get("w1", 0.0) for seen in poller.values()) <= 2 * HEARTBEAT_S
    # And the worker still runs tasks afterwards
    echoes = [client.submit("echo", i) for i in range(3)]
    assert [h.result(timeout=10) for h in echoes] == [0, 1, 2]
    assert_no_crash_markers(cluster)


@pytest.mark.timeout(90)
def test_many_tasks_with_status_poller(cluster: Cluster) -> None:
    # Given two workers of capacity 4
    cluster.start_broker()
    cluster.start_worker("w1", capacity=4)
    cluster.start_worker("w2", capacity=4)
    cluster.wait_workers("w1", "w2")
    client = cluster.client()

    # When 200 short tasks run while another thread polls status() at 20 Hz
    handles = [client.submit("probe_sleep", 0.01) for _ in range(20)]
    with Sampler(
        cluster.clients_endpoint, status_poll([h.id for h in handles]), 0.05
    ) as poller:
        handles += [client.submit("probe_sleep", 0.01) for _ in range(180)]
        results = results_within(client, handles, 40)

    # Then all succeed exactly once, on both workers, with no thread errors
    assert results == [0.01] * 200
    infos = [client.status(h.id) for h in handles]
    assert {info.state for info in infos} == {"succeeded"}
    assert {info.worker_id for info in infos} == {"w1", "w2"}
    runs = cluster.ledger.executions()
    assert sorted(runs[h.id] for h in handles) == [1] * 200
    assert poller.errors == []
    assert len(poller.samples) >= 5
    assert_no_crash_markers(cluster)
