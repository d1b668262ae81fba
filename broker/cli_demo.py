"""`hakobu up --demo DIR`: checksum every file under DIR on the local cluster.

One `checksum` task per file, round-robin: a third prefer local_001, a third
require local_002 (with two workers or more), a third go anywhere. Each result
is checked against a local SHA-256, and the report counts deliveries,
honoured preferences and processed worker notifications in the store.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from broker.cli_render import table
from config.errors import HakobuError
from sdk.client import Client
from sdk.errors import ResultTimeout, TaskFailed

#: Most files the demo checksums.
MAX_FILES = 2000
#: Folders never walked into (virtual environments are also found by pyvenv.cfg).
SKIP_DIRS = frozenset(
    {".git", ".hg", ".svn", "__pycache__", ".venv", "venv", "node_modules"}
    | {".tox", ".nox", ".mypy_cache", ".pytest_cache", ".ruff_cache"}
)
#: Up to this many files, the report lists each one; beyond, one line per worker.
MAX_TABLE_ROWS = 40
#: Seconds the whole demo may take, plus this much per file.
BASE_BUDGET_S = 120.0
PER_FILE_BUDGET_S = 0.5


@dataclass
class Outcome:
    """One file's task and how it ended."""

    path: Path
    preference: str
    target: str | None
    task_id: str = ""
    state: str = "lost"
    worker: str | None = None
    sha256: str = ""
    verified: bool = False


def run_demo(
    client: Client,
    root: Path,
    ids: list[str],
    db: str,
    stop: threading.Event,
    log_dir: Path,
) -> int:
    """Run the checksum workload and print its report; 0 when every task succeeded."""
    skip = {Path(db).resolve(), *(Path(db + s).resolve() for s in ("-wal", "-shm"))}
    files = collect_files(root.resolve(), skip, log_dir.resolve())
    if not files:
        typer.echo(f"error: no files under {root}", err=True)
        return 1
    started = time.monotonic()
    outcomes = [_plan(path, n, ids) for n, path in enumerate(files)]
    items = [_item(o) for o in outcomes]
    for outcome, handle in zip(outcomes, client.submit_many(items), strict=True):
        outcome.task_id = handle.id
    typer.echo(f"submitted {len(outcomes)} checksum tasks")

    _collect(client, outcomes, stop)
    _report(outcomes, root.resolve(), db)
    typer.echo(f"elapsed {time.monotonic() - started:.1f} s")
    return 0 if all(o.state == "succeeded" and o.verified for o in outcomes) else 1


def collect_files(root: Path, skip: set[Path], log_dir: Path) -> list[Path]:
    """Return up to MAX_FILES regular files under root, sorted, skipping noise."""
    found: list[Path] = []
    for folder, dirs, names in os.walk(root):
        here = Path(folder)
        dirs[:] = sorted(
            d
            for d in dirs
            if d not in SKIP_DIRS
            and not (here / d / "pyvenv.cfg").exists()
            and (here / d).resolve() != log_dir
        )
        for name in sorted(names):
            path = here / name
            if path.is_symlink() or not path.is_file() or path.resolve() in skip:
                continue
            found.append(path)
            if len(found) >= MAX_FILES:
                return found
    return found


def _plan(path: Path, n: int, ids: list[str]) -> Outcome:
    if n % 3 == 0:
        return Outcome(path, f"prefers {ids[0]}", ids[0])
    if n % 3 == 1 and len(ids) >= 2:
        return Outcome(path, f"requires {ids[1]}", ids[1])
    return Outcome(path, "any", None)


def _item(outcome: Outcome) -> dict[str, Any]:
    item: dict[str, Any] = {"name": "checksum", "payload": str(outcome.path)}
    if outcome.target is not None:
        item["preferred_worker"] = outcome.target
        item["require_worker"] = outcome.preference.startswith("requires")
    return item


def _collect(client: Client, outcomes: list[Outcome], stop: threading.Event) -> None:
    """Wait for every result, with a progress line, until done, out of time or stop."""
    deadline = time.monotonic() + BASE_BUDGET_S + PER_FILE_BUDGET_S * len(outcomes)
    done = Counter[str]()
    for outcome in outcomes:
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                value = client.result(outcome.task_id, timeout=1.0)
            except ResultTimeout:
                continue
            except TaskFailed as exc:
                outcome.state = exc.state
            except HakobuError as exc:
                typer.echo(f"\nerror: {exc}", err=True)
                return
            else:
                outcome.state = "succeeded"
                outcome.sha256 = str(value.get("sha256", ""))
                outcome.verified = outcome.sha256 == _sha256(outcome.path)
            outcome.worker = client.status(outcome.task_id).worker_id
            break
        done[outcome.state] += 1
        _progress(done, len(outcomes))
    typer.echo("", err=True)


def _progress(done: Counter[str], total: int) -> None:
    count = sum(done.values())
    line = f"results {count}/{total}: {done['succeeded']} succeeded"
    line += f", {count - done['succeeded']} not"
    if sys.stderr.isatty():
        typer.echo("\r" + line, err=True, nl=False)
    elif count == total or count % max(1, total // 4) == 0:
        typer.echo(line, err=True)


def _report(outcomes: list[Outcome], root: Path, db: str) -> None:
    rows: list[tuple[str, ...]]
    if len(outcomes) <= MAX_TABLE_ROWS:
        rows = [
            (
                str(o.path.relative_to(root)),
                o.worker or "-",
                o.sha256[:12] or o.state,
                o.preference + (" (kept)" if o.target and o.worker == o.target else ""),
            )
            for o in outcomes
        ]
        lines = table(("FILE", "WORKER", "SHA256", "PREFERENCE"), rows)
    else:
        per_worker = Counter(o.worker or "-" for o in outcomes)
        kept = Counter(o.worker for o in outcomes if o.target and o.worker == o.target)
        rows = [(w, str(n), str(kept[w])) for w, n in sorted(per_worker.items())]
        lines = table(("WORKER", "TASKS", "PREFERENCES KEPT HERE"), rows)
    typer.echo("\n".join(lines))

    states = Counter(o.state for o in outcomes)
    wanted = [o for o in outcomes if o.target]
    honoured = sum(o.worker == o.target for o in wanted)
    verified = sum(o.verified for o in outcomes)
    typer.echo(
        f"submitted {len(outcomes)}, succeeded {states['succeeded']}, "
        f"failed {states['failed'] + states['cancelled']}, lost {states['lost']}"
    )
    typer.echo(f"preferences honoured {honoured}/{len(wanted)}")
    typer.echo(f"checksums verified {verified}/{len(outcomes)}")
    typer.echo(f"notifications processed {_notifications(db, outcomes)}")


def _notifications(db: str, outcomes: list[Outcome]) -> str:
    """Return "processed/total" of the demo's worker_notifications rows."""
    ids = {o.task_id for o in outcomes}
    try:
        store = sqlite3.connect(f"file:{Path(db).resolve()}?mode=ro", uri=True)
        try:
            rows = store.execute("select task_id, processed from worker_notifications")
            mine = [processed for task_id, processed in rows if task_id in ids]
        finally:
            store.close()
    except sqlite3.Error as exc:
        return f"n/a (store not readable: {exc})"
    return f"{sum(1 for p in mine if p)}/{len(mine)}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except OSError:
        return ""
    return digest.hexdigest()
