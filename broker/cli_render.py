"""How the `hakobu` commands print records: aligned tables for people, JSON for scripts.

JSON output turns bytes into base64 text, tuples into lists and map keys into
text, so every value the SDK can carry prints as one JSON document.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import time
from collections.abc import Sequence
from typing import Any

from sdk.records import TaskInfo, WorkerInfo


def jsonable(value: Any) -> Any:
    """Return `value` with bytes as base64 text, tuples as lists and str keys."""
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, dict):
        return {_key(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in _fields(value)}
    return value


def dumps(value: Any) -> str:
    """Return `value` as one line of JSON (see `jsonable`)."""
    return json.dumps(jsonable(value), ensure_ascii=False)


def task_lines(info: TaskInfo) -> list[str]:
    """Return one task as aligned "field  value" lines."""
    rows: list[tuple[str, Any]] = [
        ("id", info.id),
        ("name", info.name),
        ("state", info.state),
        ("worker", info.worker_id or "-"),
        ("attempts", info.attempts),
        ("preferred", _preference(info)),
        ("priority", info.priority),
        ("tags", ", ".join(info.tags) or "-"),
        ("retries", info.retries),
        ("created", clock(info.created_at)),
        ("started", clock(info.started_at)),
        ("finished", clock(info.finished_at)),
    ]
    if info.reason:
        rows.append(("reason", info.reason))
    if info.state == "succeeded":
        rows.append(("result", dumps(info.result)))
    if info.error or info.error_type:
        rows.append(("error", f"{info.error_type or 'Error'}: {info.error or ''}"))
    for entry in info.attempt_errors:
        text = (
            f"{entry.get('worker_id')}: {entry.get('error_type')}: {entry.get('error')}"
        )
        rows.append((f"attempt {entry.get('attempt')}", text))
    width = max(len(name) for name, _ in rows)
    return [f"{name:<{width}}  {value}" for name, value in rows]


def task_table(tasks: Sequence[TaskInfo]) -> list[str]:
    """Return tasks as a table, one row each."""
    header = ("ID", "NAME", "STATE", "WORKER", "ATTEMPTS", "PREFERRED", "CREATED")
    rows = [
        (
            t.id,
            t.name,
            t.state,
            t.worker_id or "-",
            str(t.attempts),
            _preference(t),
            clock(t.created_at),
        )
        for t in tasks
    ]
    return table(header, rows)


def worker_table(workers: Sequence[WorkerInfo]) -> list[str]:
    """Return workers as a table, one row each."""
    header = ("ID", "STATE", "CAPACITY", "IN FLIGHT", "TAGS", "PID", "HOST", "SEEN")
    rows = [
        (
            w.id,
            w.state,
            str(w.capacity),
            str(w.in_flight),
            ",".join(w.tags) or "-",
            str(w.pid or "-"),
            w.host or "-",
            "-" if w.last_seen_s is None else f"{w.last_seen_s:.1f}s ago",
        )
        for w in workers
    ]
    return table(header, rows)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Return header and rows as left-aligned columns two spaces apart."""
    widths = [len(h) for h in header]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [tuple(header), *rows]
    ]


def clock(unix_s: float | None) -> str:
    """Return a Unix time as local "YYYY-MM-DD HH:MM:SS", or "-"."""
    if unix_s is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(unix_s))


def _preference(info: TaskInfo) -> str:
    if info.preferred_worker is None:
        return "-"
    return info.preferred_worker + (" (required)" if info.require_worker else "")


def _key(key: Any) -> str:
    if isinstance(key, bytes):
        return base64.b64encode(key).decode("ascii")
    return key if isinstance(key, str) else json.dumps(key)


def _fields(value: Any) -> tuple[dataclasses.Field[Any], ...]:
    # TaskHandle's client is no data; only fields shown in repr are printed.
    return tuple(f for f in dataclasses.fields(value) if f.repr)
