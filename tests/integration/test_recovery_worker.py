"""Workers that die, drain, crash or hog the GIL (C16-C19, C21, C22, C24)."""

from __future__ import annotations

import signal
import time

import pytest
from helpers.cluster import Cluster
from helpers.results import outcomes_within, results_within
from helpers.sampling import Sampler
from helpers.waiting import wait_until

from sdk import TaskFailed

#: Test timing of CASES.md: heartbeat H, liveness L, ack timeout R.
H_S, L, R_S = 0.5, 3, 2.0
#: When a silent worker's tasks must be back in the queue: L x H + R.
LOST_BOUND_S = L * H_S + R_S
#: Slack for a busy two-core machine, added to bounds measured from outside.
SLACK_S = 1.5


def running_on(cluster: Cluster, worker_id: str) -> set[str]:
    """Task ids the ledger shows started on `worker_id` and not ended."""
    started = {
        s["task_id"] for s in cluster.ledger.starts() if s["worker_id"] == worker_id
    }
    ended = {e["task_id"] for e in cluster.ledger.ends() if e["worker_id"] == worker_id}
    return started - ended


@pytest.mark.timeout(60)
def test_c16_long_tasks_are_not_resent_while_their_worker_heartbeats(
    cluster: Cluster,
) -> None:
    # Given R = 2 s and two workers
    cluster.start_broker()
    cluster.start_worker("w1", capacity=2)
    cluster.start_worker("w2", capacity=2)
    cluster.wait_workers("w1", "w2")
    client = cluster.client()

    # When tasks that run for 2.5 x R go in with short ones
    long = [client.submit("probe_sleep", 5.0) for _ in range(2)]
    short = [client.submit("probe_sleep", 0.1) for _ in range(6)]
    results_within(client, long + short, 25)

    # Then each ran once, where it was first sent, with one ACKed notification
    runs = cluster.ledger.executions()
    assert {h.id: runs[h.id] for h in long + short} == {h.id: 1 for h in long + short}
    for handle in long + short:
        (row,) = cluster.notifications(handle.id)
        (start,) = cluster.ledger.starts(handle.id)
        assert row["processed"] == 1
        assert row["worker_id"] == start["worker_id"]
        assert row.get("sends", 1) == 1, row
        assert client.status(handle.id).attempts == 1


@pytest.mark.timeout(60)
def test_c17_tasks_of_sigkilled_workers_come_back(cluster: Cluster) -> None:
    # Given three workers of capacity 2, all busy
    cluster.start_broker()
    for worker_id in ("w1", "w2", "w3"):
        cluster.start_worker(worker_id, capacity=2)
    cluster.wait_workers("w1", "w2", "w3")
    client = cluster.client()
    handles = [client.submit("probe_sleep", 1.0) for _ in range(12)]
    wait_until(lambda: len(running_on(cluster, "w1")) == 2, 10, what="w1 busy")

    # When w1, then w2, are SIGKILLed mid-task, and neither comes back
    lost = running_on(cluster, "w1")
    killed_at = time.monotonic()
    cluster.kill(cluster.workers["w1"])
    wait_until(lambda: running_on(cluster, "w2"), 10, what="w2 busy")
    lost |= running_on(cluster, "w2")
    cluster.kill(cluster.workers["w2"])

    # Then w1's tasks start again elsewhere within L x H + R
    wait_until(
        lambda: all(len(cluster.ledger.starts(t)) >= 2 for t in lost),
        LOST_BOUND_S + SLACK_S + 3,
        what="the killed workers' tasks to start again",
    )
    assert time.monotonic() - killed_at <= 2 * (LOST_BOUND_S + SLACK_S) + 2
    # And every task succeeds, none failed for its worker's death
    assert results_within(client, handles, 30) == [1.0] * 12
    infos = {h.id: client.status(h.id) for h in handles}
    assert {i.state for i in infos.values()} == {"succeeded"}
    assert {t: infos[t].attempts for t in lost} == {t: 2 for t in lost}
    assert {i.worker_id for t, i in infos.items() if t in lost} == {"w3"}
    # And the ledger repeats only the tasks that were running on them
    runs = cluster.ledger.executions()
    assert {t for t, n in runs.items() if n > 1} <= lost
    assert sum(runs.values()) - 12 <= len(lost)


