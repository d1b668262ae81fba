"""The one way tests wait (`wait_until`), and free loopback ports."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

from benchmarks.cluster import free_port

__all__ = ["free_port", "wait_until"]

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T],
    timeout_s: float,
    interval_s: float = 0.02,
    *,
    what: str | Callable[[], str] | None = None,
) -> T:
    """Call `predicate` until it returns something truthy and return that.

    An exception from the predicate counts as "not yet" and is remembered.
    When `timeout_s` runs out, raise AssertionError naming what was awaited
    (`what`, a string or a callable giving the current situation), the last
    value and the last exception.
    """
    deadline = time.monotonic() + timeout_s
    last_value: Any = None
    last_exc: BaseException | None = None
    while True:
        try:
            value = predicate()
        except Exception as exc:  # the thing awaited may not answer yet
            last_exc = exc
        else:
            if value:
                return value
            last_value = value
        if time.monotonic() >= deadline:
            break
        time.sleep(interval_s)

    if callable(what):
        try:
            described = what()
        except Exception as exc:  # a broken description must not hide the timeout
            described = f"<description failed: {exc!r}>"
    else:
        described = what or getattr(predicate, "__name__", repr(predicate))
    raise AssertionError(
        f"timed out after {timeout_s:.1f} s waiting for {described}; "
        f"last value {last_value!r}; last error {last_exc!r}"
    )


def assert_stays(
    predicate: Callable[[], object],
    duration_s: float,
    interval_s: float = 0.05,
    *,
    what: str = "condition",
) -> None:
    """Check that `predicate` holds at every sample for `duration_s` seconds.

    This observes stability (a process stays up, a task stays queued); it is
    not a way to wait for something to happen, which is `wait_until`'s job.
    """
    deadline = time.monotonic() + duration_s
    while True:
        if not predicate():
            raise AssertionError(f"{what} stopped holding before {duration_s:.1f} s")
        if time.monotonic() >= deadline:
            return
        time.sleep(interval_s)


def hold(duration_s: float) -> None:
    """Let `duration_s` pass on purpose: how long an injected fault lasts.

    Fault schedules ("restart the broker 2 s after killing it") need time to
    pass; waiting for something to happen must use `wait_until` instead.
    """
    time.sleep(duration_s)
