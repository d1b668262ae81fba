"""The scheduler's choices with real processes: priority, tags, least loaded,
no hoarding (C24), delayed tasks, batch submit, and `hakobu status` reasons."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
from helpers.cluster import Cluster
from helpers.ledger import Ledger
from helpers.results import results_within
from helpers.sampling import Sampler
from helpers.waiting import assert_stays, wait_until

from sdk import Client

#: Seconds a CLI command may take (a cold Python start on a busy box).
CLI_TIMEOUT_S = 30.0


def hakobu(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `hakobu ARGS --endpoint <clients endpoint>` and return what it did."""
    return cluster.cli(*args, timeout_s=CLI_TIMEOUT_S)  # type: ignore[no-any-return]


def wait_running(client: Client, ledger: Ledger, *task_ids: str) -> None:
    """Wait until every task is running and its handler has begun."""
    wait_until(
        lambda: all(
            ledger.starts(t) and client.status(t).state == "running" for t in task_ids
        ),
        10.0,
        what=lambda: repr([client.status(t).state for t in task_ids]),
    )


def cancel_all(client: Client, *task_ids: str) -> None:
    """Cancel long tasks at the end, and wait for their slots to be handed back,
    so teardown need not wait for them."""
    for task_id in task_ids:
        assert client.cancel(task_id).state == "cancelled"
    wait_until(
        lambda: all(w.in_flight == 0 for w in client.workers()),
        5.0,
        0.05,
        what="every slot free after the cancels",
    )


@pytest.mark.timeout(60)
def test_high_priority_runs_first(cluster: Cluster, ledger: Ledger) -> None:
    # Given the only worker blocked by a task pinned to it
    cluster.start_broker()
    cluster.start_worker("w1", capacity=1)
    cluster.wait_workers("w1")
    client = cluster.client()
    blocker = client.submit(
        "probe_sleep", 1.5, preferred_worker="w1", require_worker=True
    )
    wait_running(client, ledger, blocker.id)

    # When 10 low-priority, then 10 high-priority tasks are queued
    low = [client.submit("probe_sleep", 0.01, priority=0) for _ in range(10)]
    high = [client.submit("probe_sleep", 0.01, priority=10) for _ in range(10)]
    results_within(client, [blocker, *low, *high], 30.0)

    # Then the first ten to run after the blocker are all the high ones
    order = [s["task_id"] for s in sorted(ledger.starts(), key=lambda s: s["t_start"])]
    assert order[0] == blocker.id
    assert set(order[1:11]) == {h.id for h in high}
    assert set(order[11:]) == {h.id for h in low}


@pytest.mark.timeout(60)
def test_tags_route_and_missing_tag_waits(cluster: Cluster) -> None:
    # Given a worker with tag gpu and one without
    cluster.start_broker()
    cluster.start_worker("w-gpu", 2, ("gpu",))
    cluster.start_worker("w-plain", capacity=2)
    cluster.wait_workers("w-gpu", "w-plain")
    client = cluster.client()

    # When tasks need gpu, and one needs a tag nobody has
    gpu = [client.submit("probe_sleep", 0.05, tags=["gpu"]) for _ in range(6)]
    plain = [client.submit("probe_sleep", 0.05) for _ in range(6)]
    orphan = client.submit("probe_sleep", 0.05, tags=["tpu"])
    results_within(client, gpu + plain, 20.0)

    # Then gpu tasks ran only on the gpu worker
    assert {client.status(h.id).worker_id for h in gpu} == {"w-gpu"}
    assert {client.status(h.id).worker_id for h in plain} <= {"w-gpu", "w-plain"}
    # And the tpu task stays queued, saying no worker has that tag
    assert_stays(
        lambda: client.status(orphan.id).state == "queued",
        0.5,
        what="tpu task queued",
    )
    reason = client.status(orphan.id).reason
    assert re.search(r"\bno\b.*\bworker\b.*\btpu\b", reason), reason
    done = hakobu(cluster, "status", orphan.id)
    assert done.returncode == 0, done.stderr
    assert reason in done.stdout
    client.cancel(orphan.id)


@pytest.mark.timeout(60)
def test_least_loaded_worker_is_chosen_and_status_says_why(
    cluster: Cluster, ledger: Ledger
) -> None:
    # Given w1 (capacity 4) running 3 long tasks pinned to it, and w2 idle
    cluster.start_broker()
    cluster.start_worker("w1", capacity=4)
    cluster.start_worker("w2", capacity=4)
    cluster.wait_workers("w1", "w2")
    client = cluster.client()
    pinned = [
        client.submit("probe_sleep", 30, preferred_worker="w1", require_worker=True)
        for _ in range(3)
    ]
    wait_running(client, ledger, *(h.id for h in pinned))

    # When free tasks and one preferring w1 come in
    free = [client.submit("probe_sleep", 0.05) for _ in range(3)]
    preferred = client.submit("probe_sleep", 0.05, preferred_worker="w1")
    results_within(client, [*free, preferred], 15.0)

    # Then the free tasks went to the least loaded worker, w2
    assert [client.status(h.id).worker_id for h in free] == ["w2"] * 3
    assert client.status(preferred.id).worker_id == "w1"
    # And `hakobu status ID` says why each went where it went
    for handle, word in (
        (pinned[0], "pinned"),
        (free[0], "least loaded"),
        (preferred, "preferred"),
    ):
        done = hakobu(cluster, "status", handle.id)
        assert done.returncode == 0, done.stderr
        reason = [ln for ln in done.stdout.splitlines() if ln.startswith("reason")]
        assert reason and word in reason[0], done.stdout
    cancel_all(client, *(h.id for h in pinned))


