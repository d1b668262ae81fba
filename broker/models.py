"""Store models: tasks, workers and worker_notifications, on a database placeholder.

No module opens the database at import time; `broker.store.open_store` binds
`database` to a file, sets the pragmas and creates the tables.
"""

from __future__ import annotations

from peewee import (
    BlobField,
    BooleanField,
    CharField,
    DatabaseProxy,
    FloatField,
    IntegerField,
    Model,
    TextField,
)

database = DatabaseProxy()

#: Task states that never change again.
ENDED_STATES = ("succeeded", "failed", "cancelled")
#: End states indexed by `task_unusual_end`; `succeeded` is not.
UNUSUAL_ENDS = ("failed", "cancelled")
#: worker_notifications.notification_type of an ASSIGN.
TASK_ASSIGNED = "task_assigned"
#: worker_notifications.notification_type of an ABORT (cancel or supersede).
TASK_ABORT = "task_abort"


class BaseModel(Model):
    class Meta:
        database = database


class Task(BaseModel):
    """One task; times are Unix seconds, JSON lists are stored as text."""

    id = CharField(primary_key=True, max_length=32)
    name = CharField(max_length=200)
    state = CharField(max_length=16)
    worker_id = CharField(null=True, index=True)
    attempts = IntegerField(default=0)
    preferred_worker = CharField(null=True)
    require_worker = BooleanField(default=False)
    fallback_after = FloatField(null=True)
    start_deadline_at = FloatField(null=True)
    priority = IntegerField(default=0)
    tags = TextField(default="[]")
    payload = BlobField()
    result = BlobField(null=True)
    error_type = TextField(null=True)
    error = TextField(null=True)
    traceback = TextField(null=True)
    attempt_errors = TextField(default="[]")
    retries = IntegerField(default=0)
    failures = IntegerField(default=0)
    losses = IntegerField(default=0)
    timeout = FloatField(null=True)
    not_before = FloatField(null=True)
    key = CharField(null=True, unique=True, max_length=200)
    reason = TextField(default="")
    created_at = FloatField()
    started_at = FloatField(null=True)
    finished_at = FloatField(null=True, index=True)

    class Meta:
        table_name = "tasks"


# Indexes stay small so each commit touches few pages: only tasks that ended
# other than succeeded are indexed by state (open tasks are found through
# finished_at IS NULL, succeeded ones by walking the id index), and only
# notifications still waiting for an ACK are indexed as pending.
Task.add_index(
    Task.state, Task.id, where=Task.state.in_(UNUSUAL_ENDS), name="task_unusual_end"
)


class Worker(BaseModel):
    """Every worker id the broker has seen, with its last known state."""

    id = CharField(primary_key=True, max_length=255)
    state = CharField(max_length=16)
    session = CharField(null=True)
    capacity = IntegerField(default=1)
    tags = TextField(default="[]")
    handlers = TextField(default="[]")
    pid = IntegerField(default=0)
    host = CharField(default="")
    first_seen_at = FloatField()
    last_seen_at = FloatField()

    class Meta:
        table_name = "workers"


class WorkerNotification(BaseModel):
    """A decision sent to a worker; `processed=1` once the worker ACKed it.

    `superseded` marks a row that will never be sent again (its worker was
    given up on, or the attempt was replaced), so a late ACK claims nothing.
    """

    id = IntegerField(primary_key=True)
    worker_id = CharField()
    notification_type = CharField(max_length=16)
    task_id = CharField(index=True, max_length=32)
    attempt = IntegerField()
    message = TextField()
    processed = IntegerField(default=0)
    superseded = BooleanField(default=False)
    sends = IntegerField(default=0)
    created_at = FloatField()
    last_sent_at = FloatField(null=True)

    class Meta:
        table_name = "worker_notifications"


WorkerNotification.add_index(
    WorkerNotification.id,
    where=(WorkerNotification.processed == 0)
    & (WorkerNotification.superseded == False),  # noqa: E712
    name="workernotification_pending",
)


MODELS = (Task, Worker, WorkerNotification)
