"""Retention end to end: a real broker prunes ended tasks and their
notifications from its SQLite file, never open ones; 0 keeps everything; a
pruned task is as unknown as one never seen; a bad setting is refused."""

from __future__ import annotations

import re
import subprocess
import uuid

import pytest
from helpers.cluster import CLI, Cluster
from helpers.waiting import assert_stays, wait_until

from sdk import Client, TaskFailed, TaskNotFound

#: Retention of these tests, in seconds: passes then run every second.
RETENTION_S = "0.5"
#: Seconds to wait for a pass to have pruned what is due.
PRUNED_WITHIN_S = 10.0


def table_counts(cluster: Cluster) -> tuple[int, int]:
    """Return (tasks, worker_notifications) rows in the broker's store file."""
    tasks = cluster.query("select count(*) from tasks")[0][0]
    notes = cluster.query("select count(*) from worker_notifications")[0][0]
    return tasks, notes


def pruned_counts(log: str) -> tuple[int, int]:
    """Sum the tasks and notifications of every store.pruned line in `log`."""
    found = re.findall(r"store\.pruned tasks=(\d+) notifications=(\d+)", log)
    return sum(int(t) for t, _ in found), sum(int(n) for _, n in found)


def finish_one(cluster: Cluster, key: str | None = None) -> str:
    """Start a broker with short retention and a worker; run one echo task.

    A second task runs after it: the task of the newest notification is
    never pruned, and it must not be the one under test.
    """
    cluster.start_broker("--retention", RETENTION_S)
    cluster.start_worker("w1", capacity=1)
    client = cluster.client()
    handle = client.submit("echo", "x", key=key)
    assert handle.result(timeout=15) == "x"
    assert client.submit("echo", "later").result(timeout=15) == "later"
    return str(handle.id)


def wait_row_gone(cluster: Cluster, task_id: str) -> None:
    wait_until(
        lambda: cluster.query("select 1 from tasks where id = ?", (task_id,)) == [],
        PRUNED_WITHIN_S,
        0.05,
        what=f"task {task_id} pruned from the store",
    )


@pytest.mark.timeout(45)
def test_ended_tasks_leave_the_store_and_open_ones_stay(cluster: Cluster) -> None:
    # Given a broker keeping ended tasks 0.5 s, at most 4 per pass
    cluster.start_broker(
        "--retention",
        RETENTION_S,
        "--log-level",
        "DEBUG",
        env={"HAKOBU_PRUNE_BATCH": "4"},
    )
    cluster.start_worker("w1", capacity=2)
    cluster.wait_workers("w1")
    client = cluster.client()

    # When 8 tasks succeed, 2 fail and 1 is cancelled (11 ended, 10 ASSIGNs)
    done = [client.submit("echo", i) for i in range(8)]
    failing = [client.submit("fail", "boom") for _ in range(2)]
    cancelled = client.submit(
        "echo", "never", preferred_worker="ghost-2", require_worker=True
    )
    client.cancel(cancelled.id)
    assert [h.result(timeout=15) for h in done] == list(range(8))
    for handle in failing:
        with pytest.raises(TaskFailed):
            handle.result(timeout=15)
    # And then a task runs (holding the newest notification) and one waits for
    # a worker that never comes
    running = client.submit("sleep", 30)
    waiting = client.submit(
        "echo", "pinned", preferred_worker="ghost", require_worker=True
    )
    wait_until(lambda: client.status(running.id).state == "running", 10.0)

    # Then every ended task and its notifications leave the store
    wait_until(
        lambda: table_counts(cluster) == (2, 1),
        PRUNED_WITHIN_S,
        0.05,
        what=lambda: f"2 tasks and 1 notification left, not {table_counts(cluster)}",
    )
    # (a running task's row says "assigned" until it ends)
    assert dict(cluster.query("select id, state from tasks")) == {
        running.id: "assigned",
        waiting.id: "queued",
    }
    assert [r["task_id"] for r in cluster.notifications()] == [running.id]
    # And the passes deleted exactly those rows, at most 4 tasks each
    broker = cluster.broker
    assert broker is not None
    wait_until(lambda: pruned_counts(broker.log_text()) == (11, 10), 5.0)
    log = broker.log_text()
    per_pass = [int(n) for n in re.findall(r"store\.pruned tasks=(\d+)", log)]
    assert max(per_pass) == 4 and len(per_pass) >= 3
    assert re.search(r"INFO .*store\.pruned tasks=4 ", log)
    # And the open tasks stay through later passes
    assert_stays(lambda: table_counts(cluster) == (2, 1), 2.5, what="open tasks kept")
    assert client.status(running.id).state == "running"
    assert client.status(waiting.id).state == "queued"


