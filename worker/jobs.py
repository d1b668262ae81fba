"""What the executor runs and what it reports: jobs, outcomes, exit wording."""

from __future__ import annotations

import signal
from typing import NamedTuple

Key = tuple[str, int]


# NOTE: named tuples, not frozen dataclasses: one of each is built per task on
# the worker's hot path, and a frozen dataclass sets every field through
# object.__setattr__ (several times slower to build).
class Job(NamedTuple):
    """One attempt to run: what the broker's ASSIGN carried."""

    task: str
    attempt: int
    name: str
    payload: bytes
    #: Seconds the handler may run; None for no limit.
    timeout_s: float | None = None

    @property
    def key(self) -> Key:
        return (self.task, self.attempt)


class Outcome(NamedTuple):
    """How an attempt ended; `value` is the packed result when ok."""

    task: str
    attempt: int
    ok: bool
    value: bytes = b""
    error_type: str = ""
    error: str = ""
    traceback: str = ""
    cancelled: bool = False

    @property
    def key(self) -> Key:
        return (self.task, self.attempt)


def describe_exit(code: int | None) -> str:
    """Return how a process ended, e.g. 'died with signal SIGSEGV (-11)'."""
    if code is None:
        return "ended with an unknown status"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"died with signal {name} ({code})"
    if code == 0:
        return "exited with code 0 before returning a result"
    return f"exited with code {code}"
