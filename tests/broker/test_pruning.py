"""Retention on a real store file: what one prune pass deletes, what it never
touches, that it walks indexes, and when the Pruner runs its passes."""

from __future__ import annotations

import math
import sqlite3

import pytest
from loguru import logger

from broker.retention import BACKLOG_INTERVAL_S, IDLE_INTERVAL_S, Pruner
from broker.state import TaskState
from broker.store import Batch, Pruned, Store, prune_statements
from config.settings import BrokerSettings
from sdk.errors import StoreError

pytestmark = pytest.mark.timeout(20)

#: Wall clock of the tests' "now"; tasks end at NOW - age.
NOW = 1_700_000_000.0


def task_row(task_id: str, state: str, age_s: float | None) -> dict[str, object]:
    """Return a full tasks row; it ended `age_s` seconds before NOW if given."""
    task = TaskState(
        id=task_id,
        name="echo",
        state=state,
        payload=b"\xc0",
        created_wall=NOW - 1000.0,
        seq=0,
        key=f"key-{task_id}",
    )
    if age_s is not None:
        task.finished_wall = NOW - age_s
    return task.row()


def note_row(note_id: int, task_id: str) -> dict[str, object]:
    """Return a worker_notifications row for `task_id`."""
    return {
        "id": note_id,
        "worker_id": "w1",
        "notification_type": "task_assigned",
        "task_id": task_id,
        "attempt": 1,
        "message": "{}",
        "processed": 1,
        "superseded": False,
        "sends": 1,
        "created_at": NOW - 1000.0,
        "last_sent_at": NOW - 1000.0,
    }


def fill(store: Store, tasks: list[tuple[str, str, float | None, int]]) -> None:
    """Write tasks given as (id, state, age_s, notifications) in one commit."""
    batch = Batch()
    next_note = 1
    for task_id, state, age_s, notes in tasks:
        batch.add_task(task_row(task_id, state, age_s))
        for _ in range(notes):
            batch.add_note(note_row(next_note, task_id))
            next_note += 1
    store.commit(batch)


