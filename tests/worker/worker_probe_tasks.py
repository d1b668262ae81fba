"""Handlers for the worker tests: they crash, spin, fork and record their runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any

from worker import task
from worker.context import TaskContext


@task("probe_segv")
def probe_segv(payload: Any) -> None:
    """Kill this handler process with SIGSEGV."""
    os.kill(os.getpid(), signal.SIGSEGV)


@task("probe_exit")
def probe_exit(payload: int) -> None:
    """Leave the handler process at once with exit code `payload`."""
    os._exit(payload)


@task("probe_spin")
def probe_spin(payload: float) -> float:
    """Hold the GIL in a pure-Python loop for `payload` seconds."""
    end = time.monotonic() + payload
    n = 0
    while time.monotonic() < end:
        n += 1
    return payload


@task("probe_ignore_cancel")
def probe_ignore_cancel(payload: float) -> float:
    """Sleep `payload` seconds without ever looking at the cancel flag."""
    time.sleep(payload)
    return payload


@task("probe_fork")
def probe_fork(payload: str) -> str:
    """Fork the way C09 does: subprocess, os.fork + sys.exit, or a fork Pool."""
    if payload == "subprocess":
        subprocess.run(["true"], check=True)
    elif payload == "fork":
        pid = os.fork()
        if pid == 0:
            sys.exit(0)
        os.waitpid(pid, 0)
    elif payload == "fork_return":
        # The forked copy returns a value too; only the original may reply.
        pid = os.fork()
        if pid == 0:
            return "from the fork"
        os.waitpid(pid, 0)
    elif payload == "pool_terminate":
        # terminate() stops busy pool workers with SIGTERM.
        import multiprocessing

        pool = multiprocessing.get_context("fork").Pool(2)
        pool.map_async(time.sleep, [30, 30])
        pool.terminate()
        pool.join()
    elif payload == "pool":
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(2) as pool:
            if pool.map(abs, [-1, -2]) != [1, 2]:
                raise RuntimeError("pool gave a wrong answer")
    return payload


@task("probe_ledger")
def probe_ledger(payload: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
    """Append one line per execution to payload["path"], then sleep payload["s"]."""
    with open(payload["path"], "a", encoding="utf-8") as f:
        f.write(f"{ctx.task_id} {ctx.attempt} {ctx.worker_id} {os.getpid()}\n")
    time.sleep(payload.get("s", 0))
    return {"task": ctx.task_id, "attempt": ctx.attempt, "worker": ctx.worker_id}


@task("probe_big")
def probe_big(payload: int) -> bytes:
    """Return `payload` bytes."""
    return b"x" * payload
