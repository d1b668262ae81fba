"""The store: every query the broker makes, and the one commit per loop turn.

The broker loop is the only writer. It stages a turn's writes in a `Batch`
and `Store.commit` applies them in one transaction; peewee and sqlite errors
become `StoreError` here and nowhere else.

Limits:
- SQLite only for now; the SQL below sticks to what PostgreSQL also accepts
  except the pragmas.
"""

from __future__ import annotations

import fcntl
import json
import operator
import os
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from json.encoder import encode_basestring
from typing import IO, Any, TypeVar

import peewee
from loguru import logger

from broker.checkpointer import Checkpointer
from broker.models import (
    ENDED_STATES,
    MODELS,
    UNUSUAL_ENDS,
    Task,
    Worker,
    WorkerNotification,
    database,
)
from sdk.errors import StoreError

#: Milliseconds SQLite waits for another process's write lock before failing.
BUSY_TIMEOUT_MS = 30_000
#: Most keys looked up by one query (SQLite allows 32766 parameters).
KEYS_PER_QUERY = 500
#: Tries of one commit when SQLite reports the database locked or busy.
COMMIT_TRIES = 5
#: Page size of a new store; 2 KiB halves the bytes a small commit writes
#: compared with SQLite's 4 KiB default, and still holds payloads of a few
#: kilobytes in few pages.
PAGE_SIZE = 2048

TASK_COLUMNS = tuple(Task._meta.sorted_field_names)

T = TypeVar("T")


@dataclass
class Batch:
    """Writes staged during one loop turn; applied by `Store.commit`.

    An update to a row inserted in the same batch changes the row to insert,
    so a task assigned in the turn it was submitted costs one INSERT.
    """

    new_tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    task_updates: dict[str, dict[str, Any]] = field(default_factory=dict)
    new_notes: dict[int, dict[str, Any]] = field(default_factory=dict)
    note_updates: dict[int, dict[str, Any]] = field(default_factory=dict)
    workers: dict[str, dict[str, Any]] = field(default_factory=dict)

    def add_task(self, row: dict[str, Any]) -> None:
        """Stage a new task row."""
        self.new_tasks[row["id"]] = row

    def add_note(self, row: dict[str, Any]) -> None:
        """Stage a new worker_notifications row."""
        self.new_notes[row["id"]] = row

    def update_task(self, task_id: str, **fields: Any) -> None:
        """Stage new values for a task row; later calls win per field."""
        row = self.new_tasks.get(task_id)
        if row is not None:
            row.update(fields)
        else:
            self.task_updates.setdefault(task_id, {}).update(fields)

    def update_note(self, note_id: int, **fields: Any) -> None:
        """Stage new values for a worker_notifications row."""
        row = self.new_notes.get(note_id)
        if row is not None:
            row.update(fields)
        else:
            self.note_updates.setdefault(note_id, {}).update(fields)

    def __len__(self) -> int:
        return (
            len(self.new_tasks)
            + len(self.task_updates)
            + len(self.new_notes)
            + len(self.note_updates)
            + len(self.workers)
        )


@dataclass
class Pruned:
    """What one prune pass deleted: task ids, their keys, notification count."""

    task_ids: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    notes: int = 0