@pytest.mark.timeout(30)
def test_zero_retention_keeps_every_task(cluster: Cluster) -> None:
    # Given a broker with retention 0 (keep for ever), set by environment
    cluster.start_broker("--log-level", "DEBUG", env={"HAKOBU_RETENTION_S": "0"})
    cluster.start_worker("w1", capacity=2)
    client = cluster.client()

    # When 5 tasks end
    handles = [client.submit("echo", i) for i in range(5)]
    assert [h.result(timeout=15) for h in handles] == list(range(5))

    # Then their rows stay, longer than short retention would keep them
    wait_until(lambda: table_counts(cluster) == (5, 5), 5.0)
    assert_stays(lambda: table_counts(cluster) == (5, 5), 2.5, what="rows kept")
    log = cluster.broker.log_text() if cluster.broker else ""
    assert "store.pruned" not in log


@pytest.mark.timeout(30)
def test_a_pruned_task_is_unknown_after_a_restart(cluster: Cluster) -> None:
    # Given a task with a key that ended and was pruned
    task_id = finish_one(cluster, key="retention-key-0")
    wait_row_gone(cluster, task_id)
    assert cluster.broker is not None

    # When the broker restarts (nothing of the task left in its memory)
    cluster.restart(cluster.broker)
    client = cluster.client()

    # Then status and result say what they say for an id never seen
    assert_unknown(cluster, client, task_id)
    with pytest.raises(TaskNotFound):
        client.result(task_id, timeout=5)
    # And the key is free again: it makes a new task
    again = client.submit("echo", "y", key="retention-key-0")
    assert (again.created, again.id != task_id) == (True, True)
    assert again.result(timeout=15) == "y"


@pytest.mark.timeout(30)
def test_a_pruned_task_is_unknown_to_the_running_broker(cluster: Cluster) -> None:
    # Given a task that ended and was pruned
    task_id = finish_one(cluster)
    wait_row_gone(cluster, task_id)

    # Then status says what it says for an id never seen
    assert_unknown(cluster, cluster.client(), task_id)


@pytest.mark.timeout(30)
def test_a_pruned_task_key_makes_a_new_task(cluster: Cluster) -> None:
    # Given a task submitted with a key, ended and pruned
    task_id = finish_one(cluster, key="retention-key-1")
    wait_row_gone(cluster, task_id)

    # When the same key comes again
    again = cluster.client().submit("echo", "y", key="retention-key-1")

    # Then it makes a new task
    if not again.created or again.id == task_id:
        pytest.fail(f"the pruned task's key still names {again.id}")
    assert again.result(timeout=15) == "y"


def assert_unknown(cluster: Cluster, client: Client, task_id: str) -> None:
    """Check STATUS of `task_id` fails exactly as for a never-seen id."""
    never = uuid.uuid4().hex
    errors = []
    for some_id in (task_id, never):
        with pytest.raises(TaskNotFound) as info:
            client.status(some_id)
        errors.append(str(info.value).replace(some_id, "ID"))
    assert errors[0] == errors[1]
    shown = [cluster.cli("status", some_id) for some_id in (task_id, never)]
    assert [s.returncode for s in shown] == [1, 1]
    assert shown[0].stderr.replace(task_id, "ID") == shown[1].stderr.replace(
        never, "ID"
    )
    assert shown[0].stderr.count("\n") == 1


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["broker", "--retention", "-1"], {}),
        (["broker"], {"HAKOBU_RETENTION_S": "-0.5"}),
        (["up", "--retention", "-1"], {}),
        (["broker"], {"HAKOBU_PRUNE_BATCH": "0"}),
    ],
)
def test_a_negative_retention_is_refused_in_one_line(
    cluster: Cluster, args: list[str], env: dict[str, str]
) -> None:
    # When a broker (or `up`) starts with a bad setting
    done = subprocess.run(
        [*CLI, *args, "--db", str(cluster.db_path)],
        cwd=cluster.dir,
        env=cluster.base_env(env),
        capture_output=True,
        text=True,
        timeout=20,
    )

    # Then it exits 2 with one line naming the setting, and starts nothing
    setting = "prune_batch" if "HAKOBU_PRUNE_BATCH" in env else "retention_s"
    assert done.returncode == 2, done
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"error: invalid setting {setting}=")
    assert "below" in done.stderr
    assert not cluster.db_path.exists()
