"""One executor slot: a handler child process, its pipes, and how to end it."""

from __future__ import annotations

import os
import signal
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from worker.jobs import Job
from worker.pipe import Reader

#: First delay before restarting a child that died while starting; it doubles.
RESPAWN_MIN_S = 0.1
#: Longest delay between restarts of a child that keeps dying while starting.
RESPAWN_MAX_S = 5.0
#: Seconds to wait for a killed child to be reaped.
REAP_TIMEOUT_S = 1.0


class Slot:
    """One child process and the job it runs."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: BaseProcess | None = None
        #: Where jobs go to the child (write end of a one-way pipe).
        self.jobs: Connection | None = None
        #: Where the child's hello and replies come from (read end).
        self.replies: Connection | None = None
        #: Reads `replies`; set and cleared with it.
        self.reader: Reader | None = None
        self.cancel: Any = None
        #: True while `cancel` may be set, so it is cleared only when needed.
        self.is_cancel_set = False
        self.is_ready = False
        self.job: Job | None = None
        self.is_sent = False
        self.deadline_at: float | None = None
        self.abort_at: float | None = None
        self.abort_reason = ""
        self.respawn_at: float | None = None
        self.failures = 0

    def open_pipes(self, jobs: Connection, replies: Connection) -> None:
        """Hold the worker's ends of a new child's pipes."""
        self.jobs, self.replies = jobs, replies
        self.reader = Reader(replies.fileno())

    def close_replies(self) -> None:
        """Close the reply pipe, if open."""
        if self.replies is not None:
            self.replies.close()
        self.replies = self.reader = None

    def close_pipes(self) -> None:
        """Close both pipe ends held by the worker, if open."""
        if self.jobs is not None:
            self.jobs.close()
        self.jobs = None
        self.close_replies()


def kill_tree(process: BaseProcess) -> None:
    """SIGKILL a child and its process group (the programs its handler started)."""
    pid = process.pid
    if pid is None:
        return
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
            return
    except (ProcessLookupError, PermissionError):
        pass
    try:
        process.kill()
    except (ProcessLookupError, OSError):
        pass


def reap(process: BaseProcess) -> None:
    """Join a dead child and release its resources."""
    process.join(REAP_TIMEOUT_S)
    if process.exitcode is not None:
        process.close()


def backoff_s(failures: int) -> float:
    """Return the delay before restarting a child after `failures` failed starts."""
    return float(min(RESPAWN_MAX_S, RESPAWN_MIN_S * 2 ** (failures - 1)))
