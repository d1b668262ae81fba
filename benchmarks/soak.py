"""The retention soak: push many no-op tasks through a broker with a short
retention and check that its memory and store stay flat.

    python -m benchmarks.soak --tasks 1000000 --retention 5

A broker and workers start on loopback (`LocalCluster`); one client submits
`echo` tasks with `submit_many`, keeping at most `--window` of them
unfinished. Progress is read from the store file, read-only: tasks ended =
tasks accepted - open rows (queued, assigned, running), since ended rows are
pruned. Failed or cancelled tasks are caught by id while their rows last
(`--retention` seconds). The broker's RSS is sampled every `--sample-every`
ended tasks; the run passes when the RSS at the end is within `--tolerance`
of the RSS at `--reference` ended tasks and no task failed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import psutil  # type: ignore[import-untyped]

from benchmarks.cluster import LocalCluster, clean_env

#: Seconds the workers get to come online.
START_TIMEOUT_S = 60.0
#: Seconds between looks at the store while the window is full.
POLL_S = 0.05
#: Seconds the broker and workers get after SIGTERM before SIGKILL.
STOP_GRACE_S = 15.0
#: Ended rows allowed in the store once retention has passed: the task of the
#: newest notification is always kept (see `Store.prune`).
ROWS_LEFT_ALLOWED = 1
_OPEN = ("queued", "assigned", "running")
_UNSUCCESSFUL = ("failed", "cancelled")


@dataclass(frozen=True)
class SoakConfig:
    """What to run."""

    tasks: int = 1_000_000
    retention: float = 5.0
    prune_batch: int | None = None
    workers: int = 2
    capacity: int = 4
    batch: int = 500
    window: int = 5000
    sample_every: int = 10_000
    reference: int = 100_000
    tolerance: float = 0.10
    deadline_s: float | None = None

    def overall_deadline_s(self) -> float:
        """Return the longest the whole run may take, in seconds."""
        if self.deadline_s is not None:
            return self.deadline_s
        return 120.0 + self.tasks / 200.0 + 3 * self.retention


@dataclass
class Sample:
    """The broker and its store after `ended` tasks ended."""

    ended: int
    elapsed_s: float
    rss_bytes: int
    store_bytes: int
    rows: int


@dataclass
class Progress:
    """What the run has seen so far."""

    accepted: int = 0
    ended: int = 0
    failed_ids: set[str] = field(default_factory=set)
    samples: list[Sample] = field(default_factory=list)


def run(config: SoakConfig, out: TextIO) -> dict[str, Any]:
    """Run the soak, writing progress lines to `out`; return its figures."""
    folder = Path(tempfile.mkdtemp(prefix="hakobu-soak-"))
    # Only the flags below configure the broker: no HAKOBU_* from the caller.
    cluster = LocalCluster(folder, db_name="soak.db", env=clean_env([]))
    deadline = time.monotonic() + config.overall_deadline_s()
    progress = Progress()
    problem: str | None = None
    try:
        broker = psutil.Process(_start(cluster, config))
        started = time.monotonic()
        problem = _drive(cluster, config, broker, progress, started, deadline, out)
        end = progress.samples[-1] if progress.samples else None
        drained = _drain(cluster.db, config, deadline) if problem is None else None
        broker_alive = (
            cluster.broker is not None and cluster.broker.popen.poll() is None
        )
    finally:
        cluster.stop(grace_s=STOP_GRACE_S)
    figures = _figures(config, progress, end, drained, broker_alive, problem)
    if figures["passed"]:
        shutil.rmtree(folder, ignore_errors=True)
    else:
        figures["logs"] = str(folder)
    return figures


def _start(cluster: LocalCluster, config: SoakConfig) -> int:
    """Start the broker and workers, wait for the workers; return the broker pid."""
    env = {}
    if config.prune_batch is not None:
        env["HAKOBU_PRUNE_BATCH"] = str(config.prune_batch)
    broker = cluster.start_broker(
        "--retention", repr(config.retention), "--log-level", "WARNING", env=env
    )
    for index in range(1, config.workers + 1):
        cluster.start_worker(
            f"soak_{index:03d}",
            "--capacity",
            str(config.capacity),
            "--log-level",
            "WARNING",
        )
    cluster.wait_online(config.workers, START_TIMEOUT_S)
    return broker.pid


def _drive(
    cluster: LocalCluster,
    config: SoakConfig,
    broker: psutil.Process,
    progress: Progress,
    started: float,
    deadline: float,
    out: TextIO,
) -> str | None:
    """Submit and watch until every task ended; return what went wrong, if anything."""
    from sdk import Client

    every = config.sample_every
    next_sample = every
    with Client(cluster.clients_endpoint, request_timeout=30.0) as client:
        while progress.ended < config.tasks:
            if time.monotonic() > deadline:
                return f"deadline passed with {progress.ended} of {config.tasks} ended"
            if cluster.broker is None or cluster.broker.popen.poll() is not None:
                return "the broker exited"
            while (
                progress.accepted < config.tasks
                and progress.accepted - progress.ended + config.batch <= config.window
            ):
                size = min(config.batch, config.tasks - progress.accepted)
                progress.accepted += len(client.submit_many([{"name": "echo"}] * size))
            _observe(cluster.db, progress)
            if progress.ended >= next_sample or progress.ended == config.tasks:
                sample = _sample(cluster.db, broker, progress.ended, started)
                progress.samples.append(sample)
                print(_line(sample, config), file=out, flush=True)
                next_sample = (progress.ended // every + 1) * every
            elif progress.accepted - progress.ended + config.batch > config.window:
                time.sleep(POLL_S)
    return None


def _observe(db: Path, progress: Progress) -> None:
    """Update ended and failed counts from the store file."""
    open_rows = _query(db, "SELECT count(*) FROM tasks WHERE state IN (?, ?, ?)", _OPEN)
    failed = _query(db, "SELECT id FROM tasks WHERE state IN (?, ?)", _UNSUCCESSFUL)
    progress.ended = progress.accepted - int(open_rows[0][0])
    progress.failed_ids.update(row[0] for row in failed)


def _sample(db: Path, broker: psutil.Process, ended: int, started: float) -> Sample:
    return Sample(
        ended=ended,
        elapsed_s=round(time.monotonic() - started, 3),
        rss_bytes=broker.memory_info().rss,
        store_bytes=_store_bytes(db),
        rows=_rows(db),
    )


def _drain(db: Path, config: SoakConfig, deadline: float) -> dict[str, Any]:
    """Wait for retention to pass and the last ended rows to be pruned."""
    # A pass runs at least every 10 s, more often for short retention.
    until = min(deadline, time.monotonic() + config.retention + 30.0)
    rows = _rows(db)
    while rows > ROWS_LEFT_ALLOWED and time.monotonic() < until:
        time.sleep(0.5)
        rows = _rows(db)
    return {"rows": rows, "store_bytes": _store_bytes(db)}


def _rows(db: Path) -> int:
    return int(_query(db, "SELECT count(*) FROM tasks")[0][0])


def _query(db: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run one statement on a read-only connection to the store file."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def _store_bytes(db: Path) -> int:
    """Return the size of the store: database file plus its WAL."""
    total = 0
    for path in (db, db.with_name(db.name + "-wal")):
        try:
            total += path.stat().st_size
        except FileNotFoundError:
            pass
    return total


def _line(sample: Sample, config: SoakConfig) -> str:
    rate = sample.ended / sample.elapsed_s if sample.elapsed_s else 0.0
    return (
        f"{sample.ended:>9,}/{config.tasks:,} ended  "
        f"rss {_mib(sample.rss_bytes):7.1f} MiB  "
        f"store {_mib(sample.store_bytes):7.1f} MiB  "
        f"rows {sample.rows:>7,}  "
        f"{rate:7.0f} tasks/s"
    )


def _mib(size: int) -> float:
    return size / 2**20


def _figures(
    config: SoakConfig,
    progress: Progress,
    end: Sample | None,
    drained: dict[str, Any] | None,
    broker_alive: bool,
    problem: str | None,
) -> dict[str, Any]:
    reference_at = min(config.reference, max(config.tasks // 2, 1))
    reference = next((s for s in progress.samples if s.ended >= reference_at), None)
    ratio = None
    if reference is not None and end is not None and reference.rss_bytes:
        ratio = round(end.rss_bytes / reference.rss_bytes, 4)
    problems = [problem] if problem else []
    if ratio is None:
        problems.append("no RSS samples to compare")
    elif abs(ratio - 1.0) > config.tolerance:
        problems.append(f"RSS ratio {ratio} outside ±{config.tolerance:.0%}")
    if progress.failed_ids:
        problems.append(f"{len(progress.failed_ids)} tasks failed or were cancelled")
    if drained is not None and drained["rows"] > ROWS_LEFT_ALLOWED:
        problems.append(f"{drained['rows']} rows left after retention passed")
    if not broker_alive:
        problems.append("the broker was not running at the end")
    return {
        "config": asdict(config),
        "accepted": progress.accepted,
        "ended": progress.ended,
        "failed": len(progress.failed_ids),
        "elapsed_s": end.elapsed_s if end else None,
        "tasks_per_s": round(end.ended / end.elapsed_s, 1) if end else None,
        "reference_at": reference_at,
        "rss_reference_bytes": reference.rss_bytes if reference else None,
        "rss_end_bytes": end.rss_bytes if end else None,
        "rss_ratio": ratio,
        "store_reference_bytes": reference.store_bytes if reference else None,
        "store_end_bytes": end.store_bytes if end else None,
        "rows_at_end": end.rows if end else None,
        "rows_after_retention": drained["rows"] if drained else None,
        "store_after_retention_bytes": drained["store_bytes"] if drained else None,
        "samples": [asdict(s) for s in progress.samples],
        "problems": problems,
        "passed": not problems,
    }


def _summary(figures: dict[str, Any]) -> str:
    def mib(key: str) -> str:
        value = figures[key]
        return "-" if value is None else f"{_mib(value):.1f} MiB"

    lines = [
        f"ended            {figures['ended']:,} of {figures['accepted']:,} accepted, "
        f"{figures['failed']} failed, {figures['tasks_per_s']} tasks/s",
        f"rss at {figures['reference_at']:,}  {mib('rss_reference_bytes')}",
        f"rss at end       {mib('rss_end_bytes')}  ratio {figures['rss_ratio']}",
        f"store            {mib('store_reference_bytes')} at "
        f"{figures['reference_at']:,}, {mib('store_end_bytes')} at end, "
        f"{mib('store_after_retention_bytes')} after retention",
        f"rows left        {figures['rows_at_end']} at end, "
        f"{figures['rows_after_retention']} after retention",
    ]
    verdict = "PASS" if figures["passed"] else "FAIL: " + "; ".join(figures["problems"])
    lines.append(
        f"result           {verdict} (tolerance ±{figures['config']['tolerance']:.0%})"
    )
    if "logs" in figures:
        lines.append(f"logs             {figures['logs']}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> tuple[SoakConfig, bool]:
    """Return the run's config and whether to print JSON."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.soak",
        description="Push many tasks through a broker with short retention and "
        "check that its RSS and store stay flat.",
    )
    add = parser.add_argument
    add(
        "--tasks",
        type=int,
        default=SoakConfig.tasks,
        help="tasks to push (default %(default)s)",
    )
    add(
        "--retention",
        type=float,
        default=SoakConfig.retention,
        help="the broker's retention_s: seconds an ended task is kept "
        "(default %(default)s)",
    )
    add(
        "--prune-batch",
        type=int,
        default=None,
        help="the broker's prune_batch (default: the setting's default)",
    )
    add(
        "--workers",
        type=int,
        default=SoakConfig.workers,
        help="worker processes (default %(default)s)",
    )
    add(
        "--capacity",
        type=int,
        default=SoakConfig.capacity,
        help="capacity of each worker (default %(default)s)",
    )
    add(
        "--batch",
        type=int,
        default=SoakConfig.batch,
        help="tasks per submit_many (default %(default)s)",
    )
    add(
        "--window",
        type=int,
        default=SoakConfig.window,
        help="most tasks submitted but not yet ended (default %(default)s)",
    )
    add(
        "--sample-every",
        type=int,
        default=SoakConfig.sample_every,
        help="ended tasks between RSS samples (default %(default)s)",
    )
    add(
        "--reference",
        type=int,
        default=SoakConfig.reference,
        help="ended tasks at which the reference RSS is taken, at most half "
        "of --tasks (default %(default)s)",
    )
    add(
        "--tolerance",
        type=float,
        default=SoakConfig.tolerance,
        help="largest relative RSS change that passes, 0.10 = ±10%% "
        "(default %(default)s)",
    )
    add(
        "--deadline",
        type=float,
        default=None,
        help="seconds the whole run may take (default 120 + tasks/200 + 3 × retention)",
    )
    add(
        "--json",
        action="store_true",
        help="print the figures as one JSON object on stdout, last; progress "
        "goes to stderr",
    )
    args = parser.parse_args(argv)
    for name in ("tasks", "workers", "capacity", "batch", "window", "sample_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.retention <= 0:
        parser.error("--retention must be above 0: the soak measures pruning")
    if args.window < args.batch:
        parser.error("--window must be at least --batch")
    config = SoakConfig(
        tasks=args.tasks,
        retention=args.retention,
        prune_batch=args.prune_batch,
        workers=args.workers,
        capacity=args.capacity,
        batch=args.batch,
        window=args.window,
        sample_every=args.sample_every,
        reference=args.reference,
        tolerance=args.tolerance,
        deadline_s=args.deadline,
    )
    return config, args.json


def main(argv: list[str] | None = None) -> int:
    """Run the soak from the command line; exit 0 on PASS, 1 on FAIL."""
    config, as_json = parse_args(argv)
    out = sys.stderr if as_json else sys.stdout
    print(
        f"soak: {config.tasks:,} tasks, retention {config.retention:g} s, "
        f"{config.workers} workers × {config.capacity}, batches of {config.batch}",
        file=out,
        flush=True,
    )
    figures = run(config, out)
    print(_summary(figures), file=out, flush=True)
    if as_json:
        print(json.dumps(figures))
    return 0 if figures["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
