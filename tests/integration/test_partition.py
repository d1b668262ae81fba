"""A worker frozen with SIGSTOP longer than liveness, then SIGCONT (H=0.5 s, L=3).

SIGSTOP goes to the worker process only, like a network cut: its handler
processes keep running, but nothing reaches the broker. The broker must
declare the worker lost and requeue its attempts; after SIGCONT the worker
registers again and keeps serving, and every task still ends exactly once.
"""

from __future__ import annotations

import signal
import time

import pytest
from helpers.cluster import Cluster
from helpers.ledger import Ledger
from helpers.results import results_within
from helpers.waiting import hold, wait_until

from sdk import Client, TaskHandle

#: Seconds each probe task sleeps.
TASK_S = 3.0
#: Seconds the worker stays stopped: well past liveness (3 x 0.5 s).
STOPPED_S = 3.0
#: Seconds after SIGSTOP by which the broker must have declared the worker lost.
LOST_WITHIN_S = 1.5 + 1.5


def worker_state(client: Client, worker_id: str) -> str | None:
    """Return the worker's state as the broker reports it, None if unlisted."""
    return next((w.state for w in client.workers() if w.id == worker_id), None)


def start_on_w1(
    cluster: Cluster, ledger: Ledger, pinned: int = 0
) -> tuple[Client, list[TaskHandle]]:
    """Start a broker and w1 running two free probe tasks, then `pinned` more
    pinned to w1; return a client and the handles, free ones first."""
    cluster.start_broker()
    cluster.start_worker("w1", capacity=2 + pinned)
    cluster.wait_workers("w1")
    client = cluster.client()
    handles = [client.submit("probe_sleep", TASK_S) for _ in range(2)]
    handles += [
        client.submit("probe_sleep", TASK_S, preferred_worker="w1", require_worker=True)
        for _ in range(pinned)
    ]
    wait_until(
        lambda: (
            all(ledger.starts(h.id) for h in handles)
            and all(client.status(h.id).state == "running" for h in handles)
        ),
        10.0,
        what="every task running on w1",
    )
    assert {client.status(h.id).worker_id for h in handles} == {"w1"}
    return client, handles


def lost_entries(client: Client, task_id: str) -> list[dict]:
    """Return the attempt errors that record a lost worker."""
    return [
        e
        for e in client.status(task_id).attempt_errors
        if e.get("error_type") == "WorkerLost"
    ]


@pytest.mark.timeout(60)
def test_stopped_worker_is_lost_its_tasks_rerun_once(
    cluster: Cluster, ledger: Ledger
) -> None:
    # Given two free probe tasks and one pinned to w1 running there, w2 idle
    client, (*free, pinned) = start_on_w1(cluster, ledger, pinned=1)
    cluster.start_worker("w2", capacity=2)
    cluster.wait_workers("w2")
    w1 = cluster.workers["w1"]

    # When w1 is stopped for longer than liveness
    cluster.send_signal(w1, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        # Then the broker declares it lost and the free tasks run again on w2
        wait_until(
            lambda: worker_state(client, "w1") == "lost",
            LOST_WITHIN_S,
            0.05,
            what=lambda: cluster.describe_workers(client),
        )
        wait_until(
            lambda: all(
                (info := client.status(h.id)).worker_id == "w2"
                and info.attempts == 2
                and info.state in ("assigned", "running")
                for h in free
            ),
            5.0,
            what="both free tasks re-assigned to w2 as attempt 2",
        )
        # And the pinned task waits for w1
        info = client.status(pinned.id)
        assert (info.state, info.worker_id) == ("queued", None), info
        assert "w1" in info.reason, info.reason
        hold(max(0.0, stopped_at + STOPPED_S - time.monotonic()))
    finally:
        cluster.send_signal(w1, signal.SIGCONT)

    # Then w1 registers again, the same process, and every task ends once
    cluster.wait_workers("w1", timeout_s=5.0)
    assert w1.is_alive()
    assert results_within(client, [*free, pinned], 15.0) == [TASK_S] * 3
    for handle in free:
        info = client.status(handle.id)
        assert (info.state, info.attempts) == ("succeeded", 2)
        lost = lost_entries(client, handle.id)
        assert [(e["attempt"], e["worker_id"]) for e in lost] == [(1, "w1")]
    ids = tuple(h.id for h in [*free, pinned])
    rows = cluster.query("select state from tasks where id in (?, ?, ?)", ids)
    assert rows == [("succeeded",)] * 3
    # And the ledger shows attempt 1 on w1 and attempt 2 on w2, nothing more
    for handle in free:
        runs = sorted((s["attempt"], s["worker_id"]) for s in ledger.starts(handle.id))
        assert runs == [(1, "w1"), (2, "w2")]
    # And the pinned task ran only on w1, once per attempt, its loss recorded
    info = client.status(pinned.id)
    assert (info.state, info.worker_id) == ("succeeded", "w1")
    assert [e["worker_id"] for e in lost_entries(client, pinned.id)] == ["w1"]
    runs = [(s["attempt"], s["worker_id"]) for s in ledger.starts(pinned.id)]
    assert runs == [(n, "w1") for n in range(1, info.attempts + 1)]
    # And w1 keeps serving
    again = client.submit(
        "probe_sleep", 0.05, preferred_worker="w1", require_worker=True
    )
    assert again.result(timeout=10.0) == 0.05
    assert client.status(again.id).worker_id == "w1"


@pytest.mark.timeout(60)
def test_stopped_only_worker_takes_its_tasks_back_after_sigcont(
    cluster: Cluster, ledger: Ledger
) -> None:
    # Given two probe tasks running on w1, the only worker
    client, handles = start_on_w1(cluster, ledger)
    w1 = cluster.workers["w1"]

    # When w1 is stopped for longer than liveness, then continued
    cluster.send_signal(w1, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        wait_until(
            lambda: worker_state(client, "w1") == "lost",
            LOST_WITHIN_S,
            0.05,
            what=lambda: cluster.describe_workers(client),
        )
        # Then its tasks go back to the queue, the loss recorded
        infos = [client.status(h.id) for h in handles]
        assert [i.state for i in infos] == ["queued", "queued"]
        assert all(lost_entries(client, h.id) for h in handles)
        hold(max(0.0, stopped_at + STOPPED_S - time.monotonic()))
    finally:
        cluster.send_signal(w1, signal.SIGCONT)

    # Then w1 registers again and every task ends once, without a second run
    cluster.wait_workers("w1", timeout_s=5.0)
    assert results_within(client, handles, 15.0) == [TASK_S, TASK_S]
    for handle in handles:
        info = client.status(handle.id)
        assert info.state == "succeeded"
        assert info.worker_id == "w1"
        lost = lost_entries(client, handle.id)
        assert [(e["attempt"], e["worker_id"]) for e in lost] == [(1, "w1")]
        # The attempt that kept running during the cut is counted once
        starts = ledger.starts(handle.id)
        assert len(starts) == info.attempts, (starts, info)
    # And w1 keeps serving
    again = client.submit("probe_sleep", 0.05)
    assert again.result(timeout=10.0) == 0.05
    assert client.status(again.id).worker_id == "w1"