@pytest.mark.timeout(60)
def test_c18_task_of_a_silent_worker_is_requeued_by_a_timer(
    cluster: Cluster,
) -> None:
    # Given w1 alone, running a task
    cluster.start_broker()
    w1 = cluster.start_worker("w1", capacity=1)
    cluster.wait_workers("w1")
    client = cluster.client()
    handle = client.submit("probe_sleep", 3.0)
    wait_until(lambda: cluster.ledger.starts(handle.id), 10, what="task start")

    # When w1 is SIGKILLed and nothing else happens
    killed_at = time.monotonic()
    cluster.kill(w1)

    # Then a broker timer puts the task back in the queue, blaming w1
    requeued = wait_until(
        lambda: (info := client.status(handle.id)).state == "queued" and info,
        LOST_BOUND_S + SLACK_S + 2,
        0.1,
        what=lambda: repr(client.status(handle.id)),
    )
    assert time.monotonic() - killed_at <= LOST_BOUND_S + SLACK_S + 2
    assert requeued.attempts == 1
    assert "w1" in (requeued.error or ""), requeued
    assert requeued.worker_id != "w1" or requeued.state != "running"

    # When w2 starts, the task reaches it promptly and succeeds there
    with Sampler(cluster.clients_endpoint, lambda c: c.status(handle.id), 0.1) as s:
        cluster.start_worker("w2", capacity=1)
        cluster.wait_workers("w2")
        online_at = time.monotonic()
        wait_until(
            lambda: len(cluster.ledger.starts(handle.id)) == 2, 5, what="rerun on w2"
        )
        assert time.monotonic() - online_at <= H_S + SLACK_S
        assert handle.result(timeout=15) == 3.0
    final = client.status(handle.id)
    assert (final.state, final.worker_id, final.attempts) == ("succeeded", "w2", 2)
    assert [(x.state, x.worker_id) for x in s.values() if x.worker_id == "w1"] == []
    assert s.errors == []
    assert [(x["attempt"], x["worker_id"]) for x in cluster.ledger.starts()] == [
        (1, "w1"),
        (2, "w2"),
    ]


@pytest.mark.timeout(60)
def test_c19_sigterm_drains_a_worker(cluster: Cluster) -> None:
    # Given w1 (capacity 4, grace 2 s) busy with three long and one short task
    cluster.start_broker()
    w1 = cluster.start_worker("w1", capacity=4, env={"HAKOBU_GRACE_S": "2"})
    cluster.start_worker("w2", capacity=4)
    cluster.wait_workers("w1", "w2")
    client = cluster.client()
    prefer = {"preferred_worker": "w1", "fallback_after": 0.5}
    long = [client.submit("probe_sleep", 4.0, **prefer) for _ in range(3)]
    short_w1 = client.submit("probe_sleep", 1.0, **prefer)
    others = [client.submit("probe_sleep", 0.5) for _ in range(4)]
    wait_until(lambda: len(running_on(cluster, "w1")) == 4, 10, what="w1 full")

    # When w1 gets SIGTERM
    stopped_at = time.monotonic()
    cluster.send_signal(w1, signal.SIGTERM)

    # Then it says it is draining, takes nothing new, and exits 0 in G + 2 s
    wait_until(
        lambda: {w.id: w.state for w in client.workers()}.get("w1") == "draining",
        1.0 + SLACK_S,
        what=lambda: cluster.describe_workers(client),
    )
    late = client.submit("probe_sleep", 0.1, **prefer)
    assert w1.wait(2.0 + 2.0) == 0
    assert time.monotonic() - stopped_at <= 2.0 + 2.0
    # And every task succeeds: the short one on w1, the long ones handed on
    assert results_within(client, [*long, short_w1, *others, late], 30)
    infos = {h.id: client.status(h.id) for h in [*long, short_w1, late]}
    assert (infos[short_w1.id].worker_id, infos[short_w1.id].attempts) == ("w1", 1)
    assert {(infos[h.id].worker_id, infos[h.id].attempts) for h in long} == {("w2", 2)}
    assert infos[late.id].worker_id == "w2"
    # And nothing is left assigned to w1
    assert [t.id for t in client.tasks(worker="w1") if not t.is_terminal] == []


