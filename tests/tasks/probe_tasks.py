"""Probe handlers of CASES.md, loaded by test workers with `--tasks probe_tasks`.

Every execution appends fsync'd JSON lines to the execution ledger named by
the HAKOBU_TEST_LEDGER environment variable: one `phase: "start"` line when
it begins (so executions killed mid-way still count) and one `phase: "end"`
line when it returns. Both carry `task_id, attempt, worker_id, pid, t_start,
t_end` from the handler context. Handlers may run in child processes, so
everything they need comes from the environment, never from globals.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
from typing import Any

from worker import task

#: Environment variable naming the ledger file.
LEDGER_ENV = "HAKOBU_TEST_LEDGER"


def _record(ctx: Any, phase: str, t_start: float, t_end: float | None) -> None:
    path = os.environ.get(LEDGER_ENV)
    if not path:
        return
    line = {
        "phase": phase,
        "task_id": ctx.task_id,
        "attempt": ctx.attempt,
        "worker_id": ctx.worker_id,
        "pid": os.getpid(),
        "t_start": t_start,
        "t_end": t_end,
    }
    data = (json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8")
    # One write on an O_APPEND file keeps concurrent writers' lines whole.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _start(ctx: Any) -> float:
    t_start = time.time()
    _record(ctx, "start", t_start, None)
    return t_start


def _end(ctx: Any, t_start: float) -> None:
    _record(ctx, "end", t_start, time.time())


@task("probe_sleep")
def probe_sleep(payload: Any, ctx: Any) -> Any:
    """Sleep `payload` seconds and return them."""
    t_start = _start(ctx)
    time.sleep(float(payload))
    _end(ctx, t_start)
    return payload


@task("probe_cpu")
def probe_cpu(payload: Any, ctx: Any) -> int:
    """Spin a pure-Python loop, holding the GIL, for `payload` seconds."""
    t_start = _start(ctx)
    until = time.monotonic() + float(payload)
    spins = 0
    while time.monotonic() < until:
        for _ in range(1000):
            spins += 1
    _end(ctx, t_start)
    return spins


@task("probe_exit")
def probe_exit(payload: Any, ctx: Any) -> None:
    """Leave the handler's process at once with exit code `payload`."""
    _start(ctx)
    os._exit(int(payload))


@task("probe_segv")
def probe_segv(payload: Any, ctx: Any) -> None:
    """Kill the handler's process with SIGSEGV."""
    _start(ctx)
    os.kill(os.getpid(), signal.SIGSEGV)
    time.sleep(5)


@task("probe_alloc")
def probe_alloc(payload: Any, ctx: Any) -> int:
    """Allocate and touch `payload` MiB; return the byte count."""
    t_start = _start(ctx)
    size = int(payload) * 1024 * 1024
    block = bytearray(size)
    for offset in range(0, size, 4096):
        block[offset] = 1
    _end(ctx, t_start)
    return len(block)


@task("probe_regex")
def probe_regex(payload: Any, ctx: Any) -> bool:
    """Run the catastrophic regex of C22 on `payload` (default 27) a's and a b."""
    t_start = _start(ctx)
    count = 27 if payload is None else int(payload)
    matched = re.match(r"(a+)+$", "a" * count + "b") is not None
    _end(ctx, t_start)
    return matched


def _square(x: int) -> int:
    return x * x


def _reap(pid: int, timeout_s: float) -> None:
    """Wait for a forked child; kill it and raise if it does not leave in time."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            if code != 0:
                raise RuntimeError(f"forked child exited with {code}")
            return
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise RuntimeError(f"forked child {pid} did not exit within {timeout_s} s")


@task("probe_fork")
def probe_fork(payload: Any, ctx: Any) -> str:
    """Fork the way C09 does: "subprocess", "pool" or "fork"; return the kind."""
    t_start = _start(ctx)
    kind = str(payload)
    if kind == "subprocess":
        subprocess.run(["true"], check=True, timeout=10)
    elif kind == "pool":
        # close() + join(), not the with-block's terminate(): terminate() can
        # deadlock inside CPython's Pool when it races idle workers that hold
        # the task queue's read lock (seen about 1 run in 30 under load).
        pool = multiprocessing.get_context("fork").Pool(2)
        try:
            answer = pool.map(_square, range(4))
        finally:
            pool.close()
            pool.join()
        if answer != [0, 1, 4, 9]:
            raise RuntimeError("pool returned a wrong answer")
    elif kind == "fork":
        pid = os.fork()
        if pid == 0:
            # The child leaves through sys.exit, unwinding whatever called us.
            sys.exit(0)
        _reap(pid, timeout_s=10.0)
    else:
        raise ValueError(f"unknown fork kind {kind!r}")
    _end(ctx, t_start)
    return kind


@task("probe_big_result")
def probe_big_result(size: int) -> bytes:
    """Return `size` bytes, to test result size limits."""
    return b"x" * size