@pytest.mark.timeout(60)
def test_busy_worker_does_not_hoard(cluster: Cluster, ledger: Ledger) -> None:
    # Given two workers of capacity 1, and T0 running long on one of them
    cluster.start_broker()
    cluster.start_worker("w1", capacity=1)
    cluster.start_worker("w2", capacity=1)
    cluster.wait_workers("w1", "w2")
    client = cluster.client()
    t0 = client.submit("probe_sleep", 10)
    wait_running(client, ledger, t0.id)
    busy = client.status(t0.id).worker_id
    idle = {"w1": "w2", "w2": "w1"}[busy]

    def sample(c: Client) -> list[tuple[str, int, int, int]]:
        rows = cluster.query(
            "select worker_id, count(*) from tasks "
            "where state in ('assigned', 'running') group by worker_id"
        )
        stored = dict(rows)
        return [
            (w.id, w.in_flight, stored.get(w.id, 0), w.capacity) for w in c.workers()
        ]

    # When T1-T5 come in, sampled every 50 ms
    with Sampler(cluster.clients_endpoint, sample, 0.05) as sampler:
        rest = [client.submit("probe_sleep", 0.5) for _ in range(5)]
        results_within(client, rest, 15.0)

    # Then all ran on the idle worker while T0 still runs on the busy one
    assert [client.status(h.id).worker_id for h in rest] == [idle] * 5
    info = client.status(t0.id)
    assert (info.state, info.worker_id) == ("running", busy)
    # And no worker ever held more than its capacity
    assert sampler.errors == []
    assert len(sampler.samples) >= 20
    over = [
        s
        for s in sampler.values()
        for w, flight, stored, cap in s
        if flight > cap or stored > cap
    ]
    assert over == []
    cancel_all(client, t0.id)


@pytest.mark.timeout(60)
def test_delayed_task_waits_its_delay(cluster: Cluster) -> None:
    # Given a broker and an idle worker
    cluster.start_broker()
    cluster.start_worker("w1", capacity=1)
    cluster.wait_workers("w1")
    client = cluster.client()

    # When a task is submitted with delay=1.5
    sent_at = time.monotonic()
    handle = client.submit("echo", "later", delay=1.5)
    accepted_at = time.monotonic()

    # Then it is not assigned before 1.5 s, and is within 0.5 s after
    left = wait_until(
        lambda: client.status(handle.id).state != "queued" and time.monotonic(),
        5.0,
        0.02,
        what="the delayed task leaving the queue",
    )
    assert left >= sent_at + 1.5
    assert left <= accepted_at + 2.0
    assert handle.result(timeout=5.0) == "later"
    info = client.status(handle.id)
    assigned = [
        row["created_at"]
        for row in cluster.notifications(handle.id)
        if row["notification_type"] == "task_assigned"
    ]
    assert len(assigned) == 1
    assert 1.5 <= assigned[0] - info.created_at <= 2.0


@pytest.mark.timeout(60)
def test_batch_submit_sdk_and_cli(cluster: Cluster, tmp_path: Path) -> None:
    # Given a broker and two workers
    cluster.start_broker()
    cluster.start_worker("w1", capacity=4)
    cluster.start_worker("w2", capacity=4)
    cluster.wait_workers("w1", "w2")
    client = cluster.client()

    # When 50 tasks go in with one submit_many call
    handles = client.submit_many([("echo", {"i": i}) for i in range(50)])

    # Then there are 50 distinct handles, in order, and all succeed
    assert len(handles) == 50
    assert len({h.id for h in handles}) == 50
    assert results_within(client, handles, 20.0) == [{"i": i} for i in range(50)]

    # When a JSON-lines file is submitted with `hakobu submit --from-file`
    path = tmp_path / "tasks.jsonl"
    items = [{"name": "echo", "payload": {"line": n}} for n in range(5)]
    items.append({"name": "probe_sleep", "payload": 0.05, "priority": 5})
    path.write_text("\n".join(json.dumps(item) for item in items) + "\n")
    done = hakobu(cluster, "submit", "--from-file", str(path))

    # Then it prints one id per task, and each runs with its payload
    assert done.returncode == 0, done.stderr
    ids = done.stdout.split()
    assert len(ids) == len(items)
    results = [client.result(task_id, timeout=10.0) for task_id in ids]
    assert results == [item["payload"] for item in items]
    assert client.status(ids[-1]).priority == 5
