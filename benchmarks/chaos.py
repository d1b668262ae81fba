"""Chaos benchmark: tasks flow while workers and the broker are SIGKILLed.

Starts a real broker and workers on free loopback ports with a temporary
store, submits tasks of a tiny handler that records each run in a ledger,
SIGKILLs a random worker every few seconds (and restarts it), SIGKILLs and
restarts the broker a few times on the same store and endpoints, and prints
the delivery rate and the handler runs beyond one per task.

    python benchmarks/chaos.py --tasks 2000 --workers 3 --kill-every 1.5 \\
        --broker-kills 2

Exits 0 when every accepted task succeeded with its own input as the result.
Every process it starts runs in its own session and is stopped by pid.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROJECT_DIR = Path(__file__).resolve().parent.parent
if str(PROJECT_DIR) not in sys.path:
    sys.path.insert(0, str(PROJECT_DIR))

from benchmarks.cluster import LocalCluster, clean_env  # noqa: E402
from sdk import Client, HakobuError  # noqa: E402

#: Environment variable naming the ledger file the handler appends to.
LEDGER_ENV = "HAKOBU_CHAOS_LEDGER"
#: The handler module workers load; every run appends "task attempt" first.
TASKS_MODULE = '''"""Chaos handler: record the run, sleep, return payload["i"]."""

import os
import time

from worker import task


@task("chaos")
def chaos(payload, ctx):
    line = f"{ctx.task_id} {ctx.attempt}\\n".encode()
    path = os.environ["HAKOBU_CHAOS_LEDGER"]
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
    time.sleep(payload["s"])
    return payload["i"]
'''
#: Fast timing: heartbeat 0.5 s, lost after 3 silent beats, ack timeout 2 s.
TIMING = {
    "HAKOBU_HEARTBEAT_INTERVAL_S": "0.5",
    "HAKOBU_LIVENESS": "3",
    "HAKOBU_ACK_TIMEOUT_S": "2",
}
WORKER_TIMING = {
    "HAKOBU_RECONNECT_MIN_S": "0.05",
    "HAKOBU_RECONNECT_MAX_S": "0.5",
    "HAKOBU_GRACE_S": "3",
}
#: Seconds a process gets after SIGTERM before SIGKILL, at the end.
STOP_GRACE_S = 5.0


@dataclass
class Stats:
    """What happened so far, for progress lines and the summary."""

    submitted: int = 0
    results: int = 0
    worker_kills: int = 0
    broker_kills: int = 0
    errors: list[str] = field(default_factory=list)


class Chaos(threading.Thread):
    """SIGKILL a random worker every `kill_every_s` and the broker a few times."""

    def __init__(
        self, procs: LocalCluster, args: argparse.Namespace, stats: Stats
    ) -> None:
        super().__init__(daemon=True)
        self.procs = procs
        self.args = args
        self.stats = stats
        self.random = random.Random(args.seed)
        self.done = threading.Event()

    def run(self) -> None:
        try:
            self._schedule()
        except Exception as exc:  # reported in the summary, not lost
            self.stats.errors.append(f"chaos: {type(exc).__name__}: {exc}")

    def _schedule(self) -> None:
        started_at = time.monotonic()
        next_kill_at = started_at + self.args.kill_every
        broker_due = [
            started_at + self.args.first_broker_kill + i * self.args.broker_every
            for i in range(self.args.broker_kills)
        ]
        while not self.done.wait(0.05):
            now = time.monotonic()
            if broker_due and now >= broker_due[0]:
                broker_due.pop(0)
                broker = self.procs.broker
                assert broker is not None
                self.procs.kill(broker)
                self.stats.broker_kills += 1
                self.done.wait(self.args.broker_down)
                self.procs.restart(broker)
            elif self.args.kill_every > 0 and now >= next_kill_at:
                next_kill_at = now + self.args.kill_every
                worker_id = self.random.choice(sorted(self.procs.workers))
                proc = self.procs.workers[worker_id]
                self.procs.kill(proc)
                self.stats.worker_kills += 1
                self.done.wait(self.args.restart_after)
                self.procs.restart(proc)


def progress(
    stats: Stats, total: int, started_at: float, stop: threading.Event
) -> None:
    """Print one progress line every two seconds until `stop` is set."""
    while not stop.wait(2.0):
        print(
            f"  {time.monotonic() - started_at:6.1f} s: submitted {stats.submitted}"
            f"/{total}, results {stats.results}, worker kills {stats.worker_kills}, "
            f"broker kills {stats.broker_kills}",
            flush=True,
        )


def drive(
    client: Client, args: argparse.Namespace, stats: Stats
) -> tuple[dict[int, Any], list[tuple[int, str]]]:
    """Submit every task, paced over `args.span` seconds, and collect results."""
    started_at = time.monotonic()
    handles = []
    for i in range(args.tasks):
        due = started_at + args.span * i / args.tasks
        if due > time.monotonic():
            time.sleep(due - time.monotonic())
        payload = {"i": i, "s": args.sleep}
        handles.append(client.submit("chaos", payload, retries=args.retries))
        stats.submitted += 1
    got: dict[int, Any] = {}
    lost: list[tuple[int, str]] = []
    deadline = time.monotonic() + args.budget
    for i, handle in enumerate(handles):
        try:
            got[i] = handle.result(timeout=max(1.0, deadline - time.monotonic()))
            stats.results += 1
        except (HakobuError, TimeoutError) as exc:
            lost.append((i, f"{type(exc).__name__}: {exc}"[:200]))
    return got, lost


def count_runs(ledger: Path) -> Counter[str]:
    """Return handler runs per task id from the ledger."""
    if not ledger.exists():
        return Counter()
    lines = ledger.read_text(encoding="utf-8").splitlines()
    return Counter(line.split()[0] for line in lines if len(line.split()) == 2)


def states(db: Path) -> Counter[str]:
    """Return how many tasks the store holds in each state."""
    conn = sqlite3.connect(db, timeout=10)
    try:
        return Counter(s for (s,) in conn.execute("select state from tasks"))
    finally:
        conn.close()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000, help="tasks to submit")
    parser.add_argument("--workers", type=int, default=3, help="worker processes")
    parser.add_argument("--capacity", type=int, default=4, help="slots per worker")
    parser.add_argument(
        "--kill-every", type=float, default=1.5, help="seconds between worker kills"
    )
    parser.add_argument(
        "--restart-after", type=float, default=0.3, help="seconds a worker stays down"
    )
    parser.add_argument(
        "--broker-kills", type=int, default=2, help="times the broker is SIGKILLed"
    )
    parser.add_argument(
        "--first-broker-kill", type=float, default=4.0, help="seconds to the first"
    )
    parser.add_argument(
        "--broker-every", type=float, default=6.0, help="seconds between broker kills"
    )
    parser.add_argument(
        "--broker-down", type=float, default=0.5, help="seconds the broker stays down"
    )
    parser.add_argument("--sleep", type=float, default=0.02, help="handler seconds")
    parser.add_argument("--retries", type=int, default=5, help="retries per task")
    parser.add_argument(
        "--span", type=float, default=20.0, help="seconds the submits are spread over"
    )
    parser.add_argument(
        "--budget", type=float, default=180.0, help="seconds to wait for results"
    )
    parser.add_argument("--seed", type=int, default=7, help="seed of the kill order")
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary folder and its logs"
    )
    args = parser.parse_args(argv)
    if args.tasks < 1 or args.workers < 1 or args.capacity < 1:
        parser.error("--tasks, --workers and --capacity must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="hakobu-chaos-"))
    (folder / "chaos_tasks.py").write_text(TASKS_MODULE, encoding="utf-8")
    ledger = folder / "ledger.txt"
    procs = LocalCluster(
        folder,
        db_name="store.db",
        env=clean_env([folder, PROJECT_DIR], {LEDGER_ENV: str(ledger), **TIMING}),
        cwd=folder,
    )
    stats = Stats()
    worker_ids = [f"w{k}" for k in range(1, args.workers + 1)]
    chaos = Chaos(procs, args, stats)
    stop_progress = threading.Event()
    got: dict[int, Any] = {}
    lost: list[tuple[int, str]] = []
    started_at = time.monotonic()
    print(
        f"chaos: {args.tasks} tasks, {args.workers} workers x {args.capacity}, "
        f"worker kill every {args.kill_every} s, {args.broker_kills} broker kills; "
        f"logs in {folder}",
        flush=True,
    )
    try:
        procs.start_broker()
        for worker_id in worker_ids:
            procs.start_worker(
                worker_id,
                "--capacity",
                str(args.capacity),
                "--tasks",
                "chaos_tasks",
                env=WORKER_TIMING,
            )
        with Client(procs.clients_endpoint, request_timeout=5.0) as client:
            procs.wait_online(worker_ids, 60.0, client=client, poll_s=0.1)
            reporter = threading.Thread(
                target=progress,
                args=(stats, args.tasks, started_at, stop_progress),
                daemon=True,
            )
            reporter.start()
            chaos.start()
            got, lost = drive(client, args, stats)
    except (HakobuError, RuntimeError, OSError) as exc:
        stats.errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        chaos.done.set()
        stop_progress.set()
        if chaos.is_alive():
            chaos.join(timeout=30)
        procs.stop(grace_s=STOP_GRACE_S)

    wrong = [i for i, value in got.items() if value != i]
    runs = count_runs(ledger)
    extra = sum(n - 1 for n in runs.values() if n > 1)
    rate = 100.0 * (len(got) - len(wrong)) / args.tasks
    stored = states(procs.db) if procs.db.exists() else Counter()
    elapsed = time.monotonic() - started_at
    if lost:
        print(f"lost {len(lost)}, e.g. {lost[:3]}")
    if wrong:
        print(f"wrong results for {len(wrong)} tasks, e.g. {wrong[:5]}")
    for error in stats.errors:
        print(f"error: {error}")
    print(f"store states: {dict(stored)}")
    ok = not lost and not wrong and not stats.errors and len(got) == args.tasks
    if ok and not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    print(
        f"chaos summary: delivery {len(got) - len(wrong)}/{args.tasks} = {rate:.2f}%, "
        f"extra handler runs {extra}, worker kills {stats.worker_kills}, "
        f"broker kills {stats.broker_kills}, {elapsed:.1f} s",
        flush=True,
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