class Store:
    """The broker's SQLite store."""

    def __init__(self, path: str, durability: str = "normal") -> None:
        self.path = path
        self._lock = _lock_store(path)
        pragmas = {
            # Small pages: a commit rewrites every page it touched in the WAL,
            # and a task's rows and index entries are a few hundred bytes.
            # Takes effect only when the store file is created.
            "page_size": PAGE_SIZE,
            "journal_mode": "wal",
            "synchronous": "full" if durability == "full" else "normal",
            "foreign_keys": 1,
            "busy_timeout": BUSY_TIMEOUT_MS,
            "cache_size": -64_000,
            # The Checkpointer thread checkpoints instead of the commits.
            "wal_autocheckpoint": 0,
        }
        self.db = peewee.SqliteDatabase(path, pragmas=pragmas, autoconnect=False)
        database.initialize(self.db)
        try:
            self.db.connect()
            self.db.create_tables(MODELS)
        except (peewee.PeeweeException, sqlite3.Error) as exc:
            self._lock.close()
            raise StoreError(f"cannot open store {path}: {exc}") from exc
        self._checkpointer = Checkpointer(path)
        self._checkpointer.start()

    def _cursor(self) -> Any:
        return self.db.cursor()  # type: ignore[no-untyped-call]

    def close(self) -> None:
        """Close the connection and release the store lock; idempotent."""
        self._checkpointer.stop()
        if not self.db.is_closed():
            self.db.close()
        if not self._lock.closed:
            self._lock.close()

    # --- writes ------------------------------------------------------------

    def commit(self, batch: Batch) -> None:
        """Apply every staged write in one transaction, retrying lock errors."""
        if not len(batch):
            return
        self._transaction(lambda cursor: self._apply(cursor, batch), "commit")

    def prune(self, cutoff_wall: float, limit: int) -> Pruned:
        """Delete up to `limit` ended tasks that finished before `cutoff_wall`.

        Oldest first, with every worker_notifications row of those tasks, in
        one transaction of its own. Only succeeded, failed and cancelled tasks
        go; so does their idempotency key. The task of the newest notification
        stays, so `max_note_id` never falls and note ids are not reused after
        a restart. Returns what was deleted.
        """
        sql = prune_statements(self.db.param)

        def work(cursor: Any) -> Pruned:
            row = cursor.execute(sql["newest_note"]).fetchone()
            keep = row[0] if row else ""
            params = (cutoff_wall, *ENDED_STATES, keep, limit)
            found = cursor.execute(sql["candidates"], params).fetchall()
            if not found:
                return Pruned()
            ids = [(task_id,) for task_id, _ in found]
            cursor.executemany(sql["notes"], ids)
            notes = cursor.rowcount
            cursor.executemany(sql["tasks"], ids)
            return Pruned(
                [task_id for task_id, _ in found],
                [key for _, key in found if key is not None],
                notes,
            )

        return self._transaction(work, "prune")

    def _transaction(self, work: Callable[[Any], T], what: str) -> T:
        """Run `work(cursor)` in one transaction, retrying lock errors."""
        attempt = 0
        while True:
            attempt += 1
            try:
                cursor = self._cursor()
                cursor.execute("BEGIN")
                try:
                    result = work(cursor)
                    cursor.execute("COMMIT")
                except BaseException:
                    cursor.execute("ROLLBACK")
                    raise
                return result
            except (peewee.OperationalError, sqlite3.OperationalError) as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise StoreError(f"{what} failed: {exc}") from exc
                if attempt == COMMIT_TRIES:
                    raise StoreError(
                        f"{what} failed after {attempt} tries: {exc}"
                    ) from exc
                logger.warning("store.locked attempt={} error={}", attempt, exc)
                time.sleep(0.05 * attempt)
            except (peewee.PeeweeException, sqlite3.Error) as exc:
                raise StoreError(f"{what} failed: {exc}") from exc

    def _apply(self, cursor: Any, batch: Batch) -> None:
        # Hot path: plain executemany on the connection; peewee builds the
        # schema and the rare queries, but its per-statement cost is 5-30x.
        self._insert_many(cursor, "tasks", list(batch.new_tasks.values()))
        self._insert_many(
            cursor, "worker_notifications", list(batch.new_notes.values())
        )
        self._update_many(cursor, "tasks", "id", batch.task_updates)
        self._update_many(cursor, "worker_notifications", "id", batch.note_updates)
        if batch.workers:
            self._insert_many(
                cursor, "workers", list(batch.workers.values()), upsert="id"
            )

    def _insert_many(
        self,
        cursor: Any,
        table: str,
        rows: list[dict[str, Any]],
        upsert: str | None = None,
    ) -> None:
        if not rows:
            return
        columns = tuple(rows[0])
        names = ", ".join(f'"{c}"' for c in columns)
        marks = ", ".join([self.db.param] * len(columns))
        sql = f'INSERT INTO "{table}" ({names}) VALUES ({marks})'
        if upsert:
            kept = ("first_seen_at", upsert)
            changes = ", ".join(
                f'"{c}" = excluded."{c}"' for c in columns if c not in kept
            )
            sql += f' ON CONFLICT ("{upsert}") DO UPDATE SET {changes}'
        values = operator.itemgetter(*columns)
        if len(columns) == 1:
            cursor.executemany(sql, [(values(row),) for row in rows])
        else:
            cursor.executemany(sql, [values(row) for row in rows])

    def _update_many(
        self, cursor: Any, table: str, key: str, updates: dict[Any, dict[str, Any]]
    ) -> None:
        # Rows changing the same columns (named in the same order, as one
        # code path does) share one executemany.
        groups: dict[tuple[str, ...], list[tuple[Any, ...]]] = {}
        for row_id, values in updates.items():
            groups.setdefault(tuple(values), []).append((*values.values(), row_id))
        param = self.db.param
        for columns, params in groups.items():
            assignments = ", ".join(f'"{c}" = {param}' for c in columns)
            sql = f'UPDATE "{table}" SET {assignments} WHERE "{key}" = {param}'
            cursor.executemany(sql, params)

    # --- reads -------------------------------------------------------------

    def task_row(self, task_id: str) -> dict[str, Any] | None:
        """Return one task row as a dict, or None."""
        sql = f'SELECT * FROM "tasks" WHERE "id" = {self.db.param}'
        try:
            cursor = self._cursor().execute(sql, (task_id,))
            row = cursor.fetchone()
        except sqlite3.Error as exc:
            raise StoreError(f"read failed: {exc}") from exc
        if row is None:
            return None
        return dict(zip([c[0] for c in cursor.description], row, strict=True))

    def task_id_for_key(self, key: str) -> str | None:
        """Return the id of the task submitted with this idempotency key."""
        sql = f'SELECT "id" FROM "tasks" WHERE "key" = {self.db.param}'
        return self._scalar(sql, key)

    def largest_key_below(self, limit: str) -> str | None:
        """Return the largest idempotency key that sorts below `limit`, or None."""
        sql = f'SELECT max("key") FROM "tasks" WHERE "key" < {self.db.param}'
        return self._scalar(sql, limit)

    def _scalar(self, sql: str, param: Any) -> Any:
        """Return the first column of the query's first row, or None."""
        try:
            row = self._cursor().execute(sql, (param,)).fetchone()
        except sqlite3.Error as exc:
            raise StoreError(f"read failed: {exc}") from exc
        return row[0] if row else None

    def task_ids_for_keys(self, keys: list[str]) -> dict[str, str]:
        """Return {key: task id} for those of `keys` that name a stored task."""
        found: dict[str, str] = {}
        for start in range(0, len(keys), KEYS_PER_QUERY):
            chunk = keys[start : start + KEYS_PER_QUERY]
            marks = ", ".join([self.db.param] * len(chunk))
            sql = f'SELECT "key", "id" FROM "tasks" WHERE "key" IN ({marks})'
            try:
                found.update(self._cursor().execute(sql, chunk).fetchall())
            except sqlite3.Error as exc:
                raise StoreError(f"read failed: {exc}") from exc
        return found

    def task_payload(self, task_id: str) -> bytes:
        """Return a task's packed payload."""
        row = self._one(Task.select(Task.payload).where(Task.id == task_id))
        if row is None:
            raise StoreError(f"task {task_id} has no row")
        return bytes(row["payload"])

    def list_tasks(
        self, state: str | None, worker: str | None, limit: int
    ) -> list[dict[str, Any]]:
        """Return up to `limit` task rows, newest first, without payloads.

        Ids sort by creation time, so the id index gives the order.
        """
        columns = [getattr(Task, c) for c in TASK_COLUMNS if c != "payload"]
        query = Task.select(*columns)
        if state in UNUSUAL_ENDS:
            # Repeats the partial index's condition literally, so SQLite uses it.
            listed = ", ".join(f"'{s}'" for s in UNUSUAL_ENDS)
            unusual = peewee.SQL(f'"state" IN ({listed})')
            query = query.where(unusual & (Task.state == state))
        elif state:
            query = query.where(Task.state == state)
        if worker:
            query = query.where(Task.worker_id == worker)
        return self._all(query.order_by(Task.id.desc()).limit(limit))

    def open_tasks(self) -> list[dict[str, Any]]:
        """Return every task not yet terminal, oldest first (for recovery)."""
        query = Task.select().where(Task.finished_at.is_null())
        return self._all(query.order_by(Task.created_at))

    def pending_notes(self) -> list[dict[str, Any]]:
        """Return unacknowledged, live notifications (for recovery)."""
        # Literal terms, as in the partial index's WHERE, so SQLite uses it.
        pending = peewee.SQL('"processed" = 0 AND "superseded" = 0')
        query = WorkerNotification.select().where(pending)
        return self._all(query.order_by(WorkerNotification.id))

    def workers(self) -> list[dict[str, Any]]:
        """Return every worker row."""
        return self._all(Worker.select())

    def max_note_id(self) -> int:
        """Return the highest notification id used so far, or 0."""
        try:
            value = WorkerNotification.select(
                peewee.fn.MAX(WorkerNotification.id)
            ).scalar()
        except (peewee.PeeweeException, sqlite3.Error) as exc:
            raise StoreError(f"read failed: {exc}") from exc
        return int(value or 0)

    def _one(self, query: Any) -> dict[str, Any] | None:
        rows = self._all(query.limit(1))
        return rows[0] if rows else None

    def _all(self, query: Any) -> list[dict[str, Any]]:
        try:
            return list(query.dicts())
        except (peewee.PeeweeException, sqlite3.Error) as exc:
            raise StoreError(f"read failed: {exc}") from exc


