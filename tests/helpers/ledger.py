"""Read the execution ledger the probe handlers write (see tests/tasks).

Every probe execution appends a `phase: "start"` line when it begins and,
unless it crashes on purpose, a `phase: "end"` line when it returns. Both
carry `task_id, attempt, worker_id, pid, t_start, t_end` (t_end is None on a
start line). Executions are counted from start lines, so an execution whose
worker was killed mid-task still counts.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

#: Environment variable naming the ledger file, read by the probe handlers.
LEDGER_ENV = "HAKOBU_TEST_LEDGER"


class Ledger:
    """The ledger file of one test and ways to count what it records."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> list[dict[str, Any]]:
        """Return every complete line, parsed, in file order."""
        if not self.path.exists():
            return []
        lines = self.path.read_text(encoding="utf-8").splitlines()
        # NOTE: a writer killed mid-line may leave a fragment; it is no execution.
        return [json.loads(line) for line in lines if line.endswith("}")]

    def starts(self, task_id: str | None = None) -> list[dict[str, Any]]:
        """Return the start lines, of one task when `task_id` is given."""
        return [
            line
            for line in self.read()
            if line["phase"] == "start" and task_id in (None, line["task_id"])
        ]

    def ends(self, task_id: str | None = None) -> list[dict[str, Any]]:
        """Return the end lines, of one task when `task_id` is given."""
        return [
            line
            for line in self.read()
            if line["phase"] == "end" and task_id in (None, line["task_id"])
        ]

    def executions(self) -> Counter[str]:
        """Return how many executions started, per task id."""
        return Counter(line["task_id"] for line in self.starts())

    def completions(self) -> Counter[str]:
        """Return how many executions returned, per task id."""
        return Counter(line["task_id"] for line in self.ends())