def rows(path: str) -> tuple[list[str], dict[str, int]]:
    """Return the task ids left (sorted) and notifications per task id."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        ids = [r[0] for r in db.execute("select id from tasks order by id")]
        notes = dict(
            db.execute(
                "select task_id, count(*) from worker_notifications group by task_id"
            ).fetchall()
        )
    finally:
        db.close()
    return ids, notes


# --- Store.prune -------------------------------------------------------------------


def test_prune_deletes_the_oldest_ended_tasks_up_to_the_limit(store: Store) -> None:
    # Given ten ended tasks, two notifications each, ages 100..1000 s, and a
    # newer open task holding the newest notification
    ended = [
        (f"t{age:04d}", "succeeded", float(age), 2) for age in range(100, 1001, 100)
    ]
    fill(store, [*ended, ("open", "running", None, 1)])

    # When one pass may delete 4 tasks finished over 50 s ago
    deleted = store.prune(NOW - 50.0, 4)

    # Then exactly the 4 oldest went, with their 8 notifications
    assert counts(deleted) == (4, 8)
    ids, notes = rows(store.path)
    assert ids == ["open", "t0100", "t0200", "t0300", "t0400", "t0500", "t0600"]
    assert notes == {"open": 1, **{i: 2 for i in ids if i != "open"}}

    # And the next passes take the rest, then find nothing
    assert counts(store.prune(NOW - 50.0, 4)) == (4, 8)
    assert counts(store.prune(NOW - 50.0, 4)) == (2, 4)
    assert counts(store.prune(NOW - 50.0, 4)) == (0, 0)
    assert rows(store.path) == (["open"], {"open": 1})


def test_prune_keeps_tasks_younger_than_the_cutoff(store: Store) -> None:
    fill(
        store,
        [
            ("old", "failed", 20.0, 1),
            ("young", "cancelled", 5.0, 1),
            ("open", "queued", None, 0),
        ],
    )
    fill_note_last(store, "open")

    assert counts(store.prune(NOW - 10.0, 100)) == (1, 1)
    assert rows(store.path) == (["open", "young"], {"open": 1, "young": 1})


def counts(pruned: Pruned) -> tuple[int, int]:
    """Return (tasks, notifications) a prune pass deleted."""
    return len(pruned.task_ids), pruned.notes


def fill_note_last(store: Store, task_id: str) -> None:
    """Give `task_id` the newest notification."""
    batch = Batch()
    batch.add_note(note_row(store.max_note_id() + 1, task_id))
    store.commit(batch)


@pytest.mark.parametrize("state", ["queued", "assigned", "running"])
def test_prune_never_touches_open_tasks_or_their_notifications(
    store: Store, state: str
) -> None:
    # Given an open task that (against the rules) carries an old finished_at
    fill(store, [("open", state, 500.0, 3), ("done", "succeeded", 500.0, 1)])
    fill_note_last(store, "done-newest")

    # When everything finished before now may go
    deleted = store.prune(NOW, 1000)

    # Then only the ended task went; the open one keeps all 3 notifications
    assert counts(deleted) == (1, 1)
    ids, notes = rows(store.path)
    assert ids == ["open"]
    assert notes["open"] == 3


def test_prune_keeps_the_task_of_the_newest_notification(store: Store) -> None:
    # Given two old ended tasks; the second holds the newest notification
    fill(store, [("a", "succeeded", 500.0, 2), ("b", "succeeded", 400.0, 2)])
    newest = store.max_note_id()

    # When a pass may take everything
    deleted = store.prune(NOW, 1000)

    # Then "b" stays, so the highest notification id survives a restart
    assert counts(deleted) == (1, 2)
    assert rows(store.path) == (["b"], {"b": 2})
    assert store.max_note_id() == newest


def test_prune_frees_the_idempotency_key(store: Store) -> None:
    fill(store, [("a", "succeeded", 500.0, 0), ("open", "queued", None, 0)])
    assert store.task_id_for_key("key-a") == "a"

    pruned = store.prune(NOW, 10)

    assert (pruned.task_ids, pruned.keys) == (["a"], ["key-a"])
    assert store.task_id_for_key("key-a") is None
    fill(store, [("a2", "queued", None, 0)])
    assert store.task_row("a2") is not None


def test_prune_on_an_empty_store_deletes_nothing(store: Store) -> None:
    assert counts(store.prune(NOW, 10)) == (0, 0)


def test_prune_statements_walk_indexes(store: Store) -> None:
    # Given a store with many ended tasks in every state, some open ones
    states = ["succeeded", "failed", "cancelled", "queued", "running"]
    fill(
        store,
        [(f"t{i:05d}", states[i % 5], float(i % 977), 1) for i in range(3000)],
    )
    db = sqlite3.connect(store.path)
    try:
        db.execute("ANALYZE")
        plans = {
            name: [
                row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {sql}", _params(sql))
            ]
            for name, sql in prune_statements("?").items()
        }
    finally:
        db.close()

    # Then every step searches an index: no table scan, no sort of all rows
    assert plans["candidates"] == [
        "SEARCH tasks USING INDEX task_finished_at (finished_at<?)"
    ]
    assert plans["notes"] == [
        "SEARCH worker_notifications USING INDEX workernotification_task_id (task_id=?)"
    ]
    assert plans["tasks"] == [
        "SEARCH tasks USING INDEX sqlite_autoindex_tasks_1 (id=?)"
    ]
    for name, lines in plans.items():
        assert all(
            "SCAN" not in line and "TEMP B-TREE" not in line for line in lines
        ), (
            name,
            lines,
        )


def _params(sql: str) -> tuple[object, ...]:
    return tuple(["x"] * sql.count("?"))


def test_prune_error_becomes_store_error(store: Store) -> None:
    db = sqlite3.connect(store.path)
    db.execute("DROP TABLE worker_notifications")
    db.close()

    with pytest.raises(StoreError, match="prune failed"):
        store.prune(NOW, 10)


# --- Pruner ------------------------------------------------------------------------


def pruner(store: Store, **settings: object) -> Pruner:
    return Pruner(store, BrokerSettings(**settings))  # type: ignore[arg-type]


def test_pruner_first_pass_is_due_at_once_then_after_its_interval(
    store: Store,
) -> None:
    fill(store, [("a", "succeeded", 500.0, 0), ("open", "queued", None, 0)])
    policy = pruner(store, retention_s=60.0, prune_batch=10)

    assert policy.due_at(5.0) == 5.0
    assert len(policy.run(5.0, NOW).task_ids) == 1
    assert policy.due_at(6.0) == 5.0 + IDLE_INTERVAL_S
    assert (policy.tasks_pruned, policy.notes_pruned) == (1, 0)


def test_pruner_runs_sooner_while_a_pass_hits_its_limit(store: Store) -> None:
    fill(store, [(f"t{i}", "succeeded", 500.0, 1) for i in range(5)])
    fill_note_last(store, "open-newest")
    policy = pruner(store, retention_s=60.0, prune_batch=2)

    assert [len(policy.run(t, NOW).task_ids) for t in (0.0, 1.0, 2.0)] == [2, 2, 1]
    assert policy.due_at(2.0) == 2.0 + IDLE_INTERVAL_S
    assert len(policy.run(12.0, NOW).task_ids) == 0

    # A pass that hit the limit schedules the next one BACKLOG_INTERVAL_S later
    fill(store, [(f"u{i}", "failed", 500.0, 0) for i in range(2)])
    assert len(policy.run(20.0, NOW).task_ids) == 2
    assert policy.due_at(20.0) == 20.0 + BACKLOG_INTERVAL_S


@pytest.mark.parametrize(
    ("retention_s", "interval_s"), [(0.5, 1.0), (4.0, 4.0), (86400.0, 10.0)]
)
def test_pruner_idle_interval_follows_short_retention(
    store: Store, retention_s: float, interval_s: float
) -> None:
    policy = pruner(store, retention_s=retention_s)

    policy.run(100.0, NOW)

    assert policy.due_at(100.0) == 100.0 + interval_s


def test_pruner_with_zero_retention_keeps_everything(store: Store) -> None:
    fill(store, [("a", "succeeded", 10**6, 1), ("b", "cancelled", 10**6, 0)])
    policy = pruner(store, retention_s=0.0)

    assert policy.due_at(0.0) == math.inf
    assert len(policy.run(0.0, NOW + 10**7).task_ids) == 0
    assert rows(store.path) == (["a", "b"], {"a": 1})


def test_pruner_logs_a_backlog_pass_at_info(store: Store) -> None:
    fill(store, [(f"t{i}", "succeeded", 500.0, 1) for i in range(3)])
    fill_note_last(store, "open-newest")
    policy = pruner(store, retention_s=60.0, prune_batch=2)
    lines: list[tuple[str, str]] = []
    sink = logger.add(
        lambda m: lines.append((m.record["level"].name, m.record["message"])),
        level="DEBUG",
        format="{message}",
    )
    try:
        policy.run(0.0, NOW)
        policy.run(1.0, NOW)
        policy.run(2.0, NOW)
    finally:
        logger.remove(sink)

    cutoff = f"{NOW - 60.0:.3f}"
    assert lines == [
        ("INFO", f"store.pruned tasks=2 notifications=2 cutoff={cutoff}"),
        ("DEBUG", f"store.pruned tasks=1 notifications=1 cutoff={cutoff}"),
    ]
