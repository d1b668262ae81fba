"""Idempotency keys on a real store file: which keys are answered from memory
or proven new without a query, which are looked up, and that every key that
made a task is found again."""

from __future__ import annotations

import os
import random
import re

import pytest

from broker.keys import HEX_LIMIT, KeyIndex
from broker.state import TaskState
from broker.store import Batch, Store
from sdk.ids import time_ordered_id

pytestmark = pytest.mark.timeout(20)


def stored(store: Store, pairs: list[tuple[str, str]]) -> None:
    """Commit one task row per (task id, key)."""
    batch = Batch()
    for task_id, key in pairs:
        task = TaskState(
            id=task_id,
            name="echo",
            state="queued",
            payload=b"\xc0",
            created_wall=1.0,
            seq=0,
            key=key,
        )
        batch.add_task(task.row())
    store.commit(batch)


def test_floor_is_the_largest_stored_key_below_the_hex_limit(store: Store) -> None:
    stored(store, [("t1", "0aa"), ("t2", "6ff"), ("t3", "zebra"), ("t4", "report")])

    keys = KeyIndex(store)

    assert keys.floor == "6ff"
    assert HEX_LIMIT == "g"


def test_a_key_above_the_floor_is_new_without_a_query(store: Store) -> None:
    stored(store, [("t1", "6ff")])
    keys = KeyIndex(store)

    assert keys.find("700") is None
    assert keys.find_many(["701", "702"]) == {}
    assert keys.lookups == 0


def test_keys_at_or_below_the_floor_or_past_the_limit_are_looked_up(
    store: Store,
) -> None:
    stored(store, [("t1", "0aa"), ("t2", "6ff"), ("t3", "zebra")])
    keys = KeyIndex(store)

    assert keys.find("0aa") == "t1"
    assert keys.find("6ff") == "t2"
    assert keys.find("zebra") == "t3"
    assert keys.find("0ab") is None
    assert keys.find_many(["0aa", "zebra", "800", "yak"]) == {
        "0aa": "t1",
        "zebra": "t3",
    }
    # 0aa, 6ff, zebra, 0ab, then 0aa, zebra and yak: 800 is above the floor.
    assert keys.lookups == 7


def test_memory_answers_first_and_evicted_keys_raise_the_floor(store: Store) -> None:
    keys = KeyIndex(store, cache_size=2)
    made = [(f"t{i}", f"{i:03x}") for i in (10, 11, 12)]
    stored(store, made)
    for task_id, key in made:
        keys.add(key, task_id)

    # 00a left memory: the floor rose to it, so it is looked up, and found.
    assert keys.floor == "00a"
    assert len(keys) == 2
    assert keys.in_memory("00a") is None
    assert keys.find("00b") == "t11"
    assert keys.lookups == 0
    assert keys.find("00a") == "t10"
    assert keys.lookups == 1


def test_forget_drops_a_pruned_key_from_memory(store: Store) -> None:
    keys = KeyIndex(store)
    keys.add("0aa", "t1")
    keys.forget(["0aa", "0bb"])

    assert keys.in_memory("0aa") is None
    assert len(keys) == 0


def test_client_made_keys_are_new_to_a_restarted_broker(store: Store) -> None:
    # A store full of client-made keys: the next client-made key needs no query.
    old = [(f"t{i}", time_ordered_id()) for i in range(50)]
    stored(store, old)
    keys = KeyIndex(store)

    assert keys.find(time_ordered_id()) is None
    assert keys.lookups == 0
    for task_id, key in old:
        assert keys.find(key) == task_id
    assert keys.lookups == len(old)


def test_ids_are_32_hex_digits_ordered_by_time_and_distinct_after_fork() -> None:
    made = [time_ordered_id() for _ in range(1000)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in made)
    assert len(set(made)) == len(made)
    times = [i[:13] for i in made]
    assert times == sorted(times)

    # A caller seeding the random module does not repeat the random tails.
    random.seed(7)
    first = time_ordered_id()
    random.seed(7)
    assert time_ordered_id()[13:] != first[13:]

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child writes one id and leaves at once
        os.write(write_end, time_ordered_id().encode())
        os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    from_child = os.read(read_end, 64).decode()
    os.close(read_end)
    mine = time_ordered_id()
    # The same microsecond is possible; the same random tail is not.
    assert from_child[13:] != mine[13:]
