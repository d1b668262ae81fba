"""Idle processes stay idle: timers run from the loop tick, not a busy loop."""

from __future__ import annotations

import psutil
import pytest
from helpers.cluster import Cluster

#: Share of one core an idle process may use (heartbeats every 0.5 s only).
IDLE_CPU_PERCENT = 15.0


@pytest.mark.timeout(30)
def test_idle_broker_and_worker_do_not_spin(cluster: Cluster) -> None:
    # Given a broker and a worker with nothing to do, after one task
    broker = cluster.start_broker()
    worker = cluster.start_worker("w1", capacity=1)
    cluster.wait_workers("w1")
    assert cluster.client().submit("echo", "warm").result(timeout=10) == "warm"
    processes = {"broker": psutil.Process(broker.pid), "w1": psutil.Process(worker.pid)}
    for process in processes.values():
        process.cpu_percent(interval=None)

    # When two seconds pass with no traffic but heartbeats
    psutil.cpu_percent(interval=2.0)

    # Then neither used more than a sliver of a core
    usage = {name: p.cpu_percent(interval=None) for name, p in processes.items()}
    assert {n: u for n, u in usage.items() if u > IDLE_CPU_PERCENT} == {}
