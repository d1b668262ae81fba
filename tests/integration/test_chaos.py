"""Chaos: workers and the broker are SIGKILLed and restarted while tasks flow.

Three workers of capacity 4 run 300 `probe_sleep` tasks (retries=5) while a
chaos thread SIGKILLs a random worker every ~1.5 s and restarts it, and
SIGKILLs and restarts the broker twice on the same store and endpoints.
Every accepted task must end succeeded with its own input as the result;
handler runs beyond one per task may only come from killed workers.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter

import pytest
from helpers.cluster import Cluster
from helpers.ledger import Ledger
from helpers.results import results_within
from helpers.waiting import hold, wait_until

from sdk import HakobuError

#: Tasks submitted, over this many seconds of chaos.
TASKS = 300
SUBMIT_SPAN_S = 10.0
#: Worker ids and capacity.
WORKERS = ("w1", "w2", "w3")
CAPACITY = 4
#: Seconds between worker kills; a killed worker is restarted after RESTART_S.
KILL_EVERY_S = 1.5
RESTART_S = 0.3
#: Seconds into the chaos at which the broker is SIGKILLed; down for BROKER_DOWN_S.
BROKER_KILLS_AT_S = (3.0, 7.5)
BROKER_DOWN_S = 0.5
#: Seconds the chaos lasts after it starts.
CHAOS_S = 11.0
#: Seconds every result must be in by, after the last submit.
RESULTS_S = 40.0


class Chaos:
    """Kill and restart workers and the broker on a fixed, seeded schedule."""

    def __init__(self, cluster: Cluster, seed: int = 7) -> None:
        self.cluster = cluster
        self.random = random.Random(seed)
        self.worker_kills = 0
        self.broker_kills = 0
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Chaos:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        assert not self._thread.is_alive(), "chaos thread did not stop"

    def _run(self) -> None:
        try:
            self._schedule()
        except BaseException as exc:  # reported by the test, not lost
            self.errors.append(exc)

    def _schedule(self) -> None:
        started_at = time.monotonic()
        next_kill_at = started_at + KILL_EVERY_S
        broker_due = [started_at + at for at in BROKER_KILLS_AT_S]
        while not self._stop.is_set() and time.monotonic() < started_at + CHAOS_S:
            now = time.monotonic()
            if broker_due and now >= broker_due[0]:
                broker_due.pop(0)
                self._kill_broker()
            elif now >= next_kill_at:
                next_kill_at = now + KILL_EVERY_S
                self._kill_worker(self.random.choice(WORKERS))
            self._check_broker()
            self._stop.wait(0.05)

    def _kill_worker(self, worker_id: str) -> None:
        proc = self.cluster.workers[worker_id]
        self.cluster.kill(proc)
        self.worker_kills += 1
        hold(RESTART_S)
        self.cluster.restart(proc)

    def _kill_broker(self) -> None:
        broker = self.cluster.broker
        assert broker is not None
        self.cluster.kill(broker)
        self.broker_kills += 1
        hold(BROKER_DOWN_S)
        self.cluster.restart(broker)

    def _check_broker(self) -> None:
        broker = self.cluster.broker
        if broker is not None and not broker.is_alive():
            raise AssertionError(
                f"the restarted broker exited with code {broker.returncode}"
            )


def payload_of(i: int) -> float:
    """Return task i's payload: ~20 ms of sleep, unique so results can be told apart."""
    return 0.02 + i / 1_000_000


@pytest.mark.timeout(120)
def test_every_task_survives_worker_and_broker_kills(
    cluster: Cluster, ledger: Ledger
) -> None:
    # Given a broker and three workers of capacity 4
    cluster.start_broker()
    for worker_id in WORKERS:
        cluster.start_worker(worker_id, capacity=CAPACITY)
    cluster.wait_workers(*WORKERS)
    client = cluster.client(request_timeout=5.0)

    # When 300 tasks go in, paced over ~10 s, while workers and the broker die
    started_at = time.monotonic()
    handles = []
    chaos = Chaos(cluster)
    try:
        with chaos:
            for i in range(TASKS):
                due = started_at + SUBMIT_SPAN_S * i / TASKS
                if due > time.monotonic():
                    hold(due - time.monotonic())  # pacing of the load, not a sync
                handle = client.submit("probe_sleep", payload_of(i), retries=5)
                handles.append(handle)
            results = results_within(client, handles, RESULTS_S)
    except HakobuError as exc:
        # Say what the chaos saw (a broker that did not come back?), not only
        # the client's timeout.
        raise AssertionError(f"{exc!r}; chaos errors: {chaos.errors!r}") from exc
    elapsed_s = time.monotonic() - started_at

    # Then every accepted task succeeded once, with its own input as result
    assert chaos.errors == []
    assert chaos.broker_kills == 2
    assert chaos.worker_kills >= 5
    delivered = sum(r == payload_of(i) for i, r in enumerate(results))
    rate = 100.0 * delivered / TASKS
    ids = [h.id for h in handles]
    assert len(set(ids)) == TASKS
    rows = cluster.query("select id, state from tasks")
    assert Counter(state for _, state in rows) == {"succeeded": TASKS}
    assert {task_id for task_id, _ in rows} == set(ids)
    # And handler runs beyond one per task came only from killed workers
    executions = ledger.executions()
    completions = ledger.completions()
    assert [t for t in ids if executions[t] < 1 or completions[t] < 1] == []
    assert set(executions) == set(ids)
    extra = sum(n - 1 for n in executions.values())
    print(
        f"\nchaos: delivery {delivered}/{TASKS} = {rate:.2f}%, "
        f"extra handler runs {extra}, worker kills {chaos.worker_kills}, "
        f"broker kills {chaos.broker_kills}, {elapsed_s:.1f} s"
    )
    assert rate == 100.0
    assert extra <= chaos.worker_kills * CAPACITY
    # And the restarted workers are all back online afterwards
    wait_until(
        lambda: {w.id for w in client.workers() if w.state == "online"} >= set(WORKERS),
        10.0,
        0.1,
        what=lambda: cluster.describe_workers(client),
    )