@pytest.mark.timeout(60)
def test_c21_poison_tasks_fail_and_spare_their_siblings(cluster: Cluster) -> None:
    # Given two workers, attempts capped at 3
    cluster.start_broker(env={"HAKOBU_MAX_ATTEMPTS": "3"})
    workers = [cluster.start_worker(w, capacity=2) for w in ("w1", "w2")]
    cluster.wait_workers("w1", "w2")
    client = cluster.client()

    # When a segfault and an exit(137) are mixed into ordinary tasks
    sleeps = [client.submit("probe_sleep", 0.2) for _ in range(15)]
    segv = client.submit("probe_segv", None)
    exit137 = client.submit("probe_exit", 137)
    sleeps += [client.submit("probe_sleep", 0.2) for _ in range(15)]
    outcomes = outcomes_within(client, [*sleeps, segv, exit137], 40)

    # Then every ordinary task succeeds, and each poison task fails naming the crash
    assert outcomes[:30] == [("ok", 0.2)] * 30
    (segv_kind, segv_error), (exit_kind, exit_error) = outcomes[30:]
    assert (segv_kind, exit_kind) == ("failed", "failed")
    assert isinstance(segv_error, TaskFailed) and isinstance(exit_error, TaskFailed)
    assert any(s in str(segv_error) for s in ("SIGSEGV", "signal 11")), segv_error
    assert "137" in str(exit_error), exit_error
    # And each ran at most 3 times, at least R apart
    for poison in (segv, exit137):
        starts = sorted(s["t_start"] for s in cluster.ledger.starts(poison.id))
        assert 1 <= len(starts) <= 3
        assert all(b - a >= R_S for a, b in zip(starts, starts[1:], strict=False))
    # And the workers themselves survived
    assert all(w.is_alive() for w in workers)
    assert {w.state for w in client.workers()} == {"online"}


@pytest.mark.timeout(60)
def test_c22_gil_bound_handlers_do_not_starve_heartbeats(cluster: Cluster) -> None:
    # Given w1 of capacity 1, watched every 100 ms
    cluster.start_broker()
    cluster.start_worker("w1", capacity=1)
    cluster.wait_workers("w1")
    client = cluster.client()

    def sample(c: object) -> tuple[str, float]:
        (w1,) = [w for w in c.workers() if w.id == "w1"]  # type: ignore[attr-defined]
        return w1.state, w1.last_seen_s or 0.0

    # When it runs 3 s of pure-Python loop, then a ~2 s catastrophic regex
    with Sampler(cluster.clients_endpoint, sample, 0.1) as watch:
        cpu = client.submit("probe_cpu", 3.0)
        regex = client.submit("probe_regex", 26)
        results_within(client, [cpu, regex], 40)

    # Then w1 was never declared lost, heard from within L x H, each task ran once
    assert watch.errors == []
    assert {state for state, _ in watch.values()} == {"online"}
    assert max(seen for _, seen in watch.values()) <= L * H_S
    assert [client.status(h.id).attempts for h in (cpu, regex)] == [1, 1]
    runs = cluster.ledger.executions()
    assert (runs[cpu.id], runs[regex.id]) == (1, 1)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("variant", ["prefer", "require"])
def test_c24_a_busy_worker_does_not_hoard_tasks(cluster: Cluster, variant: str) -> None:
    # Given w1 and w2 of capacity 1, w1 busy with a pinned 3 s task
    cluster.start_broker()
    cluster.start_worker("w1", capacity=1)
    cluster.start_worker("w2", capacity=1)
    cluster.wait_workers("w1", "w2")
    client = cluster.client()
    t0 = client.submit("probe_sleep", 3.0, preferred_worker="w1", require_worker=True)
    wait_until(lambda: cluster.ledger.starts(t0.id), 10, what="T0 start")

    def sample(c: object) -> list[tuple[str, int, int]]:
        over = [
            (w.id, w.in_flight, w.capacity)
            for w in c.workers()  # type: ignore[attr-defined]
            if w.in_flight > w.capacity
        ]
        rows = cluster.query(
            "select worker_id, count(*) from tasks "
            "where state in ('assigned', 'running') group by worker_id"
        )
        return over + [(w, n, 1) for w, n in rows if n > 1]

    # When T1-T9 go in preferring (or requiring) w1
    require = variant == "require"
    with Sampler(cluster.clients_endpoint, sample, 0.1) as watch:
        ts = [
            client.submit(
                "probe_sleep", 0.2, preferred_worker="w1", require_worker=require
            )
            for _ in range(9)
        ]
        results_within(client, [t0, *ts], 30)

    # Then no worker ever held more than its capacity
    assert watch.errors == []
    assert [v for v in watch.values() if v] == []
    (t0_end,) = [e["t_end"] for e in cluster.ledger.ends(t0.id)]
    starts = {t.id: cluster.ledger.starts(t.id) for t in ts}
    assert all(len(s) == 1 for s in starts.values())
    on_w1 = sorted(
        (s[0]["t_start"], s[0]["task_id"])
        for s in starts.values()
        if s[0]["worker_id"] == "w1"
    )
    # And nothing ran on w1 before T0 was done there
    assert all(start >= t0_end for start, _ in on_w1)
    if require:
        # And pinned tasks waited for w1, then ran there one at a time
        assert len(on_w1) == 9
        ends = {e["task_id"]: e["t_end"] for e in cluster.ledger.ends()}
        for (_, first), (second_start, _) in zip(on_w1, on_w1[1:], strict=False):
            assert second_start >= ends[first]