def _lock_store(path: str) -> IO[str]:
    """Take the store's lock file, so two brokers never share one store."""
    lock_path = f"{path}.lock"
    try:
        handle = open(lock_path, "a+", encoding="utf-8")  # noqa: SIM115
    except OSError as exc:
        raise StoreError(f"cannot create {lock_path}: {exc.strerror}") from exc
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        handle.seek(0)
        owner = handle.read().strip() or "unknown"
        handle.close()
        raise StoreError(
            f"store {path} is in use by another broker (pid {owner}); stop it "
            "or give this broker another --db"
        ) from exc
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def prune_statements(param: str) -> dict[str, str]:
    """Return the statements `Store.prune` runs, by step, with `param` marks."""
    p = param
    states = ", ".join([p] * len(ENDED_STATES))
    return {
        "newest_note": 'SELECT "task_id" FROM "worker_notifications" WHERE "id" = '
        '(SELECT MAX("id") FROM "worker_notifications")',
        # NOTE: `|| ''` keeps SQLite off the state index; with it SQLite would
        # sort every ended task by finished_at on each pass, not walk the
        # finished_at index from the oldest.
        "candidates": f'SELECT "id", "key" FROM "tasks" WHERE "finished_at" < {p} '
        f'AND ("state" || \'\') IN ({states}) AND "id" <> {p} '
        f'ORDER BY "finished_at" LIMIT {p}',
        "notes": f'DELETE FROM "worker_notifications" WHERE "task_id" = {p}',
        "tasks": f'DELETE FROM "tasks" WHERE "id" = {p}',
    }


def dump_list(values: Iterable[Any]) -> str:
    """Encode a list column."""
    items = list(values)
    return json.dumps(items, separators=(",", ":")) if items else "[]"


def note_message(attempt: int, reason: str) -> str:
    """Encode a notification's `message` column: {"attempt": N, "reason": S}."""
    return f'{{"attempt":{int(attempt)},"reason":{encode_basestring(reason)}}}'


def load_list(text: str | None) -> list[Any]:
    """Decode a list column."""
    return json.loads(text) if text else []
