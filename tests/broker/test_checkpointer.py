"""The checkpointer thread keeps the WAL from growing under a writer that
never pauses, and stops with the store."""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path

import pytest

from broker.store import Batch, Store

#: Commits in a row, with no pause between them.
COMMITS = 20_000
#: Largest WAL allowed: the RESTART threshold (16 MB) plus generous slack.
MAX_WAL_BYTES = 64 * 1024 * 1024


def note(note_id: int) -> dict[str, object]:
    return {
        "id": note_id,
        "worker_id": "w1",
        "notification_type": "task_assigned",
        "task_id": f"t{note_id}",
        "attempt": 1,
        "message": "{}",
        "processed": 0,
        "superseded": False,
        "sends": 1,
        "created_at": 0.0,
        "last_sent_at": 0.0,
    }


@pytest.mark.timeout(120)
def test_wal_stays_bounded_and_every_commit_is_kept(tmp_path: Path) -> None:
    path = str(tmp_path / "store.db")
    store = Store(path)
    largest = 0
    for note_id in range(1, COMMITS + 1):
        batch = Batch()
        batch.add_note(note(note_id))
        store.commit(batch)
        if note_id % 1000 == 0:
            largest = max(largest, os.path.getsize(path + "-wal"))
    store.close()

    assert largest <= MAX_WAL_BYTES, largest
    assert not any(t.name == "hakobu-checkpointer" for t in threading.enumerate())
    with sqlite3.connect(path) as conn:
        count = conn.execute("select count(*) from worker_notifications").fetchone()
    assert count == (COMMITS,)
