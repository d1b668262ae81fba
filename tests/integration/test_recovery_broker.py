"""Vanished and restarted peers, broker crashes, a locked store (C01, C02, C11,
C12, C25): nothing acknowledged is lost and nothing runs twice needlessly."""

from __future__ import annotations

import random
import sqlite3
import threading
import time

import pytest
from helpers.cluster import Cluster
from helpers.results import results_within
from helpers.sampling import Sampler
from helpers.waiting import hold, wait_until

from sdk import BrokerUnavailable, Client, InvalidRequest

#: Test timing of CASES.md: heartbeat H, liveness L, ack timeout R.
H_S, L, R_S = 0.5, 3, 2.0


@pytest.mark.timeout(60)
def test_c01_assign_to_a_vanished_or_unknown_worker_is_not_lost(
    cluster: Cluster,
) -> None:
    # Given w1 and w2, and w1 SIGKILLed before the broker can notice
    cluster.start_broker()
    w1 = cluster.start_worker("w1", capacity=2)
    cluster.start_worker("w2", capacity=2)
    cluster.wait_workers("w1", "w2")
    client = cluster.client()
    cluster.kill(w1)
    killed_at = time.monotonic()

    # When tasks go in preferring w1, preferring an unknown id, and pinned to w1
    preferred = [
        client.submit("probe_sleep", 0.2, preferred_worker="w1") for _ in range(10)
    ]
    never = []
    for _ in range(3):
        try:
            never.append(client.submit("probe_sleep", 0.2, preferred_worker="w-never"))
        except InvalidRequest as exc:
            assert "w-never" in str(exc)
    pinned = [
        client.submit("probe_sleep", 0.2, preferred_worker="w1", require_worker=True)
        for _ in range(3)
    ]

    # Then the preferred and unknown-id tasks run on w2 after a bounded wait
    assert results_within(client, preferred + never, 20) == [0.2] * (
        len(preferred) + len(never)
    )
    assert {client.status(h.id).worker_id for h in preferred + never} == {"w2"}
    assert time.monotonic() - killed_at <= 15
    # And the pinned ones stay visible, not lost, until w1 is back
    states = {client.status(h.id).state for h in pinned}
    assert states <= {"queued", "assigned"}, states
    cluster.restart(w1)
    assert results_within(client, pinned, 20) == [0.2] * 3
    assert {client.status(h.id).worker_id for h in pinned} == {"w1"}
    # And no ASSIGN that failed counts as delivered: one processed row each
    for handle in preferred + never + pinned:
        rows = [r for r in cluster.notifications(handle.id) if r["processed"] == 1]
        assert [r["worker_id"] for r in rows] == [client.status(handle.id).worker_id]
    runs = cluster.ledger.executions()
    assert sorted(runs[h.id] for h in preferred + never + pinned) == [1] * len(
        preferred + never + pinned
    )


@pytest.mark.timeout(90)
def test_c02_worker_restarted_at_once_with_the_same_id(cluster: Cluster) -> None:
    # Given w1 alone, running 1 s tasks one at a time
    cluster.start_broker()
    cluster.start_worker("w1", capacity=1)
    cluster.wait_workers("w1")
    client = cluster.client()
    handles = [client.submit("probe_sleep", 1.0) for _ in range(5)]
    interrupted: set[str] = set()

    # When, three times, w1 is SIGKILLed mid-task and restarted at once
    seen_starts = 0
    for round_number in range(3):
        wait_until(
            lambda n=seen_starts: len(cluster.ledger.starts()) > n,
            15,
            what=f"a task starting on the current w1 (round {round_number})",
        )
        seen_starts = len(cluster.ledger.starts())
        interrupted |= _running(cluster)
        cluster.restart(cluster.workers["w1"])
    assert interrupted

    # Then every task succeeds; the broker stayed up
    assert results_within(client, handles, 40) == [1.0] * 5
    assert cluster.broker is not None and cluster.broker.is_alive()
    # And only interrupted tasks ran again, one attempt higher, each in a new pid
    runs = cluster.ledger.executions()
    assert {t for t, n in runs.items() if n > 1} <= interrupted
    for handle in handles:
        starts = cluster.ledger.starts(handle.id)
        assert client.status(handle.id).attempts == len(starts)
        assert len({s["pid"] for s in starts}) == len(starts)
    assert "EHOSTUNREACH" not in cluster.broker.log_text()


def _running(cluster: Cluster) -> set[str]:
    started = {s["task_id"] for s in cluster.ledger.starts()}
    return started - {e["task_id"] for e in cluster.ledger.ends()}


