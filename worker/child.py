"""The handler child process: import the handlers, then run one job at a time.

A child is started with the spawn method, so it shares no ZeroMQ state with
the worker; it talks to the worker only over two one-way multiprocessing
pipes, jobs in and replies out. A handler may fork (subprocess, a fork-based
Pool, os.fork): a forked copy that returns into this loop leaves at once and
never writes to the pipe.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import traceback
from multiprocessing.connection import Connection
from typing import Any

from sdk.protocol import pack_value, unpack_value
from worker import pipe, registry
from worker.context import CancelFlag, TaskContext

#: Longest error message sent back, in UTF-8 bytes.
MAX_ERROR_BYTES = 8 * 1024
#: Longest traceback sent back, in UTF-8 bytes; both fit the envelope slack.
MAX_TRACEBACK_BYTES = 32 * 1024
#: prctl option that delivers a signal to this process when its parent dies.
PR_SET_PDEATHSIG = 1

#: What the executor sends: task, attempt, name, payload, worker id, result limit.
JobTuple = tuple[str, int, str, bytes, str, int]
Reply = tuple[Any, ...]


def child_main(
    jobs: Connection,
    replies: Connection,
    cancel: CancelFlag,
    module_names: list[str],
    parent_pid: int,
) -> None:
    """Run in the child: say hello, then answer each job until the pipe closes."""
    _detach(parent_pid)
    errors = _import_handlers(module_names)
    my_pid = os.getpid()
    reader = pipe.Reader(jobs.fileno())
    reply_fd = replies.fileno()
    try:
        pipe.send(reply_fd, ("hello", my_pid, errors))
    except OSError:
        return

    while True:
        try:
            job = reader.read()
        except (EOFError, OSError):
            return
        if job is None:
            return
        reply = run_job(job, cancel, parent_pid, errors, my_pid)
        if os.getpid() != my_pid:
            _leave_fork(0)
        try:
            pipe.send(reply_fd, reply)
        except OSError:
            return


def run_job(
    job: JobTuple,
    cancel: CancelFlag,
    parent_pid: int,
    import_errors: list[str],
    my_pid: int | None = None,
) -> Reply:
    """Run one job and return ("ok", task, attempt, packed) or an error reply.

    `my_pid` is this process's pid when the caller knows it already.
    """
    task_id, attempt, name, payload_bytes, worker_id, max_payload_bytes = job
    handler = registry.get(name)
    if handler is None:
        have = ", ".join(registry.names()) or "none"
        message = f"no handler named {name!r} on worker {worker_id!r}; it has: {have}"
        if import_errors:
            message += "; task modules that failed to import: " + "; ".join(
                import_errors
            )
        return ("error", task_id, attempt, "UnknownTask", _clip(message, 4096), "")

    if my_pid is None:
        my_pid = os.getpid()
    try:
        payload = unpack_value(payload_bytes)
        ctx = (
            TaskContext(task_id, attempt, worker_id, cancel, parent_pid)
            if handler.wants_context
            else None
        )
        value = handler.call(payload, ctx)
        if os.getpid() != my_pid:
            _leave_fork(0)
        packed = pack_value(value, max_payload_bytes, "result")
    except Exception as exc:  # one task execution is a loop boundary
        if os.getpid() != my_pid:
            _leave_fork(1)
        return (
            "error",
            task_id,
            attempt,
            type(exc).__name__,
            _clip(_describe(exc), MAX_ERROR_BYTES),
            _clip(traceback.format_exc(), MAX_TRACEBACK_BYTES),
        )
    except BaseException as exc:
        # NOTE: a forked copy of this process leaving with sys.exit() must not
        # unwind into the job loop and the multiprocessing bootstrap.
        if os.getpid() != my_pid:
            _leave_fork(_exit_code(exc))
        raise
    return ("ok", task_id, attempt, packed)


def _detach(parent_pid: int) -> None:
    # Own process group: the worker can kill a handler with all it started, and
    # a terminal's Ctrl-C reaches the worker only, which then decides.
    try:
        os.setpgid(0, 0)
    except OSError:
        pass
    # Signals sent to the whole group or cgroup (systemd stop) must not end a
    # handler the worker is draining; the worker kills children itself.
    signal.signal(signal.SIGTERM, _note_signal)
    signal.signal(signal.SIGINT, _note_signal)
    # A handler's own forks (a fork Pool terminating its workers with SIGTERM)
    # must get the default behaviour back.
    os.register_at_fork(after_in_child=_default_signals)
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:
        os._exit(1)


def _note_signal(signum: int, frame: object) -> None:
    """Ignore group-wide SIGTERM/SIGINT; exec'd programs get default handling."""


def _default_signals() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _import_handlers(module_names: list[str]) -> list[str]:
    errors = []
    for name in ["worker.builtins", *module_names]:
        try:
            registry.import_task_modules([name])
        except Exception as exc:  # report per task, do not die at start-up
            errors.append(_clip(str(exc), 1024))
    return errors


def _describe(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # a broken __str__ must not lose the error
        return f"<{type(exc).__name__} with unprintable message>"


def _clip(text: str, limit: int) -> str:
    data = text.encode("utf-8", "backslashreplace")
    if len(data) > limit:
        data = data[: limit - 20] + b" ...[truncated]"
    return data.decode("utf-8", "ignore")


def _exit_code(exc: BaseException) -> int:
    if isinstance(exc, SystemExit):
        code = exc.code
        if code is None:
            return 0
        return code if isinstance(code, int) else 1
    return 1


def _leave_fork(code: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    os._exit(code)
