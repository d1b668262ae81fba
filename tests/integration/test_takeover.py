"""A second process started with a live worker's id takes the id over: the
first is told to stop, and the tasks the new one runs are never run twice,
even when the old one briefly takes the id's connection back."""

from __future__ import annotations

import psutil  # type: ignore[import-untyped]
import pytest
from helpers.cluster import Cluster
from helpers.ledger import Ledger
from helpers.waiting import wait_until

#: Seconds each task runs: longer than the silence that makes a worker lost.
TASK_S = 4.0


@pytest.mark.timeout(90)
def test_takeover_runs_each_task_once(cluster: Cluster, ledger: Ledger) -> None:
    # Given a worker w2, then a second process started as w2 while it lives
    cluster.start_broker()
    old = cluster.start_worker("w2", capacity=2, log_name="w2-old.log")
    client = cluster.client()
    wait_until(lambda: [w.state for w in client.workers()] == ["online"], 15.0)
    new = cluster.start_worker("w2", capacity=2, log_name="w2-new.log")
    wait_until(lambda: "worker.replaced worker=w2" in cluster.logs(), 15.0)

    # When tasks run on the new process while the old one reconnects
    handles = [client.submit("probe_sleep", TASK_S) for _ in range(2)]
    assert client.gather(handles, timeout=60) == [TASK_S, TASK_S]

    # Then the old process was stopped and each task ran once, on the new one
    handler_pids = {c.pid for c in psutil.Process(new.pid).children()}
    assert old.wait(20) == 3
    for handle in handles:
        info = client.status(handle.id)
        assert (info.state, info.attempts, info.attempt_errors) == (
            "succeeded",
            1,
            (),
        )
        starts = ledger.starts(handle.id)
        assert [s["pid"] in handler_pids for s in starts] == [True], cluster.tail()
