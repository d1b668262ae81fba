"""Handlers every worker has: echo, sleep, fail and checksum."""

from __future__ import annotations

import hashlib
import math
import os
import time
from typing import Any

from worker.context import TaskCancelled, TaskContext
from worker.registry import task

#: Longest single nap of `sleep`, so a cancel is noticed quickly.
SLEEP_STEP_S = 0.05
#: Bytes read at a time by `checksum`.
CHECKSUM_CHUNK_BYTES = 1024 * 1024


@task("echo")
def echo(payload: Any) -> Any:
    """Return the payload unchanged."""
    return payload


@task("sleep")
def sleep(payload: Any, ctx: TaskContext) -> Any:
    """Sleep `payload` seconds in small steps, stopping early when cancelled."""
    if isinstance(payload, bool) or not isinstance(payload, int | float):
        raise TypeError(
            f"sleep takes a number of seconds, got {type(payload).__name__}"
        )
    if not math.isfinite(payload) or payload < 0:
        raise ValueError(f"sleep takes a finite number of seconds >= 0, got {payload}")
    deadline = time.monotonic() + payload
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return payload
        if ctx.cancelled:
            raise TaskCancelled(f"sleep cancelled with {left:.3f} s left")
        time.sleep(min(SLEEP_STEP_S, left))


@task("fail")
def fail(payload: Any) -> Any:
    """Raise RuntimeError with the payload as its message."""
    raise RuntimeError(payload if isinstance(payload, str) else repr(payload))


@task("checksum")
def checksum(payload: Any, ctx: TaskContext) -> dict[str, Any]:
    """Return the SHA-256 and size of a file named by `payload` or `{"path": p}`."""
    path = payload.get("path") if isinstance(payload, dict) else payload
    if not isinstance(path, str) or not path:
        raise TypeError(
            'checksum takes a file path string or {"path": "..."}, got '
            f"{type(payload).__name__}"
        )
    if os.path.isdir(path):
        raise IsADirectoryError(f"checksum: {path!r} is a directory, not a file")
    digest = hashlib.sha256()
    size = 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(CHECKSUM_CHUNK_BYTES):
                if ctx.cancelled:
                    raise TaskCancelled(f"checksum of {path!r} cancelled")
                digest.update(chunk)
                size += len(chunk)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"checksum: no such file {path!r}") from exc
    return {"path": path, "sha256": digest.hexdigest(), "bytes": size}
