"""Collect task results under one shared deadline, failing with a summary."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from sdk import ResultTimeout, TaskFailed


def results_within(client: Any, handles: list[Any], timeout_s: float) -> list[Any]:
    """Return every handle's result, all within `timeout_s` seconds together.

    A task that fails raises its TaskFailed. When the deadline passes, raise
    AssertionError counting the unfinished tasks by state.
    """
    deadline = time.monotonic() + timeout_s
    results = []
    for index, handle in enumerate(handles):
        left = deadline - time.monotonic()
        try:
            results.append(handle.result(timeout=max(0.05, left)))
        except ResultTimeout:
            pending = [client.status(h.id) for h in handles[index:]]
            unfinished = [p for p in pending if not p.is_terminal]
            states = Counter(p.state for p in unfinished)
            raise AssertionError(
                f"{len(unfinished)} of {len(handles)} tasks unfinished after "
                f"{timeout_s} s: {dict(states)}; first: {unfinished[:1]!r:.400}"
            ) from None
    return results


def outcomes_within(
    client: Any, handles: list[Any], timeout_s: float
) -> list[tuple[str, Any]]:
    """Like `results_within`, but failures give ("failed", TaskFailed) entries."""
    deadline = time.monotonic() + timeout_s
    outcomes: list[tuple[str, Any]] = []
    for handle in handles:
        left = max(0.05, deadline - time.monotonic())
        try:
            outcomes.append(("ok", handle.result(timeout=left)))
        except TaskFailed as exc:
            outcomes.append(("failed", exc))
        except ResultTimeout:
            info = client.status(handle.id)
            raise AssertionError(
                f"task {handle.id} still {info.state} after {timeout_s} s: "
                f"{info!r:.400}"
            ) from None
    return outcomes
