"""`Client.tasks` / `hakobu tasks` by state: open tasks come from the
broker's memory (their rows lag: a running task's row says assigned), ended
ones from the store, newest first, filtered by worker."""

from __future__ import annotations

import pytest
from helpers.cluster import Cluster
from helpers.ledger import Ledger
from helpers.waiting import wait_until


@pytest.mark.timeout(60)
def test_tasks_by_state_list_exactly_the_tasks_in_it(
    cluster: Cluster, ledger: Ledger
) -> None:
    # Given two running tasks, one queued behind them, two failed, three done
    cluster.start_broker()
    cluster.start_worker("w1", capacity=2)
    client = cluster.client()
    done = [client.submit("echo", n) for n in range(3)]
    failed = [client.submit("fail", f"boom {n}") for n in range(2)]
    assert client.gather(done, timeout=20) == [0, 1, 2]
    assert client.gather(failed, timeout=20, return_exceptions=True)
    running = [client.submit("probe_sleep", 30) for _ in range(2)]
    queued = client.submit("echo", "later")
    wait_until(
        lambda: (
            all(ledger.starts(h.id) for h in running)
            and all(client.status(h.id).state == "running" for h in running)
        ),
        15.0,
        what="both sleepers running",
    )

    def ids(state: str, worker: str | None = None) -> list[str]:
        return [t.id for t in client.tasks(state=state, worker=worker)]

    # Then each state lists exactly its tasks, newest first
    assert ids("running") == [running[1].id, running[0].id]
    assert ids("running", worker="w1") == [running[1].id, running[0].id]
    assert ids("running", worker="w2") == []
    assert ids("queued") == [queued.id]
    assert ids("assigned") == []
    assert ids("failed") == [failed[1].id, failed[0].id]
    assert ids("succeeded") == [h.id for h in reversed(done)]
    assert ids("cancelled") == []
    # And the unfiltered list shows live states, not the lagging rows
    states = {t.id: t.state for t in client.tasks()}
    assert states[running[0].id] == states[running[1].id] == "running"
    assert len(states) == 8
    for handle in running:
        client.cancel(handle.id)