@pytest.mark.timeout(90)
def test_c11_broker_sigkill_and_restart_with_workers_connected(
    cluster: Cluster,
) -> None:
    # Given a broker and three workers, busy with short and long tasks
    broker = cluster.start_broker()
    for worker_id in ("w1", "w2", "w3"):
        cluster.start_worker(worker_id, capacity=2)
    cluster.wait_workers("w1", "w2", "w3")
    client = cluster.client(request_timeout=2.0)
    rng = random.Random(11)
    handles = [client.submit("probe_sleep", 4.0) for _ in range(2)]
    handles += [
        client.submit("probe_sleep", round(rng.uniform(0.05, 0.5), 2))
        for _ in range(40)
    ]
    wait_until(lambda: len(cluster.ledger.ends()) >= 10, 20, what="10 tasks finished")

    # When the broker is SIGKILLed, and restarted on the same store 2 s later
    cluster.kill(broker)
    hold(2.0)
    cluster.restart(broker)

    # Then all workers register again, without being restarted
    cluster.wait_workers("w1", "w2", "w3", timeout_s=L * H_S + 10)
    assert all(w.is_alive() for w in cluster.workers.values())
    # And every task succeeds, each executed exactly once
    results_within(client, handles, 40)
    infos = [client.status(h.id) for h in handles]
    assert {i.state for i in infos} == {"succeeded"}
    runs = cluster.ledger.executions()
    assert sorted(runs[h.id] for h in handles) == [1] * len(handles)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("run", range(3))
def test_c12_acknowledged_submits_survive_a_broker_crash(
    cluster: Cluster, run: int
) -> None:
    # Given a broker, a worker and a client submitting as fast as it can
    broker = cluster.start_broker()
    cluster.start_worker("w1", capacity=4)
    cluster.wait_workers("w1")
    acknowledged: list[tuple[int, str]] = []
    stop = threading.Event()

    def submit_loop() -> None:
        with Client(cluster.clients_endpoint, request_timeout=0.5, retries=0) as c:
            for seq in range(100_000):
                if stop.is_set():
                    return
                try:
                    acknowledged.append((seq, c.submit("echo", seq).id))
                except BrokerUnavailable:
                    return

    # When the broker is SIGKILLed at a random moment, then restarted
    submitter = threading.Thread(target=submit_loop, daemon=True)
    submitter.start()
    hold(random.Random(run).uniform(0.5, 1.5))
    cluster.kill(broker)
    submitter.join(timeout=5)
    stop.set()
    cluster.restart(broker)

    # Then every id the client got back completes with its own number
    assert len(acknowledged) > 10
    client = cluster.client(request_timeout=5.0)
    infos = [client.status(task_id) for _, task_id in acknowledged]
    assert [i.name for i in infos] == ["echo"] * len(acknowledged)
    for seq, task_id in acknowledged:
        assert client.result(task_id, timeout=20) == seq


@pytest.mark.timeout(90)
def test_c25_an_external_write_lock_only_slows_the_broker(cluster: Cluster) -> None:
    # Given a broker, two workers and pollers calling status() 20 times a second
    cluster.start_broker()
    cluster.start_worker("w1", capacity=4)
    cluster.start_worker("w2", capacity=4)
    cluster.wait_workers("w1", "w2")
    submitters = [cluster.client(request_timeout=10.0) for _ in range(2)]
    first = submitters[0].submit("probe_sleep", 0.01)
    errors: list[BaseException] = []
    handles: list[object] = []

    def submit_many(client: Client, count: int) -> None:
        try:
            handles.extend(client.submit("probe_sleep", 0.01) for _ in range(count))
        except Exception as exc:  # reported by the test, not lost
            errors.append(exc)

    # When another process holds the store's write lock for 3 s mid-run
    with Sampler(cluster.clients_endpoint, lambda c: c.status(first.id), 0.05) as p1:
        threads = [
            threading.Thread(target=submit_many, args=(c, 50)) for c in submitters
        ]
        for thread in threads:
            thread.start()
        wait_until(lambda: len(handles) >= 10, 10, what="10 submits")
        locker = sqlite3.connect(cluster.db_path, timeout=10, isolation_level=None)
        try:
            locker.execute("BEGIN IMMEDIATE")
            hold(3.0)
            submitted_under_lock = len(handles)
            locker.execute("ROLLBACK")
        finally:
            locker.close()
        for thread in threads:
            thread.join(timeout=30)

    # Then the lock really stalled submits
    assert submitted_under_lock < 100
    # Then no client saw an error, and every task succeeds once
    assert errors == []
    assert p1.errors == []
    assert len(handles) == 100
    results_within(submitters[0], handles, 40)
    runs = cluster.ledger.executions()
    assert sorted(runs[h.id] for h in handles) == [1] * 100  # type: ignore[attr-defined]
    assert cluster.broker is not None and cluster.broker.is_alive()
